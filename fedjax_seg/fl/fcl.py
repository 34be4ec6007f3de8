"""FCL: federated contrastive learning with exchanged memory banks (SPEC §4.3;
Wu et al., "Federated Contrastive Learning for Volumetric Medical Image
Segmentation", MICCAI 2021), plus the FedRotation self-supervised baseline.

One pre-training round is ONE jitted program (``make_run_round``)::

    keys_k                 = split(fold_in(key, round), K)
    upload_k, private_k'   = client_update(θ_{t-1}, (volumes_k, private_k, inbox_k), keys_k)
                             for every k, through backends.for_each_client (any backend)
    θ_t                    = aggregators.fedavg(θ_{t-1}, stack(upload_k.variables), s_k = #volumes)
    inbox_k'               = exchange(stack(upload_k.bank))_k = every other client's bank

What crosses the client boundary (``upload`` up, ``θ_t`` and ``inbox`` down) is
encoder parameters and feature vectors [·, feature_dim] with their partition
labels, validity and origin; images, slices and the momentum encoder never
leave a client (``private``).

Client update (E local steps, each on B volumes):
  1. partition sampling: each volume's D slices are split into S contiguous
     partitions along the slice axis; one slice is drawn uniformly inside each
     partition; its label is the partition index s ∈ [0, S)  (B·S slices);
  2. two augmented views; query q = f(view₁; θ) (main encoder), key
     k = f(view₂; θ_m) (momentum encoder, no gradient), both L2-normalised;
  3. the keys are pushed into the client's local memory bank, a FIFO ring
     buffer of L (feature, partition label, valid) rows;
  4. loss (``fcl_loss``): local InfoNCE (positives: local bank rows of q's
     partition) + remote InfoNCE (positives: rows of q's partition received from
     other clients), both against the same sampled negative set Q drawn from
     local ∪ remote rows of the *other* partitions, balanced: ``neg_per_partition``
     rows of every other partition (= ``num_positives`` by default, so each
     partition contributes as many negatives as the positive partition has
     positives);
  5. an optimiser step on θ, then θ_m ← m θ_m + (1 − m) θ.

Local contrastive learning ("local CL" baseline) is the same program with
``exchange = False``: inboxes stay empty, so the remote loss is 0.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_seg.fl import aggregators, algorithm, local
from fedjax_seg.models import ModelFns

METHODS = ("fcl", "local_cl", "rotation")
NEG = -1e9  # finite "minus infinity" for masked logits (keeps gradients NaN-free)


# ---------------------------------------------------------------------------
# Volumes per client and partition sampling (SPEC §4.3, first bullet).

@flax.struct.dataclass
class VolumeData:
  """Unlabelled volumes of K clients, padded to fixed shapes.

  x      float32 [K, V, D, H, W, C]  volume v of client k, slices in anatomical order
  depth  int32   [K, V]              real slices of each volume (rows >= depth are padding)
  valid  float32 [K, V]              1 = real volume; real volumes occupy rows [0, n_k)
  """
  x: jnp.ndarray
  depth: jnp.ndarray
  valid: jnp.ndarray


def stack_volumes(per_client: Sequence[Sequence[np.ndarray]], min_rows: int = 1) -> VolumeData:
  """[[vol [D_i, H, W, C], ...] per client] -> VolumeData (zero-padded in V and D)."""
  if not per_client or not any(len(v) for v in per_client):
    raise ValueError("stack_volumes: every client is empty")
  ref = next(v[0] for v in per_client if len(v))
  v_max = max(max(len(v) for v in per_client), min_rows)
  d_max = max(vol.shape[0] for vols in per_client for vol in vols)
  k = len(per_client)
  x = np.zeros((k, v_max, d_max) + ref.shape[1:], np.float32)
  depth = np.zeros((k, v_max), np.int32)
  valid = np.zeros((k, v_max), np.float32)
  for i, vols in enumerate(per_client):
    for j, vol in enumerate(vols):
      if vol.shape[1:] != ref.shape[1:]:
        raise ValueError(f"client {i} volume {j}: slice shape {vol.shape[1:]} != {ref.shape[1:]}")
      x[i, j, :len(vol)] = vol
      depth[i, j] = len(vol)
      valid[i, j] = 1.0
  return VolumeData(jnp.asarray(x), jnp.asarray(depth), jnp.asarray(valid))


def partition_bounds(depth: jnp.ndarray, num_partitions: int) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Slice ranges [lo, hi) of the S partitions of volumes with ``depth`` slices.

  depth int [...]; returns (lo, hi) int32 [..., S] with lo_s = ⌊s·D/S⌋,
  hi_s = ⌊(s+1)·D/S⌋ (contiguous, covering [0, D); empty when D < S).
  """
  s = jnp.arange(num_partitions + 1, dtype=jnp.int32)
  edges = (s * jnp.asarray(depth, jnp.int32)[..., None]) // num_partitions
  return edges[..., :-1], edges[..., 1:]


