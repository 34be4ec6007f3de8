"""fedjax_seg.sweep: grid parsing, overrides, get_sweep(), resumable sequential sweeps."""
import glob
import json
import os
import subprocess
import sys

import pytest

from fedjax_seg import sweep, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_grid_and_points():
  axes = sweep.parse_grid("seed=0,1,2; algorithm=fedavg,dcew ;optimizer.lr=1e-3")
  assert axes == [("seed", [0, 1, 2]), ("algorithm", ["fedavg", "dcew"]), ("optimizer.lr", [1e-3])]
  points = sweep.product(axes)
  assert len(points) == 6 and points[0] == {"seed": 0, "algorithm": "fedavg", "optimizer.lr": 1e-3}
  assert points[1]["algorithm"] == "dcew"  # first axis outermost
  assert sweep.point_name(points[0]) == "seed=0,algorithm=fedavg,optimizer.lr=0.001"
  # commas inside brackets do not split; literals, booleans and None parse
  assert sweep.parse_grid("config.data.target_spacing=(2.0,2.0,2.0),(1,1,1);fl.eval_clients=true,None") == [
      ("data.target_spacing", [(2.0, 2.0, 2.0), (1, 1, 1)]), ("fl.eval_clients", [True, None])]
  assert sweep.points_from({"seed": [0, 1], "algorithm": "dcew"}) == [
      {"seed": 0, "algorithm": "dcew"}, {"seed": 1, "algorithm": "dcew"}]
  assert sweep.points_from([{"config.seed": 3}]) == [{"seed": 3}]
  for bad in ("seed", "seed=", "seed=1;seed=2", ""):
    with pytest.raises(sweep.SweepError):
      sweep.parse_grid(bad)
  assert sweep.parse_shard("1/4") == (1, 4)
  with pytest.raises(sweep.SweepError):
    sweep.parse_shard("4/4")


def test_apply_point_converts_types_and_names_unknown_keys(tiny):
  c = tiny()
  c.lock()
  d = sweep.apply_point(c, {"optimizer.lr": 1, "seed": 3, "data.root": 123})
  assert d.optimizer.lr == 1.0 and isinstance(d.optimizer.lr, float) and d.seed == 3
  assert d.data.root == "123"
  assert c.seed == 0 and c.optimizer.lr == 1e-3  # the base config is untouched
  with pytest.raises(sweep.SweepError, match="optimizer.nope"):
    sweep.apply_point(c, {"optimizer.nope": 1})
  with pytest.raises(sweep.SweepError, match="'nope.lr'"):
    sweep.apply_point(c, {"nope.lr": 1})
  with pytest.raises(sweep.SweepError, match="seed"):
    sweep.apply_point(c, {"seed": 0.5})


def test_get_sweep_in_config_module(tmp_path):
  path = tmp_path / "exp.py"
  path.write_text("def get_config(arg=None):\n  return None\n\n"
                  "def get_sweep(arg=None):\n"
                  "  return {'seed': [0, 1], 'algorithm': ['fedavg', arg or 'dcew']}\n")
  assert sweep.resolve(None, str(path)) == sweep.points_from("seed=0,1;algorithm=fedavg,dcew")
  assert sweep.resolve(None, f"{path}:costw_ce")[1] == {"seed": 0, "algorithm": "costw_ce"}
  assert sweep.resolve("none", str(path)) is None  # --sweep=none: the plain config
  assert sweep.resolve("seed=5", str(path)) == [{"seed": 5}]  # the flag wins
  plain = tmp_path / "plain.py"
  plain.write_text("def get_config(arg=None):\n  return None\n")
  assert sweep.resolve(None, str(plain)) is None


