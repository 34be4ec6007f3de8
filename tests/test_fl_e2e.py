"""End-to-end federated runs on a tiny phantom LGG federation (K=3 by site)."""
import json
import os

import chex
import pytest

from configs import lgg_fedavg
from fedjax_seg import runlog, train


def fl_config(tiny, algorithm, rounds=5):
  c = tiny(algorithm)
  c.fl = lgg_fedavg.get_fl_config()
  c.fl.rounds = rounds
  c.fl.local_steps = 10
  c.fl.client_batch_size = 8
  c.fl.stats_samples = 8
  c.optimizer.lr = 1e-2
  # one compiled step body: smallest compile for tests (speed: benchmarks/round_speed.py)
  c.fl.client_strategy = "vmap"
  c.fl.step_strategy = "scan"
  return c


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f]


@pytest.mark.parametrize("algorithm", ["fedavg", "fedcostw", "costw_ce", "dcew"])
def test_dice_rises_from_round_0(tiny, tmp_path, algorithm):
  c = fl_config(tiny, algorithm)
  res = train.run(c, str(tmp_path))
  rows = _rows(tmp_path)
  assert [r["round"] for r in rows] == list(range(0, 6))
  assert rows[-1]["val_dice_mean"] > rows[0]["val_dice_mean"] + 0.2, [
      r["val_dice_mean"] for r in rows]
  for r in rows[1:]:
    assert sum(r["weights"]) == pytest.approx(1.0, abs=1e-5)
    assert len(r["client_val_dice"]) == 3 and not r["failed"]
    assert r["bytes_up_per_client"] > 0
  assert res["metrics"]["test"]["dice_mean"] > 0.3
  if algorithm == "fedavg":  # s_k-proportional weights
    assert rows[1]["weights"] == pytest.approx([1 / 3] * 3, abs=1e-6)
  for f in ("results.json", "learning_curves.png", "metrics.csv"):
    assert os.path.exists(tmp_path / f)


def test_federated_resume_equals_uninterrupted(tiny, tmp_path):
  c = fl_config(tiny, "dcew", rounds=3)
  c.fl.local_steps = 2
  full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
  train.run(c, full)
  with pytest.raises(train.Interrupted):
    train.run(c, cut, stop_after=2)
  assert [r["round"] for r in _rows(cut)] == [0, 1, 2]
  train.run(c, cut)
  assert [r["round"] for r in _rows(cut)] == [0, 1, 2, 3]
  a = runlog.Checkpointer(full); b = runlog.Checkpointer(cut)
  sa, sb = a.manager.restore(3), b.manager.restore(3)
  a.close(); b.close()
  chex.assert_trees_all_close(sa, sb, rtol=1e-6)
  assert _rows(full)[-1]["weights"] == pytest.approx(_rows(cut)[-1]["weights"], rel=1e-6)
  # the resumed run reused the fresh runs' compiled round and evaluation (a restored
  # state is placed like a fresh one): one executable each
  sizes = {j.name: j.executables() for k, j in runlog._JIT_CACHE.items()
           if j.name in ("round", "eval") and '"dcew"' in k}
  assert sizes and all(n == 1 for n in sizes.values()), sizes
