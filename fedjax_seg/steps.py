"""Pure train/eval steps shared by the centralised trainer and every client.

``make_train_step`` returns ``step(variables, opt_state, x, y, mask, key) ->
(variables, opt_state, loss)``; it is the unit that the federated client
update repeats E times, so centralised and federated training run the exact
same maths.

Shapes: x float32 [B, *spatial, C]; y int32 [B, *spatial]; mask float32 [B]
(1 = real sample, 0 = padding).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_seg import losses, metrics
from fedjax_seg.fl import local
from fedjax_seg.models import ModelFns


def make_optimizer(opt_cfg, lr: Optional[float] = None) -> optax.GradientTransformation:
  """Optimiser from ``config.optimizer`` (name: adam | sgd | momentum | adamw).

  Every key is read from ``opt_cfg`` (configs/common.optimizer: seed 001's Adam(1e-3,
  0.9, 0.999, 1e-7)). ``lr`` overrides ``opt_cfg.lr`` (e.g. the semi-supervised clients' scaled step).
  """
  name = opt_cfg["name"]
  lr = opt_cfg["lr"] if lr is None else lr
  if name == "adam":
    return optax.adam(lr, b1=opt_cfg["b1"], b2=opt_cfg["b2"], eps=opt_cfg["eps"])
  if name == "adamw":
    return optax.adamw(lr, b1=opt_cfg["b1"], b2=opt_cfg["b2"], eps=opt_cfg["eps"],
                       weight_decay=opt_cfg["weight_decay"])
  if name == "sgd":
    return optax.sgd(lr)
  if name == "momentum":
    return optax.sgd(lr, momentum=opt_cfg["momentum"])
  raise ValueError(f"config.optimizer.name={name!r}: expected adam, adamw, sgd or momentum")


AugmentFn = Callable[[jax.Array, jnp.ndarray, jnp.ndarray], tuple]


def make_loss(fns: ModelFns, loss_name: str, num_classes: int,
              augment: Optional[AugmentFn] = None, extra_loss: Optional[Callable] = None):
  """loss(params, variables, x, y, mask, key) -> (scalar, new_variables)."""
  loss_fn = losses.get_loss(loss_name)

  def loss(params, variables, x, y, mask, key):
    akey, dkey = jax.random.split(key)
    if augment is not None:
      x, y = augment(akey, x, y)
    logits, new_vars = fns.apply({**variables, "params": params}, x, train=True, key=dkey)
    value = loss_fn(logits, y, num_classes, mask)
    if extra_loss is not None:
      value = value + extra_loss(params)
    return value, new_vars
  return loss


def make_train_step(fns: ModelFns, tx: optax.GradientTransformation, loss_name: str,
                    num_classes: int, augment: Optional[AugmentFn] = None,
                    extra_loss: Optional[Callable] = None):
  """One optimiser step on one batch (pure, jittable, vmappable): the one local-training
  loop of ``fl/local.py`` with E = 1 on this batch.

  step(variables, opt_state, x, y, mask, key) -> (variables', opt_state', loss float32 []).
  """
  loss = make_loss(fns, loss_name, num_classes, augment, extra_loss)

  def step(variables, opt_state, x, y, mask, key):
    batch_loss = lambda params, v, k: loss(params, v, x, y, mask, k)
    variables, opt_state, (losses, _) = local.local_train(
        lambda p, v, k: _no_aux(batch_loss(p, v, k)), tx, variables, key[None],
        strategy="unrolled", opt_state=opt_state)
    return variables, opt_state, losses[0]
  return step


def _no_aux(out):
  value, new_vars = out
  return value, (new_vars, ())


def make_eval_batch(fns: ModelFns, loss_name: str, num_classes: int):
  """eval_batch(variables, x, y, mask) -> dict of summable statistics.

  Returns {'loss_sum': masked-mean loss × #valid, 'n': #valid samples,
  'counts': confusion counts [C, 4] (tp, fp, fn, tn)}.
  """
  loss_fn = losses.get_loss(loss_name)

  def eval_batch(variables, x, y, mask):
    logits, _ = fns.apply(variables, x, train=False)
    n = jnp.sum(mask)
    pred = jnp.argmax(logits, axis=-1)
    return {"loss_sum": loss_fn(logits, y, num_classes, mask) * n, "n": n,
            "counts": metrics.confusion_counts(pred, y, num_classes, mask)}
  return eval_batch


def pad_batch(x: np.ndarray, y: np.ndarray, batch_size: int):
  """Pads a partial batch to ``batch_size``; returns (x, y, mask float32 [B])."""
  n = len(x)
  mask = np.zeros((batch_size,), np.float32)
  mask[:n] = 1.0
  if n == batch_size:
    return x, y, mask
  px = np.zeros((batch_size - n,) + x.shape[1:], x.dtype)
  py = np.zeros((batch_size - n,) + y.shape[1:], y.dtype)
  return np.concatenate([x, px]), np.concatenate([y, py]), mask


def evaluate(eval_batch_jit, variables, x: np.ndarray, y: np.ndarray, batch_size: int,
             class_names, include_background: bool = False) -> Dict[str, float]:
  """Metrics of ``variables`` on (x, y), in fixed-size padded batches.

  ``eval_batch_jit`` is ``jax.jit(make_eval_batch(...))`` (compiled once and
  reused across calls since the batch shape never changes).
  """
  totals = None
  for i in range(0, len(x), batch_size):
    bx, by, bm = pad_batch(x[i:i + batch_size], y[i:i + batch_size], batch_size)
    out = eval_batch_jit(variables, bx, by, bm)
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  if totals is None:
    return {}
  totals = jax.device_get(totals)
  result = metrics.metrics_from_counts(np.asarray(totals["counts"]),
                                       include_background=include_background,
                                       class_names=tuple(class_names))
  result["loss"] = float(totals["loss_sum"] / max(float(totals["n"]), 1.0))
  return result
