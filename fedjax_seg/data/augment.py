"""Jittable, key-driven spatial augmentation (SPEC §1.5, seed 001).

``make_augment(config.augment)`` returns ``augment(key, x, y) -> (x, y)``:

* x float [B, H, W, C] (2D) or [B, D, H, W, C] (3D), y int [B, H, W] or
  [B, D, H, W];
* per sample, an in-plane transform about the slice centre: rotation by
  θ ~ U(rotation_deg) degrees (seed 001: U(0°, 90°)), zoom z ~ U(zoom)
  (seed 001: U(1.0, 1.1); z > 1 magnifies), optional random flips of the
  H and W axes (p = 0.5 each). A 3D volume gets the same transform on every
  axial slice (rotation about the z axis);
* the *same* transform is applied to image and mask: the image is sampled
  bilinearly, the mask by nearest neighbour, so it stays integer-valued
  with no new labels; pixels mapped from outside the input are 0
  (background) in both;
* rotation 0 with zoom 1 (and no flip) is exactly the identity.

Output pixel p (centre c) samples the input at
``c + R(θ) F (p − c) / z`` with F = diag(±1, ±1) the flips. Keys are split
per sample with `jax.random.split`, so a batch's augmentation is a pure
function of (key, batch).
"""
from __future__ import annotations

from typing import Callable, Sequence, Tuple

import jax
import jax.numpy as jnp

AugmentFn = Callable[[jax.Array, jnp.ndarray, jnp.ndarray], Tuple[jnp.ndarray, jnp.ndarray]]


def source_coords(h: int, w: int, theta, zoom, flip_y, flip_x) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Input coordinates (sy, sx), float32 [H, W], sampled by every output pixel.

  theta: rotation (radians); zoom: > 0; flip_y / flip_x: ±1.
  """
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
  dy, dx = (yy - cy) * flip_y, (xx - cx) * flip_x
  c, s = jnp.cos(theta), jnp.sin(theta)
  sy = cy + (c * dy - s * dx) / zoom
  sx = cx + (s * dy + c * dx) / zoom
  return sy, sx


def _inside(iy, ix, h, w):
  return (iy >= 0) & (iy <= h - 1) & (ix >= 0) & (ix <= w - 1)


def sample_bilinear(img: jnp.ndarray, sy: jnp.ndarray, sx: jnp.ndarray) -> jnp.ndarray:
  """Bilinear sampling of ``img`` [H, W, ...] at (sy, sx) [H', W']; zero outside."""
  h, w = img.shape[0], img.shape[1]
  y0, x0 = jnp.floor(sy), jnp.floor(sx)
  wy, wx = sy - y0, sx - x0
  out = 0.0
  for dy, fy in ((0, 1.0 - wy), (1, wy)):
    for dx, fx in ((0, 1.0 - wx), (1, wx)):
      iy, ix = y0 + dy, x0 + dx
      ok = _inside(iy, ix, h, w)
      v = img[jnp.clip(iy, 0, h - 1).astype(jnp.int32), jnp.clip(ix, 0, w - 1).astype(jnp.int32)]
      weight = jnp.where(ok, fy * fx, 0.0)
      out = out + v * weight.reshape(weight.shape + (1,) * (img.ndim - 2)).astype(img.dtype)
  return out.astype(img.dtype)


def sample_nearest(img: jnp.ndarray, sy: jnp.ndarray, sx: jnp.ndarray) -> jnp.ndarray:
  """Nearest-neighbour sampling of ``img`` [H, W, ...] at (sy, sx); 0 outside; dtype kept."""
  h, w = img.shape[0], img.shape[1]
  iy, ix = jnp.round(sy), jnp.round(sx)
  ok = _inside(iy, ix, h, w)
  v = img[jnp.clip(iy, 0, h - 1).astype(jnp.int32), jnp.clip(ix, 0, w - 1).astype(jnp.int32)]
  return jnp.where(ok.reshape(ok.shape + (1,) * (img.ndim - 2)), v, jnp.zeros((), img.dtype))


def transform_pair(x: jnp.ndarray, y: jnp.ndarray, theta, zoom, flip_y=1.0, flip_x=1.0):
  """Applies one in-plane transform to a single sample.

  x: [H, W, C] or [D, H, W, C]; y: [H, W] or [D, H, W]. Returns (x, y) of
  the same shapes and dtypes.
  """
  volume = x.ndim == 4
  if volume:  # put the in-plane axes first: [H, W, D, C] / [H, W, D]
    x, y = jnp.moveaxis(x, 0, 2), jnp.moveaxis(y, 0, 2)
  h, w = x.shape[0], x.shape[1]
  sy, sx = source_coords(h, w, theta, zoom, flip_y, flip_x)
  x, y = sample_bilinear(x, sy, sx), sample_nearest(y, sy, sx)
  if volume:
    x, y = jnp.moveaxis(x, 2, 0), jnp.moveaxis(y, 2, 0)
  return x, y


def draw_params(key: jax.Array, rotation_deg: Sequence[float], zoom: Sequence[float], flip: bool):
  """One sample's (theta radians, zoom, flip_y, flip_x)."""
  k_rot, k_zoom, k_fy, k_fx = jax.random.split(key, 4)
  theta = jnp.deg2rad(jax.random.uniform(k_rot, (), jnp.float32, rotation_deg[0], rotation_deg[1]))
  z = jax.random.uniform(k_zoom, (), jnp.float32, zoom[0], zoom[1])
  if flip:
    fy = jnp.where(jax.random.bernoulli(k_fy), -1.0, 1.0)
    fx = jnp.where(jax.random.bernoulli(k_fx), -1.0, 1.0)
  else:
    fy = fx = jnp.float32(1.0)
  return theta, z, fy, fx


def make_augment(cfg) -> AugmentFn:
  """Builds the augmentation from ``config.augment``.

  Keys (defaults = seed 001): rotation_deg (0.0, 90.0), zoom (1.0, 1.1),
  flip False. ``enabled`` is read by the trainer, not here.
  """
  get = cfg.get if hasattr(cfg, "get") else (lambda k, d=None: getattr(cfg, k, d))
  rotation = tuple(float(v) for v in get("rotation_deg", (0.0, 90.0)))
  zoom = tuple(float(v) for v in get("zoom", (1.0, 1.1)))
  flip = bool(get("flip", False))
  if len(rotation) != 2 or rotation[0] > rotation[1]:
    raise ValueError(f"config.augment.rotation_deg={rotation}: expected (low, high) degrees")
  if len(zoom) != 2 or not 0 < zoom[0] <= zoom[1]:
    raise ValueError(f"config.augment.zoom={zoom}: expected (low, high) with 0 < low <= high")
  known = {"enabled", "rotation_deg", "zoom", "flip"}
  if hasattr(cfg, "keys"):
    extra = set(cfg.keys()) - known
    if extra:
      raise ValueError(f"unknown config.augment keys {sorted(extra)}; known: {sorted(known)}")

  def augment(key, x, y):
    if x.ndim not in (4, 5) or y.ndim != x.ndim - 1:
      raise ValueError(f"augment expects x [B, (D,) H, W, C] and y [B, (D,) H, W], got {x.shape} and {y.shape}")
    keys = jax.random.split(key, x.shape[0])

    def one(k, xi, yi):
      theta, z, fy, fx = draw_params(k, rotation, zoom, flip)
      return transform_pair(xi, yi, theta, z, fy, fx)

    return jax.vmap(one)(keys, x, y)

  return augment
