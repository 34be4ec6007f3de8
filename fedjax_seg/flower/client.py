"""One hospital of a Flower federation: its own data, the algorithm's client update.

    python -m fedjax_seg.flower.client --config configs/lgg_fedavg.py --hospital K \
        --data_root /data/my_hospital --address SERVER:PORT [--config.x=y ...]
        [--root_certificates ca.crt]          # TLS (docs/flower.md); --insecure otherwise

The hospital reads only ``--data_root`` (one site's patients; it keeps the train
patients the pooled by-site split gives site K, ``common.hospital_split``). Each round
the server sends the global model and (round, hospital, K); the hospital runs the
jitted ``alg.client_update`` with client key ``c_keys[K]`` of
``algorithm.round_keys(scheme, fold_in(round_key, round), K)`` and sends back exactly
the declared upload (``alg.uploads``, leaves in ``jax.tree.leaves`` order) plus its
stats (num_samples, train_loss, cost/ce/dice pre/post) as metrics. The process stays
up across rounds (one compilation) and exits when the server ends the run.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
from typing import Dict, Optional

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # nothing leaves the machine but the upload

from fedjax_seg.flower import common


class HospitalClient:
  """The Flower-independent core of a hospital (fit() as the NumPyClient's)."""

  def __init__(self, config, hospital: int, data_root: Optional[str] = None,
               verbose: bool = True):
    common.check_config(config)
    self.config, self.hospital, self.verbose = config, int(hospital), verbose
    self.local = common.load_hospital(config, self.hospital, data_root, verbose=verbose)
    self.digest = common.config_digest(config)
    self._fed: Dict[int, tuple] = {}
    self._warm: Optional[threading.Thread] = None
    if verbose:
      print(f"[flower] hospital {self.hospital} (site {self.local.site}): "
            f"{len(self.local.train_patients)} train patients, "
            f"{int(self.local.data.valid.sum())} samples from {self.local.root}", flush=True)

  def properties(self) -> Dict:
    return {common.HOSPITAL: self.hospital, "site": self.local.site,
            "num_classes": self.local.num_classes,
            "sample_shape": ",".join(str(s) for s in self.local.sample_shape),
            "config_digest": self.digest}

  def _federation(self, k: int):
    if k not in self._fed:
      if not 0 <= self.hospital < k:
        raise ValueError(f"hospital {self.hospital} is not one of the server's {k} hospitals")
      fed = common.build(self.config, k, self.local.num_classes, self.local.sample_shape,
                         server=False)
      self._fed[k] = (fed, common.variables_like(fed), common.client_step(fed))
    return self._fed[k]

  def warm_up(self, k: int) -> None:
    """Compiles the client update for K = ``k`` hospitals (one call on a zero model, result
    dropped), so that round 1 does not wait for the compilation."""
    import jax
    import numpy as np
    _, like, step = self._federation(k)
    zeros = jax.tree.map(lambda l: np.zeros(l.shape, l.dtype), like)
    jax.block_until_ready(step(zeros, self.local.data, 0, self.hospital))

  def warm_up_in_background(self, k: int) -> None:
    """:meth:`warm_up` in a thread while the hospital connects; fit() waits for it. A wrong
    ``k`` costs one compilation (fit compiles for the server's K)."""
    def run():
      try:
        self.warm_up(k)
      except Exception as e:  # noqa: BLE001 (fit reports the real error, if any)
        print(f"[flower] hospital {self.hospital}: warm-up for K={k} failed ({e!r})",
              flush=True)
    self._warm = threading.Thread(target=run, name="warm-up", daemon=True)
    self._warm.start()

  def fit(self, arrays, ins: Dict):
    """(global model arrays, {round, hospital, num_clients}) -> (upload arrays, s_k, metrics)."""
    if self._warm is not None:
      self._warm.join()
      self._warm = None
    if int(ins[common.HOSPITAL]) != self.hospital:
      raise ValueError(f"message for hospital {ins[common.HOSPITAL]} reached hospital "
                       f"{self.hospital}")
    rnd, k = int(ins[common.ROUND]), int(ins[common.NUM_CLIENTS])
    fed, like, step = self._federation(k)
    t0 = time.perf_counter()
    bcast = common.from_wire(arrays, like, "global model")
    upload, stats = step(bcast, self.local.data, rnd, self.hospital)
    wire = common.upload_to_wire(fed.alg, upload)
    metrics = common.stats_to_metrics(stats)
    if self.verbose:
      print(f"[flower] hospital {self.hospital} round {rnd + 1}: train_loss "
            f"{metrics['train_loss']:.4f} dice {metrics['dice_pre']:.3f}->"
            f"{metrics['dice_post']:.3f} ({time.perf_counter() - t0:.3f}s)", flush=True)
    return wire, int(round(metrics["num_samples"])), {
        common.HOSPITAL: self.hospital, common.ROUND: rnd, **metrics}


def numpy_client(core: HospitalClient):
  """A ``flwr.client.NumPyClient`` around ``core``."""
  import flwr

  class _Client(flwr.client.NumPyClient):
    def get_properties(self, config):
      return core.properties()

    def get_parameters(self, config):
      raise RuntimeError("the server initialises the global model itself; it never asks a "
                         "hospital for one")

    def fit(self, parameters, config):
      return core.fit(parameters, config)

  return _Client()


def start(core: HospitalClient, address: str, root_certificates: Optional[bytes] = None,
          max_wait_s: Optional[float] = None) -> None:
  """Connects to the server and serves rounds until the server ends the run. A lost
  connection (the server stopped or restarted) is retried, for up to ``max_wait_s``
  (default: forever); the compiled client update is kept across reconnections."""
  import flwr
  import grpc
  client = numpy_client(core).to_client()
  lost_since = None
  while True:
    try:
      flwr.client.start_client(server_address=address, client=client,
                               insecure=root_certificates is None,
                               root_certificates=root_certificates, max_wait_time=max_wait_s)
      return  # the server ended the run
    except grpc.RpcError as e:
      now = time.time()
      lost_since = lost_since or now
      if max_wait_s is not None and now - lost_since > max_wait_s:
        raise
      if core.verbose:
        print(f"[flower] hospital {core.hospital}: connection lost ({e.code()}); "
              f"reconnecting to {address}", flush=True)
      time.sleep(1.0)


def main(argv=None):
  sys.path.insert(0, os.getcwd())  # so that configs/*.py can import configs.*
  from absl import app, flags
  from ml_collections import config_flags

  config_flag = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                                lock_config=True)
  hospital = flags.DEFINE_integer("hospital", None, "This hospital's index K (0-based): its "
                                  "site's position in the sorted site names.")
  data_root = flags.DEFINE_string("data_root", None, "This hospital's data folder (default: "
                                  "config.data.root).")
  address = flags.DEFINE_string("address", "127.0.0.1:8080", "The server's HOST:PORT.")
  certs = flags.DEFINE_string("root_certificates", None, "PEM CA certificate of the server "
                              "(TLS); without it the connection is insecure.")
  max_wait = flags.DEFINE_float("max_wait_s", None, "Give up reconnecting after this many "
                                "seconds (default: retry forever).")
  k_flag = flags.DEFINE_integer("num_hospitals", 0, "K, to compile the client update while "
                                "connecting (default: config.fl.num_clients, else the "
                                "phantom's sites; the server's K is what counts).")
  flags.mark_flags_as_required(["config", "hospital"])

  def run(args):
    common.start_cli(args)
    from fedjax_seg import compile_cache
    compile_cache.enable(config_flag.value.get("compile_cache_dir"))
    common.quiet_flower_logs()
    try:
      core = HospitalClient(config_flag.value, hospital.value, data_root.value)
    except (ValueError, FileNotFoundError) as e:
      if os.environ.get("FEDJAX_SEG_TRACEBACK"):
        raise
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    ca = open(certs.value, "rb").read() if certs.value else None
    k = k_flag.value or int(config_flag.value.fl.num_clients) or \
        len(config_flag.value.data.phantom.sites)
    import flwr  # noqa: F401  (imported before the warm-up thread competes for the GIL)
    core.warm_up_in_background(k)
    start(core, address.value, ca, max_wait.value)
    common.exit_now(0)  # the server ended the run; a hospital writes nothing

  app.run(run, argv=argv)


if __name__ == "__main__":
  main()
