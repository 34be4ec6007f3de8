"""Server optimisers on the aggregated update (Reddi et al., "Adaptive Federated
Optimization", ICLR 2021; Hsu et al., 2019 for FedAvgM).

The aggregator (any of SPEC §4.1, or median / trimmed mean) decides *which*
average ω_t of the client models to take; the server optimiser decides the
*step* towards it. With the pseudo-gradient

    g_t = x_{t−1} − ω_t          (= −Δ_t, Δ_t the aggregated client update)

every optimiser is an ``optax.GradientTransformation`` applied to g_t:

  'none'        x_t = ω_t                                         (plain averaging)
  'fedavgm'     v_t = β v_{t−1} + g_t;  x_t = x_{t−1} − η v_t       (optax.sgd momentum)
  'fedadam'     m_t = β1 m_{t−1} + (1−β1) g_t
                v_t = β2 v_{t−1} + (1−β2) g_t²
                x_t = x_{t−1} − η m_t / (√v_t + τ)
  'fedyogi'     as fedadam with v_t = v_{t−1} − (1−β2) g_t² sign(v_{t−1} − g_t²)
  'fedadagrad'  as fedadam with v_t = v_{t−1} + g_t²
with m_{−1} = 0, v_{−1} = τ² and *no* bias correction, exactly Reddi et al.
Algorithm 2 (optax.adam / optax.yogi add bias correction, optax.adagrad has no
momentum, so those three are one small transformation here, ``scale_by_reddi``).
'fedavgm' with η = 1, β = 0 is FedAvg.

Only the 'params' collection is stepped; other collections (batch_stats)
take the aggregate. A failed round (no client included) keeps the model
and the optimiser state.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

SERVER_OPTS = ("none", "fedavgm", "fedadam", "fedyogi", "fedadagrad")


class ReddiState(NamedTuple):
  m: Any   # first moment, like params
  v: Any   # second moment, like params


def scale_by_reddi(mode: str, b1: float = 0.9, b2: float = 0.99,
                   tau: float = 1e-3) -> optax.GradientTransformation:
  """g ↦ m_t / (√v_t + τ), Reddi et al. 2021 Algorithm 2 (see module docstring).

  mode: 'adam' | 'yogi' | 'adagrad' selects the v_t recursion.
  """
  if mode not in ("adam", "yogi", "adagrad"):
    raise ValueError(f"scale_by_reddi mode={mode!r}: expected adam, yogi or adagrad")

  def init(params):
    return ReddiState(m=jax.tree.map(jnp.zeros_like, params),
                      v=jax.tree.map(lambda p: jnp.full_like(p, tau ** 2), params))

  def update(g, state, params=None):
    del params
    m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.m, g)
    if mode == "adam":
      v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.v, g)
    elif mode == "yogi":
      v = jax.tree.map(lambda v, g: v - (1 - b2) * g * g * jnp.sign(v - g * g), state.v, g)
    else:
      v = jax.tree.map(lambda v, g: v + g * g, state.v, g)
    out = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + tau), m, v)
    return out, ReddiState(m=m, v=v)
  return optax.GradientTransformation(init, update)


def make_server_optimizer(name: str, lr: float = 1.0, momentum: float = 0.9, b1: float = 0.9,
                          b2: float = 0.99, tau: float = 1e-3
                          ) -> Optional[optax.GradientTransformation]:
  """The optax transformation of server optimiser ``name`` (None for 'none')."""
  if name not in SERVER_OPTS:
    raise ValueError(f"config.fl.server_opt={name!r}: expected one of {SERVER_OPTS}")
  if name == "none":
    return None
  if lr <= 0:
    raise ValueError(f"config.fl.server_lr={lr} must be > 0")
  if name == "fedavgm":
    return optax.sgd(lr, momentum=momentum if momentum > 0 else None)
  return optax.chain(scale_by_reddi(name[3:], b1, b2, tau), optax.scale(-lr))


def from_config(fl) -> Optional[optax.GradientTransformation]:
  """From ``config.fl`` keys server_opt, server_lr, server_momentum, server_b1,
  server_b2, server_tau."""
  return make_server_optimizer(fl.server_opt, fl.server_lr, fl.server_momentum, fl.server_b1,
                               fl.server_b2, fl.server_tau)


def init(tx: Optional[optax.GradientTransformation], variables) -> Any:
  """Initial ``ServerState.server_opt_state`` (``()`` without an optimiser)."""
  return () if tx is None else tx.init(variables["params"])


def pseudo_gradient(global_params, aggregate_params):
  """g_t = x_{t−1} − ω_t."""
  return jax.tree.map(jnp.subtract, global_params, aggregate_params)


def make_server_update(tx: optax.GradientTransformation) -> Callable:
  """``server_update(state, aggregate, failed) -> (variables, opt_state)`` for
  ``core.make_run_round``."""

  def server_update(state, aggregate, failed):
    params = state.variables["params"]
    g = pseudo_gradient(params, aggregate["params"])
    updates, opt_state = tx.update(g, state.server_opt_state, params)
    new_params = optax.apply_updates(params, updates)
    new_vars = {**aggregate, "params": new_params}
    keep = lambda old, new: jax.tree.map(lambda a, b: jnp.where(failed, a, b), old, new)
    return keep(state.variables, new_vars), keep(state.server_opt_state, opt_state)
  return server_update
