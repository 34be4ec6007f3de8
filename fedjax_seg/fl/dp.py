"""Client-level differential privacy: DP-FedAvg (McMahan et al., ICLR 2018,
"Learning Differentially Private Recurrent Language Models"), central model
with a trusted server, full participation (every client every round).

One round, K clients, global model x_{t−1}, client models M_k:

    Δ_k  = M_k − x_{t−1}                        (every float leaf, all collections)
    Δ̃_k  = Δ_k · min(1, C / ‖Δ_k‖₂)             (clip to norm C)
    w_k  = 1/K                 weighting='uniform'
         = min(s_k / cap, 1)/K weighting='samples' (bounded sample weighting)
    x_t  = x_{t−1} + Σ_k w_k Δ̃_k + N(0, (z C / K)² I)

Excluded clients (non-finite model, no samples) contribute Δ̃_k = 0; the
denominator K stays fixed (public), so w_k ≤ 1/K for every client and the
L2 sensitivity of Σ_k w_k Δ̃_k to adding / removing (zeroing) one client's
entire data is C/K: the released model sequence is a composition of T
Gaussian mechanisms with noise multiplier z, and ε(δ) after T rounds comes
from Google's ``dp_accounting`` (RDP by default, PLD optional).

What is covered: the sequence of global models released by the server
(and anything computed from them only, e.g. the server optimiser, which is
post-processing). What is NOT covered: the per-round diagnostics logged by
the trainer (client weights, client losses/Dice, update norms, clip
fraction) — they are trusted-server logs; the validation/test metrics are
computed on data the server holds.

Aggregators whose weights depend on *other* clients' data or are unbounded
void the C/K sensitivity: FedCostW / CostW+CE / DCEW normalise c_k/C and
d_k/D over clients (one client's data moves every weight) and c_k, d_k are
unbounded ratios; the coordinate-wise median / trimmed mean and the
exploding-norm exclusion (k × median norm) also couple clients.
``check_config`` refuses those combinations (ValueError naming the keys).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from fedjax_seg.fl import aggregators

WEIGHTINGS = ("uniform", "samples")
ACCOUNTANTS = ("rdp", "pld")
DP_ALGORITHMS = ("fedavg",)


# --- mechanism -------------------------------------------------------------------


def client_deltas(global_vars, stacked, ok):
  """Δ_k = M_k − x_{t−1} on inexact leaves, 0 for clients not ok (and for
  non-float leaves)."""
  def d(g, m):
    if not jnp.issubdtype(m.dtype, jnp.inexact):
      return jnp.zeros(m.shape, jnp.float32)
    okb = ok.reshape((-1,) + (1,) * (m.ndim - 1))
    return jnp.where(okb, m - g[None], 0).astype(jnp.float32)
  return jax.tree.map(d, global_vars, stacked)


def clip_updates(deltas, clip_norm: float):
  """Δ̃_k = Δ_k · min(1, C/‖Δ_k‖). Returns (clipped, norms [K], factor [K])."""
  norms = jnp.sqrt(sum(jnp.sum(jnp.square(a.reshape(a.shape[0], -1)), axis=1)
                      for a in jax.tree.leaves(deltas)))
  factor = jnp.minimum(1.0, clip_norm / jnp.maximum(norms, 1e-30))
  clipped = jax.tree.map(
      lambda a: a * factor.reshape((-1,) + (1,) * (a.ndim - 1)).astype(a.dtype), deltas)
  return clipped, norms, factor


def dp_weights(stats, ok, num_clients: int, weighting: str = "uniform",
               sample_cap: float = 0.0) -> jnp.ndarray:
  """w_k ≤ 1/K, a function of client k's own data only (fixed denominator K)."""
  if weighting == "uniform":
    raw = jnp.ones_like(stats["num_samples"])
  elif weighting == "samples":
    if sample_cap <= 0:
      raise ValueError("config.fl.dp.sample_cap must be > 0 with config.fl.dp.weighting='samples'")
    raw = jnp.minimum(stats["num_samples"] / sample_cap, 1.0)
  else:
    raise ValueError(f"config.fl.dp.weighting={weighting!r}: expected one of {WEIGHTINGS}")
  return jnp.where(ok, raw, 0.0).astype(jnp.float32) / num_clients


