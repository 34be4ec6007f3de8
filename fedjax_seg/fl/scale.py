"""Scale: clients sharded over devices, several hosts, clients streamed in chunks.
Every path computes the same round as ``core.make_run_round``
(tested in tests/test_sharding.py, tests/test_chunks.py, tests/test_distributed.py).

Sharded clients (``config.fl.client_strategy = 'sharded'``, ``backends.for_each_client``)
    The client axis is placed on the axis ``'clients'`` of a
    ``jax.sharding.Mesh`` over all devices (of all processes, after
    ``jax.distributed.initialize``) with ``jax.shard_map``; each device runs its
    K/D clients with the per-device strategy ``inner`` ('auto': vmap on gpu/tpu,
    unrolled on cpu). K not divisible by D is padded to K_p = D·⌈K/D⌉ with
    zero-sample clients (valid = 0, so s_k = 0 and every aggregator gives them
    weight 0); their outputs are dropped before the aggregator, so the
    aggregator sees exactly the K real clients (DP-FedAvg's public denominator K
    and secure aggregation's K pairwise seeds stay right). The models are not
    gathered: the aggregator's Σ_k w_k M_k over the sharded axis compiles to
    per-device partial sums + an all-reduce.

Streamed chunks (``config.fl.clients_per_chunk = C > 0``)
    Client data stay in host memory; clients go to the device C at a time
    (the last chunk padded with zero-sample clients, so one program is compiled).
    The linear aggregators (fedavg, fedcostw, costw_ce, dcew) weight client k as
    w_k = Σ_j a_j r_jk / R_j with normalisers R_j = Σ_k r_jk over ALL clients
    (``aggregators.linear_terms``). Choice: ONE pass of client training; each
    chunk adds its numerators N_j += Σ_{k ok} r_jk M_k and normalisers
    R_j += Σ_{k ok} r_jk to a running sum, and the model is finalised after the
    last chunk as ω = Σ_j a_j N_j / R_j / Σ_{j: R_j>0} a_j. (The alternative,
    stats of all chunks first, would train every client twice.) Memory: one
    model per term (≤ 3) + one chunk of client models. The result equals the
    all-at-once round up to float summation order (tested); the weights
    reported in ``info`` are computed from all K clients' stats by
    ``aggregators.linear_weights`` and equal the all-at-once weights.
    Non-linear aggregators (median, trimmed mean, norm-based exclusion, DP with
    clipping/noise, secure aggregation) need all client models at once and
    are refused with a ValueError naming the key.

Mixed precision (``config.model.dtype = 'bfloat16'``): the U-Net computes in
bf16 (convolutions, activations) with f32 parameters, f32 logits/losses,
f32 gradients, optimiser states and aggregation.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedjax_seg.data.federated import ClientData
from fedjax_seg.fl import aggregators, algorithm, backends, core
from fedjax_seg.fl.backends import CLIENT_AXIS, client_mesh, pad_clients, pad_keys

# --- placement (single host and several hosts) ------------------------------------


def to_global(tree, sharding: NamedSharding):
  """Places every leaf with ``sharding``. Works with several processes: each
  process holds the full value (host NumPy, a local array or a fully
  replicated global one) and contributes its addressable shards."""
  def put(x):
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    if jax.process_count() == 1:
      return jax.device_put(x, sharding)
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
      raise ValueError("to_global: pass raw uint32 keys (jax.random.PRNGKey), not typed keys")
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
  return jax.tree.map(put, tree)


def place_round_inputs(state, data: ClientData, key, mesh: Optional[Mesh] = None):
  """(state, data, key) on the mesh: state and key replicated; data sharded on
  'clients' when K is a multiple of the device count, else replicated (the
  round pads inside the jit). Needed with several processes (the jitted round
  then spans all of them); on one host it avoids re-sending the data each round."""
  mesh = client_mesh() if mesh is None else mesh
  rep = NamedSharding(mesh, P())
  k, d = data.x.shape[0], mesh.shape[CLIENT_AXIS]
  dsh = NamedSharding(mesh, P(CLIENT_AXIS)) if k % d == 0 else rep
  return to_global(state, rep), to_global(data, dsh), to_global(key, rep)


# --- streamed chunks of clients ------------------------------------------------------


def check_chunked(config, aggregator: Optional[str] = None) -> None:
  """Refuses the combinations a streamed round cannot compute exactly (the norm_k
  exclusion is skipped, with a note). aggregator: what averages the clients' models
  (default config.algorithm; 'fedavg' for the semi-supervised and FCL rounds)."""
  fl = config.fl
  aggregator = aggregator or config.algorithm
  c = fl.clients_per_chunk
  if not c:
    return
  if c < 0:
    raise ValueError(f"config.fl.clients_per_chunk={c} must be >= 0 (0 = all clients at once)")
  if fl.client_strategy == "loop":
    raise ValueError(f"config.fl.clients_per_chunk={c} cannot be combined with "
                     f"config.fl.client_strategy='loop' (each already compiles one client "
                     f"program and reuses it): set one of them")
  if aggregator not in aggregators.LINEAR_AGGREGATORS:
    raise ValueError(f"config.fl.clients_per_chunk={c} needs a linear aggregator "
                     f"{aggregators.LINEAR_AGGREGATORS}; config.algorithm={config.algorithm!r} "
                     f"needs all client models at once")
  for bad, why in (("secagg", bool(fl.secagg)), ("dp.enabled", bool(fl.dp.enabled))):
    if why:
      raise ValueError(f"config.fl.clients_per_chunk={c} cannot be combined with "
                       f"config.fl.{bad} (needs all client models at once)")
  if fl.norm_k > 0:
    print(f"[fl] note: config.fl.norm_k={fl.norm_k} is not applied with config.fl."
          f"clients_per_chunk={c} (the median update norm needs all client models at once); "
          f"clients with non-finite models or no samples are still excluded", flush=True)


def _add_weighted(n, m, ok, r):
  """n + Σ_{k ok} r_k m_k (f32) of one leaf of a chunk of client models m [C, ...]."""
  okb = ok.reshape((-1,) + (1,) * (m.ndim - 1))
  return n + jnp.tensordot(jnp.where(ok, r, 0.0).astype(jnp.float32),
                           jnp.where(okb, m, 0).astype(jnp.float32), axes=1)


def _stream(k: int, C: int, chunk_fn: Callable, acc, pieces, keys, *args):
  """Runs ``chunk_fn(*args, pieces' chunk, keys' chunk, acc) -> (acc, *out)`` over the K
  clients C at a time (each piece of ``pieces`` a pytree [K, ...], the last chunk padded
  with zero clients); returns (acc, the outputs concatenated over the K real clients)."""
  outs = []
  for lo in range(0, k, C):
    hi = min(lo + C, k)
    piece = lambda t: (pad_clients(jax.tree.map(lambda a: a[lo:hi], t), C)
                       if jax.tree.leaves(t) else t)
    acc, *out = chunk_fn(*args, piece(pieces), pad_keys(keys[lo:hi], C), acc)
    outs.append(out)
  return acc, jax.tree.map(lambda *xs: jnp.concatenate(xs)[:k], *outs)


def _stream_info(stats, weights, failed, upd, finite) -> Dict[str, Any]:
  """info of a streamed round: stats [K], weights, failure, and the robust-report keys."""
  empty = ~((stats["num_samples"] > 0) & jnp.isfinite(stats["num_samples"]))
  return {**stats, "weights": weights, "failed": failed, "included": weights > 0,
          "update_norm": upd, "excl_nonfinite": ~finite, "excl_empty": finite & empty,
          "excl_norm": jnp.zeros_like(finite), "excl_stats": finite & ~empty & ~(weights > 0)}


def make_chunked_round(client_update: Callable, algorithm: str, clients_per_chunk: int,
                       client_strategy: str = "auto",
                       agg_kwargs: Optional[Dict[str, Any]] = None,
                       server_update: Optional[Callable] = None,
                       jit: Callable = lambda name, build: jax.jit(build())) -> Callable:
  """``run_round(state, data, key) -> (state', info)`` streaming C clients at a time.

  Same contract and same result as ``jax.jit(core.make_run_round(client_update,
  aggregators.get(algorithm), ...))`` (see the module docstring for how the
  weights' normalisers over all clients are handled). ``data`` may live in host
  memory (NumPy ClientData, ``federated.stack_clients(..., host=True)``); each
  chunk is copied to the device when it is its turn. Not jittable as a whole
  (that would put every chunk on the device at once): it runs two jitted
  programs, compiled once each: ``chunk`` (C client updates + running sums)
  and ``finish`` (ω, weights, server update). ``jit(name, build)`` lets a
  trainer memoise them (runlog.cached_jit).
  info: per-client stats [K], 'weights' [K], 'failed', 'included' [K], and the
  robust-report keys 'update_norm', 'excl_nonfinite', 'excl_empty',
  'excl_norm' (all False), 'excl_stats'.
  """
  if clients_per_chunk < 1:
    raise ValueError(f"config.fl.clients_per_chunk={clients_per_chunk} must be >= 1")
  agg_kwargs = dict(agg_kwargs or {})
  aggregators.linear_terms(algorithm, {"a": jnp.zeros((1,))},  # fail fast on the name
                           {k: jnp.ones((1,)) for k in ("num_samples", "cost_pre", "cost_post",
                                                        "ce_pre", "ce_post", "dice_pre",
                                                        "dice_post")}, **agg_kwargs)
  clients = backends.for_each_client(client_update, client_strategy)
  C = clients_per_chunk

  def chunk_step(variables, data, keys, acc):
    stacked, stats = clients(variables, data, keys)
    ok, terms = aggregators.linear_terms(algorithm, stacked, stats, **agg_kwargs)
    sums, norms_ = acc
    sums = tuple(jax.tree.map(functools.partial(_add_weighted, ok=ok, r=r), n, stacked)
                 for n, (_, r) in zip(sums, terms))
    norms_ = tuple(R + jnp.sum(jnp.where(ok, r, 0.0)) for R, (_, r) in zip(norms_, terms))
    upd = aggregators.update_norms(variables, stacked)
    finite = aggregators.finite_clients(stacked)
    return (sums, norms_), stats, ok, jnp.where(finite, upd, jnp.nan), finite

  def finish(state, acc, stats, ok):
    sums, norms_ = acc
    _, terms = aggregators.linear_terms(algorithm, {"a": jnp.zeros_like(ok, jnp.float32)},
                                        stats, **agg_kwargs)
    weights = aggregators.linear_weights(terms, ok)
    coef = [a * (R > 0) for (a, _), R in zip(terms, norms_)]
    total = sum(coef)
    failed = ~(total > 0)

    def combine(g, *ns):
      new = sum(c / jnp.where(total > 0, total, 1.0) * n / jnp.where(R > 0, R, 1.0)
                for c, n, R in zip(coef, ns, norms_))
      return jnp.where(failed, g, new.astype(g.dtype))
    new_vars = jax.tree.map(combine, state.variables, *sums)
    opt_state = state.server_opt_state
    if server_update is not None:
      new_vars, opt_state = server_update(state, new_vars, failed)
    return core.ServerState(new_vars, state.round + 1, opt_state), weights, failed

  chunk_fn = jit("chunk", lambda: chunk_step)
  finish_fn = jit("finish", lambda: finish)
  n_terms = {"fedavg": 1, "dcew": 3}.get(algorithm, 2)

  def run_round(state: core.ServerState, data: ClientData, key):
    k = data.x.shape[0]
    keys = jax.random.split(jax.random.fold_in(key, state.round), k)
    zeros = jax.tree.map(lambda g: jnp.zeros(g.shape, jnp.float32), state.variables)
    acc = (tuple(zeros for _ in range(n_terms)), tuple(jnp.float32(0) for _ in range(n_terms)))
    acc, (stats, ok, upd, finite) = _stream(k, C, chunk_fn, acc, data, keys, state.variables)
    new_state, weights, failed = finish_fn(state, acc, stats, ok)
    return new_state, _stream_info(stats, weights, failed, upd, finite)
  return run_round


def make_chunked_algorithm_round(alg: algorithm.Algorithm, clients_per_chunk: int,
                                 client_strategy: str = "auto",
                                 jit: Callable = lambda name, build: jax.jit(build())) -> Callable:
  """``run_round(state, data, key, **round_options) -> (state', info)`` of an
  ``algorithm.Algorithm`` that declares ``fedavg_model`` (the semi-supervised methods,
  FCL pre-training), streaming C clients at a time.

  Same result as ``algorithm.make_round(alg, ...)`` without client sampling, up to float
  summation order (tested), except that the divergence guard's norm exclusion (which
  needs every update at once) is not applied, as in :func:`make_chunked_round`. Three
  jitted programs, compiled once each: ``broadcast``, ``chunk`` (C client updates, the
  running FedAvg sums of upload['model'] and ``num_samples``) and ``finish`` (the
  average, ``alg.server_update``). The other uploads (FCL's banks: small) and the
  per-client state rows are gathered over the chunks to [K, ...] for ``server_update``.
  ``data`` may hold host NumPy arrays; each chunk goes to the device on its turn.
  info: as ``make_round``'s, plus the robust-report keys of :func:`make_chunked_round`.
  """
  if clients_per_chunk < 1:
    raise ValueError(f"config.fl.clients_per_chunk={clients_per_chunk} must be >= 1")
  if not alg.fedavg_model:
    raise ValueError(f"config.fl.clients_per_chunk={clients_per_chunk}: {alg.name} does not "
                     f"average one uploaded model by FedAvg, so its clients cannot be streamed")
  C = clients_per_chunk
  clients = backends.for_each_client(alg.client_update, client_strategy,
                                     stage=f"{alg.name} client update")
  others = tuple(u for u in alg.uploads if u != "model")

  def chunk_step(variables, bcast, inputs, keys, acc):
    upload, rows, stats = clients(bcast, inputs, keys)
    stacked = upload["model"]
    ok, ((_, r),) = aggregators.linear_terms("fedavg", stacked, stats)
    total, num = acc
    num = jax.tree.map(functools.partial(_add_weighted, ok=ok, r=r), num, stacked)
    upd = aggregators.update_norms(variables, stacked)
    finite = aggregators.finite_clients(stacked)
    return ((total + jnp.sum(jnp.where(ok, r, 0.0)), num), rows, stats,
            {o: upload[o] for o in others}, ok, jnp.where(finite, upd, jnp.nan), finite)

  def finish(state, acc, stats, ok, rows, other_uploads, server_data, s_key, round_options):
    total, num = acc
    _, terms = aggregators.linear_terms("fedavg", {"a": jnp.zeros_like(ok, jnp.float32)}, stats)
    weights = aggregators.linear_weights(terms, ok)
    failed = ~(total > 0)
    agg = jax.tree.map(
        lambda g, n: jnp.where(failed, g, (n / jnp.where(failed, 1.0, total)).astype(g.dtype)),
        state.variables, num)
    upload = {**other_uploads, "model": None}
    new_state, info_s = alg.server_update(state, agg, failed, upload, rows, weights,
                                          server_data, s_key, **round_options)
    return new_state, info_s, weights, failed

  bcast_fn = jit("broadcast", lambda: lambda st, sd, k: (alg.broadcast(st, sd, k),
                                                        alg.downlink(st)))
  chunk_fn = jit("chunk", lambda: chunk_step)
  finish_fn = jit("finish", lambda: finish)

  def run_round(state, data, key, **round_options):
    per_client, server_data = alg.split_data(data)
    k = backends.num_clients(per_client)
    r_key = jax.random.fold_in(key, state.round)
    b_key, c_keys, s_key, _ = algorithm.round_keys(alg.key_scheme, r_key, k)
    (bcast, info_b), down = bcast_fn(state, server_data, b_key)
    zeros = jax.tree.map(lambda g: jnp.zeros(g.shape, jnp.float32), state.variables)
    acc = (jnp.float32(0), zeros)
    acc, (rows, stats, other_uploads, ok, upd, finite) = _stream(
        k, C, chunk_fn, acc, (per_client, state.clients, down), c_keys, state.variables, bcast)
    new_state, info_s, weights, failed = finish_fn(state, acc, stats, ok, rows, other_uploads,
                                                   server_data, s_key, round_options)
    info = _stream_info(stats, weights, failed, upd, finite)
    return new_state, {**info_b, **info_s, **info, "sampled": jnp.ones((k,), bool)}
  return run_round