def sample_partition_slices(key: jax.Array, depth: jnp.ndarray, num_partitions: int):
  """One slice index drawn uniformly inside each partition.

  depth int [V] -> (idx int32 [V, S], ok bool [V, S]); ok is False for an
  empty partition (a volume with fewer than S slices).
  """
  lo, hi = partition_bounds(depth, num_partitions)
  u = jax.random.uniform(key, lo.shape)
  idx = lo + jnp.floor(u * (hi - lo)).astype(jnp.int32)
  return jnp.clip(idx, lo, jnp.maximum(hi - 1, lo)), hi > lo


def partition_batch(x: jnp.ndarray, depth: jnp.ndarray, valid: jnp.ndarray, key: jax.Array,
                    num_volumes: int, num_partitions: int):
  """One client's contrastive batch: B volumes × S partition slices (inside jit).

  x [V, D, H, W, C], depth [V], valid [V] (one client). Volumes are drawn
  uniformly with replacement from the client's real volumes.
  Returns (slices [B·S, H, W, C], labels int32 [B·S] = partition index,
  mask float32 [B·S]: 0 for an empty partition or a client with no volume).
  """
  kv, ks = jax.random.split(key)
  n = jnp.sum(valid)
  vidx = jax.random.randint(kv, (num_volumes,), 0, jnp.maximum(n, 1).astype(jnp.int32))
  sidx, ok = sample_partition_slices(ks, depth[vidx], num_partitions)
  slices = x[vidx[:, None], sidx]                       # [B, S, H, W, C]
  labels = jnp.broadcast_to(jnp.arange(num_partitions, dtype=jnp.int32), sidx.shape)
  mask = (ok & (n > 0)).astype(jnp.float32)
  flat = lambda a: a.reshape((-1,) + a.shape[2:])
  return flat(slices), flat(labels), flat(mask)


# ---------------------------------------------------------------------------
# Memory banks: fixed-size FIFO ring buffers (they live inside jit).

@flax.struct.dataclass
class MemoryBank:
  """A client's local bank of momentum features (FIFO ring buffer).

  feats [L, D] float32, labels [L] int32 (partition), valid [L] bool,
  ptr int32 [] (next row to overwrite = the oldest row once full).
  """
  feats: jnp.ndarray
  labels: jnp.ndarray
  valid: jnp.ndarray
  ptr: jnp.ndarray


def init_bank(size: int, dim: int) -> MemoryBank:
  if size < 1:
    raise ValueError(f"config.pretrain.bank_size={size} must be >= 1")
  return MemoryBank(jnp.zeros((size, dim), jnp.float32), jnp.zeros((size,), jnp.int32),
                    jnp.zeros((size,), bool), jnp.zeros((), jnp.int32))


