"""Several processes: two processes on localhost, one CPU device each,
``jax.distributed.initialize`` through fedjax_seg.distributed, one sharded
federated round over both; and launch.py --distributed running the federated
trainer (slow)."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from fedjax_seg import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices=1):
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  env.update({"JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT,
              "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"})
  return env


def _run_pair(cmd_for, env, timeout=900):
  procs = [subprocess.Popen(cmd_for(i), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, o in zip(procs, outs):
    assert p.returncode == 0, o[-6000:]
  return outs


def test_two_process_localhost_round():
  addr = f"localhost:{_free_port()}"
  worker = os.path.join(ROOT, "tests", "workers", "distributed_worker.py")
  outs = _run_pair(lambda i: [sys.executable, worker, addr, "2", str(i)], _env())
  res = [json.loads(next(l for l in o.splitlines() if l.startswith("RESULT "))[7:]) for o in outs]
  assert [r["process"] for r in res] == [0, 1]
  assert all(r["devices"] == 2 and r["process_count"] == 2 and r["round"] == 1 for r in res)
  assert res[0]["checksum"] == res[1]["checksum"] and np.isfinite(res[0]["checksum"])
  assert res[0]["weights"] == res[1]["weights"] and len(res[0]["weights"]) == 3
  assert abs(sum(res[0]["weights"]) - 1) < 1e-5 and res[0]["delta"] > 0


def test_resolve_flags_and_environment():
  env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"}
  assert distributed.resolve(environ=env) == {"coordinator_address": "h:1", "num_processes": 4,
                                              "process_id": 2}
  assert distributed.resolve("x:2", None, 0, environ=env)["coordinator_address"] == "x:2"
  assert distributed.resolve("x:2", None, 0, environ=env)["process_id"] == 0
  assert distributed.resolve(environ={}) == {"coordinator_address": None, "num_processes": None,
                                             "process_id": None}  # auto-detect
  with pytest.raises(ValueError, match="coordinator"):
    distributed.resolve(None, 2, 0, environ={})
  with pytest.raises(ValueError, match="process_id"):
    distributed.resolve("h:1", 2, 2, environ={})
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES"):
    distributed.resolve(environ={"JAX_NUM_PROCESSES": "two"})


@pytest.mark.slow
def test_launch_distributed_trainer_two_processes(tmp_path):
  """The same config and command on 2 processes x 2 CPU devices (K=3 clients
  sharded over 4 devices): both finish the round with the same model and
  write their own workdir (process 0: DIR, process 1: DIR/process_1)."""
  sys.path.insert(0, ROOT)
  from configs import lgg_fedavg
  from fedjax_seg.data import pipeline
  over = {"data.cache_dir": str(tmp_path / "cache"), "data.phantom.size": 32,
          "data.phantom.patients_per_site": 4, "data.phantom.slices_per_patient": 8,
          "data.image_size": 32, "model.base": 4, "model.depth": 2, "model.dropout": 0.0,
          "fl.rounds": 1, "fl.local_steps": 1, "fl.client_batch_size": 4,
          "fl.stats_samples": 4, "fl.client_strategy": "sharded", "fl.eval_clients": False,
          "eval_batch_size": 16}
  c = lgg_fedavg.get_config()
  for k, v in over.items():
    if k.startswith("data."):
      sub = c.data
      *path, last = k.split(".")[1:]
      for p in path:
        sub = sub[p]
      sub[last] = v
  pipeline.build_dataset(c.data)  # write the phantom once (not from two processes at once)
  addr = f"localhost:{_free_port()}"
  wd = tmp_path / "run"
  cmd = lambda i: ([sys.executable, "launch.py", "--config", "configs/lgg_fedavg.py",
                    "--workdir", str(wd), "--distributed", f"--coordinator_address={addr}",
                    "--num_processes=2", f"--process_id={i}"]
                   + [f"--config.{k}={v}" for k, v in over.items()])
  outs = _run_pair(cmd, _env(devices=2))
  assert "process 0/2, 2 local of 4 cpu devices" in outs[0]
  r0 = json.load(open(wd / "results.json"))
  r1 = json.load(open(wd / "process_1" / "results.json"))
  rows = [json.loads(l) for l in open(wd / "metrics.jsonl")]
  assert rows[-1]["round"] == 1 and len(rows[-1]["weights"]) == 3
  assert r0["metrics"]["test"]["loss"] == r1["metrics"]["test"]["loss"]
