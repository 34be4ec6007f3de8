"""Traced programs kept on disk (fedjax_seg/program_store.py): a later process reads a
program back instead of tracing it, runs the same computation, and never serves a program
whose key (caller's key, signature, code, environment) changed."""
import collections
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import monitoring

from fedjax_seg import program_store, runlog, train

Pair = collections.namedtuple("Pair", "a b")
_BACKEND_COMPILES = []
monitoring.register_event_duration_secs_listener(
    lambda name, secs, **kw: _BACKEND_COMPILES.append(secs)
    if name == "/jax/core/compile/backend_compile_duration" else None)


@pytest.fixture
def store(tmp_path, monkeypatch):
  folder = tmp_path / "store"
  monkeypatch.setenv(program_store.ENV_VAR, str(folder))
  return folder


def _build(traces):
  def f(state, x, scale):
    traces.append(1)  # runs once per trace
    s = state["w"] + jnp.tanh(x @ x.T).sum() * scale
    return {"w": s, "n": state["n"] + 1}, Pair(x.mean(), (x * scale)[:2])
  return f


def _timed(traces, key="ps_test{}", name="ps"):
  """A TimedJit as ``runlog.cached_jit`` makes it, new each time (a new process's)."""
  fn = _build(traces)
  kw = {"donate_argnums": (0,)}
  return runlog.TimedJit(name, jax.jit(fn, **kw), fn=fn, key=key, jit_kwargs=kw)


def _args(n=8):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(n, 4)), jnp.float32)
  return {"w": jnp.full((3,), 0.5, jnp.float32), "n": jnp.int32(0)}, x, 0.25


def _same(a, b):
  chex.assert_trees_all_equal(jax.device_get(a), jax.device_get(b))
  assert jax.tree.structure(a) == jax.tree.structure(b)


def test_a_new_process_reads_the_program_instead_of_tracing(store, capsys):
  ref = jax.jit(_build([]))(*_args())
  traces = []
  first = _timed(traces)
  state, x, s = _args()
  out1 = first(state, x, s)
  assert len(traces) == 1  # traced once, through jax.export
  assert state["w"].is_deleted()  # the donation is kept
  files = [f for f in os.listdir(store) if not f.endswith(".tmp")]
  assert len(files) == 1
  assert "trace + lower" in capsys.readouterr().out
  second = _timed(traces)  # as a new process: nothing memoised
  state, x, s = _args()
  out2 = second(state, x, s)
  assert len(traces) == 1, "the stored program was traced again"
  assert "stored program read" in capsys.readouterr().out
  assert state["w"].is_deleted()
  _same(out1, ref)
  _same(out2, ref)
  assert isinstance(out2[1], Pair)  # the output pytree, namedtuple included, comes back
  n = len(_BACKEND_COMPILES)
  out3 = second(out2[0], x, s)  # a donated (committed) output fed back in: no recompile
  np.testing.assert_array_equal(np.asarray(out3[0]["n"]), 2)
  second(out3[0], x, s)
  assert len(_BACKEND_COMPILES) == n


def test_a_changed_key_signature_or_code_traces_again(store, monkeypatch):
  traces = []
  _timed(traces)(*_args())
  _timed(traces, key="ps_test{other config}")(*_args())
  assert len(traces) == 2
  _timed(traces)(*_args(6))  # another shape
  assert len(traces) == 3
  state, x, _ = _args()
  _timed(traces)(state, x, 1)  # a Python int where a float was
  assert len(traces) == 4
  monkeypatch.setattr(program_store, "code_digest", lambda: "edited source")
  _timed(traces)(*_args())
  assert len(traces) == 5
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
  _timed(traces)(*_args())
  assert len(traces) == 6
  monkeypatch.undo()
  monkeypatch.setenv(program_store.ENV_VAR, str(store))
  _timed(traces)(*_args())  # the first program again: read
  assert len(traces) == 6
  assert len(os.listdir(store)) == 6