def gaussian_noise(key, like, std):
  """Independent N(0, std²) for every coordinate of every float leaf of ``like``
  (one draw of the total size, split over leaves: one PRNG call to compile)."""
  leaves, treedef = jax.tree.flatten(like)
  sizes = [l.size if jnp.issubdtype(l.dtype, jnp.inexact) else 0 for l in leaves]
  flat = jax.random.normal(key, (sum(sizes),), jnp.float32) * std
  out, start = [], 0
  for l, n in zip(leaves, sizes):
    out.append(flat[start:start + n].reshape(l.shape) if n else jnp.zeros(l.shape, l.dtype))
    start += n
  return jax.tree.unflatten(treedef, out)


def dp_fedavg(clip_norm: float, noise_multiplier: float, weighting: str = "uniform",
              sample_cap: float = 0.0, sum_fn: Optional[Callable] = None) -> Callable:
  """The DP-FedAvg aggregator (module docstring) for ``core.make_run_round``.

  sum_fn(contribs [K, ...], ok [K], round) -> (Σ_k contribs_k, extra dict), the
  transport (default a plain sum; ``secagg.make_secure_sum`` for masked
  aggregation, whose extra dict reports saturated clients).
  Returns (x_t, weights [K], failed=False, extra) where extra holds
  'dp_clip_fraction' (fraction of contributing clients with ‖Δ_k‖ > C),
  'dp_clipped' bool [K], 'dp_noise_std' = zC/K, 'dp_contributors'.
  The noisy model is released every round, even when no client contributed
  (that is the mechanism the accountant accounts for), so failed is False.
  """
  if clip_norm <= 0:
    raise ValueError(f"config.fl.dp.clip_norm={clip_norm} must be > 0")
  if noise_multiplier < 0:
    raise ValueError(f"config.fl.dp.noise_multiplier={noise_multiplier} must be >= 0")

  def agg(global_vars, stacked, stats, rng=None, round=0, **_):
    if rng is None:
      raise ValueError("dp_fedavg needs rng= (core.make_run_round passes it)")
    k = jax.tree.leaves(stacked)[0].shape[0]
    ok = aggregators._base_ok(stacked, stats)
    clipped, norms, _ = clip_updates(client_deltas(global_vars, stacked, ok), clip_norm)
    w = dp_weights(stats, ok, k, weighting, sample_cap)
    contribs = jax.tree.map(lambda a: a * w.reshape((-1,) + (1,) * (a.ndim - 1)), clipped)
    if sum_fn is None:
      total, sum_extra = jax.tree.map(lambda a: jnp.sum(a, axis=0), contribs), {}
    else:
      total, sum_extra = sum_fn(contribs, ok, round)
    std = noise_multiplier * clip_norm / k
    noise = gaussian_noise(rng, global_vars, std)
    new = jax.tree.map(lambda g, s, n: (g + s + n).astype(g.dtype)
                       if jnp.issubdtype(g.dtype, jnp.inexact) else g, global_vars, total, noise)
    n_ok = jnp.sum(ok)
    clipped_k = ok & (norms > clip_norm)
    extra = {"dp_clip_fraction": jnp.sum(clipped_k) / jnp.maximum(n_ok, 1),
             "dp_clipped": clipped_k, "dp_noise_std": jnp.float32(std),
             "dp_contributors": n_ok, **sum_extra}
    return new, w, jnp.asarray(False), extra
  agg.wants_round_key = True
  agg.bounds_updates = True   # clipping bounds every update: aggregators.robust skips norm_k
  agg.__name__ = "dp_fedavg"
  return agg


# --- accountant -------------------------------------------------------------------


def _event(noise_multiplier: float, rounds: int, sampling_rate: float = 1.0):
  import dp_accounting
  ev = dp_accounting.GaussianDpEvent(noise_multiplier)
  if sampling_rate < 1.0:
    ev = dp_accounting.PoissonSampledDpEvent(sampling_rate, ev)
  return dp_accounting.SelfComposedDpEvent(ev, rounds)


def _accountant(kind: str):
  from dp_accounting import pld, rdp
  if kind == "rdp":
    return rdp.RdpAccountant()
  if kind == "pld":
    return pld.PLDAccountant(value_discretization_interval=1e-3)
  raise ValueError(f"config.fl.dp.accountant={kind!r}: expected one of {ACCOUNTANTS}")


@functools.lru_cache(maxsize=4096)
def epsilon(noise_multiplier: float, rounds: int, delta: float, sampling_rate: float = 1.0,
            accountant: str = "rdp") -> float:
  """ε(δ) of ``rounds`` compositions of the (subsampled) Gaussian mechanism with
  noise multiplier z = σ/sensitivity, from ``dp_accounting`` (add/remove-one
  neighbouring relation). 0 for 0 rounds, inf for z = 0."""
  if rounds <= 0:
    return 0.0
  if noise_multiplier <= 0:
    return math.inf
  acc = _accountant(accountant)
  acc.compose(_event(noise_multiplier, rounds, sampling_rate))
  return float(acc.get_epsilon(delta))


