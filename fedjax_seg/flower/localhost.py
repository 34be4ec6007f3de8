"""A whole Flower federation on one machine: one server process and one process per
hospital, each hospital reading only its own folder.

    python -m fedjax_seg.flower.localhost --config configs/lgg_fedavg.py --workdir DIR \
        [--port 0] [--hospitals_dir H] [--tls] [--config.x=y ...]
    python -m fedjax_seg.flower.localhost split --config configs/lgg_fedavg.py \
        --hospitals_dir H [--config.x=y ...]       # only the per-site folders

writes one folder per site (``H``, default ``DIR/hospitals/<k>_<site>/kaggle_3m/...``,
copied from config.data.root or the phantom; Kaggle LGG layout), then starts
``fedjax_seg.flower.server`` and K ``fedjax_seg.flower.client`` processes on
127.0.0.1 with the same config and overrides: insecure, or with ``--tls`` over TLS with
self-signed certificates in ``DIR/certificates`` (``fedjax_seg.flower.certs``). Logs:
``DIR/logs/``.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def split_sites(config, out_dir: str, verbose: bool = True) -> List[str]:
  """Copies each site's patient folders (Kaggle LGG layout) of config.data.root, or of the
  phantom written for config.data, into ``out_dir/<k>_<site>/kaggle_3m/``; k = the site's
  position in sorted site names (the by-site client order). Returns the K folders."""
  from fedjax_seg.data import layouts, pipeline
  if config.data.layout != "lgg":
    raise ValueError(f"split_sites copies Kaggle LGG folders; data.layout={config.data.layout!r}")
  root = pipeline.resolve_root(config.data, verbose)
  patients = layouts.find_lgg(root)
  sites = sorted({p.site for p in patients})
  roots = [os.path.join(out_dir, f"{k}_{site}") for k, site in enumerate(sites)]
  for k, site in enumerate(sites):
    base = os.path.join(roots[k], "kaggle_3m")
    if os.path.isdir(base):
      continue
    tmp = roots[k] + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for p in patients:
      if p.site == site:
        shutil.copytree(p.folder, os.path.join(tmp, "kaggle_3m", p.id))
    shutil.rmtree(roots[k], ignore_errors=True)
    os.replace(tmp, roots[k])
  if verbose:
    print(f"[flower] {len(sites)} hospital folders in {out_dir}: {', '.join(sites)}", flush=True)
  return roots


class Federation:
  """The running processes of a localhost federation (``start``)."""

  def __init__(self, server: subprocess.Popen, clients: List[subprocess.Popen], logs: List[str],
               address: str):
    self.server, self.clients, self.logs, self.address = server, clients, logs, address

  def wait(self, timeout_s: float = 600.0) -> Dict:
    """Waits for the server, then the hospitals (which leave when the server ends the run);
    kills what is still running after ``timeout_s``. Returns the exit codes."""
    deadline = time.time() + timeout_s
    procs = [p for p in [self.server] + self.clients if p is not None]
    try:
      if self.server is not None:
        self.server.wait(max(1.0, deadline - time.time()))
      for p in self.clients:
        p.wait(max(1.0, min(60.0, deadline - time.time())))
    except subprocess.TimeoutExpired:
      pass
    finally:
      for p in procs:
        if p.poll() is None:
          p.kill()
          p.wait()
    return {"server": None if self.server is None else self.server.returncode,
            "clients": [p.returncode for p in self.clients]}

  def stop(self) -> None:
    for p in [self.server] + self.clients:
      if p is not None and p.poll() is None:
        p.kill()
        p.wait()

  def log(self, i: int = 0) -> str:
    with open(self.logs[i]) as f:
      return f.read()


def start(config_args: Sequence[str], workdir: str, roots: Sequence[str], port: int = 0,
          client_prefix: Sequence[str] = (), server_prefix: Sequence[str] = (),
          env: Optional[Dict[str, str]] = None,
          server_args: Sequence[str] = (), client_args: Sequence[str] = (),
          start_server: bool = True, start_clients: bool = True,
          hospitals: Optional[Sequence[int]] = None) -> Federation:
  """Starts the server (writing ``workdir``) and one client per folder of ``roots``.

  config_args: ``--config=FILE`` and any ``--config.x=y`` overrides, given to every process.
  client_prefix / server_prefix: a command that runs in place of ``python -m
  fedjax_seg.flower.client`` / ``... .server`` with the same arguments (tests: wrappers
  recording what crosses the network); default ``sys.executable -m ...``.
  server_args / client_args: more flags for the server / every client (TLS: see
  :func:`tls_args`). hospitals: the indices k of the clients to start (default: all; a
  hospital restarted alone keeps its index and folder).
  """
  port = port or free_port()
  address = f"127.0.0.1:{port}"
  logs_dir = os.path.join(workdir, "logs")
  os.makedirs(logs_dir, exist_ok=True)
  env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", **(env or {})}
  cwd = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

  def spawn(cmd, log):
    f = open(log, "a")
    try:
      return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    finally:
      f.close()

  logs = [os.path.join(logs_dir, "server.log")]
  server = None
  if start_server:
    prefix = list(server_prefix) or [sys.executable, "-m", "fedjax_seg.flower.server"]
    server = spawn([*prefix, *config_args,
                    f"--workdir={workdir}", f"--address={address}",
                    f"--num_hospitals={len(roots)}", *server_args], logs[0])
  clients = []
  if start_clients:
    for k, root in enumerate(roots):
      if hospitals is not None and k not in hospitals:
        continue
      logs.append(os.path.join(logs_dir, f"hospital{k}.log"))
      prefix = list(client_prefix) or [sys.executable, "-m", "fedjax_seg.flower.client"]
      clients.append(spawn([*prefix, *config_args, f"--hospital={k}", f"--data_root={root}",
                            f"--address={address}", f"--num_hospitals={len(roots)}", *client_args],
                           logs[-1]))
  return Federation(server, clients, logs, address)


def tls_args(cert_dir: str):
  """(server_args, client_args) of a TLS federation with the certificates of
  ``fedjax_seg.flower.certs`` in ``cert_dir``: the server gets the CA certificate, its
  certificate and its key; a hospital only the CA certificate."""
  j = lambda name: os.path.join(cert_dir, name)  # noqa: E731
  return ([f"--ca_cert={j('ca.crt')}", f"--server_cert={j('server.pem')}",
           f"--server_key={j('server.key')}"], [f"--root_certificates={j('ca.crt')}"])


def main(argv=None):
  sys.path.insert(0, os.getcwd())
  from absl import app, flags
  from ml_collections import config_flags

  config_flag = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
  workdir = flags.DEFINE_string("workdir", None, "The server's output directory.")
  hospitals_dir = flags.DEFINE_string("hospitals_dir", None, "Per-site folders (default "
                                      "WORKDIR/hospitals).")
  port = flags.DEFINE_integer("port", 0, "Server port on 127.0.0.1 (0: a free one).")
  timeout = flags.DEFINE_float("timeout_s", 3600.0, "Kill everything after this long.")
  tls = flags.DEFINE_bool("tls", False, "Connect over TLS with self-signed certificates "
                          "written to WORKDIR/certificates (fedjax_seg.flower.certs).")
  flags.mark_flags_as_required(["config"])

  def run(args):
    if args[1:] not in ([], ["split"]):
      raise app.UsageError(f"unexpected arguments {args[1:]} (the one command is 'split')")
    if args[1:] == ["split"]:  # the hospitals' folders only, for running the processes by hand
      if not hospitals_dir.value:
        raise app.UsageError("split needs --hospitals_dir")
      for k, root in enumerate(split_sites(config_flag.value, hospitals_dir.value)):
        print(f"hospital {k}: --data_root={root}")
      return
    if not workdir.value:
      raise app.UsageError("--workdir is required")
    argv_all = list(sys.argv if argv is None else argv)[1:]
    passthrough = []
    for i, a in enumerate(argv_all):  # --config FILE, --config=FILE, --config.x=y
      if a == "--config" and i + 1 < len(argv_all):
        passthrough.append(f"--config={argv_all[i + 1]}")
      elif a.startswith("--config=") or a.startswith("--config."):
        passthrough.append(a)
    roots = split_sites(config_flag.value, hospitals_dir.value
                        or os.path.join(workdir.value, "hospitals"))
    server_args, client_args = (), ()
    if tls.value:
      from fedjax_seg.flower import certs
      cert_dir = os.path.join(workdir.value, "certificates")
      if not all(os.path.exists(os.path.join(cert_dir, n)) for n in certs.FILES):
        certs.generate(cert_dir)
      server_args, client_args = tls_args(cert_dir)
    fed = start(passthrough, workdir.value, roots, port.value, server_args=server_args,
                client_args=client_args)
    print(f"[flower] server + {len(roots)} hospitals on {fed.address}"
          f"{' (TLS)' if tls.value else ' (insecure)'}; logs in "
          f"{os.path.join(workdir.value, 'logs')}", flush=True)
    codes = fed.wait(timeout.value)
    print(f"[flower] exit codes {codes}", flush=True)
    sys.exit(0 if codes["server"] == 0 and not any(codes["clients"]) else 1)

  app.run(run, argv=argv)


if __name__ == "__main__":
  main()
