"""Scale-attentional U-Net (SCAUnet, SCAUnet-A), Flax linen, 2D and 3D.

Seed ``fedwep_scaunet_summary.md`` (Kim, Yu et al., "Scale-Attentional U-Net
for the Segmentation of the Median Nerve in Ultrasound Images",
Ultrasonography 2021), Fig. 3.1:

  "(a) SCA-conv performs cascaded convolutions, without nonlinearity or
  pooling in-between, effectively using receptive fields of varying sizes.
  (b) Intermediate convolutional outputs form a concatenated feature map to
  which self-attention is applied in order to select and mix important scale
  features. In our implementations, the input is initially processed by 1×1
  convolution and subsequently by 3×3 depthwise separable convolution (DSC).
  The total number of scales N can be either fixed (SCAUnet) or adaptively
  (SCAUnet-A) determined depending on the resolution of feature maps."

The seed gives no code, layer widths or attention formula; what is written
here is our reading of that description (see :class:`SCABlock` for the exact
equations).  The reference sizes (SCAUnet 491,907 params / 3.90 GFLOPs,
SCAUnet-A 164,795 / 3.34, U-Net 9,421,569 / 66.42) are compared with ours in
``benchmarks/model_table.py``.

Shapes (channels last, like :mod:`fedjax_seg.models.unet`):
  2D: x [B, H, W, C_in]     -> logits float32 [B, H, W, num_classes]
  3D: x [B, D, H, W, C_in]  -> logits float32 [B, D, H, W, num_classes]
Spatial sizes must be divisible by 2**(depth-1).
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import Any, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_seg.models.unet import ConvTranspose, UNetBase, make_norm, max_pool_2

Scales = Union[int, Sequence[int]]


def default_adaptive_scales(depth: int, max_scales: int = 4) -> Tuple[int, ...]:
  """SCAUnet-A's default N per level: most scales at full resolution.

  Level 0 (full resolution) gets ``max_scales``, each coarser level one fewer,
  never below 1: depth 4 -> (4, 3, 2, 1); depth 5 -> (4, 3, 2, 1, 1).
  A 3×3 cascade of N convs sees a (2N+1)-pixel window, so at coarse levels,
  where one pixel already covers a large area, fewer scales are needed.
  """
  return tuple(max(1, max_scales - level) for level in range(depth))


def scales_per_level(scales: Scales, depth: int) -> Tuple[int, ...]:
  """Normalises ``scales`` (int or one int per level) to a tuple of ``depth`` ints."""
  if isinstance(scales, int):
    per_level = (scales,) * depth
  else:
    per_level = tuple(int(s) for s in scales)
  if len(per_level) != depth:
    raise ValueError(f"model.scales={tuple(per_level)} has {len(per_level)} entries but "
                     f"model.depth={depth}: give one N per resolution level (level 0 = full "
                     f"resolution) or a single int")
  if any(s < 1 for s in per_level):
    raise ValueError(f"model.scales={tuple(per_level)}: every N must be >= 1")
  return per_level


def _windows(x, k: int, ndim: int):
  """Yields (offset, shifted view) for the k**ndim taps of a 'SAME' k-window."""
  p = k // 2
  xp = jnp.pad(x, [(0, 0)] + [(p, k - 1 - p)] * ndim + [(0, 0)])
  spatial = x.shape[1:-1]
  for offs in itertools.product(range(k), repeat=ndim):
    yield offs, xp[(slice(None),) + tuple(slice(o, o + n) for o, n in zip(offs, spatial))]


def _shift_correlate(x, kernel, ndim: int):
  """Depthwise 'SAME' cross-correlation as a sum of shifted copies.

  x [B, *S, C], kernel [k]*ndim + [1, C] -> [B, *S, C]:
  y[b, s, c] = Σ_o kernel[o, 0, c] · x[b, s + o - k//2, c] (zero padded).
  """
  k = kernel.shape[0]
  y = None
  for offs, window in _windows(x, k, ndim):
    term = window * kernel[offs + (0,)]
    y = term if y is None else y + term
  return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def depthwise_shift(x, kernel, ndim: int):
  """:func:`_shift_correlate` with a hand-written VJP (reverse mode only).

  Autodiff of the shifted sum pads the cotangent once per tap; the VJP below
  computes the input gradient as one more shifted correlation with the
  flipped kernel (odd k) and the kernel gradient as k**ndim reductions. Same
  numbers (tests compare with the grouped convolution), about half the
  compile time and ~40% less backward time on XLA:CPU.
  """
  return _shift_correlate(x, kernel, ndim)


def _depthwise_shift_fwd(x, kernel, ndim):
  return _shift_correlate(x, kernel, ndim), (x, kernel)


def _depthwise_shift_bwd(ndim, res, g):
  x, kernel = res
  k = kernel.shape[0]
  flipped = kernel[(slice(None, None, -1),) * ndim]
  gx = _shift_correlate(g, flipped, ndim)
  gk = [jnp.sum((window * g).reshape(-1, g.shape[-1]), axis=0, dtype=jnp.float32)
        for _, window in _windows(x, k, ndim)]
  gk = jnp.stack(gk).reshape(kernel.shape).astype(kernel.dtype)
  return gx.astype(x.dtype), gk


depthwise_shift.defvjp(_depthwise_shift_fwd, _depthwise_shift_bwd)


class DepthwiseConv(nn.Module):
  """k×k (k×k×k) depthwise convolution, 'SAME' padding, channels last.

  x [B, *S, C] -> [B, *S, C]; kernel param [k]*ndim + [1, C] (the layout of
  ``nn.Conv(C, feature_group_count=C)``, so both implementations share
  checkpoints).

  impl:
    'conv':  ``lax.conv_general_dilated`` with ``feature_group_count=C``.
    'shift': sum over the k**ndim offsets of a shifted copy of x times a
             per-channel weight (:func:`depthwise_shift`, odd k only):
             elementwise work that XLA fuses into one loop; on XLA:CPU this
             is ~3× faster than the grouped convolution per training step.
             Reverse-mode differentiable only (custom VJP).
  """
  kernel_size: int = 3
  ndim: int = 2
  use_bias: bool = True
  impl: str = "shift"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    k = self.kernel_size
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (k,) * self.ndim + (1, c), jnp.float32).astype(self.dtype)
    x = x.astype(self.dtype)
    if self.impl == "conv":
      dn = jax.lax.conv_dimension_numbers(
          x.shape, kernel.shape,
          ("NHWC", "HWIO", "NHWC") if self.ndim == 2 else ("NDHWC", "DHWIO", "NDHWC"))
      y = jax.lax.conv_general_dilated(x, kernel, (1,) * self.ndim, "SAME",
                                       dimension_numbers=dn, feature_group_count=c)
    elif self.impl == "shift":
      if k % 2 != 1:
        raise ValueError(f"depthwise impl 'shift' needs an odd kernel size, got {k}")
      y = depthwise_shift(x, kernel, self.ndim)
    else:
      raise ValueError(f"model.depthwise={self.impl!r}: expected 'shift' or 'conv'")
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (c,), jnp.float32).astype(self.dtype)
    return y


class SCABlock(nn.Module):
  """Scale-attentional convolution block (SCA-conv), then norm + ReLU.

  With x [B, *S, C_in], F = ``features``, N = ``scales``, d = ``key_dim``:

    h_0 = Conv1×1(x)                                  [B, *S, F]
    h_n = PW_n(DW_n(h_{n-1})),  n = 1..N              [B, *S, F]
          (3×3 depthwise DW then 1×1 pointwise PW = one depthwise-separable
          conv; no nonlinearity or pooling between them, so h_n is a linear
          function of h_0 with a (2n+1)-pixel receptive field)
    Z   = stack(h_1..h_N, axis=-2)                    [B, *S, N, F]
          (the "concatenated feature map", with the scales on their own axis)
    A   = softmax_m(Z W_q (Z W_k)^T / sqrt(d))        [B, *S, N, N]
          (self-attention across the scale axis, per pixel; rows sum to 1)
    w   = mean_n A[..., n, :]                         [B, *S, N], Σ_m w_m = 1
    y   = Conv1×1(mean_n (A Z)_n) = Conv1×1(Σ_m w_m h_m)          [B, *S, F]
    out = ReLU(norm(y))

  So each pixel selects (w) and mixes (Σ) its own receptive-field sizes.
  For N = 1 there is nothing to select: w = 1 and W_q, W_k are not created.

  ``self.sow('intermediates', 'scale_weights', w)`` and
  ``'scale_attention', A`` record the weights when the caller applies with
  ``mutable=['intermediates']`` (never during ``init``, so they do not end up
  in the model variables that training and aggregation carry around).
  """
  features: int
  scales: int = 4
  ndim: int = 2
  norm: str = "none"
  key_dim: Optional[int] = None
  depthwise: str = "shift"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    f, n_scales, nd = self.features, self.scales, self.ndim
    if n_scales < 1:
      raise ValueError(f"SCABlock.scales={n_scales} must be >= 1")
    one = (1,) * nd
    h = nn.Conv(f, one, dtype=self.dtype, name="conv_in")(x)
    outs = []
    for i in range(n_scales):
      h = DepthwiseConv(3, nd, impl=self.depthwise, dtype=self.dtype, name=f"dw{i}")(h)
      h = nn.Conv(f, one, dtype=self.dtype, name=f"pw{i}")(h)
      outs.append(h)
    z = jnp.stack(outs, axis=-2)                                  # [B, *S, N, F]
    if n_scales == 1:
      w = jnp.ones(z.shape[:-1], jnp.float32)
      a = jnp.ones(z.shape[:-1] + (1,), jnp.float32)
    else:
      d = self.key_dim or max(4, f // 4)
      q = nn.Dense(d, use_bias=False, dtype=self.dtype, name="query")(z)   # [B, *S, N, d]
      k = nn.Dense(d, use_bias=False, dtype=self.dtype, name="key")(z)     # [B, *S, N, d]
      # N ≤ ~5: broadcast-multiply-sum instead of a batched matmul with tiny
      # N×N blocks (fuses into one elementwise loop on CPU).
      s = jnp.sum(q[..., :, None, :].astype(jnp.float32) * k[..., None, :, :], axis=-1)
      a = jax.nn.softmax(s / math.sqrt(d), axis=-1)               # [B, *S, N, N]
      w = jnp.mean(a, axis=-2)                                    # [B, *S, N]
    if not self.is_initializing():
      self.sow("intermediates", "scale_weights", w)
      self.sow("intermediates", "scale_attention", a)
    y = jnp.sum(z * w[..., None].astype(z.dtype), axis=-2)        # [B, *S, F]
    y = nn.Conv(f, one, dtype=self.dtype, name="mix")(y)
    y = make_norm(self.norm, train)(y)
    return nn.relu(y)


class SCAUnet(UNetBase):
  """U-Net whose conv blocks are :class:`SCABlock` s (SCAUnet / SCAUnet-A).

  Layout as :class:`~fedjax_seg.models.unet.UNet`: per level one SCA block,
  2×2 max-pool down; bottleneck block + dropout; up by a 2×2 transposed conv
  (or nearest resize, ``upsample='resize'``, which saves its parameters),
  skip concatenation, SCA block; 1×1 conv head giving logits.

  Attributes:
    num_classes: output channels (logits), background included.
    base: filters at level 0; level l has base * 2**l.
    depth: number of resolution levels (depth-1 poolings).
    scales: N, an int (SCAUnet: the same N everywhere) or one int per level,
      level 0 = full resolution (SCAUnet-A, e.g. (4, 3, 2, 1)); the decoder
      block at level l uses the same N as the encoder block at level l.
    dropout: dropout rate at the bottleneck.
    norm: 'none', 'batch', 'group' or 'layer' (after each SCA block).
    ndim: 2 or 3 spatial dimensions.
    upsample: 'transpose' (2×2 transposed conv to base*2**l channels) or
      'resize' (nearest-neighbour ×2, channels unchanged; the next block's
      1×1 conv does the channel reduction).
    key_dim: attention key size d (default max(4, F//4) per block).
    depthwise: 'shift' or 'conv', see :class:`DepthwiseConv`.
    dtype: compute dtype (params stay float32); bfloat16 for mixed precision.
  """
  base: int = 16
  scales: Scales = 4
  dropout: float = 0.5
  norm: str = "none"
  ndim: int = 2
  upsample: str = "transpose"
  key_dim: Optional[int] = None
  depthwise: str = "shift"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    self.check_input(x)
    if self.upsample not in ("transpose", "resize"):
      raise ValueError(f"model.upsample={self.upsample!r}: expected 'transpose' or 'resize'")
    per_level = scales_per_level(self.scales, self.depth)

    def block(level, name):
      return SCABlock(self.base * 2 ** level, per_level[level], self.ndim, self.norm,
                      self.key_dim, self.depthwise, self.dtype, name=name)

    x = x.astype(self.dtype)
    window = (2,) * self.ndim
    skips = []
    for level in range(self.depth - 1):
      x = block(level, f"down{level}")(x, train)
      skips.append(x)
      x = max_pool_2(x, self.ndim)  # every block ends in a ReLU
    x = block(self.depth - 1, "bottleneck")(x, train)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    for level in reversed(range(self.depth - 1)):
      if self.upsample == "transpose":
        x = ConvTranspose(self.base * 2 ** level, window, strides=window, dtype=self.dtype,
                          name=f"upconv{level}")(x)
      else:
        for axis in range(1, self.ndim + 1):
          x = jnp.repeat(x, 2, axis=axis)
      x = jnp.concatenate([x, skips[level]], axis=-1)
      x = block(level, f"up{level}")(x, train)
    x = nn.Conv(self.num_classes, (1,) * self.ndim, dtype=self.dtype, name="head")(x)
    return x.astype(jnp.float32)
