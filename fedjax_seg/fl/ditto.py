"""Ditto (Li et al., ICML 2021): a global model and one personalised model per hospital.

Client k keeps a personal model v_k (``state.clients`` row k, all variables, starting from
the initial global model). One round, w = w_{t-1} received:

    global part:    w_k = E local steps from w on F_k            (FedAvg's client update)
    personal part:  v_k ← E local steps from v_k on F_k(v) + (λ/2)‖v − w‖²
                                                                 (anchor: the received w)
    upload w_k only; server: w_t = aggregator(w, {w_k}, stats)   (any model aggregator)

λ is ``config.fl.ditto_lambda`` (> 0 switches Ditto on). The personal model never
leaves the hospital: the bytes counters see one model each way, as FedAvg. A client
whose personal update is non-finite keeps its last v_k. The personal step uses a key
independent of the global step's (``fold_in(key_k, 1)``).

Evaluation: results.json holds both the global model's metrics (``metrics``, the one
``final_model.msgpack`` holds) and the personalised ones (``personalised``: each
trained hospital's patients segmented by that hospital's v_k; patients of a site that
never trained by the global model).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp

from fedjax_seg.fl import aggregators, algorithm, core


def init_clients(variables, num_clients: int):
  """v_k = the initial global model for every client: [K, ...]."""
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (num_clients,) + a.shape), variables)


def personal_models(state: algorithm.ServerState):
  return state.clients


def make_algorithm(client_update: Callable, personal_update: Callable, aggregator: Callable,
                   agg_kwargs: Optional[Dict[str, Any]] = None,
                   server_update: Optional[Callable] = None) -> algorithm.Algorithm:
  """client_update: the global model's local training (core.make_client_update);
  personal_update: the same with prox_mu = λ, called with anchor = the received w."""
  def client(bcast, inp, key):
    data, v_k, _ = inp
    w_k, stats = client_update(bcast, data, key)
    v_new, pstats = personal_update(v_k, data, jax.random.fold_in(key, 1),
                                    anchor=bcast["params"])
    v_new = aggregators.keep_if_finite(v_new, v_k)
    stats = {**stats, "personal_train_loss": pstats["train_loss"],
             "personal_dice_post": pstats["dice_post"]}
    return {"model": w_k}, v_new, stats

  return algorithm.Algorithm("ditto", ("model",), client,
                             core.model_aggregate(aggregator, agg_kwargs),
                             server_update=core.optimiser_server_update(server_update))
