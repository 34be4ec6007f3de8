"""Every benchmark script parses its command line and imports its modules
(`--help` exits 0): a renamed option or a broken import in a benchmark that
only runs for hours is caught here in seconds."""
import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "benchmarks", "*.py"))
                 if not os.path.basename(p).startswith("_"))


def test_scripts_found():
  assert {"fedwep_table.py", "fcl_table.py", "label_at_server_study.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
  r = subprocess.run([sys.executable, os.path.join("benchmarks", script), "--help"], cwd=ROOT,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "usage" in r.stdout.lower()


@pytest.mark.slow
def test_round_speed_rows_compute_the_same_round(tmp_path):
  """The timed strategies of round_speed run the same round: after round 0 from the same
  state and keys, the loop of jitted client updates, the trainers' loop round with 2
  clients per call (remainder call at K = 3) and the one-program round agree."""
  import json
  r = subprocess.run([sys.executable, os.path.join("benchmarks", "round_speed.py"), "--quick",
                      "--ks", "3", "--strategies", "loop", "looped2", "unrolled", "--reps", "1",
                      "--no-cached-compile", "--tag", "speed_test", "--out", str(tmp_path)],
                     cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  row = json.load(open(tmp_path / "speed_test.json"))["rows"][0]
  assert row["agreement_ref"] == "loop"
  assert row["loop_max_abs_diff"] == 0.0
  for s in ("looped2", "unrolled"):
    assert 0.0 <= row[f"{s}_max_abs_diff"] < 1e-4, (s, row[f"{s}_max_abs_diff"])
  assert "Same round: max |Δ|" in open(tmp_path / "speed_test.md").read()


def _round_speed():
  sys.path.insert(0, ROOT)
  from benchmarks import round_speed
  return round_speed


def test_round_speed_paired_ratio_against_numpy():
  """The speed ratio over paired repeats: geometric mean of ref/strategy with a t interval
  on the log ratios (t_{0.975, 2} = 4.302652729911275 for three repeats)."""
  import numpy as np
  rs = _round_speed()
  ref, times = [1.10, 0.95, 1.32], [1.0, 1.0, 1.1]
  logs = np.log(np.array(ref) / np.array(times))
  se = logs.std(ddof=1) / np.sqrt(3)
  half = 4.302652729911275 * se
  g, ci, p = rs.paired_ratio(ref, times)
  np.testing.assert_allclose(g, np.exp(logs.mean()), rtol=1e-12)
  np.testing.assert_allclose(ci, np.exp([logs.mean() - half, logs.mean() + half]), rtol=1e-9)
  assert ci[0] < 1.0 < ci[1]  # these three repeats do not separate the two rows
  # two-sided p of the paired t test, t distribution with 2 degrees of freedom:
  # P(|T| > t) = 1 - t / sqrt(2 + t²)
  t_stat = abs(logs.mean()) / se
  np.testing.assert_allclose(p, 1 - t_stat / np.sqrt(2 + t_stat ** 2), rtol=1e-9)
  assert p > 0.05
  g1, ci1, p1 = rs.paired_ratio([2.0], [1.0])
  assert g1 == 2.0 and ci1 is None and p1 is None


def test_round_speed_repeats_rotate_and_merge():
  """Repeat r runs the rows rotated by r places; the merged row holds the median over the
  repeats, the per-repeat times and the load range."""
  import argparse
  rs = _round_speed()
  assert rs._rotated(["a", "b", "c"], 0) == ["a", "b", "c"]
  assert rs._rotated(["a", "b", "c"], 1) == ["b", "c", "a"]
  assert rs._rotated(["a", "b", "c"], 4) == ["b", "c", "a"]
  args = argparse.Namespace(strategies=["loop", "torch"], local_steps=2)

  def rep(t_loop, t_torch, load):
    r = {"K": 4, "params": 10, "load": {"loop": load, "torch": load + 1}, "agreement_ref": "loop",
         "loop": t_loop, "torch": t_torch, "loop_max_abs_diff": 0.0,
         "loop_threads": "all", "torch_threads": 2, "torch_device": "cpu"}
    for s, f in (("loop", 2e9), ("torch", None)):
      r.update({f"{s}_first_s": 3.0, f"{s}_cpu_s": 2 * r[s], f"{s}_flops": f,
                f"{s}_compile_cold_s": 10.0 if s == "loop" else None})
    return r
  m = rs.merge_repeats([rep(1.0, 0.8, 1.5), rep(3.0, 1.0, 2.5), rep(2.0, 0.9, 1.0)], args,
                       peak=100.0)
  assert m["loop"] == 2.0 and m["torch"] == 0.9 and m["repeats"] == 3
  assert m["loop_times"] == [1.0, 3.0, 2.0] and m["torch_times"] == [0.8, 1.0, 0.9]
  assert m["loop_cpu_s"] == 4.0 and m["loop_compile_cold_s"] == 10.0
  assert m["torch_compile_cold_s"] is None
  assert m["load"] == {"loop": "1.0–2.5", "torch": "2.0–3.5"}
  assert m["loop_client_steps_per_s"] == 4 * 2 / 2.0
  assert m["loop_gflops_per_s"] == 1.0 and m["loop_pct_peak"] == 1.0
  assert m["torch_gflops_per_s"] == 2e9 / 0.9 / 1e9  # credited with the loop's FLOPs


def test_config_ab_round_seconds_and_rotation(tmp_path):
  """config_ab: seconds per round from metrics.csv's cumulative time_s, round 0 (the
  initial evaluation) and round 1 (its compile) excluded; arms rotated per repeat."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "config_ab", os.path.join(ROOT, "benchmarks", "config_ab.py"))
  ab = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(ab)
  (tmp_path / "metrics.csv").write_text(
      "round,val_dice_mean,time_s\n0,0.1,2.0\n1,0.2,30.0\n2,0.3,41.0\n3,0.4,53.0\n4,0.5,63.5\n")
  assert ab.round_seconds(str(tmp_path)) == pytest.approx((63.5 - 30.0) / 3)
  (tmp_path / "metrics.csv").write_text("round,time_s\n0,2.0\n1,30.0\n")
  with pytest.raises(SystemExit, match="need --rounds >= 2"):
    ab.round_seconds(str(tmp_path))
  arms = [("a", []), ("b", ["x=1"])]
  assert [n for n, _ in ab.rotated(arms, 0)] == ["a", "b"]
  assert [n for n, _ in ab.rotated(arms, 1)] == ["b", "a"]
  assert ab.arm_root("a") == ab.ROOT
  assert ab.arm_root(f"old@{tmp_path}") == str(tmp_path)


def test_aggregate_flat_ab_arms_aggregate_alike_one_on_vectors():
  """aggregate_speed --flat-ab: both arms give the same model and weights; the 'flat' arm
  aggregates [K, P_j] matrices, the 'pytree' arm never builds one."""
  import chex
  import jax
  import jax.numpy as jnp
  from benchmarks import aggregate_speed as a
  variables = {"params": {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3),
                          "v": jnp.full((4,), 2.0)}}
  rows = [jax.tree.map(lambda g, i=i: g[None] * (1.0 + i), variables) for i in range(3)]
  stats = a._stats(3)
  for name in ("fedavg", "robust_fedavg", "median"):
    fn = a._agg(name)
    flat, tree = (jax.jit(a.round_post(fn, f)) for f in (True, False))
    chex.assert_trees_all_close(flat(variables, rows, stats), tree(variables, rows, stats),
                                rtol=1e-6)
    # two vectors per client: b and v (3 + 4), w (6)
    assert "tensor<3x7xf32>" in flat.lower(variables, rows, stats).as_text()
    assert "tensor<3x7xf32>" not in tree.lower(variables, rows, stats).as_text()


def test_compile_budget_arms_pair_cold_and_cached_seconds(tmp_path, monkeypatch):
  """compile_budget --arm: each repeat runs every arm (rotated), the table pairs the round
  programs' seconds ('eval' left out) of the later arm with the first arm's."""
  import argparse
  import json
  import numpy as np
  from benchmarks import compile_budget as cb
  calls = []
  secs = {"old": {"cold": [20.0, 22.0, 21.0], "cached": [4.0, 4.4, 4.2]},
          "new@x": {"cold": [20.0, 22.0, 21.0], "cached": [3.0, 3.3, 3.5]}}

  def fake(name, args, root):
    arm = "old" if root == cb.ROOT else "new@x"
    rep = sum(1 for n, a in calls if a == arm)
    calls.append((name, arm))
    run = lambda ph: {"compile_s": {"semi_round_post": secs[arm][ph][rep] - 1.0,
                                    "semi_round_stage0": 1.0, "eval": 9.0},
                      "trace_s": {"semi_round_post": 0.5, "semi_round_stage0": 0.25, "eval": 1.0},
                      "wall_s": 1.0, "strategy": "loop", "load": 1.0}
    return {"algorithm": name, "config": "c", "load_start": 1.5, "cold": run("cold"),
            "cached": run("cached")}
  monkeypatch.setattr(cb, "cold_and_cached", fake)
  monkeypatch.setattr(cb, "arm_root", lambda a: cb.ROOT if "@" not in a else "/x")
  args = argparse.Namespace(only=["fedwep_real"], arm=["old", "new@x"], repeats=3,
                            out=str(tmp_path), tag="ab", clients=8, local_steps=8)
  cb.paired(args)
  assert [a for _, a in calls] == ["old", "new@x", "new@x", "old", "old", "new@x"]
  md = (tmp_path / "ab.md").read_text()
  assert "| fedwep_real | cold | 20.0, 22.0, 21.0 | 20.0, 22.0, 21.0 | new | 1.00×" in md
  ratio = float(np.exp(np.mean(np.log(np.array([4.0, 4.4, 4.2]) / [3.0, 3.3, 3.5]))))
  assert f"| fedwep_real | cached | 4.0, 4.4, 4.2 | 3.0, 3.3, 3.5 | new | {ratio:.2f}× [" in md
  assert "| fedwep_real | cached, trace + lower | 0.8, 0.8, 0.8 | 0.8, 0.8, 0.8 | new | 1.00×" in md
  rows = json.loads((tmp_path / "ab.json").read_text())["rows"]
  assert len(rows) == 6 and {r["arm"] for r in rows} == {"old", "new@x"}
