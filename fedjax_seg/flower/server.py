"""The server of a Flower federation: the project's aggregator and server update.

    python -m fedjax_seg.flower.server --config configs/lgg_fedavg.py --workdir DIR \
        --address 0.0.0.0:8080 [--num_hospitals K] [--config.x=y ...]
        [--ca_cert ca.crt --server_cert server.pem --server_key server.key]   # TLS

Each round (``round`` = the server state's round, restored from ``DIR/checkpoints``):
wait until hospitals 0..K-1 are connected (each says which it is, its site and a hash of
its config, which must equal the server's), send every one the broadcast global model
and (round, hospital, K), receive the K declared uploads and stats, stack them in
hospital order, run ``alg.aggregate`` + ``alg.server_update`` (jitted, keys from
``algorithm.round_keys``) and save the state with ``runlog.Checkpointer``; one row per
round is appended to ``DIR/metrics.jsonl`` (weights, per-client stats, exclusions, time).
At the end: ``DIR/final_model.msgpack`` (load it with ``fedjax_seg.infer``) and
``DIR/flower_results.json``. A hospital that fails a round stops the server (nothing is
aggregated); re-running the same command resumes from the last completed round, and the
hospitals (which keep retrying) reconnect.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Dict, List, Optional

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import jax
import numpy as np

from fedjax_seg import experiment, runlog
from fedjax_seg.fl import train as fl_train
from fedjax_seg.flower import common

RESULTS = "flower_results.json"


class FederationError(RuntimeError):
  """A round that cannot be aggregated as the in-process round would (missing or
  inconsistent hospitals)."""


class ServerCore:
  """The Flower-independent server: state, rounds, checkpoints, metrics."""

  def __init__(self, config, workdir: str, num_hospitals: int = 0, verbose: bool = True):
    common.check_config(config)
    self.config, self.workdir, self.verbose = config, workdir, verbose
    self.k = common.num_hospitals(config, num_hospitals)
    self.rounds = int(config.fl.rounds)
    self.digest = common.config_digest(config)
    self.fed = self.state = None
    self.names: List[str] = []
    self.round_s: List[float] = []
    self.results: Optional[Dict] = None
    self.t_start = time.time()
    os.makedirs(workdir, exist_ok=True)
    self.ckpt = runlog.Checkpointer(workdir)

  def rounds_done_on_disk(self) -> int:
    return int(self.ckpt.latest_step() or 0)

  def setup(self, props: Dict[int, Dict]) -> None:
    """Builds the algorithm from the hospitals' properties (sample shape, classes) and
    restores the latest checkpoint."""
    if sorted(props) != list(range(self.k)):
      raise FederationError(f"hospitals {sorted(props)}, expected 0..{self.k - 1}")
    for h, p in props.items():
      if p["config_digest"] != self.digest:
        raise FederationError(f"hospital {h} ({p.get('site')}) runs another config (digest "
                              f"{p['config_digest']} != the server's {self.digest})")
    shapes = {(p["sample_shape"], int(p["num_classes"])) for p in props.values()}
    if len(shapes) != 1:
      raise FederationError(f"hospitals disagree on (sample shape, classes): {sorted(shapes)}")
    shape, num_classes = shapes.pop()
    self.names = [str(props[h]["site"]) for h in range(self.k)]
    if self.names != sorted(self.names) and self.verbose:
      print(f"[flower] warning: sites {self.names} are not in sorted order of hospital index; "
            f"the in-process by-site run orders clients by sorted site name", flush=True)
    if self.fed is not None:
      return
    self.fed = common.build(self.config, self.k, num_classes,
                            tuple(int(s) for s in shape.split(",")), server=True)
    self.upload_like, self.stats_like = common.upload_like(self.fed)
    self._broadcast = common.broadcast_step(self.fed)
    self._server_step = common.server_step(self.fed)
    experiment.save_config(self.config, self.workdir)
    state = common.initial_state(self.fed)
    _, restored = self.ckpt.restore_latest(state)
    self.state = restored if restored is not None else state
    start = int(self.state.round)
    self.log = runlog.MetricsLog(self.workdir, resume_from=start if restored is not None else None,
                                 key="round")
    if self.verbose:
      print(f"[flower] {self.config.algorithm}: {self.k} hospitals {self.names}; "
            + (f"resumed at round {start}" if restored is not None else "round 0")
            + f" of {self.rounds}", flush=True)
    self.t_round = time.time()

  @property
  def round(self) -> int:
    return int(self.state.round)

  def broadcast(self) -> List[np.ndarray]:
    """The arrays every hospital receives this round: the broadcast global model only."""
    return common.to_wire(self._broadcast(self.state))

  def aggregate(self, received: Dict[int, tuple]) -> None:
    """received: {hospital: (upload arrays, metrics)} of this round, every hospital."""
    rnd = self.round
    if sorted(received) != list(range(self.k)):
      raise FederationError(f"round {rnd}: uploads from hospitals {sorted(received)}, "
                            f"expected 0..{self.k - 1}")
    uploads, metrics = [], []
    for h in range(self.k):
      arrays, m = received[h]
      m = dict(m)
      if int(m.pop(common.HOSPITAL)) != h or int(m.pop(common.ROUND)) != rnd:
        raise FederationError(f"round {rnd}: hospital {h}'s upload is labelled otherwise")
      uploads.append(common.upload_from_wire(self.fed.alg, arrays, self.upload_like,
                                             f"hospital {h} upload"))
      metrics.append(m)
    upload = jax.tree.map(lambda *a: np.stack(a), *uploads)
    stats = common.stats_from_metrics(metrics, self.stats_like)
    self.state, info = self._server_step(self.state, upload, stats)
    now = time.time()
    self.round_s.append(now - self.t_round)
    self.t_round = now
    row = {"round": rnd + 1, **fl_train.info_row(info, self.names),
           "round_s": self.round_s[-1], "time_s": now - self.t_start}
    self.log.append(row)  # a row past the checkpoint is dropped on resume (runlog.MetricsLog)
    self.ckpt.save(rnd + 1, self.state)
    if self.verbose:
      w = " ".join(f"{x:.2f}" for x in row["weights"])
      print(f"[flower] round {rnd + 1}/{self.rounds}  train_loss {row['train_loss']:.4f}  "
            f"w [{w}] {fl_train.status(row)} ({row['round_s']:.1f}s)", flush=True)
    if self.round >= self.rounds:
      self.finish()

  def finish(self) -> Dict:
    """final_model.msgpack and flower_results.json of the current state (after the
    last round, before the hospitals are told to leave)."""
    self.ckpt.close()
    out = {"algorithm": self.config.algorithm, "rounds": self.round, "hospitals": self.names,
           "final_model": experiment.save_model(self.workdir, self.state.variables),
           "num_params": experiment.num_params(self.state.variables),
           "round_s": self.round_s, "wall_time_s": time.time() - self.t_start}
    runlog.write_json(os.path.join(self.workdir, RESULTS), out)
    self.results = out
    if self.verbose:
      print(f"[flower] {self.round} rounds done; global model in "
            f"{os.path.join(self.workdir, out['final_model'])}", flush=True)
    return out


def strategy(core: ServerCore, wait_s: float = 600.0, rpc_timeout_s: Optional[float] = 120.0):
  """A ``flwr.server.strategy.Strategy`` driving ``core``."""
  from flwr.common import (Code, FitIns, GetPropertiesIns, ndarrays_to_parameters,
                           parameters_to_ndarrays)
  from flwr.server.strategy import Strategy

  class FedJaxStrategy(Strategy):
    def __init__(self):
      self.props: Dict[str, Dict] = {}   # cid -> the hospital's properties
      self.sent: Dict[str, int] = {}     # cid -> hospital, this round

    def __repr__(self):
      return f"FedJaxStrategy({core.config.algorithm}, K={core.k})"

    def hospitals(self, client_manager):
      """{hospital: proxy} of hospitals 0..K-1, waiting up to wait_s for them."""
      deadline = time.time() + wait_s
      while True:
        client_manager.wait_for(core.k, timeout=max(1, int(deadline - time.time())))
        found: Dict[int, list] = {}
        for cid, proxy in client_manager.all().items():
          if cid not in self.props:
            res = proxy.get_properties(GetPropertiesIns(config={}), timeout=rpc_timeout_s,
                                       group_id=None)
            if res.status.code != Code.OK:
              continue
            self.props[cid] = dict(res.properties)
          found.setdefault(int(self.props[cid][common.HOSPITAL]), []).append(proxy)
        bad = sorted(h for h in found if not 0 <= h < core.k)
        if bad:
          raise FederationError(f"hospital indices {bad} outside 0..{core.k - 1}")
        if sorted(found) == list(range(core.k)) and all(len(v) == 1 for v in found.values()):
          return {h: v[0] for h, v in found.items()}
        if time.time() > deadline:  # a duplicate may be a stale connection: wait it out
          raise FederationError(f"after {wait_s:.0f}s connected hospitals are "
                                f"{ {h: len(v) for h, v in sorted(found.items())} }, expected "
                                f"one each of 0..{core.k - 1}")
        time.sleep(0.2)

    def initialize_parameters(self, client_manager):
      hosp = self.hospitals(client_manager)
      core.setup({h: self.props[p.cid] for h, p in hosp.items()})
      return ndarrays_to_parameters(common.to_wire(core.state.variables))

    def configure_fit(self, server_round, parameters, client_manager):
      if core.round >= core.rounds:
        return []
      hosp = self.hospitals(client_manager)
      core.setup({h: self.props[p.cid] for h, p in hosp.items()})  # checks reconnected ones
      params = ndarrays_to_parameters(core.broadcast())
      self.sent = {p.cid: h for h, p in hosp.items()}
      return [(hosp[h], FitIns(params, {common.ROUND: core.round, common.HOSPITAL: h,
                                        common.NUM_CLIENTS: core.k}))
              for h in range(core.k)]

    def aggregate_fit(self, server_round, results, failures):
      if failures:
        raise FederationError(
            f"round {core.round + 1}: {len(failures)} hospital(s) failed ({failures[0]!r}); "
            f"nothing of this round was aggregated. Re-run the server to resume after round "
            f"{core.round} (its last checkpoint)")
      received = {}
      for proxy, res in results:
        h = self.sent.get(proxy.cid)
        if h is None or h in received:
          raise FederationError(f"round {core.round}: an upload from a client not asked")
        received[h] = (parameters_to_ndarrays(res.parameters), res.metrics)
      core.aggregate(received)
      return ndarrays_to_parameters(common.to_wire(core.state.variables)), {}

    def configure_evaluate(self, server_round, parameters, client_manager):
      return []

    def aggregate_evaluate(self, server_round, results, failures):
      return None, {}

    def evaluate(self, server_round, parameters):
      return None

  return FedJaxStrategy()


def serve(core: ServerCore, address: str, certificates=None, wait_s: float = 600.0,
          round_timeout_s: Optional[float] = None) -> Dict:
  """Runs the remaining rounds over Flower (gRPC at ``address``); returns flower_results.json's dict."""
  remaining = core.rounds - core.rounds_done_on_disk()
  if remaining <= 0:  # already done (the last round wrote the results): no hospital needed
    raise FederationError(f"{core.workdir} already holds all {core.rounds} rounds; its "
                          f"{experiment.FINAL_MODEL} is the result")
  import flwr
  flwr.server.start_server(server_address=address,
                           config=flwr.server.ServerConfig(num_rounds=remaining,
                                                           round_timeout=round_timeout_s),
                           strategy=strategy(core, wait_s), certificates=certificates)
  if core.state is None or core.round < core.rounds:
    raise FederationError(f"stopped at round {0 if core.state is None else core.round} of "
                          f"{core.rounds}")
  return core.results