def noise_multiplier_for(target_epsilon: float, delta: float, rounds: int,
                         sampling_rate: float = 1.0, accountant: str = "rdp") -> float:
  """Smallest z with ε(δ) ≤ target after ``rounds`` rounds
  (``dp_accounting.calibrate_dp_mechanism``)."""
  import dp_accounting
  if target_epsilon <= 0:
    raise ValueError(f"config.fl.dp.target_epsilon={target_epsilon} must be > 0")
  return float(dp_accounting.calibrate_dp_mechanism(
      lambda: _accountant(accountant),
      lambda z: _event(z, rounds, sampling_rate), target_epsilon, delta))


def gaussian_epsilon_exact(noise_multiplier: float, rounds: int, delta: float) -> float:
  """Tight ε(δ) of T compositions of the Gaussian mechanism (full participation):
  it is one Gaussian mechanism with μ = √T / z, and (Balle & Wang, ICML 2018, Thm 8)
      δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2),
  solved for ε by bisection. A closed-form reference for the accountant."""
  from scipy.stats import norm
  mu = math.sqrt(rounds) / noise_multiplier

  def d(eps):
    return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)
  lo, hi = 0.0, 1.0
  while d(hi) > delta:
    hi *= 2
  for _ in range(200):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if d(mid) > delta else (lo, mid)
  return hi


# --- config -----------------------------------------------------------------------


def check_config(config) -> None:
  """Refuses DP settings that would void the guarantee (ValueError naming keys)."""
  fl = config.fl
  dp = fl.dp
  if not dp.enabled:
    return
  if config.algorithm not in DP_ALGORITHMS:
    why = ("its weights c_k/C, d_k/D are normalised over clients and c_k, d_k are unbounded "
           "ratios, so one client's data moves every weight"
           if config.algorithm in ("fedcostw", "costw_ce", "dcew") else
           "a coordinate-wise median / trimmed mean has no C/K sensitivity bound"
           if config.algorithm in ("median", "trimmed_mean") else "it is not analysed for DP")
    raise ValueError(
        f"config.fl.dp.enabled=True with config.algorithm={config.algorithm!r} would void the "
        f"DP guarantee: {why}. DP-FedAvg supports config.algorithm in {DP_ALGORITHMS} with "
        f"bounded fixed-denominator weights (config.fl.dp.weighting in {WEIGHTINGS}).")
  # fl.norm_k (the k × median-norm exclusion) is not applied under DP: it would couple
  # the clients' contributions, and clipping to config.fl.dp.clip_norm already bounds
  # every update (aggregators.robust reads dp_fedavg's bounds_updates).
  if dp.clip_norm <= 0:
    raise ValueError(f"config.fl.dp.clip_norm={dp.clip_norm} must be > 0")
  if not 0 < dp.delta < 1:
    raise ValueError(f"config.fl.dp.delta={dp.delta} must be in (0, 1)")
  if dp.noise_multiplier < 0:
    raise ValueError(f"config.fl.dp.noise_multiplier={dp.noise_multiplier} must be >= 0")
  if dp.noise_multiplier > 0 and dp.target_epsilon > 0:
    raise ValueError("config.fl.dp.noise_multiplier and config.fl.dp.target_epsilon are both "
                     "set; set one (the other to 0)")
  if dp.weighting not in WEIGHTINGS:
    raise ValueError(f"config.fl.dp.weighting={dp.weighting!r}: expected one of {WEIGHTINGS}")
  if dp.weighting == "samples" and dp.sample_cap <= 0:
    raise ValueError("config.fl.dp.sample_cap must be > 0 with config.fl.dp.weighting='samples'")
  if dp.accountant not in ACCOUNTANTS:
    raise ValueError(f"config.fl.dp.accountant={dp.accountant!r}: expected one of {ACCOUNTANTS}")


def resolve_noise_multiplier(fl, sampling_rate: float = 1.0) -> float:
  """z from config.fl.dp: noise_multiplier if > 0, else calibrated to
  target_epsilon over config.fl.rounds rounds at client sampling rate q (1.0: every
  client every round), else 0 (clipping only, ε = ∞)."""
  dp = fl.dp
  if dp.noise_multiplier > 0:
    return float(dp.noise_multiplier)
  if dp.target_epsilon > 0:
    return noise_multiplier_for(dp.target_epsilon, dp.delta, fl.rounds, sampling_rate,
                                dp.accountant)
  return 0.0
