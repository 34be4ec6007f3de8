"""Trainers: the epoch loop (centralised) and dispatch to federated algorithms.

``run(config, workdir)`` is what ``launch.py`` calls. Every trainer:
  * writes ``config.json``, appends ``metrics.jsonl``/``metrics.csv`` each epoch/round,
  * checkpoints its full state with orbax each epoch/round and, when the same
    command is re-run, resumes from the latest checkpoint so that the final
    result equals an uninterrupted run's (data order and PRNG keys are pure
    functions of (config.seed, epoch, step), never of wall time or history),
  * ends with ``results.json``, ``learning_curves.png`` and ``overlays.png``.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_seg import evaluation, models, runlog, steps
from fedjax_seg.data import pipeline

TABLE_KEYS = ["dice_mean", "iou_mean", "precision_mean", "sensitivity_mean",
              "specificity_mean", "pixel_accuracy", "loss"]


class Interrupted(RuntimeError):
  """Raised by the ``stop_after`` test hook to simulate a killed run."""


def save_config(config, workdir: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  new = json.loads(config.to_json_best_effort())
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old != new:
      changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
      print(f"[train] warning: config differs from the one stored in {path} "
            f"(top-level keys {changed}); resuming with the new config", flush=True)
  runlog.write_json(path, new)


def compile_key(config, ds, parts=None) -> str:
  """Everything a compiled step depends on besides its argument shapes:
  the whole config, or only the top-level ``parts`` named."""
  import json as _json
  blob = _json.loads(config.to_json_best_effort())
  if parts is not None:
    blob = {k: blob.get(k) for k in parts}
  return _json.dumps(blob, sort_keys=True) + str(ds.num_classes)


def num_params(variables) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(variables["params"])))


def build_augment(config) -> Optional[steps.AugmentFn]:
  aug = config.get("augment")
  if not aug or not aug.get("enabled", False):
    return None
  from fedjax_seg.data import augment  # issue: real data formats
  return augment.make_augment(aug)


def train_centralized(config, workdir: str, stop_after: Optional[int] = None) -> Dict:
  """Centralised (CL) training on the pooled train split.

  Args:
    config: ConfigDict (see configs/lgg_centralized.py).
    workdir: output folder; re-running with the same workdir resumes.
    stop_after: test hook: raise ``Interrupted`` after this many epochs
      (after the checkpoint is written), to simulate a killed job.
  Returns the results dict also written to results.json.
  """
  t_start = time.time()
  save_config(config, workdir)
  ds = pipeline.build_dataset(config.data)
  x_tr, y_tr = ds.split("train")
  x_va, y_va = ds.split("val")
  x_te, y_te = ds.split("test")
  if len(x_tr) == 0:
    raise ValueError("the train split is empty")
  fns = models.build(config.model, ds.num_classes)
  key = jax.random.PRNGKey(config.seed)
  init_key, train_key = jax.random.split(key)
  variables = fns.init(init_key, jnp.zeros((1,) + x_tr.shape[1:], jnp.float32))
  tx = steps.make_optimizer(config.optimizer)
  state = {"variables": variables, "opt_state": tx.init(variables["params"]),
           "epoch": jnp.asarray(0, jnp.int32)}
  print(f"[train] model {config.model.name}: {num_params(variables):,} parameters", flush=True)

  ckpt = runlog.Checkpointer(workdir)
  last, restored = ckpt.restore_latest(state)
  start = 0
  if restored is not None:
    state, start = restored, int(restored["epoch"])
    print(f"[train] resumed from checkpoint at epoch {start}", flush=True)
  log = runlog.MetricsLog(workdir, resume_from=start)

  bs = config.batch_size
  ckey = compile_key(config, ds, ("model", "loss", "optimizer", "augment"))
  step = runlog.cached_jit("train_step" + ckey, lambda: steps.make_train_step(
      fns, tx, config.loss, ds.num_classes, augment=build_augment(config)),
      donate_argnums=(0, 1))
  eval_batch = runlog.cached_jit("eval" + compile_key(config, ds, ("model", "loss")),
                                 lambda: steps.make_eval_batch(
      fns, config.loss, ds.num_classes))
  x_dev, y_dev = jax.device_put(x_tr), jax.device_put(y_tr.astype(np.int32))
  gather = jax.jit(lambda x, y, idx: (x[idx], y[idx]))
  steps_per_epoch = int(np.ceil(len(x_tr) / bs))
  prog = runlog.Progress(config.num_epochs, start)
  variables, opt_state = state["variables"], state["opt_state"]
  for epoch in range(start, config.num_epochs):
    perm = np.random.default_rng([config.seed, epoch]).permutation(len(x_tr))
    ep_key = jax.random.fold_in(train_key, epoch)
    loss_sum = jnp.zeros(())
    for b in range(steps_per_epoch):
      idx = perm[b * bs:(b + 1) * bs]
      mask = np.zeros((bs,), np.float32)
      mask[:len(idx)] = 1.0
      idx = np.pad(idx, (0, bs - len(idx)))
      bx, by = gather(x_dev, y_dev, idx)
      variables, opt_state, loss = step(variables, opt_state, bx, by, mask,
                                        jax.random.fold_in(ep_key, b))
      loss_sum = loss_sum + loss
    train_loss = float(loss_sum) / steps_per_epoch
    if not np.isfinite(train_loss):
      raise FloatingPointError(f"training diverged at epoch {epoch + 1}: train loss {train_loss}; "
                               f"lower config.optimizer.lr (now {config.optimizer.lr})")
    val = steps.evaluate(eval_batch, variables, x_va, y_va, config.eval_batch_size, ds.class_names)
    row = {"epoch": epoch + 1, "train_loss": train_loss,
           **{f"val_{k}": v for k, v in val.items() if not isinstance(v, (bool, str))},
           "time_s": time.time() - t_start}
    log.append(row)
    state = {"variables": variables, "opt_state": opt_state, "epoch": jnp.asarray(epoch + 1, jnp.int32)}
    ckpt.save(epoch + 1, state)
    print(prog.line(epoch + 1, f"train_loss {train_loss:.4f}  val_dice {val['dice_mean']:.4f}  "
                    f"val_loss {val['loss']:.4f}"), flush=True)
    if stop_after is not None and epoch + 1 >= stop_after and epoch + 1 < config.num_epochs:
      ckpt.close()
      raise Interrupted(f"stopped after epoch {epoch + 1} (test hook)")
  ckpt.close()
  variables = state["variables"]
  results = finish(config, workdir, fns, variables, ds, eval_batch, log.rows,
                   extra={"epochs": config.num_epochs, "num_params": num_params(variables),
                          "wall_time_s": time.time() - t_start})
  return results


def finish(config, workdir, fns, variables, ds, eval_batch, rows, extra: Dict,
           x_key: str = "epoch") -> Dict:
  """Final evaluation on val and test, results.json, plots, printed table."""
  split_metrics = {}
  for name in ("val", "test"):
    x, y = ds.split(name)
    if len(x):
      split_metrics[name] = steps.evaluate(eval_batch, variables, x, y,
                                           config.eval_batch_size, ds.class_names)
  # Per-patient Dice / IoU / HD95 of every val and test patient (for paired comparisons,
  # `python -m fedjax_seg.report compare`): one jitted predict, fixed-size padded batches.
  predict_fn = evaluation.make_predict(fns)
  preds = {name: evaluation.predict_patients(predict_fn, variables, ds, ds.splits.get(name, []),
                                             config.eval_batch_size) for name in ("val", "test")}
  per_patient = evaluation.per_patient_report(ds, preds)
  # Region Dice / HD95 (mm) / seed 001 table for layouts with voxel spacing (BraTS, ACDC).
  report = evaluation.dataset_report(config, fns, variables, ds, eval_batch, split_metrics,
                                     predict_fn=predict_fn, preds=preds)
  results = {"algorithm": config.algorithm, "metrics": split_metrics,
             "class_names": list(ds.class_names), "background_in_means": False,
             "hd95_convention": per_patient["hd95_convention"],
             **(report["results"] if report else {}), "per_patient": per_patient, **extra}
  results["compile_s"] = runlog.compile_times(reset=True)  # {program: s} of this run
  runlog.write_json(os.path.join(workdir, "results.json"), results)
  if rows:
    runlog.plot_learning_curves(rows, os.path.join(workdir, "learning_curves.png"), x_key)
  x_te, y_te = ds.split("test")
  if len(x_te):
    p_te = np.concatenate([preds["test"][pid] for pid in ds.splits["test"]])  # x_te's order
    runlog.plot_overlays(*evaluation.overlay_samples(
        x_te[:config.eval_batch_size], y_te[:config.eval_batch_size], p_te[:config.eval_batch_size]),
        os.path.join(workdir, "overlays.png"))
  print("\n[results] foreground means (background excluded); pixel_accuracy includes background\n"
        + runlog.metrics_table(split_metrics, TABLE_KEYS), flush=True)
  per_class = {n: {k.split("/")[1]: v for k, v in m.items() if k.startswith("dice/")}
               for n, m in split_metrics.items()}
  print("\n[results] per-class Dice\n" + runlog.metrics_table(
      per_class, list(ds.class_names)), flush=True)
  if report:
    print(report["text"], flush=True)
  print(f"\n[results] written to {os.path.join(workdir, 'results.json')}", flush=True)
  return results


TRAINERS: Dict[str, Callable] = {"centralized": train_centralized}


def run(config, workdir: str, **kwargs) -> Dict:
  algo = config.algorithm
  if algo not in TRAINERS:
    try:
      from fedjax_seg.fl import train as fl_train  # registers federated trainers
      TRAINERS.update(fl_train.TRAINERS)
    except ImportError:
      pass
  if algo not in TRAINERS:
    raise ValueError(f"config.algorithm={algo!r} unknown; available: {sorted(TRAINERS)}")
  return TRAINERS[algo](config, workdir, **kwargs)
