"""SIGKILL a small federated run at random moments, re-run the same command after each
kill: the final parameters equal an uninterrupted run's bit for bit, and metrics.jsonl
never has a duplicated, missing or half-written round.

Moments (seeded): during start-up, a random time after a round's progress line, while
a checkpoint is being written (its orbax temporary folder exists), and during the final
evaluation / results writing. After every kill the workdir must hold whole files only:
metrics rows 0..n with n the latest complete checkpoint or one past it.
"""
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from fedjax_seg import runlog

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROUNDS = 8
TINY = {"data.phantom.size": 16, "data.phantom.patients_per_site": 4,
        "data.phantom.slices_per_patient": 2, "data.image_size": 8, "model.base": 2,
        "model.depth": 2, "model.dropout": 0.0, "fl.local_steps": 1, "fl.client_batch_size": 2,
        "fl.stats_samples": 2, "fl.client_strategy": "vmap", "fl.step_strategy": "scan",
        "fl.eval_clients": False, "eval_batch_size": 8, "fl.rounds": ROUNDS}
TIMEOUT_S = 300


class Launch:
  """launch.py in a subprocess, its stdout lines collected with their arrival times."""

  def __init__(self, workdir, data_cache):
    args = [f"--config.{k}={v}" for k, v in {**TINY, "data.cache_dir": data_cache}.items()]
    self.t0 = time.time()
    self.proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "launch.py"), "--config",
         os.path.join(ROOT, "configs", "lgg_fedavg.py"), "--workdir", str(workdir), *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    self.lines = []
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    for line in self.proc.stdout:
      self.lines.append((time.time(), line.rstrip("\n")))

  def running(self):
    return self.proc.poll() is None

  def wait_line(self, pred, n=1):
    """Time of the n-th stdout line satisfying pred, or None when the process ended first."""
    while True:
      hits = [t for t, l in list(self.lines) if pred(l)]
      if len(hits) >= n:
        return hits[n - 1]
      if not self.running():
        self._reader.join(5)
        hits = [t for t, l in list(self.lines) if pred(l)]
        return hits[n - 1] if len(hits) >= n else None
      if time.time() - self.t0 > TIMEOUT_S:
        raise TimeoutError("\n".join(l for _, l in self.lines[-30:]))
      time.sleep(0.002)

  def kill(self):
    """SIGKILL; True when the process was still running."""
    alive = self.running()
    if alive:
      self.proc.kill()
    self.proc.wait(TIMEOUT_S)
    self._reader.join(5)
    return alive

  def finish(self):
    rc = self.proc.wait(TIMEOUT_S)
    self._reader.join(5)
    return rc, "\n".join(l for _, l in self.lines)


def _round_line(l):
  return l.startswith("[train] round ")


def _kill_at(run, plan, ckpt_dir):
  """Kills ``run`` at the moment ``plan`` describes; returns (killed, checkpoint being written)."""
  kind, x = plan
  if kind == "startup":
    time.sleep(x)
  elif kind == "after_round":
    if run.wait_line(_round_line) is None:
      return run.kill(), False
    time.sleep(x)
  elif kind == "checkpoint":  # the moment orbax's temporary folder appears
    while run.running():
      try:
        if any(".orbax-checkpoint-tmp" in n for n in os.listdir(ckpt_dir)):
          return run.kill(), True
      except FileNotFoundError:
        pass
      if time.time() - run.t0 > TIMEOUT_S:
        raise TimeoutError("no checkpoint write seen")
  elif kind == "finish":
    if run.wait_line(lambda l: f"round {ROUNDS}/{ROUNDS}" in l or
                     f"checkpoint at round {ROUNDS}" in l) is None:
      return run.kill(), False
    time.sleep(x)
  return run.kill(), False


def _check_whole(workdir):
  """After a kill: whole files only, rows 0..n with n the latest checkpoint or one past it."""
  rows = runlog.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  rounds = [r["round"] for r in rows]
  assert rounds == list(range(len(rounds))), rounds
  steps = runlog.checkpoint_steps(workdir)
  last = steps[-1] if steps else 0
  if rounds:
    assert rounds[-1] in (last, last + 1), (rounds, steps)
  if os.path.exists(os.path.join(workdir, "config.json")):
    runlog.read_json_file(os.path.join(workdir, "config.json"))
  return rounds, steps


@pytest.mark.slow
def test_sigkill_at_random_moments_resumes_bit_identically(tmp_path, data_cache):
  ref, victim = tmp_path / "uninterrupted", tmp_path / "killed"
  run = Launch(ref, data_cache)
  rc, out = run.finish()
  assert rc == 0, out
  # the reference run's timing: start-up, one round, the final evaluation
  ticks = [t for t, l in run.lines if _round_line(l)]
  t_first, t_round = ticks[0] - run.t0, float(np.median(np.diff(ticks)))
  t_finish = run.lines[-1][0] - ticks[-1]
  rng = np.random.default_rng(20240611)
  middle = ["startup"] * 2 + ["after_round"] * 5 + ["checkpoint"] * 5
  rng.shuffle(middle)
  kinds = ["startup", *middle, "finish", "finish"]  # the final evaluation is killed last
  plans = [(k, float({"startup": rng.uniform(0.2, t_first), "after_round": rng.uniform(0, t_round),
                      "checkpoint": 0.0, "finish": rng.uniform(0, t_finish)}[k])) for k in kinds]
  log = []
  for plan in plans:
    run = Launch(victim, data_cache)
    killed, in_ckpt = _kill_at(run, plan, os.path.join(victim, "checkpoints"))
    if not killed:  # it finished first: a later plan re-runs the finished workdir
      assert run.finish()[0] == 0
    rounds, steps = _check_whole(str(victim))
    log.append((plan, killed, in_ckpt, rounds[-1] if rounds else None, steps))
  kills = [e for e in log if e[1]]
  assert len(kills) >= 10, log
  assert sum(e[2] for e in log) >= 2, log  # killed while a checkpoint was being written
  rc, out = Launch(victim, data_cache).finish()
  assert rc == 0, out

  with open(ref / "final_model.msgpack", "rb") as a, open(victim / "final_model.msgpack", "rb") as b:
    assert a.read() == b.read(), log
  ra = runlog.read_metrics(str(ref / "metrics.jsonl"))
  rb = runlog.read_metrics(str(victim / "metrics.jsonl"))
  assert [r["round"] for r in rb] == list(range(ROUNDS + 1)), log
  strip = lambda rows: [{k: v for k, v in r.items() if k != "time_s"} for r in rows]
  assert strip(rb) == strip(ra)  # every round's losses and weights, bit for bit
  da = runlog.read_json_file(str(ref / "checkpoints" / runlog.DIGESTS))
  db = runlog.read_json_file(str(victim / "checkpoints" / runlog.DIGESTS))
  assert da[str(ROUNDS)] == db[str(ROUNDS)]
  print("\n".join(f"{p[0]:>11} {p[1]:6.3f}s killed={k} in_checkpoint={c} last_row={r} "
                  f"checkpoints={s}" for p, k, c, r, s in log))
