"""Server aggregators (SPEC §4.1): pure, jittable reductions over stacked
client pytrees (leading axis K) and per-client statistics.

Statistics (all float32 [K], produced by ``core.client_update``):
  num_samples  s_k, real local samples
  cost_pre/post   training loss (Dice+CE) of M_{t-1} (received) / M_t (trained)
  ce_pre/post     cross-entropy of M_{t-1} / M_t
  dice_pre/post   soft Dice coefficient (foreground) of M_{t-1} / M_t
all measured on the same fixed-per-round subset of the client's local data.

Robustness (all aggregators): a client is *excluded* (weight 0, remaining
weights renormalised) when any leaf of its model, or any statistic its
weight depends on, is non-finite, or when it has no samples. If every client
is excluded the global model is kept and ``failed`` is True.

Every aggregator returns ``(new_variables, weights [K], failed bool[])``.
Weighting of clients lives here only; algorithms never re-implement averaging.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import jax
import jax.numpy as jnp

Stats = Dict[str, jnp.ndarray]


def finite_clients(stacked) -> jnp.ndarray:
  """bool [K]: every leaf of client k's pytree is finite."""
  leaves = jax.tree.leaves(stacked)
  ok = jnp.ones((leaves[0].shape[0],), bool)
  for leaf in leaves:
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
      ok = ok & jnp.all(jnp.isfinite(leaf.reshape(leaf.shape[0], -1)), axis=1)
  return ok


def _normalise(raw: jnp.ndarray, ok: jnp.ndarray) -> jnp.ndarray:
  """raw_k / Σ_{ok} raw_j over included clients; 0 for excluded ones."""
  raw = jnp.where(ok, raw, 0.0)
  total = jnp.sum(raw)
  return jnp.where(total > 0, raw / jnp.where(total > 0, total, 1.0), 0.0)


def _ratio(num: jnp.ndarray, den: jnp.ndarray) -> jnp.ndarray:
  """num/den where both are finite and positive; NaN otherwise (→ excluded)."""
  good = jnp.isfinite(num) & jnp.isfinite(den) & (num > 0) & (den > 0)
  return jnp.where(good, num / jnp.where(good, den, 1.0), jnp.nan)


def weighted_average(global_vars, stacked, weights: jnp.ndarray, ok: jnp.ndarray):
  """ω = Σ_k w_k M_k over included clients; keeps ``global_vars`` if none.

  Non-finite clients are zeroed *before* the sum (NaN × 0 would be NaN).
  Returns (new_vars, failed).
  """
  failed = ~jnp.any(ok & (weights > 0))

  def avg(g, m):
    mk = jnp.where(ok.reshape((-1,) + (1,) * (m.ndim - 1)), m, 0)
    w = weights.astype(m.dtype) if jnp.issubdtype(m.dtype, jnp.inexact) else weights
    new = jnp.tensordot(w, mk, axes=1).astype(g.dtype)
    return jnp.where(failed, g, new)
  return jax.tree.map(avg, global_vars, stacked), failed


def fedavg_weights(stats: Stats, ok: jnp.ndarray) -> jnp.ndarray:
  """FedAvg: w_k = s_k / S, S = Σ_k s_k   (SPEC §4.1, seed eq. 1)."""
  return _normalise(stats["num_samples"], ok)


def costw_weights(stats: Stats, ok: jnp.ndarray, alpha: float = 0.5,
                  cost: str = "cost") -> Tuple[jnp.ndarray, jnp.ndarray]:
  """FedCostW-Avg: w_k = α s_k/S + (1−α) c_k/C   (seed eqs. 2–3),

  c_k = c(M_{t−1}) / c(M_t), C = Σ_k c_k. ``cost`` selects c(M): 'cost'
  (the training loss) for FedCostW-Avg, 'ce' for CostW-Avg+CE where
  c(M) = sigmoid(CE(M)).
  Returns (weights, ok') where ok' also drops clients with non-finite c_k.
  """
  c_k = _cost_ratio(stats, cost)
  ok = ok & jnp.isfinite(c_k)
  w = alpha * _normalise(stats["num_samples"], ok) + (1 - alpha) * _normalise(c_k, ok)
  return w, ok


def dcew_weights(stats: Stats, ok: jnp.ndarray, alpha: float = 0.5, beta: float = 0.25,
                 gamma: float = 0.25) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """DCEW-Avg: w_k = α s_k/S + β c_k/C + γ d_k/D   (seed eq. 4),

  c_k = sigmoid(CE(M_{t−1})) / sigmoid(CE(M_t)) (the CostW-Avg+CE cost),
  d_k = dice(M_t) / dice(M_{t−1}), D = Σ_k d_k, α + β + γ = 1.
  """
  c_k = _cost_ratio(stats, "ce")
  d_k = _ratio(stats["dice_post"], stats["dice_pre"])
  ok = ok & jnp.isfinite(c_k) & jnp.isfinite(d_k)
  w = (alpha * _normalise(stats["num_samples"], ok) + beta * _normalise(c_k, ok)
       + gamma * _normalise(d_k, ok))
  return w, ok


def _cost_ratio(stats: Stats, cost: str) -> jnp.ndarray:
  if cost == "cost":
    return _ratio(stats["cost_pre"], stats["cost_post"])
  if cost == "ce":
    return _ratio(jax.nn.sigmoid(stats["ce_pre"]), jax.nn.sigmoid(stats["ce_post"]))
  raise ValueError(f"cost={cost!r}: expected 'cost' or 'ce'")


def _base_ok(stacked, stats: Stats) -> jnp.ndarray:
  return finite_clients(stacked) & (stats["num_samples"] > 0) & jnp.isfinite(stats["num_samples"])


def fedavg(global_vars, stacked, stats: Stats, **_):
  """ω = (1/S) Σ_k s_k M_k."""
  ok = _base_ok(stacked, stats)
  w = fedavg_weights(stats, ok)
  new, failed = weighted_average(global_vars, stacked, w, ok)
  return new, w, failed


def fedcostw(global_vars, stacked, stats: Stats, alpha: float = 0.5, cost: str = "cost", **_):
  """ω = Σ_k (α s_k/S + (1−α) c_k/C) M_k, c_k = c(M_{t−1})/c(M_t)."""
  w, ok = costw_weights(stats, _base_ok(stacked, stats), alpha, cost)
  w = _normalise(w, ok)
  new, failed = weighted_average(global_vars, stacked, w, ok)
  return new, w, failed


def costw_ce(global_vars, stacked, stats: Stats, alpha: float = 0.5, **_):
  """CostW-Avg+CE: FedCostW-Avg with c(M) = sigmoid(CE(M))."""
  return fedcostw(global_vars, stacked, stats, alpha=alpha, cost="ce")


def dcew(global_vars, stacked, stats: Stats, alpha: float = 0.5, beta: float = 0.25,
         gamma: float = 0.25, **_):
  """ω = Σ_k (α s_k/S + β c_k/C + γ d_k/D) M_k."""
  w, ok = dcew_weights(stats, _base_ok(stacked, stats), alpha, beta, gamma)
  w = _normalise(w, ok)
  new, failed = weighted_average(global_vars, stacked, w, ok)
  return new, w, failed


AGGREGATORS: Dict[str, Callable] = {
    "fedavg": fedavg, "fedcostw": fedcostw, "costw_ce": costw_ce, "dcew": dcew}


def get(name: str) -> Callable:
  if name not in AGGREGATORS:
    raise ValueError(f"config.fl.aggregator={name!r} unknown; available: {sorted(AGGREGATORS)}")
  return AGGREGATORS[name]
