"""U-Net (Ronneberger et al. 2015) in 2D and 3D, Flax linen.

SPEC §2: two 3×3 conv + ReLU per level, 2×2 max-pool down, up-conv + skip
concatenation up, ``base`` filters doubling per level, dropout 0.5 at the
bottleneck, 1×1 conv head producing per-class logits (softmax is applied by
the losses/metrics, never inside the model, so losses stay numerically stable).

Shapes (channels last):
  2D: x float32 [B, H, W, C_in]     -> logits float32 [B, H, W, num_classes]
  3D: x float32 [B, D, H, W, C_in]  -> logits float32 [B, D, H, W, num_classes]
Spatial sizes must be divisible by 2**(depth-1).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp


def make_norm(norm: str, train: bool, groups: int = 8) -> Callable[[jnp.ndarray], jnp.ndarray]:
  """Returns a normalisation layer by name: 'none', 'batch', 'group', 'layer'."""
  if norm == "none":
    return lambda x: x
  if norm == "batch":
    return nn.BatchNorm(use_running_average=not train, momentum=0.9)
  if norm == "group":
    return lambda x: nn.GroupNorm(num_groups=min(groups, x.shape[-1]))(x)
  if norm == "layer":
    return nn.LayerNorm()
  raise ValueError(f"model.norm={norm!r}: expected one of 'none', 'batch', 'group', 'layer'")


class ConvBlock(nn.Module):
  """Two 3×3 (or 3×3×3) convolutions, each followed by norm and ReLU."""
  features: int
  ndim: int = 2
  norm: str = "none"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    for _ in range(2):
      x = nn.Conv(self.features, (3,) * self.ndim, padding="SAME", dtype=self.dtype)(x)
      x = make_norm(self.norm, train)(x)
      x = nn.relu(x)
    return x


class UNetBase(nn.Module):
  """What the U-Nets here share: the class count, the width and number of the
  levels, and the check of the input. A subclass declares ``ndim`` (2 or 3)
  and its other attributes.

  Attributes:
    num_classes: output channels (logits), background included.
    base: filters at level 0; level l has base * 2**l.
    depth: number of resolution levels (depth-1 poolings).
  """
  num_classes: int = 2
  base: int = 32
  depth: int = 4

  def check_input(self, x) -> None:
    """Raises ValueError unless ``x`` has rank ``ndim + 2`` and spatial sizes divisible by 2**(depth-1)."""
    if x.ndim != self.ndim + 2:
      raise ValueError(
          f"{type(self).__name__}(ndim={self.ndim}) expects input of rank {self.ndim + 2} "
          f"[B, {'D, ' if self.ndim == 3 else ''}H, W, C], got shape {x.shape}")
    factor = 2 ** (self.depth - 1)
    for s in x.shape[1:-1]:
      if s % factor:
        raise ValueError(f"spatial size {x.shape[1:-1]} must be divisible by "
                         f"2**(depth-1) = {factor} (depth={self.depth})")


class UNet(UNetBase):
  """U-Net with configurable depth, width, dropout and normalisation.

  Attributes:
    num_classes: output channels (logits), background included.
    base: filters at the first level; level l has base * 2**l.
    depth: number of resolution levels (depth-1 poolings).
    dropout: dropout rate at the bottleneck (SPEC: 0.5).
    norm: 'none' (the original), 'batch', 'group' or 'layer'.
    ndim: 2 or 3 spatial dimensions.
    dtype: compute dtype (params stay float32); bfloat16 for mixed precision.
  """
  dropout: float = 0.5
  norm: str = "none"
  ndim: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    self.check_input(x)
    x = x.astype(self.dtype)
    window = (2,) * self.ndim
    skips = []
    for level in range(self.depth - 1):
      x = ConvBlock(self.base * 2 ** level, self.ndim, self.norm, self.dtype)(x, train)
      skips.append(x)
      x = nn.max_pool(x, window, strides=window)
    x = ConvBlock(self.base * 2 ** (self.depth - 1), self.ndim, self.norm, self.dtype)(x, train)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    for level in reversed(range(self.depth - 1)):
      x = nn.ConvTranspose(self.base * 2 ** level, window, strides=window, dtype=self.dtype)(x)
      x = jnp.concatenate([x, skips[level]], axis=-1)
      x = ConvBlock(self.base * 2 ** level, self.ndim, self.norm, self.dtype)(x, train)
    x = nn.Conv(self.num_classes, (1,) * self.ndim, dtype=self.dtype)(x)
    return x.astype(jnp.float32)