def test_a_damaged_stored_file_costs_a_trace_and_is_rewritten(store):
  traces = []
  ref = _timed(traces)(*_args())
  (path,) = [store / f for f in os.listdir(store)]
  for damage in (b"", b"not a pickle", path.read_bytes()[:100]):
    path.write_bytes(damage)
    _same(_timed(traces)(*_args()), ref)
  assert len(traces) == 4
  _same(_timed(traces)(*_args()), ref)  # rewritten, read again
  assert len(traces) == 4


def test_what_the_store_cannot_take_is_traced_by_jit(store, monkeypatch, capsys):
  traces = []

  def with_callback(x):
    traces.append(1)
    jax.debug.callback(lambda v: None, x.sum())  # host callbacks cannot be exported
    return x * 2
  t = runlog.TimedJit("cb", jax.jit(with_callback), fn=with_callback, key="ps_cb")
  np.testing.assert_array_equal(np.asarray(t(jnp.ones(3))), 2 * np.ones(3))
  assert "[compile] cb program not stored: " in capsys.readouterr().out
  assert not os.path.exists(store) or not os.listdir(store)
  t2 = _timed(traces)  # keyword arguments: the jitted function
  state, x, s = _args()
  t2(state, x, scale=s)
  assert not os.path.exists(store) or not os.listdir(store)
  monkeypatch.setenv(program_store.ENV_VAR, "0")  # the store off
  assert program_store.folder() is None
  _timed(traces)(*_args())
  assert not os.path.exists(store) or not os.listdir(store)


def test_flat_donation_names_the_leaves_of_donated_arguments():
  args = ({"a": 1, "b": (2, 3)}, 4, [5, 6])
  assert program_store.flat_donation(args, (0,)) == (0, 1, 2)
  assert program_store.flat_donation(args, (0, 2)) == (0, 1, 2, 4, 5)
  assert program_store.flat_donation(args, 1) == (3,)
  assert program_store.flat_donation(args, None) == ()


def test_trainer_with_stored_programs_equals_the_traced_run(tiny, tmp_path, store,
                                                            monkeypatch, capsys):
  """The host-step loop round (begin, stage, step and post programs, 2 host threads) with
  the store off, storing, and reading: the same metrics and final model, bit for bit."""
  from conftest import tiny_federated
  c = tiny_federated(tiny, "dcew", local_steps=2, client_strategy="loop", step_strategy="host")
  runs = {}
  for label, env in (("off", "0"), ("stored", str(store)), ("read", str(store))):
    monkeypatch.setenv(program_store.ENV_VAR, env)
    monkeypatch.setattr(runlog, "_JIT_CACHE", {})  # a new process: nothing memoised
    capsys.readouterr()
    train.run(c, str(tmp_path / label))
    runs[label] = capsys.readouterr().out
  assert "stored program read" not in runs["off"] + runs["stored"]
  reads = [l for l in runs["read"].splitlines() if "stored program read" in l]
  assert {l.split()[1] for l in reads} >= {"round_begin", "round_stage0", "round_step0",
                                           "round_post", "eval"}, reads
  rows = {k: [json.loads(r) for r in open(tmp_path / k / "metrics.jsonl")] for k in runs}
  for k in ("stored", "read"):
    for a, b in zip(rows["off"], rows[k]):
      assert {n: v for n, v in a.items() if "time" not in n} == \
             {n: v for n, v in b.items() if "time" not in n}
    ca, cb = runlog.Checkpointer(str(tmp_path / "off")), runlog.Checkpointer(str(tmp_path / k))
    sa = ca.manager.restore(ca.manager.latest_step())
    sb = cb.manager.restore(cb.manager.latest_step())
    ca.close(); cb.close()
    chex.assert_trees_all_equal(sa, sb)


def test_an_unwritable_store_only_costs_the_next_process_a_trace(tmp_path, monkeypatch):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a folder")
  monkeypatch.setenv(program_store.ENV_VAR, str(blocker / "store"))
  traces = []
  ref = jax.jit(_build([]))(*_args())
  _same(_timed(traces)(*_args()), ref)
  _same(_timed(traces)(*_args()), ref)
  assert len(traces) == 2 and blocker.read_text() == "not a folder"