def bank_push(bank: MemoryBank, feats: jnp.ndarray, labels: jnp.ndarray,
              mask: Optional[jnp.ndarray] = None) -> MemoryBank:
  """Enqueues the rows with mask = 1, in order, evicting the oldest rows.

  feats [N, D], labels [N], mask [N] (default all 1). Row i of the m masked-in
  rows goes to (ptr + i) mod L; if m > L only the last L are kept (exactly a
  ``collections.deque(maxlen=L)``). ptr advances by m mod L, so it always
  points at the oldest row of a full bank.
  """
  size = bank.feats.shape[0]
  mask = jnp.ones(labels.shape, bool) if mask is None else mask.astype(bool)
  rank = jnp.cumsum(mask.astype(jnp.int32)) - 1          # position among the kept rows
  m = jnp.sum(mask.astype(jnp.int32))
  keep = mask & (rank >= m - size)                        # only the newest L survive
  pos = jnp.where(keep, (bank.ptr + rank) % size, size)   # size = out of bounds -> dropped
  return MemoryBank(
      feats=bank.feats.at[pos].set(feats.astype(bank.feats.dtype), mode="drop"),
      labels=bank.labels.at[pos].set(labels.astype(jnp.int32), mode="drop"),
      valid=bank.valid.at[pos].set(True, mode="drop"),
      ptr=((bank.ptr + m) % size).astype(jnp.int32))


def bank_fifo_order(bank: MemoryBank) -> jnp.ndarray:
  """Row indices from oldest to newest (for inspection/tests): ptr, ptr+1, ... mod L."""
  size = bank.feats.shape[0]
  return (bank.ptr + jnp.arange(size)) % size


@flax.struct.dataclass
class BankFeatures:
  """What a client sends at the exchange: its bank's rows, no ring-buffer state.

  feats [L, D] float32, labels [L] int32, valid [L] bool.
  """
  feats: jnp.ndarray
  labels: jnp.ndarray
  valid: jnp.ndarray


@flax.struct.dataclass
class RemoteBank:
  """Features a client received from the others at the last exchange.

  feats [R, D], labels [R] int32, valid [R] bool, origin [R] int32 (sending
  client). R = (K − 1)·L (at least 1 row, invalid, when K = 1).
  """
  feats: jnp.ndarray
  labels: jnp.ndarray
  valid: jnp.ndarray
  origin: jnp.ndarray


def empty_inbox(num_clients: int, bank_size: int, dim: int) -> RemoteBank:
  """Stacked [K] inboxes with no valid row (before the first exchange)."""
  r = max((num_clients - 1) * bank_size, 1)
  return RemoteBank(jnp.zeros((num_clients, r, dim), jnp.float32),
                    jnp.zeros((num_clients, r), jnp.int32), jnp.zeros((num_clients, r), bool),
                    jnp.full((num_clients, r), -1, jnp.int32))


def exchange(banks: BankFeatures, enabled=True, include: Optional[jnp.ndarray] = None) -> RemoteBank:
  """Feature exchange after a round: client k receives every other client's bank.

  banks: stacked uploads [K] (feats [K, L, D], labels [K, L], valid [K, L]);
  a stacked MemoryBank works too (only those three fields are read).
  include: bool [K], clients whose bank may be sent (e.g. excluded, non-finite
  clients are not); default all. Features only: nothing but (feats, labels,
  valid, origin) is read. enabled: Python or traced bool; False (local CL)
  leaves every inbox without a valid row, same shapes, so FCL and local CL run
  the same compiled program.
  Returns stacked RemoteBank [K] with R = (K − 1)·L rows per client.
  """
  k, size, dim = banks.feats.shape
  if k == 1:
    return empty_inbox(k, size, dim)
  others = np.array([[j for j in range(k) if j != i] for i in range(k)], np.int32)  # [K, K-1]
  ok = banks.valid if include is None else banks.valid & include[:, None]
  ok = ok & jnp.asarray(enabled, bool)
  origin = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32)[:, None], (k, size))
  take = lambda a: a[others].reshape((k, (k - 1) * size) + a.shape[2:])
  return RemoteBank(take(banks.feats), take(banks.labels), take(ok), take(origin))


# ---------------------------------------------------------------------------
# Losses (SPEC §4.3).

