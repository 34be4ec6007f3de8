"""End-to-end centralised runs: outputs, learning, exact resume."""
import json
import os

import chex
import jax
import numpy as np
import pytest

from fedjax_seg import runlog, train
from fedjax_seg.config_utils import validate


def _final_params(workdir, like):
  ck = runlog.Checkpointer(workdir)
  step, state = ck.restore_latest(like)
  ck.close()
  return step, state


def test_centralized_run_writes_outputs_and_learns(tiny, tmp_path):
  c = tiny()
  c.num_epochs = 8
  c.batch_size = 4
  c.optimizer.lr = 1e-2
  validate(c)
  res = train.run(c, str(tmp_path))
  for f in ("config.json", "metrics.jsonl", "metrics.csv", "results.json",
            "learning_curves.png", "overlays.png"):
    assert os.path.exists(tmp_path / f), f
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [r["epoch"] for r in rows] == list(range(1, 9))
  assert rows[-1]["train_loss"] < rows[0]["train_loss"]
  assert res["metrics"]["test"]["background_in_means"] is False
  assert res["metrics"]["test"]["dice_mean"] > 0.3  # learns the phantom tumour
  with open(tmp_path / "results.json") as f:
    saved = json.load(f)
  assert saved["metrics"]["test"]["dice_mean"] == pytest.approx(res["metrics"]["test"]["dice_mean"])
  # one per-patient record per val / test patient (paired comparisons), HD95 in pixels for LGG
  pp = saved["per_patient"]
  assert pp["hd95_units"] == "pixels" and pp["hd95_convention"] == saved["hd95_convention"] == "pooled"
  from fedjax_seg.data import pipeline
  ds = pipeline.build_dataset(c.data, verbose=False)
  for split in ("val", "test"):
    assert [r["id"] for r in pp[split]] == ds.splits[split]
    for r in pp[split]:
      assert r["site"] == ds.patients[r["id"]].site and r["num_samples"] == len(ds.patients[r["id"]].labels)
      assert set(r["dice"]) == set(r["iou"]) == {"background", "tumour"} and set(r["hd95"]) == {"tumour"}
      assert 0.0 <= r["dice_mean"] <= 1.0 and np.isfinite(r["hd95_mean"]) and r["hd95_mean"] >= 0.0
  _, y_te = ds.split("test")
  assert sum(r["gt_voxels"]["tumour"] for r in pp["test"]) == int((y_te == 1).sum())
  assert np.mean([r["dice_mean"] for r in pp["test"]]) > 0.3


def test_resume_equals_uninterrupted(tiny, tmp_path):
  c = tiny()
  c.num_epochs = 3
  full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
  train.run(c, full)
  with pytest.raises(train.Interrupted):
    train.run(c, cut, stop_after=1)
  rows = [json.loads(l) for l in open(os.path.join(cut, "metrics.jsonl"))]
  assert [r["epoch"] for r in rows] == [1]
  train.run(c, cut)  # same command again: resumes at epoch 1
  rows = [json.loads(l) for l in open(os.path.join(cut, "metrics.jsonl"))]
  assert [r["epoch"] for r in rows] == [1, 2, 3]
  r_full = json.load(open(os.path.join(full, "results.json")))
  r_cut = json.load(open(os.path.join(cut, "results.json")))
  assert r_cut["metrics"]["test"] == pytest.approx(r_full["metrics"]["test"], rel=1e-6)
  like_dir = full
  ck = runlog.Checkpointer(like_dir)
  step = ck.latest_step()
  a = ck.manager.restore(step)
  ck.close()
  ck = runlog.Checkpointer(cut)
  b = ck.manager.restore(ck.latest_step())
  ck.close()
  chex.assert_trees_all_close(a["variables"]["params"], b["variables"]["params"], rtol=1e-6)
  # the best checkpoint by validation Dice: the first epoch with the highest val_dice_mean,
  # the same after the resume, in results.json too, with the same parameters
  dice = [r["val_dice_mean"] for r in rows]
  best_step = int(np.argmax(dice)) + 1
  for wd, res in ((full, r_full), (cut, r_cut)):
    assert runlog.best_checkpoint(wd) == (best_step, pytest.approx(dice[best_step - 1]))
    assert res["best_step"] == best_step
    assert res["best_val_dice_mean"] == pytest.approx(dice[best_step - 1])
  best = []
  for wd in (full, cut):
    ck = runlog.Checkpointer(wd)
    best.append(ck.restore_best(a)[1])
    ck.close()
  chex.assert_trees_all_close(best[0]["variables"]["params"], best[1]["variables"]["params"],
                              rtol=1e-6)


def test_config_validation_names_the_key(tiny):
  c = tiny()
  c.data.image_size = 30
  with pytest.raises(ValueError, match="image_size"):
    validate(c)
  c = tiny()
  c.algorithm = "nope"
  with pytest.raises(ValueError, match="config.algorithm='nope'"):
    train.run(c, "/tmp/unused_workdir_fedjax_seg")