def test_sweep_resumes_point_by_point_after_interruption(tiny, tmp_path, capsys):
  c = tiny()
  c.num_epochs = 2
  points = sweep.points_from("seed=0,1")
  wd = str(tmp_path / "sweep")

  def killed_in_point_2(config, workdir):
    # point 2 dies after its first epoch (checkpoint written), like a killed job
    return train.run(config, workdir, stop_after=1 if workdir.endswith("seed=1") else None)

  with pytest.raises(train.Interrupted):
    sweep.run_sweep(c, wd, points, run_fn=killed_in_point_2)
  p1, p2 = (os.path.join(wd, sweep.point_name(p)) for p in points)
  assert os.path.isfile(os.path.join(p1, "results.json"))
  assert not os.path.exists(os.path.join(p2, "results.json"))
  assert [json.loads(l)["epoch"] for l in open(os.path.join(p2, "metrics.jsonl"))] == [1]
  assert not os.path.exists(os.path.join(wd, "report.md"))
  mtime = os.path.getmtime(os.path.join(p1, "results.json"))
  capsys.readouterr()

  status = sweep.run_sweep(c, wd, points)  # the same command again
  log = capsys.readouterr().out
  assert [s["status"] for s in status] == ["skipped", "ran"]
  assert os.path.getmtime(os.path.join(p1, "results.json")) == mtime  # point 1 not re-run
  assert "resumed from checkpoint at epoch 1" in log
  assert [json.loads(l)["epoch"] for l in open(os.path.join(p2, "metrics.jsonl"))] == [1, 2]
  res = [json.load(open(os.path.join(p, "results.json"))) for p in (p1, p2)]
  assert [json.load(open(os.path.join(p, "config.json")))["seed"] for p in (p1, p2)] == [0, 1]
  text = open(os.path.join(wd, "report.md")).read()
  for name, r in zip(("seed=0", "seed=1"), res):  # the report covers both points, with their numbers
    assert f"| {name} | centralized | {name[-1]} |" in text
    assert f"{r['metrics']['test']['dice_mean']:.4f}" in text
  assert "Mean ± std over seeds" in text
  # TensorBoard: a HParams session per point, the test overlays of each point
  for p in (p1, p2):
    assert glob.glob(os.path.join(wd, "hparams", os.path.basename(p), "events.out.tfevents.*"))
    assert glob.glob(os.path.join(p, "tensorboard", "overlays", "events.out.tfevents.*"))
  assert json.load(open(os.path.join(wd, "sweep.json")))["points"][1] == {"name": "seed=1",
                                                                         "overrides": {"seed": 1}}
  # a third run does nothing but the report
  assert [s["status"] for s in sweep.run_sweep(c, wd, points, report=False)] == ["skipped", "skipped"]


def test_shards_split_points(tiny, tmp_path):
  c = tiny()
  seen = []
  points = sweep.points_from("seed=0,1,2,3,4")
  for i in range(2):
    sweep.run_sweep(c, str(tmp_path), points, run_fn=lambda cfg, wd: seen.append((i, cfg.seed)),
                    shard=(i, 2), report=False)
  assert seen == [(0, 0), (0, 2), (0, 4), (1, 1), (1, 3)]


def test_failed_point_does_not_stop_the_others(tiny, tmp_path):
  c = tiny()
  ran = []

  def run(cfg, wd):
    if cfg.seed == 0:
      raise FloatingPointError("diverged")
    ran.append(cfg.seed)
  with pytest.raises(sweep.SweepError, match="seed=0: FloatingPointError: diverged"):
    sweep.run_sweep(c, str(tmp_path), sweep.points_from("seed=0,1"), run_fn=run, report=False)
  assert ran == [1]


def test_launch_bad_sweep_key_is_one_error_line(tmp_path):
  r = subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), "--config", "configs/demo.py:geometric",
                      "--workdir", str(tmp_path / "w"), "--sweep", "seed=0,1;optimizer.nope=1"],
                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2, r.stderr[-2000:]
  assert "error: sweep key 'optimizer.nope'" in r.stderr and "Traceback" not in r.stderr
