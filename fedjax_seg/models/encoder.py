"""U-Net encoder + projection head for contrastive pre-training (SPEC §2, §4.3).

    x [B, H, W, C] -> U-Net contracting path (ConvBlock_0 .. ConvBlock_{depth-1},
    2×2 max-pool between levels; the last block is the bottleneck)
    -> global average pool [B, base·2^(depth-1)]
    -> Dense(hidden_dim) -> ReLU -> Dense(feature_dim)   (the 2-layer projection MLP)
    -> L2-normalised features [B, feature_dim]           (normalize=True)

The contracting path reuses :class:`fedjax_seg.models.unet.ConvBlock` in the
same order as :class:`~fedjax_seg.models.unet.UNet`, so its parameters carry
the *same names* (``ConvBlock_l/Conv_{0,1}``, plus ``BatchNorm_*`` /
``GroupNorm_*`` when normalised) as the U-Net's contracting path.
:func:`encoder_to_unet` copies them into a U-Net for fine-tuning; the
projection head (``proj_hidden``, ``proj_out``) is dropped, as in the paper.

With ``normalize=False`` and ``feature_dim=4`` the same module is the
rotation classifier of the FedRotation baseline (logits over 0/90/180/270°).
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_seg.models.unet import ConvBlock, max_pool_2

HEAD_NAMES = ("proj_hidden", "proj_out")


def l2_normalize(x: jnp.ndarray, axis: int = -1, eps: float = 1e-12) -> jnp.ndarray:
  """x / max(‖x‖₂, eps) along ``axis``."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)


class UNetEncoder(nn.Module):
  """U-Net contracting path + global pooling + 2-layer MLP (L2-normalised).

  Attributes:
    base, depth, norm, ndim, dtype: as in :class:`UNet` (must match the U-Net
      that will be fine-tuned from these weights).
    hidden_dim: width of the projection MLP's hidden layer.
    feature_dim: output dimension (the exchanged feature size in FCL).
    normalize: L2-normalise the output (contrastive features); False for
      classification heads (FedRotation).
  Shapes: x float32 [B, H, W, C] (or [B, D, H, W, C] for ndim=3) ->
  float32 [B, feature_dim].
  """
  base: int = 32
  depth: int = 4
  norm: str = "none"
  ndim: int = 2
  hidden_dim: int = 256
  feature_dim: int = 128
  normalize: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    if x.ndim != self.ndim + 2:
      raise ValueError(f"UNetEncoder(ndim={self.ndim}) expects input of rank {self.ndim + 2}, "
                       f"got shape {x.shape}")
    factor = 2 ** (self.depth - 1)
    for s in x.shape[1:-1]:
      if s % factor:
        raise ValueError(f"spatial size {x.shape[1:-1]} must be divisible by 2**(depth-1) = {factor}")
    x = x.astype(self.dtype)
    for level in range(self.depth - 1):
      x = ConvBlock(self.base * 2 ** level, self.ndim, self.norm, self.dtype)(x, train)
      x = max_pool_2(x, self.ndim)
    x = ConvBlock(self.base * 2 ** (self.depth - 1), self.ndim, self.norm, self.dtype)(x, train)
    h = jnp.mean(x.astype(jnp.float32), axis=tuple(range(1, 1 + self.ndim)))  # global average pool
    h = nn.relu(nn.Dense(self.hidden_dim, name="proj_hidden")(h))
    z = nn.Dense(self.feature_dim, name="proj_out")(h)
    return l2_normalize(z) if self.normalize else z


# ---------------------------------------------------------------------------
# Encoder -> U-Net weight mapping.

def _flatten(tree, prefix=()) -> Dict[Tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict) or hasattr(v, "items"):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def encoder_mapping(encoder_variables, depth: int | None = None) -> List[Tuple[str, Tuple[str, ...]]]:
  """The (collection, path) of every encoder variable that maps into a U-Net.

  Every variable under ``ConvBlock_l`` (l < depth) of every collection
  (params, batch_stats) maps to the same (collection, path) in the U-Net;
  the projection head (:data:`HEAD_NAMES`) does not map.
  """
  out = []
  for col, tree in encoder_variables.items():
    for path in _flatten(tree):
      if path[0] in HEAD_NAMES:
        continue
      if not path[0].startswith("ConvBlock_"):
        raise ValueError(f"encoder variable {col}/{'/'.join(path)} is neither a U-Net "
                         f"contracting-path block nor the projection head")
      if depth is not None and int(path[0].split("_")[1]) >= depth:
        raise ValueError(f"encoder block {path[0]} is deeper than the U-Net (depth {depth})")
      out.append((col, path))
  return out


def encoder_to_unet(encoder_variables, unet_variables):
  """U-Net variables with the contracting path (incl. bottleneck) from the encoder.

  Args:
    encoder_variables: {'params': ..., ['batch_stats': ...]} of a
      :class:`UNetEncoder` (head included; it is ignored).
    unet_variables: variables of a :class:`UNet` with the same base, depth,
      norm and ndim (e.g. a fresh random init: its expanding path and 1×1
      head are kept).
  Returns:
    New U-Net variables (inputs are not modified). Raises ValueError when a
    mapped variable is missing from the U-Net or has another shape.
  """
  new = jax.tree.map(lambda a: a, {k: dict(v) for k, v in unet_variables.items()})
  for col, path in encoder_mapping(encoder_variables):
    src = encoder_variables[col]
    for p in path:
      src = src[p]
    if col not in new:
      raise ValueError(f"U-Net has no collection {col!r} for encoder variable {col}/{'/'.join(path)} "
                       f"(does model.norm match?)")
    node = new[col]
    for p in path[:-1]:
      if p not in node:
        raise ValueError(f"U-Net has no {col}/{'/'.join(path)}: encoder and U-Net architectures differ")
      node[p] = dict(node[p])
      node = node[p]
    if path[-1] not in node:
      raise ValueError(f"U-Net has no {col}/{'/'.join(path)}: encoder and U-Net architectures differ")
    if node[path[-1]].shape != src.shape:
      raise ValueError(f"{col}/{'/'.join(path)}: encoder shape {src.shape} != U-Net shape "
                       f"{node[path[-1]].shape} (base/depth/ndim/input channels must match)")
    node[path[-1]] = jnp.asarray(src, node[path[-1]].dtype)
  return new
