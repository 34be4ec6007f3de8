"""Secure-aggregation simulation with pairwise masks (Bonawitz et al., CCS 2017).

Setup (once, outside the jitted round): every client i draws a Diffie–Hellman
secret a_i and publishes A_i = g^{a_i} mod p; clients i and j derive the same
pair seed s_ij = H(A_j^{a_i} mod p) = H(A_i^{a_j} mod p)  (``agree_seeds``).

Round t, contribution x_i (a float pytree, e.g. w_i·Δ_i):
    q_i = encode(x_i) = round(x_i · 2^bits)         int32 fixed point, as uint32
    y_i = q_i + Σ_{j>i} PRG(s_ij, t) − Σ_{j<i} PRG(s_ji, t)        (mod 2^32)
The server sees only y_i (uniform on Z_2^32: uncorrelated with x_i) and sums:
    Σ_{i alive} y_i = Σ_{i alive} q_i + Σ_{i alive, j dropped} ±PRG(s_ij, t)
The masks between two alive clients cancel *exactly* (integer arithmetic
mod 2^32); the masks shared with dropped clients are re-derived by the server
and removed (``unmask_sum``), so the sum of the alive clients' q_i is exact,
and decode(Σ q_i) differs from Σ x_i only by the rounding of each x_i to
2^-bits (≤ K·2^-(bits+1) per coordinate). Each client saturates x_i to
±(2^31 − 1)/(K·2^bits) so the sum cannot overflow; saturation is reported.

Simplifications (this is a simulation of the arithmetic, not a secure
implementation): the 127-bit DH group is far too small for real use; there
are no self-masks b_i and no Shamir shares — the server is simply given the
dropped clients' pair seeds, as it would reconstruct them from t-of-n shares
held by the survivors; weights w_i are computed by the server from stats the
clients report in the clear and sent back, so each client can scale its own
update before masking. Non-finite or empty clients drop out before masking.
Coordinate-wise median / trimmed mean need individual values and cannot run
on masked updates (``check_config`` refuses them).
"""
from __future__ import annotations

import hashlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

DH_PRIME = 2 ** 127 - 1   # Mersenne prime M127 (simulation only)
DH_GENERATOR = 3


def _secret(session_seed: int, i: int) -> int:
  h = hashlib.sha256(f"fedjax_seg-secagg:{session_seed}:{i}".encode()).digest()
  return int.from_bytes(h, "big") % (DH_PRIME - 2) + 1


def agree_seeds(num_clients: int, session_seed: int = 0) -> np.ndarray:
  """uint32 [K, K, 2]: symmetric pair seeds s_ij from a DH key agreement
  (diagonal unused, zeros). Each client only uses its own secret and the
  others' public keys; the assertion checks both ends derive the same seed."""
  if num_clients < 2:
    raise ValueError(f"secure aggregation needs >= 2 clients, got {num_clients} "
                     f"(config.fl.secagg)")
  secrets = [_secret(session_seed, i) for i in range(num_clients)]
  public = [pow(DH_GENERATOR, a, DH_PRIME) for a in secrets]
  seeds = np.zeros((num_clients, num_clients, 2), np.uint32)
  for i in range(num_clients):
    for j in range(i + 1, num_clients):
      shared = pow(public[j], secrets[i], DH_PRIME)
      assert shared == pow(public[i], secrets[j], DH_PRIME)
      h = hashlib.sha256(shared.to_bytes(16, "big")).digest()
      s = np.frombuffer(h[:8], np.uint32)
      seeds[i, j] = seeds[j, i] = s
  return seeds


def max_abs(num_clients: int, bits: int) -> float:
  """Per-client saturation bound so that |Σ_k q_k| < 2^31."""
  return (2 ** 31 - 1) / (num_clients * 2.0 ** bits)


def encode(x, bits: int, bound: float):
  """float → fixed point round(x·2^bits), saturated to ±bound, as uint32
  (two's complement). Non-float leaves are encoded as zeros."""
  def enc(a):
    if not jnp.issubdtype(a.dtype, jnp.inexact):
      return jnp.zeros(a.shape, jnp.uint32)
    q = jnp.round(jnp.clip(a.astype(jnp.float32), -bound, bound) * 2.0 ** bits)
    return jax.lax.bitcast_convert_type(q.astype(jnp.int32), jnp.uint32)
  return jax.tree.map(enc, x)


def decode(q, bits: int):
  """uint32 (two's complement) → float32 / 2^bits."""
  return jax.tree.map(
      lambda a: jax.lax.bitcast_convert_type(a, jnp.int32).astype(jnp.float32) / 2.0 ** bits, q)


def prg(seed_ij, rnd, like):
  """PRG(s_ij, t): uniform uint32 pytree shaped like ``like`` (threefry keyed
  by the pair seed, folded with the round and the leaf index)."""
  key = jax.random.fold_in(jax.random.wrap_key_data(jnp.asarray(seed_ij, jnp.uint32),
                                                    impl="threefry2x32"), rnd)
  leaves, treedef = jax.tree.flatten(like)
  return jax.tree.unflatten(treedef, [
      jax.random.bits(jax.random.fold_in(key, n), l.shape, jnp.uint32)
      for n, l in enumerate(leaves)])


