"""The best checkpoint by validation Dice (checkpoints_best/), kept beside the latest ones:
Checkpointer with synthetic rows, run_loop (peak mid-run, resume, a kill between the two
saves), and infer --checkpoint best|latest."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_seg import experiment, infer, models, runlog, steps, train


def _state(step):
  return {"w": jnp.full((3,), float(step), jnp.float32), "t": jnp.asarray(step, jnp.int32)}


def _steps(folder):
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


def test_checkpointer_keeps_best_and_latest(tmp_path):
  wd = str(tmp_path)
  dice = {1: 0.1, 2: 0.5, 3: None, 4: 0.3, 5: float("nan"), 6: 0.5}  # peak at 2 (6 only ties)
  ck = runlog.Checkpointer(wd)
  for step, d in dice.items():
    row = {"epoch": step, "train_loss": 1.0} | ({} if d is None else {"val_dice_mean": d})
    ck.save(step, _state(step), metrics=row)
  assert ck.best() == (2, 0.5)
  ck.close()
  assert _steps(os.path.join(wd, "checkpoints")) == [5, 6]  # the latest 2, as before
  assert _steps(os.path.join(wd, runlog.BEST_DIR)) == [2]
  assert runlog.best_checkpoint(wd) == (2, 0.5)
  digests = json.load(open(os.path.join(wd, runlog.BEST_DIR, runlog.DIGESTS)))
  assert set(digests) == {"2"} and digests["2"] == runlog.state_digest(_state(2))
  ck = runlog.Checkpointer(wd)  # reopened: the best is read back from orbax's metrics
  assert ck.best() == (2, 0.5)
  step, state = ck.restore_best(_state(0))
  assert step == 2 and np.array_equal(state["w"], np.full(3, 2.0, np.float32))
  assert ck.restore_latest(_state(0))[0] == 6
  ck.save(7, _state(7), metrics={"val_dice_mean": 0.9})  # a new best replaces the old
  ck.close()
  assert _steps(os.path.join(wd, runlog.BEST_DIR)) == [7]
  assert runlog.best_checkpoint(wd) == (7, 0.9)
  # a step re-run after a resume (its latest checkpoint lost) that now scores higher
  shutil.rmtree(os.path.join(wd, "checkpoints", "7"))
  ck = runlog.Checkpointer(wd)
  ck.save(7, _state(8), metrics={"val_dice_mean": 0.95})
  ck.close()
  assert runlog.best_checkpoint(wd) == (7, 0.95)


def test_rows_without_val_dice_keep_no_best(tmp_path):
  ck = runlog.Checkpointer(str(tmp_path))
  for step in (1, 2):  # FCL pre-training rows: a loss, no validation Dice
    ck.save(step, _state(step), metrics={"round": step, "loss": 0.5})
  assert ck.best() is None and ck.restore_best(_state(0)) == (None, None)
  ck.close()
  assert not os.path.exists(tmp_path / runlog.BEST_DIR)
  assert runlog.best_checkpoint(str(tmp_path)) is None


DICE = [0.2, 0.7, 0.4, 0.6, 0.5]  # validation Dice after steps 1..5: the peak at step 2


def _run(total=len(DICE)):
  return experiment.Run(
      "[test]", _state(0), lambda s, t: (_state(t + 1), None), total, lambda s: int(s["t"]),
      lambda s, t, info: {"epoch": t, "val_dice_mean": DICE[t - 1]}, lambda r: "",
      x_key="epoch", log_initial=False)


def test_run_loop_best_survives_resume_and_a_kill_between_the_saves(tmp_path):
  full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
  experiment.run_loop(full, _run(), verbose=False)
  assert runlog.best_checkpoint(full) == (2, 0.7)
  assert _steps(os.path.join(full, "checkpoints")) == [4, 5]
  with pytest.raises(experiment.Interrupted):
    experiment.run_loop(cut, _run(), stop_after=2, verbose=False)
  assert runlog.best_checkpoint(cut) == (2, 0.7)
  # killed after the best of step 2 was saved, before its latest checkpoint: the run
  # resumes from step 1, re-runs step 2 and finds it already the best (no second save)
  shutil.rmtree(os.path.join(cut, "checkpoints", "2"))
  experiment.run_loop(cut, _run(), verbose=False)
  assert runlog.best_checkpoint(cut) == (2, 0.7)
  for wd in (full, cut):
    ck = runlog.Checkpointer(wd)
    step, state = ck.restore_best(_state(0))
    ck.close()
    assert step == 2 and int(state["t"]) == 2
  rows = runlog.read_metrics(os.path.join(cut, "metrics.jsonl"))
  assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]
  # a fresh start in a workdir whose latest checkpoints are gone drops the stale best
  shutil.rmtree(os.path.join(full, "checkpoints"))
  experiment.run_loop(full, _run(1), verbose=False)
  assert runlog.best_checkpoint(full) == (1, 0.2)


def _variables(config, seed):
  fns = models.build(config.model, 2)
  shapes = jax.eval_shape(lambda: fns.init(jax.random.PRNGKey(0), jnp.zeros(
      (1, config.data.image_size, config.data.image_size, 3))))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.2, s.shape), s.dtype), shapes)


@pytest.fixture(scope="module")
def lgg_three_steps(data_cache, tmp_path_factory):
  """An LGG run folder with checkpoints of steps 1..4 (distinct weights), val Dice peaking at 2
  (checkpoints/ keeps 3 and 4, checkpoints_best/ keeps 2)."""
  from conftest import tiny_config
  from fedjax_seg.data import pipeline
  c = tiny_config(data_cache)
  root = pipeline.resolve_root(c.data, verbose=False)
  wd = str(tmp_path_factory.mktemp("lgg_best"))
  train.save_config(c, wd)
  tx = steps.make_optimizer(c.optimizer)
  ck = runlog.Checkpointer(wd)
  saved = {}
  for step, d in ((1, 0.3), (2, 0.8), (3, 0.6), (4, 0.5)):
    saved[step] = v = _variables(c, step)
    ck.save(step, {"variables": v, "opt_state": tx.init(v["params"]),
                   "epoch": jnp.asarray(step, jnp.int32)}, metrics={"val_dice_mean": d})
  ck.close()
  return wd, saved, os.path.join(root, "kaggle_3m")


def _assert_same(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def test_infer_best_and_latest(lgg_three_steps, tmp_path, capsys):
  wd, saved, root = lgg_three_steps
  best = infer.load_run(wd, checkpoint="best")
  assert best.step == 2 and best.checkpoint == "best" and best.val_dice == pytest.approx(0.8)
  _assert_same(best.variables, saved[2])
  latest = infer.load_run(wd)  # default: latest
  assert latest.step == 4 and latest.checkpoint == "latest"
  _assert_same(latest.variables, saved[4])
  assert _steps(os.path.join(wd, "checkpoints")) == [3, 4]
  # --step still works, and finds the best step in checkpoints_best/ once pruned there
  _assert_same(infer.load_run(wd, step=2).variables, saved[2])
  with pytest.raises(infer.InferError, match="no checkpoint for step 1"):
    infer.load_run(wd, step=1)
  _assert_same(infer.load_run(wd, step=3).variables, saved[3])
  with pytest.raises(infer.InferError, match="give one of them"):
    infer.load_run(wd, step=3, checkpoint="best")
  tif = infer.tiff_slices(os.path.join(root, sorted(os.listdir(root))[0]))[0]
  rc = infer.main(["--workdir", wd, "--input", tif, "--output", str(tmp_path / "b.tif"),
                   "--checkpoint", "best"])
  out = capsys.readouterr().out
  assert rc == 0 and "[infer] checkpoint step 2 (best, val Dice 0.8000)" in out


def test_infer_best_without_best_is_one_line_error(lgg_three_steps, tmp_path, capsys):
  wd, _, root = lgg_three_steps
  old = tmp_path / "old_run"
  shutil.copytree(wd, old)
  shutil.rmtree(old / runlog.BEST_DIR)  # a run from before best checkpoints (or FCL pre-training)
  tif = infer.tiff_slices(os.path.join(root, sorted(os.listdir(root))[0]))[0]
  rc = infer.main(["--workdir", str(old), "--input", tif, "--output", str(tmp_path / "o.tif"),
                   "--checkpoint", "best"])
  err = capsys.readouterr().err
  assert rc == 2 and err.startswith("error: ") and "has no best checkpoint" in err
  assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_infer_best_of_a_run_with_models_by_name(lgg_three_steps, tmp_path):
  """Semi-supervised states hold {model name: variables}: the evaluated model is restored."""
  wd, saved, _ = lgg_three_steps
  semi = str(tmp_path / "semi")
  os.makedirs(semi)
  shutil.copy(os.path.join(wd, "config.json"), semi)
  ck = runlog.Checkpointer(semi)
  for step, d in ((1, 0.4), (2, 0.2)):
    ck.save(step, {"variables": {"student": saved[step], "teacher": saved[step + 2]},
                   "round": jnp.asarray(step, jnp.int32)}, metrics={"val_dice_mean": d})
  ck.close()
  with open(os.path.join(semi, "results.json"), "w") as f:
    json.dump({"evaluated_model": "teacher", "class_names": ["background", "tumour"]}, f)
  run = infer.load_run(semi, checkpoint="best")
  assert run.step == 1
  _assert_same(run.variables, saved[3])
