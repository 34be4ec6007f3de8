"""The federated round: K client updates + one aggregation in ONE jitted program.

    run_round(state, data, key) -> (state', info)

      keys_k     = split(fold_in(key, state.round), K)
      M_k, st_k  = client_update(M_{t-1}, data_k, keys_k)     for every k
      M_t, w, ok = aggregator(M_{t-1}, stack(M_k), stack(st_k))

This family is one ``Algorithm`` (fl/algorithm.py: :func:`supervised_algorithm`)
run by the shared round ``algorithm.make_round``.

How "for every k" executes is the backend of ``fl/backends.py``
(config ``fl.client_strategy``: vmap | unrolled | map | sharded | debug | auto);
the E local steps run through the one local-training loop of ``fl/local.py``
(config ``fl.step_strategy``: scan | unrolled | auto). All strategies compute
the same function (tested).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

from fedjax_seg import losses, steps
from fedjax_seg.data.federated import ClientData, sample_batch
from fedjax_seg.fl import algorithm, aggregators, backends, local
from fedjax_seg.models import ModelFns



# The one server state of every algorithm (variables, round, server_opt_state,
# per-client state, algorithm server state): fl/algorithm.py.
ServerState = algorithm.ServerState


@dataclasses.dataclass(frozen=True)
class ClientHParams:
  """From ``config.fl`` (fl/train.client_hparams); no defaults here: they live in
  configs/lgg_fedavg.py get_fl_config()."""
  local_steps: int              # E optimiser steps per round
  batch_size: int
  stats_samples: int            # local samples for the aggregator statistics
  step_strategy: str            # auto | scan | unrolled
  prox_mu: float                # FedProx μ (0 = FedAvg local objective)


def client_stats(fns: ModelFns, loss_name: str, num_classes: int, variables, x, y, mask):
  """cost (training loss), CE and soft foreground Dice coefficient of a model.

  Dice here is the smooth coefficient 1 − soft_dice_loss (ε = 1, background
  excluded for >1 class), so the DCEW ratio d_k is finite and > 0 even for a
  model that predicts no foreground yet.
  """
  logits, _ = fns.apply(variables, x, train=False)
  cost = losses.get_loss(loss_name)(logits, y, num_classes, mask)
  ce = losses.sparse_cross_entropy(logits, y, mask)
  dice = 1.0 - losses.soft_dice_loss(logits, y, num_classes, mask,
                                     include_background=num_classes <= 1)
  return cost, ce, dice


def make_client_update(fns: ModelFns, tx: optax.GradientTransformation, loss_name: str,
                       num_classes: int, hp: ClientHParams,
                       augment: Optional[Callable] = None,
                       penalty: Optional[Callable] = None) -> Callable:
  """Returns the pure ``client_update(variables, data, key, anchor=None, penalty_args=None)
  -> (variables', stats)``.

  data: one client's ClientData slice (x [N, ...], y [N, ...], valid [N]).
  Runs E = hp.local_steps optimiser steps from a fresh optimiser state on
  batches sampled (by key) from the client's real samples; with ``data.steps`` (unequal
  local work) only the first ``data.steps`` ≤ E of them change the model. stats: float32
  scalars num_samples, train_loss, local_steps (τ_k), cost_pre/post, ce_pre/post,
  dice_pre/post.
  FedProx: with hp.prox_mu > 0 the local objective adds (μ/2)‖w − anchor‖², anchor =
  the received parameters (default) or ``anchor`` (Ditto: the global model while the
  personal model trains). ``penalty(params, penalty_args) -> scalar`` is added to the
  local objective (SCAFFOLD's control-variate correction).
  """
  loss = steps.make_loss(fns, loss_name, num_classes, augment)

  def client_update(variables, data: ClientData, key, anchor=None, penalty_args=None):
    skey, tkey = jax.random.split(key)
    sx, sy, smask = sample_batch(data, skey, hp.stats_samples)
    pre = client_stats(fns, loss_name, num_classes, variables, sx, sy, smask)
    anchor = variables["params"] if anchor is None else anchor

    def loss_fn(params, v, k):
      bkey, dkey = jax.random.split(k)
      x, y, m = sample_batch(data, bkey, hp.batch_size)
      value, new_vars = loss(params, v, x, y, m, dkey)
      if hp.prox_mu > 0:
        # Σ of squares, not global_norm(.)**2: d sqrt(x)/dx is inf at x = 0, and the
        # first local step starts at w = w_global, so that form has a NaN gradient.
        value = value + 0.5 * hp.prox_mu * sum(
            jnp.sum(jnp.square(a - b))
            for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(anchor)))
      if penalty is not None:
        value = value + penalty(params, penalty_args)
      return value, (new_vars, ())

    n_steps = getattr(data, "steps", None)   # unequal local work: E_k ≤ hp.local_steps
    new_vars, _, (step_losses, _) = local.local_train(
        loss_fn, tx, variables, jax.random.split(tkey, hp.local_steps),
        strategy=hp.step_strategy, num_steps=n_steps)
    post = client_stats(fns, loss_name, num_classes, new_vars, sx, sy, smask)
    train_loss = jnp.mean(step_losses) if n_steps is None else jnp.nanmean(step_losses)
    tau = jnp.float32(hp.local_steps) if n_steps is None else n_steps.astype(jnp.float32)
    stats = {"num_samples": jnp.sum(data.valid), "train_loss": train_loss, "local_steps": tau,
             "cost_pre": pre[0], "cost_post": post[0], "ce_pre": pre[1], "ce_post": post[1],
             "dice_pre": pre[2], "dice_post": post[2]}
    return new_vars, stats
  return client_update


def model_aggregate(aggregator: Callable, agg_kwargs: Optional[Dict[str, Any]] = None,
                    global_of: Callable = lambda state: state.variables) -> Callable:
  """``Algorithm.aggregate`` for clients that upload one model (upload['model']).

  ``aggregator(global, stacked, stats, **agg_kwargs) -> (agg, weights, failed[, extra])``
  (fl/aggregators.py, dp.py, secagg.py); one with attribute ``wants_round_key = True``
  also gets ``rng=`` (the round's aggregation key, independent of the client keys) and
  ``round=`` (DP noise, secure-aggregation masks). ``global_of(state)``: the global
  model the uploads are aggregated against (FedBN: its shared part).
  """
  agg_kwargs = dict(agg_kwargs or {})
  flat = getattr(aggregator, "coordinatewise", False)  # aggregators.flat_view

  def aggregate(state, upload, stats, a_key):
    dyn = ({"rng": a_key, "round": state.round}
           if getattr(aggregator, "wants_round_key", False) else {})
    g, m, unflatten = aggregators.flat_or_tree(global_of(state), upload["model"], flat)
    out = aggregator(g, m, stats, **agg_kwargs, **dyn)
    return unflatten(out[0]), out[1], out[2], (out[3] if len(out) > 3 else {})
  return aggregate


def optimiser_server_update(server_update: Optional[Callable]) -> Callable:
  """``Algorithm.server_update`` from an optional server optimiser
  ``server_update(state, aggregate, failed) -> (variables, server_opt_state)``
  (fl/server_opt.py); without one the aggregate *is* the next model."""
  def update(state, agg, failed, upload, clients, weights, server_data, key, **_):
    opt_state = state.server_opt_state
    if server_update is not None:
      agg, opt_state = server_update(state, agg, failed)
    return state.replace(variables=agg, round=state.round + 1, server_opt_state=opt_state,
                         clients=clients), {}
  return update


COST_RATIOS = ("local", "rounds")
PREV_KEYS = ("cost", "ce", "dice")


def init_prev_stats(num_clients: int) -> Dict[str, jnp.ndarray]:
  """Per-client state of ``cost_ratio='rounds'``: last round's post-training cost, CE and
  Dice of each client (NaN: never trained yet)."""
  return {k: jnp.full((num_clients,), jnp.nan, jnp.float32) for k in PREV_KEYS}


def rounds_reading(stats, prev):
  """cost_ratio='rounds': the 'pre' statistics become the client's own post-training
  values of the last round it took part in (the local reading where it has none yet).
  Returns (stats', prev')."""
  out = dict(stats)
  for k in PREV_KEYS:
    p = prev[k]
    out[f"{k}_pre"] = jnp.where(jnp.isfinite(p), p, stats[f"{k}_pre"])
    out[f"{k}_pre_local"] = stats[f"{k}_pre"]
  post = {k: jnp.where(jnp.isfinite(stats[f"{k}_post"]), stats[f"{k}_post"], prev[k])
          for k in PREV_KEYS}
  return out, post


def supervised_algorithm(client_update: Callable, aggregator: Callable,
                         agg_kwargs: Optional[Dict[str, Any]] = None,
                         server_update: Optional[Callable] = None,
                         name: str = "supervised", cost_ratio: str = "local") -> algorithm.Algorithm:
  """FedAvg / FedProx / FedCostW / CostW+CE / DCEW / median / trimmed mean / DP /
  secure aggregation / server optimisers: a ``client_update(variables, data_k, key)
  -> (variables', stats)`` (:func:`make_client_update`) uploading its model, the
  aggregator over the uploaded models, an optional server optimiser.

  cost_ratio (config ``fl.cost_ratio``): how c_k = c(M_{t−1}) / c(M_t) (and DCEW's
  d_k = dice(M_t) / dice(M_{t−1})) is read. 'local': M_{t−1} is the received global
  model and M_t the client's model after local training, same round, same samples.
  'rounds': M_{t−1} and M_t are the client's own trained models in consecutive rounds
  it took part in (per-client state :func:`init_prev_stats`; the first round falls
  back to 'local')."""
  if cost_ratio not in COST_RATIOS:
    raise ValueError(f"config.fl.cost_ratio={cost_ratio!r}: expected one of {COST_RATIOS}")

  def client(bcast, inp, key):
    data, client_state, _ = inp
    new_vars, stats = client_update(bcast, data, key)
    if cost_ratio == "rounds":
      stats, client_state = rounds_reading(stats, client_state)
    return {"model": new_vars}, client_state, stats
  return algorithm.Algorithm(name, ("model",), client, model_aggregate(aggregator, agg_kwargs),
                             server_update=optimiser_server_update(server_update))


def make_run_round(client_update: Callable, aggregator: Callable, client_strategy: str = "auto",
                   agg_kwargs: Optional[Dict[str, Any]] = None,
                   server_update: Optional[Callable] = None, clients_per_round: int = 0,
                   sample_probs=None, cost_ratio: str = "local") -> Callable:
  """``run_round(state, data, key) -> (state', info)`` of :func:`supervised_algorithm`
  (jit it once). info: per-client stats [K], 'weights' [K], 'failed' bool,
  'included' [K], 'sampled' [K], plus the aggregator's extra dict (DP clip fraction,
  exclusion reasons, ...). clients_per_round / sample_probs: client sampling
  (``algorithm.make_round``). cost_ratio 'rounds' needs ``state.clients =
  init_prev_stats(K)``."""
  return algorithm.make_round(
      supervised_algorithm(client_update, aggregator, agg_kwargs, server_update,
                           cost_ratio=cost_ratio), client_strategy,
      clients_per_round=clients_per_round, sample_probs=sample_probs)


def model_bytes(variables) -> int:
  """Bytes of one model (all collections) as sent over the wire."""
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(variables)))
