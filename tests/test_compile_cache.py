"""Compile time as a number (runlog.cached_jit / compile_times) and the persistent
compilation cache (fedjax_seg/compile_cache.py) shared across processes."""
import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import monitoring

from fedjax_seg import compile_cache, program_store, runlog

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_BACKEND_COMPILES = []
monitoring.register_event_duration_secs_listener(
    lambda name, secs, **kw: _BACKEND_COMPILES.append(secs)
    if name == "/jax/core/compile/backend_compile_duration" else None)


def _f(x, y):
  return jnp.tanh(x @ y) * 2.0 + x


def test_cached_jit_times_the_first_compile_only(capsys):
  runlog.reset_compile_times()
  fn = runlog.cached_jit("cc_test_round{\"k\": 1}", lambda: _f)
  assert fn is runlog.cached_jit("cc_test_round{\"k\": 1}", lambda: _f)  # memoised by key
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 8)), jnp.float32)
  r1 = fn(x, x)
  t = runlog.compile_times()
  assert set(t) == {"cc_test_round"} and t["cc_test_round"] > 0
  out = capsys.readouterr().out
  assert "[compile] compiling cc_test_round program ..." in out
  line = next(l for l in out.splitlines() if l.startswith("[compile] cc_test_round program:"))
  assert re.fullmatch(r"\[compile\] cc_test_round program: [0-9.]+ s \((trace \+ lower|stored program read) "
                      r"[0-9.]+ s, "
                      r"compile or cache read [0-9.]+ s\)", line), line
  # the trace + lower part is recorded on its own, under the same name
  tr = runlog.trace_times()
  assert set(tr) == {"cc_test_round"} and 0 < tr["cc_test_round"] < t["cc_test_round"]
  n = len(_BACKEND_COMPILES)
  r2 = fn(x, x)  # the jitted call reuses the AOT executable: no second compilation
  assert len(_BACKEND_COMPILES) == n
  assert runlog.compile_times() == t and "[compile]" not in capsys.readouterr().out
  ref = jax.jit(_f)(x, x)
  np.testing.assert_array_equal(np.asarray(r1), np.asarray(ref))
  np.testing.assert_array_equal(np.asarray(r2), np.asarray(ref))
  fn(jnp.ones((4, 8)), jnp.ones((8, 8)))  # a new shape is compiled (and timed) again
  assert runlog.compile_times()["cc_test_round"] > t["cc_test_round"]
  assert runlog.compile_times(reset=True)["cc_test_round"] > 0
  assert runlog.compile_times() == {}
  fn(x, x)  # already compiled in this process: recorded as 0
  assert runlog.compile_times(reset=True) == {"cc_test_round": 0.0}
  runlog.add_compile_time("probe", 0.5, trace=True)
  runlog.add_compile_time("other", 0.25)
  assert runlog.trace_times()["probe"] == 0.5 and "other" not in runlog.trace_times()
  runlog.reset_compile_times()
  assert runlog.compile_times() == {} and runlog.trace_times() == {}


def test_cached_jit_keeps_donation_and_name():
  fn = runlog.cached_jit("cc_test_donate", lambda: lambda a, b: (a + b, b),
                         name="donated", donate_argnums=(0,))
  a, b = jnp.ones((16,)), jnp.ones((16,))
  out, _ = fn(a, b)
  assert a.is_deleted() and not b.is_deleted()
  np.testing.assert_array_equal(np.asarray(out), 2 * np.ones(16))
  out2, _ = fn(out, b)  # a donated output fed back in (the trainers' loop)
  np.testing.assert_array_equal(np.asarray(out2), 3 * np.ones(16))
  assert "donated" in runlog.compile_times(reset=True)
  assert fn.lower(out2, b) is not None  # jit attributes pass through


def test_resolve_precedence(monkeypatch, tmp_path):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert compile_cache.default_dir() == str(tmp_path / "xdg" / "fedjax_seg" / "jax")
  monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path / "env"))
  assert compile_cache.resolve(None) == str(tmp_path / "env")
  assert compile_cache.resolve(str(tmp_path / "cfg")) == str(tmp_path / "cfg")  # config wins
  assert compile_cache.resolve("") is None                                      # '' disables
  monkeypatch.setenv(compile_cache.ENV_VAR, "")
  assert compile_cache.resolve(None) is None
  assert compile_cache.resolve(str(tmp_path / "cfg")) == str(tmp_path / "cfg")


def test_enable_switches_folder_in_process(tmp_path):
  before = compile_cache.current()
  try:
    d = compile_cache.enable(str(tmp_path / "c"))
    assert d == str(tmp_path / "c") and compile_cache.current() == d
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
    jax.jit(lambda x: x * 3.0 + 1.0)(jnp.ones((5,))).block_until_ready()
    assert os.listdir(d), "tiny programs are cached too"
    assert compile_cache.enable("") is None and compile_cache.current() is None
  finally:
    compile_cache.enable(before if before is not None else "")


_PROBE = textwrap.dedent("""
    import json, sys, time
    from jax import monitoring
    events = []
    monitoring.register_event_listener(lambda name, **kw: events.append(name))
    from fedjax_seg import compile_cache, program_store, runlog
    folder = compile_cache.enable(sys.argv[1])
    import jax.numpy as jnp

    traced = []

    def build():
      def f(x):
        traced.append(1)  # once per trace
        for i in range(40):  # a program that takes a while (~1 s) to compile
          x = jnp.tanh(x @ x.T + i) * jnp.cos(x)
        return x
      return f

    y = runlog.cached_jit("probe", build)(jnp.ones((16, 16)) * 0.01)
    print(json.dumps({"folder": folder, "compile_s": runlog.compile_times()["probe"],
                      "hits": events.count("/jax/compilation_cache/cache_hits"),
                      "misses": events.count("/jax/compilation_cache/cache_misses"),
                      "sum": float(y.sum()), "traced": len(traced)}))
""")


def _probe(script, cache):
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop(compile_cache.ENV_VAR, None)
  env.pop(program_store.ENV_VAR, None)
  r = subprocess.run([sys.executable, str(script), str(cache)], capture_output=True, text=True,
                     cwd=ROOT, env=env, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


def test_second_process_reads_the_cache(tmp_path):
  script = tmp_path / "probe.py"
  script.write_text(_PROBE)
  cache = tmp_path / "cache"
  cold = _probe(script, cache)
  assert cold["folder"] == str(cache) and cold["hits"] == 0 and cold["misses"] >= 1
  assert os.listdir(cache), "run 1 wrote no cache entries"
  warm = _probe(script, cache)
  assert warm["hits"] >= 1 and warm["misses"] == 0
  # the program store (in the cache folder): the second process read the traced program
  assert cold["traced"] == 1 and warm["traced"] == 0, (cold, warm)
  assert os.listdir(cache / "exported")
  assert warm["sum"] == pytest.approx(cold["sum"], rel=1e-6)
  # reading the executable back is much faster than compiling it (the machine may be loaded)
  assert warm["compile_s"] < 0.5 * cold["compile_s"], (cold, warm)
  off = _probe(script, "")  # '' disables: nothing read, nothing written
  assert off["folder"] is None and off["hits"] == 0
  assert off["traced"] == 1  # no cache, no program store
