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
from jax import lax


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


def max_pool_2(x, ndim: int):
  """2×2 (2×2×2) max pooling with stride 2 as a reshape and a max: the same values as
  ``nn.max_pool(x, (2,) * ndim, strides=(2,) * ndim)`` (every spatial size even). On
  XLA:CPU it runs several times faster than the reduce-window (and its gradient faster
  than the select-and-scatter). Gradients agree except where a window holds equal
  maxima: reduce-window gives the first the whole gradient, this splits it equally;
  after a ReLU (every U-Net block ends in one) tied windows are zeros whose gradient
  the ReLU zeroes either way.

  Shapes: x [B, *S, C] -> [B, *(S/2), C]."""
  spatial = x.shape[1:1 + ndim]
  split = sum(((s // 2, 2) for s in spatial), ())
  y = x.reshape((x.shape[0],) + split + (x.shape[-1],))
  return jnp.max(y, axis=tuple(2 + 2 * d for d in range(ndim)))


class ConvTranspose(nn.ConvTranspose):
  """``nn.ConvTranspose`` whose kernel equals its stride (the U-Net's 2×2 / 2×2×2 up-conv),
  computed as one matrix product and a depth-to-space reshape.

  With kernel == stride the output windows do not overlap, so
    y[b, s·i + a, ..., o] = Σ_c x[b, i, ..., c] · kernel[s−1−a, ..., c, o] + bias[o]
  exactly as ``lax.conv_transpose`` with 'SAME' padding computes it (the window is
  reversed; tests/test_models.py checks it against ``nn.ConvTranspose``). The parameters
  (names 'kernel' [*window, C_in, C_out] and 'bias' [C_out], initialisers, auto-name
  ``ConvTranspose_<i>``) are those of ``nn.ConvTranspose``: checkpoints and parameter
  trees are unchanged. Why: on XLA:CPU the kernel gradient of a strided transposed
  convolution is an input-dilated convolution that runs as a naive loop (3 of them
  took 112 of 200 ms of a 64×64 U-Net training step); as a matrix product the gradient
  is a matrix product too. Any other kernel/stride/padding falls back to
  ``nn.ConvTranspose``.

  Shapes: x [B, *S, C_in] -> [B, *(s·S), C_out] (2D or 3D, channels last)."""

  @nn.compact
  def __call__(self, inputs):
    window = tuple(self.kernel_size)
    strides = tuple(self.strides) if self.strides is not None else (1,) * len(window)
    if (window != strides or self.padding != "SAME" or self.transpose_kernel
        or self.mask is not None or self.kernel_dilation not in (None, 1, (1,) * len(window))
        or inputs.ndim != len(window) + 2):
      return super().__call__(inputs)
    nd = len(window)
    kernel = self.param("kernel", self.kernel_init, window + (inputs.shape[-1], self.features),
                        self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
    inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    kernel = lax.rev(kernel, tuple(range(nd)))  # conv_transpose's window order
    # [B, *S, C] x [*w, C, O] -> [B, *S, *w, O]
    y = lax.dot_general(inputs, kernel, (((inputs.ndim - 1,), (nd,)), ((), ())),
                        precision=self.precision,
                        preferred_element_type=self.preferred_element_type)
    spatial = inputs.shape[1:-1]
    # interleave each spatial axis with its window axis: [B, S1, w1, S2, w2, ..., O]
    perm = (0,) + sum(((1 + d, 1 + nd + d) for d in range(nd)), ()) + (1 + 2 * nd,)
    y = jnp.transpose(y, perm).reshape((inputs.shape[0],)
                                        + tuple(s * w for s, w in zip(spatial, window))
                                        + (self.features,))
    if bias is not None:
      y = y + bias
    return y


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
      x = max_pool_2(x, self.ndim)
    x = ConvBlock(self.base * 2 ** (self.depth - 1), self.ndim, self.norm, self.dtype)(x, train)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    for level in reversed(range(self.depth - 1)):
      x = ConvTranspose(self.base * 2 ** level, window, strides=window, dtype=self.dtype)(x)
      x = jnp.concatenate([x, skips[level]], axis=-1)
      x = ConvBlock(self.base * 2 ** level, self.ndim, self.norm, self.dtype)(x, train)
    x = nn.Conv(self.num_classes, (1,) * self.ndim, dtype=self.dtype)(x)
    return x.astype(jnp.float32)
