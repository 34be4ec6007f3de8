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

Robust options: ``robust(aggregator, norm_k)`` also excludes a
client whose update norm exceeds norm_k × the median update norm of the other
clients (the divergence guard, on by default: config ``fl.norm_k = 10``) and
reports why each client was excluded; ``median`` / ``trimmed_mean`` are coordinate-wise
robust aggregators (Yin et al., ICML 2018).

Every aggregator returns ``(new_variables, weights [K], failed bool[])``.
Weighting of clients lives here only; algorithms never re-implement averaging.

Coordinate-wise aggregators (attribute ``coordinatewise = True``: every aggregator of
this module, and ``robust`` / ``nova`` around one) compute coordinate by coordinate or over
all of a client's coordinates at once, so in the loop round's aggregation program (traced
under :func:`flat_aggregation`) ``core.model_aggregate`` hands them the models as a few
vectors per client (:func:`flat_view`) and reshapes the result back; the others (DP-FedAvg's
per-leaf noise, secure aggregation's per-leaf masks) and every other round (vmap,
sharded, one program) get the pytrees. Called directly, every aggregator takes either.
"""
from __future__ import annotations

import contextlib
import contextvars
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


def keep_if_finite(new, old):
  """One client's state: ``new`` if every leaf is finite, else ``old`` (a diverged client
  keeps its last good per-client state)."""
  ok = finite_clients(jax.tree.map(lambda a: a[None], new))[0]
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


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


# --- Robust aggregation ---------------------------------------------


def update_norms(global_vars, stacked) -> jnp.ndarray:
  """float32 [K]: ‖M_k − M_{t−1}‖₂ over every inexact leaf (all collections);
  non-finite for a client with a non-finite leaf."""
  sq = 0.0
  for g, m in zip(jax.tree.leaves(global_vars), jax.tree.leaves(stacked)):
    if jnp.issubdtype(m.dtype, jnp.inexact):
      d = (m - g[None]).astype(jnp.float32).reshape(m.shape[0], -1)
      sq = sq + jnp.sum(d * d, axis=1)
  return jnp.sqrt(sq)


def exploding_clients(norms: jnp.ndarray, ok: jnp.ndarray, k: float) -> jnp.ndarray:
  """bool [K]: ok clients with ‖Δ_k‖ > k · median_{j ok, j ≠ k} ‖Δ_j‖ (k <= 0: none).

  The reference is the leave-one-out median (over the *other* included
  clients), so an outlier is caught from K = 2 on; a client with no other
  included client to compare with (K = 1) is never excluded.
  norms: float [K] update norms; ok: bool [K] clients eligible for the test.
  """
  if k <= 0:
    return jnp.zeros_like(ok)
  n = norms.shape[0]
  others = ok[None, :] & ~jnp.eye(n, dtype=bool)                    # [K, K]: j ok, j ≠ k
  ref = jnp.nanmedian(jnp.where(others, norms[None, :], jnp.nan), axis=1)
  return ok & jnp.isfinite(ref) & (norms > k * ref)


EXCLUSION_REASONS = ("nonfinite", "empty", "norm", "stats")


def robust(aggregator: Callable, norm_k: float = 0.0) -> Callable:
  """Wraps an aggregator: exploding-norm exclusion + per-reason exclusion report.

  Client k is excluded (weight 0, others renormalised by the inner aggregator) for
    'nonfinite'  a non-finite leaf in M_k,
    'empty'      s_k = 0 (or non-finite),
    'norm'       ‖M_k − M_{t−1}‖ > norm_k · the median norm of the other included
                 clients (norm_k > 0; not applied when the inner aggregator bounds every
                 update itself, ``bounds_updates = True``: DP-FedAvg's clipping),
    'stats'      the inner aggregator dropped it (e.g. a non-finite c_k or d_k).
  The 'norm' exclusion is passed to the inner aggregator as s_k = 0, so it
  composes with every aggregator without changing it. Returns the inner
  aggregator's (new, weights, failed) plus extra {'update_norm' [K],
  'excl_<reason>' bool [K]} (and the inner aggregator's own extra dict).
  """
  def agg(global_vars, stacked, stats: Stats, **kw):
    norms = update_norms(global_vars, stacked)
    finite = finite_clients(stacked)
    empty = ~((stats["num_samples"] > 0) & jnp.isfinite(stats["num_samples"]))
    k = 0.0 if getattr(aggregator, "bounds_updates", False) else norm_k
    explode = exploding_clients(norms, finite & ~empty, k)
    stats = {**stats, "num_samples": jnp.where(explode, 0.0, stats["num_samples"])}
    out = aggregator(global_vars, stacked, stats, **kw)
    new, w, failed = out[:3]
    extra = dict(out[3]) if len(out) > 3 else {}
    extra.update({"update_norm": jnp.where(finite, norms, jnp.nan),
                  "excl_nonfinite": ~finite, "excl_empty": finite & empty,
                  "excl_norm": explode, "excl_stats": finite & ~empty & ~explode & ~(w > 0)})
    return new, w, failed, extra
  agg.wants_round_key = getattr(aggregator, "wants_round_key", False)
  agg.bounds_updates = getattr(aggregator, "bounds_updates", False)
  agg.coordinatewise = getattr(aggregator, "coordinatewise", False)
  agg.__name__ = f"robust_{getattr(aggregator, '__name__', 'agg')}"
  return agg


def _nominal_weights(ok: jnp.ndarray) -> jnp.ndarray:
  n = jnp.sum(ok)
  return jnp.where(ok, 1.0 / jnp.maximum(n, 1), 0.0).astype(jnp.float32)


def coordinate_median(global_vars, stacked, stats: Stats, **_):
  """ω_i = median_{k ok} M_{k,i} for every coordinate i (Yin et al., 2018).

  Sample counts are ignored (each included client counts once); the mean of
  the two middle values for an even number of clients. weights: nominal 1/n
  for the n included clients (the median has no per-client weights).
  """
  ok = _base_ok(stacked, stats)
  failed = ~jnp.any(ok)

  def med(g, m):
    if not jnp.issubdtype(m.dtype, jnp.inexact):
      return g
    okb = ok.reshape((-1,) + (1,) * (m.ndim - 1))
    new = jnp.nanmedian(jnp.where(okb, m, jnp.nan), axis=0).astype(g.dtype)
    return jnp.where(failed, g, new)
  return jax.tree.map(med, global_vars, stacked), _nominal_weights(ok), failed


def trimmed_mean(global_vars, stacked, stats: Stats, trim: float = 0.1, **_):
  """ω_i = mean of the included clients' M_{k,i} after dropping the ⌊trim·n⌋
  smallest and ⌊trim·n⌋ largest values of coordinate i (Yin et al., 2018).

  n = number of included clients (dynamic under jit); trim in [0, 0.5).
  trim = 0 is the unweighted mean. weights: nominal 1/n.
  """
  if not 0.0 <= trim < 0.5:
    raise ValueError(f"config.fl.trim={trim}: expected 0 <= trim < 0.5")
  ok = _base_ok(stacked, stats)
  n = jnp.sum(ok)
  t = jnp.floor(trim * n).astype(jnp.int32)
  failed = ~jnp.any(ok)

  def tmean(g, m):
    if not jnp.issubdtype(m.dtype, jnp.inexact):
      return g
    okb = ok.reshape((-1,) + (1,) * (m.ndim - 1))
    srt = jnp.sort(jnp.where(okb, m, jnp.inf), axis=0)  # excluded clients sort last
    pos = jnp.arange(m.shape[0]).reshape(okb.shape)
    keep = (pos >= t) & (pos < n - t)
    new = jnp.sum(jnp.where(keep, srt, 0.0), axis=0) / jnp.maximum(n - 2 * t, 1)
    return jnp.where(failed, g, new.astype(g.dtype))
  return jax.tree.map(tmean, global_vars, stacked), _nominal_weights(ok), failed


def nova(inner: Callable) -> Callable:
  """FedNova (Wang et al., NeurIPS 2020): normalised averaging for unequal local work.

  With the inner aggregator's weights p_k and client k's local steps τ_k
  (``stats['local_steps']``), x = the global model:

      x_t = x − τ_eff Σ_k p_k (x − y_k) / τ_k,      τ_eff = Σ_k p_k τ_k

  Each client's update is normalised to one step, then scaled back by the average work,
  so a client that ran more steps no longer pulls the model further towards its own
  optimum. With equal τ_k this is the inner weighted average exactly. For the
  weighted-average aggregators (fedavg, fedcostw, costw_ce, dcew).
  """
  def agg(global_vars, stacked, stats: Stats, **kw):
    out = inner(global_vars, stacked, stats, **kw)
    _, w, failed = out[0], out[1], out[2]
    ok = w > 0
    tau = jnp.where(ok, stats["local_steps"], 1.0)
    tau_eff = jnp.sum(w * tau)

    def upd(g, m):
      if not jnp.issubdtype(m.dtype, jnp.inexact):
        return g
      okb = ok.reshape((-1,) + (1,) * (m.ndim - 1))
      d = jnp.where(okb, (g[None] - m) / tau.reshape(okb.shape).astype(m.dtype), 0)
      new = g - tau_eff.astype(m.dtype) * jnp.tensordot(w.astype(m.dtype), d, axes=1)
      return jnp.where(failed, g, new.astype(g.dtype))
    return (jax.tree.map(upd, global_vars, stacked), w, failed) + tuple(out[3:])
  agg.wants_round_key = getattr(inner, "wants_round_key", False)
  agg.coordinatewise = getattr(inner, "coordinatewise", False)
  agg.__name__ = f"nova({getattr(inner, '__name__', 'aggregator')})"
  return agg


for _agg in (fedavg, fedcostw, costw_ce, dcew, coordinate_median, trimmed_mean):
  _agg.coordinatewise = True  # see flat_view
del _agg


FLAT_GROUPS = 2  # vectors per client in flat_view (docs/performance.md: 2 cores)
_FLAT = contextvars.ContextVar("fedjax_seg_flat_aggregation", default=False)


@contextlib.contextmanager
def flat_aggregation():
  """Within it, ``core.model_aggregate`` (and SCAFFOLD's control sum) trace the
  aggregation on :func:`flat_view`. The loop round traces its aggregation program under
  it: there each client's row is a call's own output, so the vectors cost one copy per
  client and the program compiles 1.3–2.2× faster on XLA:CPU. Elsewhere (vmap, sharded
  clients, one-program rounds) the pytrees stay: stacking client by client would grow the
  program with K and gather sharded clients onto every device."""
  token = _FLAT.set(True)
  try:
    yield
  finally:
    _FLAT.reset(token)


def flat_enabled() -> bool:
  """True inside :func:`flat_aggregation`."""
  return _FLAT.get()


def _groups(sizes, n: int):
  """Contiguous runs of leaf indices, at most n, of about equal total size: leaf i goes to
  run ⌊n · (its middle element's position) / total⌋ (empty runs dropped)."""
  total, runs, before = max(sum(sizes), 1), {}, 0
  for i, size in enumerate(sizes):
    runs.setdefault(min(int(n * (before + size / 2) / total), n - 1), []).append(i)
    before += size
  return [runs[r] for r in sorted(runs)]


def flat_view(global_vars, stacked, groups: int = FLAT_GROUPS):
  """The models as a few vectors each, for a ``coordinatewise`` aggregator: (global
  (v_1 [P_1], ...), stacked ([K, P_1], ...), unflatten): the leaves in ``jax.tree.leaves``
  order cut into at most ``groups`` contiguous runs of about equal size, each run one
  vector; None when the leaves do not share one inexact dtype (then the aggregator runs
  on the pytrees).

  Every aggregator of this module computes coordinate by coordinate, or over all the
  coordinates of a client at once (norms, finiteness), so it gives the same model on the
  vectors as on the pytrees (up to float summation order in the norms). On XLA:CPU the
  round's aggregation program is then a few kernels per operation instead of one per
  parameter leaf, which is most of its compile time; a few vectors rather than one keep
  the independent kernels that XLA:CPU runs side by side on several cores
  (docs/performance.md). ``unflatten(vectors)`` is the pytree of ``global_vars``'
  structure, shapes and dtype.
  """
  g_leaves, tree = jax.tree.flatten(global_vars)
  m_leaves = jax.tree.leaves(stacked)
  if not g_leaves or len(g_leaves) != len(m_leaves):
    return None
  dtype = g_leaves[0].dtype
  if not jnp.issubdtype(dtype, jnp.inexact) or any(
      a.dtype != dtype for a in g_leaves + m_leaves):
    return None
  k = m_leaves[0].shape[0]
  shapes = [g.shape for g in g_leaves]
  sizes = [int(g.size) for g in g_leaves]
  runs = _groups(sizes, max(1, int(groups)))
  g_flat = tuple(jnp.concatenate([g_leaves[j].reshape(-1) for j in run]) for run in runs)
  # client by client: slicing client i out of the calls' concatenated rows folds to that
  # call's own output, so XLA copies each client's leaves once, into its rows
  m_flat = tuple(jnp.stack([jnp.concatenate([m_leaves[j][i].reshape(-1) for j in run])
                            for i in range(k)]) for run in runs)

  def unflatten(vectors):
    out = []
    for run, v in zip(runs, vectors):
      off = 0
      for j in run:
        out.append(v[off:off + sizes[j]].reshape(shapes[j]))
        off += sizes[j]
    return jax.tree.unflatten(tree, out)
  return g_flat, m_flat, unflatten


def flat_or_tree(global_vars, stacked, coordinatewise: bool = True):
  """(global, stacked, unflatten) for a reduction: :func:`flat_view`'s vectors when it is
  ``coordinatewise`` and traced inside :func:`flat_aggregation` (and the leaves allow
  one), else the pytrees themselves with ``unflatten`` the identity."""
  view = flat_view(global_vars, stacked) if coordinatewise and flat_enabled() else None
  return view if view is not None else (global_vars, stacked, lambda tree: tree)


AGGREGATORS: Dict[str, Callable] = {
    "fedavg": fedavg, "fedcostw": fedcostw, "costw_ce": costw_ce, "dcew": dcew,
    "median": coordinate_median, "trimmed_mean": trimmed_mean}


def get(name: str) -> Callable:
  if name not in AGGREGATORS:
    raise ValueError(f"config.fl.aggregator={name!r} unknown; available: {sorted(AGGREGATORS)}")
  return AGGREGATORS[name]


# --- Linear aggregators as running sums (clients streamed in chunks) ---


LINEAR_AGGREGATORS = ("fedavg", "fedcostw", "costw_ce", "dcew")


def linear_terms(name: str, stacked, stats: Stats, alpha: float = 0.5, beta: float = 0.25,
                 gamma: float = 0.25, cost: str = "cost", **_):
  """The weights of a linear aggregator as per-client terms (for streamed rounds).

  fedavg, fedcostw, costw_ce and dcew all weight client k as
      w_k = Σ_j a_j r_jk / R_j,   R_j = Σ_{i ok} r_ji          (then renormalised)
  with terms (a_j, r_j): fedavg (1, s); fedcostw/costw_ce (α, s), (1−α, c);
  dcew (α, s), (β, c), (γ, d)   (seed eqs. 1–4). r_jk and ok_k depend on
  client k only, so ω = Σ_j a_j N_j / R_j / Σ_{j: R_j > 0} a_j with
  N_j = Σ_{k ok} r_jk M_k can be accumulated over chunks of clients.
  Returns (ok bool [K], ((a_j, r_j [K]), ...)); ``linear_weights`` turns them
  back into exactly the weights the aggregator itself returns.
  """
  ok = _base_ok(stacked, stats)
  s = stats["num_samples"]
  if name == "fedavg":
    return ok, ((1.0, s),)
  if name in ("fedcostw", "costw_ce"):
    c = _cost_ratio(stats, cost if name == "fedcostw" else "ce")
    return ok & jnp.isfinite(c), ((alpha, s), (1.0 - alpha, c))
  if name == "dcew":
    c = _cost_ratio(stats, "ce")
    d = _ratio(stats["dice_post"], stats["dice_pre"])
    return ok & jnp.isfinite(c) & jnp.isfinite(d), ((alpha, s), (beta, c), (gamma, d))
  raise ValueError(f"config.algorithm={name!r} is not a linear aggregator; streaming clients "
                   f"in chunks (config.fl.clients_per_chunk) supports {LINEAR_AGGREGATORS}")


def linear_weights(terms, ok: jnp.ndarray) -> jnp.ndarray:
  """w [K] from ``linear_terms`` over all K clients (same formula as the aggregators)."""
  w = sum(a * _normalise(r, ok) for a, r in terms)
  return w if len(terms) == 1 else _normalise(w, ok)