def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def mask(q_stacked, seeds, rnd):
  """y_i = q_i + Σ_{j>i} PRG(s_ij) − Σ_{j<i} PRG(s_ji) (mod 2^32), for every
  client i of the stacked uint32 pytree [K, ...] — the client side."""
  k = seeds.shape[0]
  one = jax.tree.map(lambda a: a[0], q_stacked)
  out = [jax.tree.map(lambda a: a[i], q_stacked) for i in range(k)]
  for i in range(k):
    for j in range(i + 1, k):
      m = prg(seeds[i, j], rnd, one)
      out[i] = jax.tree.map(jnp.add, out[i], m)
      out[j] = jax.tree.map(jnp.subtract, out[j], m)
  return _stack(out)


def unmask_sum(y_stacked, alive, seeds, rnd):
  """Server side: Σ_{i alive} y_i with the masks shared with dropped clients
  re-derived and removed → Σ_{i alive} q_i exactly (uint32, mod 2^32)."""
  k = seeds.shape[0]
  a = alive.astype(jnp.uint32)
  total = jax.tree.map(
      lambda y: jnp.sum(y * a.reshape((-1,) + (1,) * (y.ndim - 1)), axis=0, dtype=jnp.uint32),
      y_stacked)
  one = jax.tree.map(lambda y: y[0], y_stacked)
  for i in range(k):
    for j in range(i + 1, k):
      # i alive, j dropped: the sum holds +PRG(s_ij) from i; j alive, i dropped: −PRG(s_ij).
      plus, minus = a[i] * (1 - a[j]), a[j] * (1 - a[i])
      m = prg(seeds[i, j], rnd, one)
      total = jax.tree.map(lambda t, m: t - plus * m + minus * m, total, m)
  return total


def secure_sum(contribs, alive, seeds, rnd, bits: int):
  """Σ_{i alive} contribs_i through encode → mask → (server) unmask_sum → decode.

  contribs: float pytree [K, ...]; every client's leaves are concatenated
  into one vector first (one PRG stream per pair and round: few PRNG calls
  to compile). Returns (sum pytree [...], saturated bool [K])."""
  k = seeds.shape[0]
  bound = max_abs(k, bits)
  leaves, treedef = jax.tree.flatten(contribs)
  flat = jnp.concatenate([l.reshape(k, -1).astype(jnp.float32) for l in leaves], axis=1)
  saturated = jnp.any(jnp.abs(flat) > bound, axis=1)
  y = mask(encode(flat, bits, bound), seeds, rnd)       # all the server receives
  total = decode(unmask_sum(y, alive, seeds, rnd), bits)
  out, start = [], 0
  for l in leaves:
    n = l[0].size
    out.append(total[start:start + n].reshape(l.shape[1:]).astype(l.dtype))
    start += n
  return jax.tree.unflatten(treedef, out), saturated & alive


def make_secure_sum(seeds, bits: int) -> Callable:
  """sum_fn(contribs, alive, round) -> (sum, {'secagg_saturated'}) for ``dp.dp_fedavg``."""
  seeds = jnp.asarray(seeds)

  def sum_fn(contribs, alive, rnd):
    total, sat = secure_sum(contribs, alive, seeds, rnd, bits)
    return total, {"secagg_saturated": sat}
  return sum_fn


def secure(aggregator: Callable, seeds, bits: int = 24) -> Callable:
  """Runs ``aggregator`` for its weights only and computes the new model as
  x_{t−1} + Σ_{k alive} w_k (M_k − x_{t−1}) through masked fixed-point sums;
  alive = clients with w_k > 0 (the others drop out before masking).
  extra['secagg_saturated'] bool [K]: a client's contribution was clipped to
  the fixed-point range."""
  seeds = jnp.asarray(seeds)

  def agg(global_vars, stacked, stats, rng=None, round=0, **kw):
    out = aggregator(global_vars, stacked, stats, **kw)
    _, w, failed = out[:3]
    extra = dict(out[3]) if len(out) > 3 else {}
    alive = w > 0

    def contrib(g, m):
      if not jnp.issubdtype(m.dtype, jnp.inexact):
        return jnp.zeros(m.shape, jnp.float32)
      shp = (-1,) + (1,) * (m.ndim - 1)
      d = jnp.where(alive.reshape(shp), m - g[None], 0).astype(jnp.float32)
      return d * w.reshape(shp).astype(jnp.float32)
    total, sat = secure_sum(jax.tree.map(contrib, global_vars, stacked), alive, seeds,
                            round, bits)
    new = jax.tree.map(
        lambda g, s: jnp.where(failed, g, (g + s).astype(g.dtype))
        if jnp.issubdtype(g.dtype, jnp.inexact) else g, global_vars, total)
    extra["secagg_saturated"] = sat
    return new, w, failed, extra
  agg.wants_round_key = True
  agg.__name__ = f"secure_{getattr(aggregator, '__name__', 'agg')}"
  return agg


def check_config(config) -> None:
  fl = config.fl
  if not fl.secagg:
    return
  if config.algorithm in ("median", "trimmed_mean"):
    raise ValueError(f"config.fl.secagg=True with config.algorithm={config.algorithm!r}: a "
                     f"coordinate-wise median / trimmed mean needs individual client values, "
                     f"which the server never sees under secure aggregation")
  bits = fl.secagg_bits
  if not 8 <= bits <= 28:
    raise ValueError(f"config.fl.secagg_bits={bits}: expected 8..28 (fractional bits of the "
                     f"int32 fixed point)")