def info_nce(q: jnp.ndarray, pos: jnp.ndarray, pos_mask: jnp.ndarray, neg: jnp.ndarray,
             neg_mask: jnp.ndarray, temperature: float) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """ℓ(q) = −(1/|P|) Σ_{k⁺∈P} log [ exp(q·k⁺/τ) / Σ_{k∈Q∪{k⁺}} exp(q·k/τ) ].

  q [D]; pos [P, D] with pos_mask [P] (the positive set P); neg [M, D] with
  neg_mask [M] (the sampled negative set Q). Returns (ℓ, |P|); ℓ = 0 when P
  is empty. Masked rows never enter a sum (and cannot produce NaN).
  """
  pos_mask = pos_mask.astype(bool)
  lp = pos @ q / temperature                                        # [P]
  ln = jnp.where(neg_mask.astype(bool), neg @ q / temperature, NEG)  # [M]
  lse_neg = jax.nn.logsumexp(ln) if ln.shape[0] else jnp.float32(NEG)
  per = jnp.logaddexp(lp, lse_neg) - lp                              # −log softmax of k⁺
  n = jnp.sum(pos_mask.astype(jnp.float32))
  return jnp.sum(jnp.where(pos_mask, per, 0.0)) / jnp.maximum(n, 1.0), n


