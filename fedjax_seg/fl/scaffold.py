"""SCAFFOLD (Karimireddy et al., ICML 2020), option II control variates.

Server state c (``state.server``), client k's control c_k (``state.clients`` row k),
both shaped like the model's 'params', zero at the start. One round, x = w_{t-1}:

    client k:  y ← x;  E steps  y ← y − η_l (∇f_k(y) + c − c_k)
               c_k⁺ = c_k − c + (x − y) / (τ_k η_l)                  (option II; τ_k = E,
                                                                      or the client's own
                                                                      steps, unequal work)
               upload (y, Δc_k = c_k⁺ − c_k);  c_k ← c_k⁺
    server:    x ← aggregator(x, {y_k}, stats)                       (η_g = 1: FedAvg-style
                                                                      average of the y_k)
               c ← c + (1/N) Σ_{k∈S} Δc_k                            (N = K clients, S the
                                                                      clients of this round)

The correction c − c_k enters the local objective as the linear term ⟨c − c_k, y⟩
(gradient c − c_k, ``core.make_client_update(penalty=...)``), so the configured local
optimiser applies it; with ``optimizer.name='sgd'`` (configs/lgg_scaffold.py) the steps
are exactly the paper's. η_l is ``config.optimizer.lr``. With an adaptive optimiser
(Adam) the option-II estimate (x − y)/(E η_l) is no longer the mean corrected gradient;
the code runs but the paper's analysis does not apply.

Robustness: a client whose c_k⁺ is non-finite keeps its c_k and uploads Δc_k = 0; only
clients with aggregation weight > 0 contribute Δc_k to c (so an excluded client moves
neither x nor c). Both the model and the control cross the wire each way: the byte
counters (``algorithm.comm_bytes``) count 2× a model's parameters up and down.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp

from fedjax_seg.fl import aggregators, algorithm, core


def zeros_like_params(variables):
  return jax.tree.map(jnp.zeros_like, variables["params"])


def init_clients(variables, num_clients: int):
  """c_k = 0 for every client: [K, ...] like 'params'."""
  return jax.tree.map(lambda a: jnp.zeros((num_clients,) + a.shape, a.dtype),
                      variables["params"])


def correction_penalty(params, corr):
  """⟨c − c_k, y⟩ with the correction held constant (its gradient is c − c_k)."""
  corr = jax.lax.stop_gradient(corr)
  return sum(jnp.sum(p * c) for p, c in zip(jax.tree.leaves(params), jax.tree.leaves(corr)))


def make_algorithm(client_update: Callable, aggregator: Callable, local_lr: float,
                   local_steps: int, num_clients: int,
                   agg_kwargs: Optional[Dict[str, Any]] = None,
                   server_update: Optional[Callable] = None) -> algorithm.Algorithm:
  """client_update: ``core.make_client_update(..., penalty=correction_penalty)``.
  server_update: optional server optimiser on the model (fl/server_opt.py)."""

  def broadcast(state, server_data, key):
    return {"model": state.variables, "control": state.server}, {}

  def client(bcast, inp, key):
    data, c_k, _ = inp
    x, c = bcast["model"], bcast["control"]
    corr = jax.tree.map(jnp.subtract, c, c_k)
    y, stats = client_update(x, data, key, penalty_args=corr)
    # τ_k = the client's local steps (E, or its own under unequal local work)
    inv = 1.0 / (stats.get("local_steps", jnp.float32(local_steps)) * local_lr)
    c_new = jax.tree.map(lambda ck, cc, xp, yp: ck - cc + (xp - yp) * inv,
                         c_k, c, x["params"], y["params"])
    c_new = aggregators.keep_if_finite(c_new, c_k)
    delta = jax.tree.map(jnp.subtract, c_new, c_k)
    return {"model": y, "control": delta}, c_new, stats

  model_agg = core.model_aggregate(aggregator, agg_kwargs)

  def aggregate(state, upload, stats, a_key):
    model, weights, failed, extra = model_agg(state, upload, stats, a_key)
    inc = (weights > 0).astype(jnp.float32)

    def dsum(d):
      d = jnp.where(inc.reshape((-1,) + (1,) * (d.ndim - 1)) > 0, d, 0)
      return (jnp.tensordot(inc, d, axes=1) / num_clients).astype(d.dtype)
    _, deltas, unflatten = aggregators.flat_or_tree(state.server, upload["control"])
    control_delta = unflatten(jax.tree.map(dsum, deltas))
    return {"model": model, "control_delta": control_delta}, weights, failed, extra

  def update(state, agg, failed, upload, clients, weights, server_data, key, **_):
    model, opt_state = agg["model"], state.server_opt_state
    if server_update is not None:
      model, opt_state = server_update(state, model, failed)
    c = jax.tree.map(jnp.add, state.server, agg["control_delta"])
    return state.replace(variables=model, round=state.round + 1, server_opt_state=opt_state,
                         clients=clients, server=c), {}

  return algorithm.Algorithm("scaffold", ("model", "control"), client, aggregate,
                             broadcast=broadcast, server_update=update)
