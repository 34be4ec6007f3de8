"""Per-client data stacked into fixed-shape arrays so all clients run in one
compiled program (SPEC §1.6).

    ClientData.x      float32 [K, N_max, *spatial, C]
    ClientData.y      int32   [K, N_max, *spatial]
    ClientData.valid  float32 [K, N_max]   1 = real sample, 0 = padding
    ClientData.steps  int32   [K] or None  local optimiser steps of each client
                                           (unequal local work; None: fl.local_steps each)

Real samples of client k occupy rows [0, s_k); s_k = valid[k].sum() counts
real samples only. Padding rows are zeros and carry zero weight everywhere.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class ClientData:
  x: jnp.ndarray
  y: jnp.ndarray
  valid: jnp.ndarray
  steps: jnp.ndarray = None

  @property
  def num_clients(self) -> int:
    return self.x.shape[0]

  @property
  def num_samples(self) -> jnp.ndarray:
    """s_k, float32 [K]: real samples per client."""
    return jnp.sum(self.valid, axis=1)

  def client(self, k: int) -> "ClientData":
    """Client k's slice, keeping a leading axis of 1."""
    return jax.tree.map(lambda a: a[k:k + 1], self)


def stack_clients(per_client: Sequence[Tuple[np.ndarray, np.ndarray]],
                  min_rows: int = 1, host: bool = False) -> ClientData:
  """Stacks [(x_k [n_k, ...], y_k [n_k, ...])] into a padded ClientData.

  N_max = max(max_k n_k, min_rows); an empty client (n_k = 0) is allowed and
  gets all-zero validity (it is then excluded by the aggregators).
  host=True keeps NumPy arrays in host memory (clients streamed to the device
  in chunks, fl/scale.py) instead of placing them on the default device.
  """
  if not per_client:
    raise ValueError("stack_clients needs at least one client")
  n_max = max(max(len(x) for x, _ in per_client), min_rows)
  x0 = next((x for x, _ in per_client if len(x)), None)
  y0 = next((y for x, y in per_client if len(x)), None)
  if x0 is None:
    raise ValueError("every client is empty: no data to train on")
  k = len(per_client)
  xs = np.zeros((k, n_max) + x0.shape[1:], np.float32)
  ys = np.zeros((k, n_max) + y0.shape[1:], np.int32)
  valid = np.zeros((k, n_max), np.float32)
  for i, (x, y) in enumerate(per_client):
    n = len(x)
    if n:
      if x.shape[1:] != x0.shape[1:] or y.shape[1:] != y0.shape[1:]:
        raise ValueError(f"client {i}: sample shape {x.shape[1:]}/{y.shape[1:]} differs from "
                         f"client 0's {x0.shape[1:]}/{y0.shape[1:]}")
      xs[i, :n], ys[i, :n], valid[i, :n] = x, y, 1.0
  if host:
    return ClientData(xs, ys, valid)
  return ClientData(jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(valid))


def sample_batch(data: ClientData, key: jax.Array, batch_size: int):
  """Samples a batch of one client's *real* samples inside jit.

  data: one client's arrays (x [N, ...], y [N, ...], valid [N]).
  Indices are uniform over [0, s_k) with replacement, so padding rows are
  never drawn; an empty client returns an all-masked batch.
  Returns (x [B, ...], y [B, ...], mask float32 [B]).
  """
  s = jnp.sum(data.valid)
  idx = jax.random.randint(key, (batch_size,), 0, jnp.maximum(s, 1).astype(jnp.int32))
  mask = jnp.where(s > 0, 1.0, 0.0) * jnp.ones((batch_size,), jnp.float32)
  return data.x[idx], data.y[idx], mask


def client_summary(names: List[str], patients: List[List[str]], data: ClientData,
                   val_patients: List[List[str]] | None = None) -> str:
  """Table of clients: patients, slices, slices with foreground."""
  valid = np.asarray(data.valid)
  y = np.asarray(data.y)
  lines = ["| client | patients | val patients | slices | with foreground |",
           "|---|---|---|---|---|"]
  for k, name in enumerate(names):
    n = int(valid[k].sum())
    fg = float((y[k, :n].reshape(n, -1).max(axis=1) > 0).mean()) if n else 0.0
    nv = len(val_patients[k]) if val_patients else 0
    lines.append(f"| {name} | {len(patients[k])} | {nv} | {n} | {fg:.1%} |")
  return "\n".join(lines)
