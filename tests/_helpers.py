"""Small helpers shared by several test files."""
import os
import subprocess
import sys


def read_tree(root):
  """Every file below ``root``: {path relative to ``root``: its bytes}."""
  out = {}
  for dirpath, _, files in os.walk(root):
    for f in files:
      path = os.path.join(dirpath, f)
      with open(path, "rb") as fh:
        out[os.path.relpath(path, root)] = fh.read()
  return out


def run_worker(name, timeout, devices=4):
  """``python tests/workers/<name>`` on ``devices`` forced CPU devices (the count must be set
  before jax is imported, hence a subprocess): the completed process, its output as text."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, os.path.join(root, "tests", "workers", name)],
                        env=env, capture_output=True, text=True, timeout=timeout)


# The hyper-parameters the unit tests of the rounds were written (and their golden numbers
# recorded) with; a run reads every field from its config instead (fl/train.client_hparams,
# fl/semi_train.hparams).
CLIENT_HP = dict(local_steps=4, batch_size=8, stats_samples=16, step_strategy="auto", prox_mu=0.0)
SEMI_HP = dict(
    method="fedwep", scenario="label_at_client", loss="dice_ce", unsup_weight=1.0,
    rampup_rounds=0, client_start_round=0, unlabelled_batch_size=8, server_steps=8,
    server_batch_size=8, p=0.5, sigma=0.1, num_seeds=8, search_size=8, search_inputs="random",
    pair_criterion="max", search_strategy="vmap", pseudo="hard", pseudo_loss="ce", cps_on_labelled=True, ema_decay=0.99,
    mt_ema_warmup=True, mt_noise=0.1, threshold=0.9, strong_noise=0.1, strong_intensity=0.2)


def client_hp(**over):
  """core.ClientHParams: CLIENT_HP with ``over``."""
  from fedjax_seg.fl import core
  return core.ClientHParams(**{**CLIENT_HP, **over})


def semi_hp(**over):
  """semi.SemiHParams: SEMI_HP with ``over``."""
  from fedjax_seg.fl import semi
  return semi.SemiHParams(**{**SEMI_HP, **over})


# The config.data keys of a NIfTI layout (BraTS, ACDC) a hand-built test config leaves at
# their configs/ values (configs/brats_3d_centralized.py, configs/common.py).
NIFTI_DATA = dict(depth=0, target_spacing=(), min_foreground_fraction=0.0, fold=None, num_folds=5,
                  n4=dict(enabled=False))


def jit_round(run, backend=None):
  """A round as the tests call it: ``jax.jit(run)``, except the 'loop' round
  (algorithm.LoopedRound: three programs, called as it is) and the 'debug' backend
  (eager, so a client's error names its index)."""
  import jax
  from fedjax_seg.fl import algorithm
  if backend == "debug" or isinstance(run, algorithm.LoopedRound):
    return run
  return jax.jit(run)


def loop_variant(backend):
  """'loop<c>' / 'host' / 'host<c>', optionally with 't<T>' (T host threads issuing the
  calls, e.g. 'loop1t2') -> ('loop', {clients_per_call, host_steps, host_threads}); any
  other backend (plain 'loop' included) -> (backend, None)."""
  import re
  m = re.fullmatch(r"(loop|host)(\d*)(?:t(\d+))?", backend)
  if m is None or backend == "loop":
    return backend, None
  return "loop", {"clients_per_call": int(m[2] or 1), "host_steps": m[1] == "host",
                  "host_threads": int(m[3] or 1)}


def build_round(make, backend):
  """``make(strategy)`` for the backend's round strategy, with the loop round's options of
  a 'loop<c>' / 'host<c>' backend set on the LoopedRound it returns."""
  import dataclasses
  strategy, opts = loop_variant(backend)
  rr = make(strategy)
  return dataclasses.replace(rr, **opts) if opts else rr


def make_round(alg, backend, **kwargs):
  """``algorithm.make_round(alg, backend, **kwargs)``; backend 'loop<c>' (e.g. 'loop2'):
  the 'loop' round with c clients per client call (LoopedRound.clients_per_call);
  'host' / 'host<c>': the same with every local step a program call (host_steps); a
  suffix 't<T>': the calls of every round after the first issued from T host threads."""
  from fedjax_seg.fl import algorithm
  return build_round(lambda s: algorithm.make_round(alg, s, **kwargs), backend)
