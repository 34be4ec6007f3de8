"""``train_and_evaluate(config, workdir)``: the one entry point of every run kind.

``launch.py`` calls it. ``config.algorithm`` picks the run kind, each of which
builds an ``experiment.Run`` for the one loop (``fedjax_seg/experiment.py``):

  centralized                                  epochs on the pooled train split (below)
  fedavg fedcostw costw_ce dcew median ...     the supervised family (fl/train.py)
  fedwep_real fedwep_random mean_teacher cps
  pseudoseg supervised_only fully_supervised   semi-supervised methods (fl/semi_train.py)
  fcl local_cl fedrotation random_init         pre-training, then fine-tuning runs that
                                               start from it (fl/fcl_train.py)

Every run writes ``config.json``, appends ``metrics.jsonl``/``metrics.csv`` each
epoch/round, checkpoints its full state with orbax each epoch/round and, when the
same command is re-run, resumes from the latest checkpoint so that the final result
equals an uninterrupted run's; it ends with ``results.json`` (same schema for every
kind), ``final_model.msgpack``, ``learning_curves.png`` and ``overlays.png``.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_seg import experiment, models, runlog, steps
from fedjax_seg.data import pipeline
from fedjax_seg.experiment import (Interrupted, TABLE_KEYS, build_augment, compile_key,  # noqa: F401
                                   finish, num_params, save_config)
from fedjax_seg.fl import aggregators, fcl_train, semi, semi_train
from fedjax_seg.fl import train as fl_train


def train_centralized(config, workdir: str, stop_after: Optional[int] = None) -> Dict:
  """Centralised (CL) training on the pooled train split.

  One step of the loop is one epoch: a seeded permutation of the train slices
  (``np.random.default_rng([seed, epoch])``), batches of ``config.batch_size``
  (the last one masked), one jitted optimiser step per batch; the optimiser state
  is carried across epochs. stop_after: test hook (``experiment.Interrupted``).
  """
  t_start = time.time()
  save_config(config, workdir)
  ds = pipeline.build_dataset(config.data, seed=config.seed)
  x_tr, y_tr = ds.split("train")
  x_va, y_va = ds.split("val")
  if len(x_tr) == 0:
    raise ValueError("the train split is empty")
  fns = models.build(config.model, ds.num_classes)
  init_key, train_key = jax.random.split(jax.random.PRNGKey(config.seed))
  variables = fns.init(init_key, jnp.zeros((1,) + x_tr.shape[1:], jnp.float32))
  tx = steps.make_optimizer(config.optimizer)
  state = {"variables": variables, "opt_state": tx.init(variables["params"]),
           "epoch": jnp.asarray(0, jnp.int32)}
  print(f"[train] model {config.model.name}: {num_params(variables):,} parameters", flush=True)

  bs = config.batch_size
  ckey = compile_key(config, ds, ("model", "loss", "optimizer", "augment"))
  step = runlog.cached_jit("train_step" + ckey, lambda: steps.make_train_step(
      fns, tx, config.loss, ds.num_classes, augment=build_augment(config)),
      donate_argnums=(0, 1))
  eval_batch = runlog.cached_jit("eval" + compile_key(config, ds, ("model", "loss")),
                                 lambda: steps.make_eval_batch(fns, config.loss, ds.num_classes))
  x_dev, y_dev = jax.device_put(x_tr), jax.device_put(y_tr.astype(np.int32))
  gather = jax.jit(lambda x, y, idx: (x[idx], y[idx]))
  steps_per_epoch = int(np.ceil(len(x_tr) / bs))

  def epoch_step(state, epoch):
    perm = np.random.default_rng([config.seed, epoch]).permutation(len(x_tr))
    ep_key = jax.random.fold_in(train_key, epoch)
    variables, opt_state = state["variables"], state["opt_state"]
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
    return ({"variables": variables, "opt_state": opt_state,
             "epoch": jnp.asarray(epoch + 1, jnp.int32)}, {"train_loss": train_loss})

  def row(state, epoch, info):
    val = steps.evaluate(eval_batch, state["variables"], x_va, y_va, config.eval_batch_size,
                         ds.class_names)
    return {"epoch": epoch, "train_loss": info["train_loss"],
            **{f"val_{k}": v for k, v in val.items() if not isinstance(v, (bool, str))},
            "time_s": time.time() - t_start}

  run = experiment.Run(
      "[train]", state, epoch_step, config.num_epochs, lambda s: int(s["epoch"]), row,
      lambda r: (f"train_loss {r['train_loss']:.4f}  val_dice {r['val_dice_mean']:.4f}  "
                 f"val_loss {r['val_loss']:.4f}"), x_key="epoch", log_initial=False)
  state, rows = experiment.run_loop(workdir, run, stop_after)
  variables = state["variables"]
  return finish(config, workdir, fns, variables, ds, eval_batch, rows,
                extra={"epochs": config.num_epochs, "num_params": num_params(variables),
                       "wall_time_s": time.time() - t_start})


TRAINERS: Dict[str, Callable] = {
    "centralized": train_centralized,
    **{name: fl_train.train_federated for name in aggregators.AGGREGATORS},
    **{name: semi_train.train_semi for name in semi.METHODS},
    **{name: fcl_train.train_fcl for name in fcl_train.ALGORITHMS},
}


def train_and_evaluate(config, workdir: str, **kwargs) -> Dict:
  """Trains and evaluates ``config`` in ``workdir`` (resuming it); returns results.json's dict."""
  algo = config.algorithm
  if algo not in TRAINERS:
    raise ValueError(f"config.algorithm={algo!r} unknown; available: {sorted(TRAINERS)}")
  return TRAINERS[algo](config, workdir, **kwargs)


run = train_and_evaluate
