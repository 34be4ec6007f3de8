"""FedBN and SiloBN: normalisation layers stay at each hospital (per-client state).

FedBN (Li et al., ICLR 2021): the normalisation layers' running statistics *and* affine
parameters (scale γ, bias β) are local; every other parameter is aggregated by the
configured aggregator. SiloBN (Andreux et al., MICCAI DART 2020): only the statistics
are local, γ and β are aggregated with the rest. Config ``fl.local_norm = 'fedbn' |
'silobn'`` ('none': everything averaged, the default) with a model that has
normalisation layers (``model.norm = 'batch'``; with 'group'/'layer' FedBN keeps their
affine parameters local, SiloBN has nothing local and is refused).

One round, client k with local part ℓ_k (state.clients row k):

    v_k      = merge(shared(w_{t-1}), ℓ_k)              # the client's own normalisation
    v_k'     = E local steps from v_k                   # core.make_client_update
    upload_k = shared(v_k')                             # only the shared part crosses the wire
    ℓ_k      ← local(v_k')    (kept if non-finite: a diverged client keeps its last good ℓ_k)
    shared(w_t) = aggregator(shared(w_{t-1}), upload [K], stats [K])
    local(w_t)  = (1/K) Σ_k ℓ_k                         # the held-out-site rule below

Evaluation: a validation/test patient of a hospital that trained is segmented with that
hospital's model ``merge(shared(w_t), ℓ_k)`` (:func:`personal_models`); a patient of a
site that never trained (held-out site) is segmented with ``w_t``, whose normalisation is
the **uniform average over clients of their local parameters and running statistics**.
In a real deployment that average costs one extra upload of the normalisation layers at
the end of training; during training nothing local leaves a hospital.

Paths: a leaf is *local* if it is in the 'batch_stats' collection (both modes) or, for
FedBN, a 'params' leaf of a module named ``BatchNorm_*``, ``GroupNorm_*`` or
``LayerNorm_*`` (flax's automatic names, as in models/unet.py).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import flax
import jax
import jax.numpy as jnp

from fedjax_seg.fl import aggregators, algorithm, core

MODES = ("fedbn", "silobn")
NORM_MODULES = ("BatchNorm", "GroupNorm", "LayerNorm")


def is_local(path: Tuple[str, ...], mode: str) -> bool:
  """path: a flattened flax variables path (collection, module..., leaf name)."""
  if mode not in MODES:
    raise ValueError(f"config.fl.local_norm={mode!r}: expected one of ('none',) + {MODES}")
  if path[0] == "batch_stats":
    return True
  return mode == "fedbn" and path[0] == "params" and any(
      p.split("_")[0] in NORM_MODULES for p in path[1:-1])


def split(variables, mode: str) -> Tuple[Dict, Dict]:
  """(shared, local) nested dicts of flax ``variables`` (module docstring)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))
  shared = {p: v for p, v in flat.items() if not is_local(p, mode)}
  local = {p: v for p, v in flat.items() if is_local(p, mode)}
  return (flax.traverse_util.unflatten_dict(shared), flax.traverse_util.unflatten_dict(local))


def merge(shared, local) -> Dict:
  """The variables of ``split`` put back together."""
  flat = {**flax.traverse_util.flatten_dict(shared), **flax.traverse_util.flatten_dict(local)}
  return flax.traverse_util.unflatten_dict(flat)


def check_model(variables, mode: str, model_norm: str) -> None:
  _, local = split(variables, mode)
  if not jax.tree.leaves(local):
    raise ValueError(f"config.fl.local_norm={mode!r} with config.model.norm={model_norm!r}: the "
                     f"model has no {'running statistics' if mode == 'silobn' else 'normalisation layers'} "
                     f"to keep local (use config.model.norm='batch')")


def init_clients(variables, num_clients: int, mode: str):
  """Per-client state: every client starts from the initial model's local part [K, ...]."""
  _, local = split(variables, mode)
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (num_clients,) + a.shape), local)


def personal_models(state: algorithm.ServerState, mode: str):
  """[K, ...] variables: client k's model merge(shared(w_t), ℓ_k)."""
  shared, _ = split(state.variables, mode)
  k = jax.tree.leaves(state.clients)[0].shape[0]
  shared_k = jax.tree.map(lambda a: jnp.broadcast_to(a, (k,) + a.shape), shared)
  return merge(shared_k, state.clients)


def make_algorithm(client_update: Callable, aggregator: Callable, mode: str,
                   agg_kwargs: Optional[Dict[str, Any]] = None) -> algorithm.Algorithm:
  """FedBN / SiloBN over ``client_update(variables, data_k, key) -> (variables', stats)``
  (core.make_client_update) and any model aggregator (fl/aggregators.py, robust)."""
  def client(bcast, inp, key):
    data, local_k, _ = inp
    shared, _ = split(bcast, mode)
    new_vars, stats = client_update(merge(shared, local_k), data, key)
    new_shared, new_local = split(new_vars, mode)
    return {"model": new_shared}, aggregators.keep_if_finite(new_local, local_k), stats

  aggregate = core.model_aggregate(aggregator, agg_kwargs,
                                   global_of=lambda state: split(state.variables, mode)[0])

  def server_update(state, agg, failed, upload, clients, weights, server_data, key, **_):
    mean_local = jax.tree.map(lambda a: jnp.mean(a, axis=0).astype(a.dtype), clients)
    return state.replace(variables=merge(agg, mean_local), round=state.round + 1,
                         clients=clients), {}

  return algorithm.Algorithm(mode, ("model",), client, aggregate, server_update=server_update)