def main(argv=None):
  sys.path.insert(0, os.getcwd())  # so that configs/*.py can import configs.*
  from absl import app, flags
  from ml_collections import config_flags

  config_flag = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                                lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, "Output directory (resumes from its checkpoints).")
  address = flags.DEFINE_string("address", "0.0.0.0:8080", "HOST:PORT to listen on.")
  k_flag = flags.DEFINE_integer("num_hospitals", 0, "K (default: config.fl.num_clients, else "
                                "the phantom's sites).")
  wait = flags.DEFINE_float("wait_s", 600.0, "How long to wait for all hospitals to connect.")
  round_timeout = flags.DEFINE_float("round_timeout_s", None, "A round's limit (default none).")
  ca = flags.DEFINE_string("ca_cert", None, "TLS: PEM CA certificate.")
  cert = flags.DEFINE_string("server_cert", None, "TLS: PEM server certificate.")
  key = flags.DEFINE_string("server_key", None, "TLS: PEM server private key.")
  flags.mark_flags_as_required(["config", "workdir"])

  def run(args):
    common.start_cli(args)
    tls = [ca.value, cert.value, key.value]
    if any(tls) and not all(tls):
      raise app.UsageError("TLS needs all of --ca_cert, --server_cert, --server_key")
    certificates = tuple(open(p, "rb").read() for p in tls) if all(tls) else None
    from fedjax_seg import compile_cache
    compile_cache.enable(config_flag.value.get("compile_cache_dir"))
    common.quiet_flower_logs()
    try:
      core = ServerCore(config_flag.value, workdir.value, k_flag.value)
      serve(core, address.value, certificates, wait.value, round_timeout.value)
    except (ValueError, FileNotFoundError, FederationError) as e:
      if os.environ.get("FEDJAX_SEG_TRACEBACK"):
        raise
      print(f"error: {e}", file=sys.stderr)
      common.exit_now(2)  # not sys.exit: Flower's gRPC threads would keep the process alive
    common.exit_now(0)  # checkpoints, metrics, final model and results are written and closed

  app.run(run, argv=argv)


if __name__ == "__main__":
  main()