def sample_rows(key: jax.Array, candidates: jnp.ndarray, k: int) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Up to k rows drawn uniformly without replacement among ``candidates``.

  candidates bool [..., N] -> (idx int32 [..., k'], ok bool [..., k']),
  k' = min(k, N); ok is False where fewer than k' candidates exist.
  """
  k = min(k, candidates.shape[-1])
  scores = jnp.where(candidates, jax.random.uniform(key, candidates.shape), -1.0)
  vals, idx = jax.lax.top_k(scores, k)
  return idx, vals >= 0.0


@dataclasses.dataclass(frozen=True)
class LossConfig:
  temperature: float = 0.1
  num_positives: int = 4          # positives sampled per query, for each of the local / remote loss
  neg_per_partition: int = 4      # negatives sampled per query from each *other* partition
  num_partitions: int = 4


def fcl_loss(q: jnp.ndarray, q_labels: jnp.ndarray, q_mask: jnp.ndarray, local: MemoryBank,
             remote: RemoteBank, key: jax.Array, cfg: LossConfig) -> Tuple[jnp.ndarray, Dict]:
  """Local + remote InfoNCE for a batch of queries (SPEC §4.3).

  q [Nq, D] (main encoder, L2-normalised), q_labels [Nq] partition, q_mask [Nq].
  Bank rows = local rows (L) ∪ remote rows (R). For query q of partition p:
    P_local  = ≤ num_positives rows sampled from valid local rows with label p
    P_remote = ≤ num_positives rows sampled from valid remote rows with label p
    Q        = neg_per_partition rows sampled from valid local ∪ remote rows of
               each partition p' ≠ p (balanced over partitions)
  local = mean over masked queries with |P_local| > 0 of info_nce(q, P_local, Q),
  remote likewise; total = local + remote. Returns (total, aux dict).
  """
  feats = jnp.concatenate([local.feats, remote.feats])
  labels = jnp.concatenate([local.labels, remote.labels])
  valid = jnp.concatenate([local.valid, remote.valid])
  is_local = jnp.arange(feats.shape[0]) < local.feats.shape[0]
  same = labels[None, :] == q_labels[:, None]                         # [Nq, N]
  kl, kr, kn = jax.random.split(key, 3)
  pl_idx, pl_ok = sample_rows(kl, valid[None] & is_local[None] & same, cfg.num_positives)
  pr_idx, pr_ok = sample_rows(kr, valid[None] & ~is_local[None] & same, cfg.num_positives)
  # balanced negatives: the same number from every other partition
  parts = jnp.arange(cfg.num_partitions, dtype=jnp.int32)
  cand = (valid[None, None] & (labels[None, None] == parts[None, :, None])
          & (parts[None, :, None] != q_labels[:, None, None]))       # [Nq, S, N]
  n_idx, n_ok = sample_rows(kn, cand, cfg.neg_per_partition)
  n_idx = n_idx.reshape(q.shape[0], -1)
  n_ok = n_ok.reshape(q.shape[0], -1)
  per_q = jax.vmap(info_nce, in_axes=(0, 0, 0, 0, 0, None))
  l_loc, n_loc = per_q(q, feats[pl_idx], pl_ok, feats[n_idx], n_ok, cfg.temperature)
  l_rem, n_rem = per_q(q, feats[pr_idx], pr_ok, feats[n_idx], n_ok, cfg.temperature)
  qm = q_mask.astype(bool)
  has_l, has_r = qm & (n_loc > 0), qm & (n_rem > 0)
  mean = lambda v, m: jnp.sum(jnp.where(m, v, 0.0)) / jnp.maximum(jnp.sum(m), 1)
  local_loss, remote_loss = mean(l_loc, has_l), mean(l_rem, has_r)
  aux = {"local_loss": local_loss, "remote_loss": remote_loss,
         "local_pos": mean(n_loc, qm), "remote_pos": mean(n_rem, qm),
         "negatives": mean(jnp.sum(n_ok, axis=1).astype(jnp.float32), qm)}
  return local_loss + remote_loss, aux


def momentum_update(momentum_vars, vars_, m: float):
  """θ_m ← m θ_m + (1 − m) θ, leaf-wise over every collection (params, batch_stats)."""
  return jax.tree.map(lambda a, b: m * a + (1.0 - m) * b, momentum_vars, vars_)


# ---------------------------------------------------------------------------
# Augmentation of unlabelled slices.

def make_view_augment(aug_cfg) -> Callable[[jax.Array, jnp.ndarray], jnp.ndarray]:
  """(key, x [B, H, W, C]) -> x: in-plane rotation/zoom/flip (data.augment, bilinear)
  then per-sample intensity scale ~ U(1 ± scale), shift ~ U(± shift), Gaussian noise σ."""
  from fedjax_seg.data import augment as aug_lib
  aug_cfg = dict(aug_cfg)
  missing = [k for k in ("intensity_scale", "intensity_shift", "noise") if k not in aug_cfg]
  if missing:
    raise ValueError(f"config.pretrain.augment.{missing[0]} is missing (configs/"
                     f"acdc_fcl_exchange.py has every key and its default)")
  scale, shift, noise = (float(aug_cfg.pop(k)) for k in ("intensity_scale", "intensity_shift",
                                                           "noise"))
  geo = aug_lib.make_augment(aug_cfg)

  def view(key, x):
    kg, ka, kb, kn = jax.random.split(key, 4)
    x, _ = geo(kg, x, jnp.zeros(x.shape[:-1], jnp.int32))
    b = x.shape[0]
    shape = (b,) + (1,) * (x.ndim - 1)
    a = jax.random.uniform(ka, shape, minval=1.0 - scale, maxval=1.0 + scale)
    c = jax.random.uniform(kb, shape, minval=-shift, maxval=shift)
    return x * a + c + noise * jax.random.normal(kn, x.shape)
  return view


def rotate90(x: jnp.ndarray, k: jnp.ndarray) -> jnp.ndarray:
  """Rotates each sample of x [B, H, W, C] (H = W) by k_i·90° (k int [B])."""
  rots = jnp.stack([jnp.rot90(x, r, axes=(1, 2)) for r in range(4)])   # [4, B, H, W, C]
  return rots[k, jnp.arange(x.shape[0])]


# ---------------------------------------------------------------------------
# Client updates and the round.

@dataclasses.dataclass(frozen=True)
class PretrainHParams:
  method: str = "fcl"             # fcl | local_cl | rotation
  local_steps: int = 4
  volumes_per_batch: int = 4      # B volumes -> B·S slices per step
  num_partitions: int = 4         # S
  temperature: float = 0.1        # τ
  momentum: float = 0.99          # m
  bank_size: int = 64             # L rows per local bank
  num_positives: int = 4
  neg_per_partition: int = 4
  step_strategy: str = "auto"
  norm_k: float = 0.0             # divergence guard of the encoder average (aggregators.robust)

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"pre-training method {self.method!r}: expected one of {METHODS}")
    if not 0.0 <= self.momentum < 1.0:
      raise ValueError(f"config.pretrain.momentum={self.momentum} must be in [0, 1)")
    if self.temperature <= 0:
      raise ValueError(f"config.pretrain.temperature={self.temperature} must be > 0")
    if self.num_partitions < 2:
      raise ValueError(f"config.pretrain.num_partitions={self.num_partitions} must be >= 2")

  @property
  def exchange(self) -> bool:
    return self.method == "fcl"

  @property
  def contrastive(self) -> bool:
    return self.method in ("fcl", "local_cl")

  def program_key(self) -> str:
    """What the compiled round depends on (FCL and local CL share one program)."""
    return str(dataclasses.replace(self, method="fcl") if self.contrastive else self)

  def loss_config(self) -> LossConfig:
    return LossConfig(self.temperature, self.num_positives, self.neg_per_partition,
                      self.num_partitions)


@flax.struct.dataclass
class ClientPrivate:
  """What never leaves client k: its momentum encoder θ_m and its ring buffer state."""
  momentum: Any
  bank: MemoryBank


def init_state(hp: PretrainHParams, variables, num_clients: int,
               feature_dim: int) -> algorithm.ServerState:
  """Server state of a pre-training run: variables = global main encoder θ; clients =
  ClientPrivate [K] (contrastive) or () (rotation); server = the RemoteBank inbox [K]
  each client receives next round (contrastive) or ()."""
  if not hp.contrastive:
    return algorithm.ServerState(variables, jnp.int32(0))
  stack = lambda t: jax.tree.map(lambda a: jnp.broadcast_to(a, (num_clients,) + a.shape), t)
  private = ClientPrivate(stack(variables), stack(init_bank(hp.bank_size, feature_dim)))
  return algorithm.ServerState(variables, jnp.int32(0), clients=private,
                               server=empty_inbox(num_clients, hp.bank_size, feature_dim))


def make_client_update(hp: PretrainHParams, fns: ModelFns, tx: optax.GradientTransformation,
                       view: Callable) -> Callable:
  """``client_update(θ, (volumes_k, private_k, inbox_k), key) -> (upload, private', stats)``.

  upload = {'model': θ_k, ['bank': (feats, labels, valid) of the local bank]};
  stats: num_samples (#volumes), loss, and for FCL local/remote loss and counts.
  """
  lcfg = hp.loss_config()

  def contrastive_client(variables, inp, key):
    data, private, inbox = inp

    # carried state (v, momentum encoder, bank); only v's params step
    def loss_fn(params, s, k):
      v, mom, bank = s
      kb, k1, k2, kd, ks = jax.random.split(k, 5)
      x, lab, mask = partition_batch(data.x, data.depth, data.valid, kb,
                                     hp.volumes_per_batch, hp.num_partitions)
      keys_, _ = fns.apply(mom, view(k2, x), train=False)
      bank = bank_push(bank, jax.lax.stop_gradient(keys_), lab, mask)
      q, new_v = fns.apply({**v, "params": params}, view(k1, x), train=True, key=kd)
      loss, aux = fcl_loss(q, lab, mask, bank, inbox, ks, lcfg)
      return loss, ((new_v, mom, bank), aux)

    (v, mom, bank), _, (losses, aux) = local.local_train(
        loss_fn, tx, (variables, private.momentum, private.bank),
        jax.random.split(key, hp.local_steps), strategy=hp.step_strategy,
        params=lambda s: s[0]["params"],
        merge=lambda s, new, p: ({**new[0], "params": p}, new[1], new[2]),
        after_step=lambda s: (s[0], momentum_update(s[1], s[0], hp.momentum), s[2]))
    stats = {"num_samples": jnp.sum(data.valid), "loss": jnp.mean(losses),
             **jax.tree.map(jnp.mean, aux)}
    upload = {"model": v, "bank": BankFeatures(bank.feats, bank.labels, bank.valid)}
    return upload, ClientPrivate(mom, bank), stats

  def rotation_client(variables, inp, key):
    data, private, inbox = inp

    def loss_fn(params, v, k):
      kb, kr, ka, kd = jax.random.split(k, 4)
      x, _, mask = partition_batch(data.x, data.depth, data.valid, kb,
                                   hp.volumes_per_batch, hp.num_partitions)
      rot = jax.random.randint(kr, (x.shape[0],), 0, 4)
      x = rotate90(view(ka, x), rot)
      logits, new_v = fns.apply({**v, "params": params}, x, train=True, key=kd)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, rot)
      acc = (jnp.argmax(logits, -1) == rot).astype(jnp.float32)
      m = jnp.maximum(jnp.sum(mask), 1.0)
      return jnp.sum(ce * mask) / m, (new_v, {"rotation_acc": jnp.sum(acc * mask) / m})

    v, _, (losses, aux) = local.local_train(
        loss_fn, tx, variables, jax.random.split(key, hp.local_steps),
        strategy=hp.step_strategy)
    stats = {"num_samples": jnp.sum(data.valid), "loss": jnp.mean(losses),
             **jax.tree.map(jnp.mean, aux)}
    return {"model": v}, private, stats

  return contrastive_client if hp.contrastive else rotation_client


def make_algorithm(hp: PretrainHParams, client_update: Callable) -> algorithm.Algorithm:
  """Pre-training as an ``Algorithm``: clients upload their encoder (+ their bank's
  features for FCL), FedAvg averages the encoders, and the server routes every
  included client's bank to the others (the downlink of the next round). An encoder
  update over ``hp.norm_k`` × the others' median norm is excluded (with its bank).

  Round option ``exchange_on`` (traced bool): FCL passes True, local CL False —
  the same compiled program.
  """
  average = aggregators.robust(aggregators.fedavg, hp.norm_k)

  def aggregate(state, upload, stats, a_key):
    return average(state.variables, upload["model"], {"num_samples": stats["num_samples"]})

  def server_update(state, agg, failed, upload, clients, weights, server_data, key,
                    exchange_on=True):
    inbox = state.server
    if hp.contrastive:
      inbox = exchange(upload["bank"], exchange_on, include=weights > 0)
    return state.replace(variables=agg, round=state.round + 1, clients=clients,
                         server=inbox), {}

  return algorithm.Algorithm(hp.method, ("model", "bank") if hp.contrastive else ("model",),
                             client_update, aggregate, server_update=server_update,
                             downlink=lambda state: state.server, fedavg_model=True)


def make_run_round(hp: PretrainHParams, client_update: Callable, client_strategy: str = "auto"):
  """``run_round(state, volumes, key, exchange_on=True) -> (state', info)``: all clients,
  FedAvg and the feature exchange in one program (jit it once)."""
  run = algorithm.make_round(make_algorithm(hp, client_update), client_strategy)
  if isinstance(run, algorithm.LoopedRound):  # three programs; call it un-jitted
    return run.with_option_names(("exchange_on",))

  def run_round(state, data: VolumeData, key, exchange_on=True):
    return run(state, data, key, exchange_on=exchange_on)
  return run_round


def comm_bytes(hp: PretrainHParams, model_nbytes: int, num_clients: int,
               feature_dim: int) -> Dict[str, int]:
  """Bytes per client per round: up = θ_k (+ its bank), down = θ (+ the others' banks).

  A bank row = feature_dim float32 + int32 label + bool valid (+ int32 origin
  on the way down, added by the server).
  """
  up = down = model_nbytes
  if hp.exchange and num_clients > 1:
    row = 4 * feature_dim + 4 + 1
    up += hp.bank_size * row
    down += (num_clients - 1) * hp.bank_size * (row + 4)
  return {"up": int(up), "down": int(down)}
