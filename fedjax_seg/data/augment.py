"""Jittable, key-driven augmentation: spatial (SPEC §1.5, seed 001) plus nnU-Net's
intensity set and elastic deformation (docs/data.md, "Augmentation").

``make_augment(config.augment)`` returns ``augment(key, x, y) -> (x, y)``:

* x float [B, H, W, C] (2D) or [B, D, H, W, C] (3D), y int [B, H, W] or
  [B, D, H, W]; shapes and dtypes are kept;
* per sample, an in-plane transform about the slice centre: rotation by
  θ ~ U(rotation_deg) degrees (seed 001: U(0°, 90°)), zoom z ~ U(zoom)
  (seed 001: U(1.0, 1.1); z > 1 magnifies), optional random flips of the
  H and W axes (p = 0.5 each), optionally an elastic displacement field
  d(p) (``elastic``). A 3D volume gets the same in-plane transform (and
  field) on every axial slice (rotation about the z axis);
* the *same* coordinates are used for image and mask: the image is sampled
  bilinearly (``jax.scipy.ndimage.map_coordinates`` order 1), the mask by
  nearest neighbour (order 0), so it stays integer-valued with no new
  labels; pixels mapped from outside the input are 0 (background) in both
  (mode 'constant', cval 0);
* then, on the image only, each enabled intensity op with its own
  probability per sample, in nnU-Net's order: ``noise``, ``blur``,
  ``brightness``, ``contrast``, ``gamma``. The mask is never touched by them;
* rotation 0 with zoom 1 (no flip, no elastic, no intensity op) is exactly
  the identity.

Output pixel p (centre c) samples the input at
``c + R(θ) F (p − c) / z + d(p)`` with F = diag(±1, ±1) the flips. Nearest
sampling rounds a coordinate half away from zero (``lax.round``; 2.5 → 3,
−0.5 → −1, i.e. outside), where the hand-written sampler this replaced used
``jnp.round`` (half to even: 2.5 → 2, −0.5 → 0). The two masks differ only at
output pixels whose source coordinate is exactly a half-integer (e.g. zoom 2
about an integer centre); ``tests/test_augment.py`` checks both facts.

Each op section (``noise``, ``blur``, ``brightness``, ``contrast``, ``gamma``,
``elastic``) is optional: absent, or ``prob`` 0, means the op is off and is
not even traced. A present section must have all its keys (no defaults here:
they live in configs/lgg_centralized.py and configs/acdc_centralized.py).
Keys are split per sample with `jax.random.split`; the spatial parameters use
the per-sample key as before, each op a `jax.random.fold_in` of it, so a
batch's augmentation is a pure function of (key, batch) and the spatial part
is unchanged by enabling an intensity op.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import dm_pix as pix
import jax
import jax.numpy as jnp
from jax.scipy import ndimage

AugmentFn = Callable[[jax.Array, jnp.ndarray, jnp.ndarray], Tuple[jnp.ndarray, jnp.ndarray]]

# The keys of each op section (all required when the section is present).
OPS: Dict[str, Tuple[str, ...]] = {
    "noise": ("prob", "sigma"),
    "blur": ("prob", "sigma"),
    "brightness": ("prob", "range"),
    "contrast": ("prob", "range"),
    "gamma": ("prob", "range"),
    "elastic": ("prob", "alpha", "sigma"),
}
SPATIAL_KEYS = ("enabled", "rotation_deg", "zoom", "flip")
# fold_in index of each op's key (fixed: enabling one op never changes another's draws).
_FOLD = {"elastic": 1, "noise": 2, "blur": 3, "brightness": 4, "contrast": 5, "gamma": 6}
# Gamma: x is mapped to [0, 1] as (x − min) / (max − min + GAMMA_EPS) (nnU-Net's 1e-7).
GAMMA_EPS = 1e-7
# Gaussian kernels are truncated at radius ⌈TRUNCATE · σ_high⌉ pixels.
TRUNCATE = 3.0


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


def sample(img: jnp.ndarray, sy: jnp.ndarray, sx: jnp.ndarray, order: int) -> jnp.ndarray:
  """``img`` [H, W, ...] sampled at (sy, sx) float32 [H', W'] -> [H', W', ...], dtype kept.

  ``jax.scipy.ndimage.map_coordinates`` on every trailing index: order 1 is
  bilinear, order 0 nearest (rounding half away from zero); 0 outside.
  """
  h, w, rest = img.shape[0], img.shape[1], img.shape[2:]
  flat = img.reshape(h, w, -1)

  def one(plane):  # [H, W] -> [H', W']
    return ndimage.map_coordinates(plane, (sy, sx), order=order, mode="constant", cval=0)

  out = jax.vmap(one, in_axes=2, out_axes=2)(flat)
  return out.reshape(sy.shape + rest)


def sample_bilinear(img: jnp.ndarray, sy: jnp.ndarray, sx: jnp.ndarray) -> jnp.ndarray:
  """Bilinear sampling of ``img`` [H, W, ...] at (sy, sx) [H', W']; zero outside."""
  return sample(img, sy, sx, order=1)


def sample_nearest(img: jnp.ndarray, sy: jnp.ndarray, sx: jnp.ndarray) -> jnp.ndarray:
  """Nearest-neighbour sampling of ``img`` [H, W, ...] at (sy, sx); 0 outside; dtype kept."""
  return sample(img, sy, sx, order=0)


def transform_pair(x: jnp.ndarray, y: jnp.ndarray, theta, zoom, flip_y=1.0, flip_x=1.0,
                   displacement: Optional[Tuple[jnp.ndarray, jnp.ndarray]] = None):
  """Applies one in-plane transform to a single sample.

  x: [H, W, C] or [D, H, W, C]; y: [H, W] or [D, H, W]; displacement: None or
  (dy, dx) float32 [H, W] added to the source coordinates (same for every
  slice). Returns (x, y) of the same shapes and dtypes.
  """
  volume = x.ndim == 4
  if volume:  # put the in-plane axes first: [H, W, D, C] / [H, W, D]
    x, y = jnp.moveaxis(x, 0, 2), jnp.moveaxis(y, 0, 2)
  h, w = x.shape[0], x.shape[1]
  sy, sx = source_coords(h, w, theta, zoom, flip_y, flip_x)
  if displacement is not None:
    sy, sx = sy + displacement[0], sx + displacement[1]
  x, y = sample(x, sy, sx, order=1), sample(y, sy, sx, order=0)
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


# ---------------------------------------------------------------------------
# Elastic displacement and intensity ops (one sample; x [H, W, C] or [D, H, W, C]).

def kernel_radius(sigma_high: float) -> int:
  """Radius (pixels, static) of the truncated Gaussian kernel for σ ≤ sigma_high."""
  return max(1, int(math.ceil(TRUNCATE * sigma_high)))


def elastic_field(key: jax.Array, h: int, w: int, alpha, sigma, radius: int) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """(dy, dx) float32 [H, W]: ``alpha · (G_σ * u)`` with u ~ U(−1, 1) iid per pixel and
  axis (Simard 2003; nnU-Net's and dm_pix's recipe), G_σ the Gaussian of std σ
  truncated at ``radius``, zero padded (``pix.gaussian_blur``). alpha, sigma: scalars."""
  u = jax.random.uniform(key, (h, w, 2), jnp.float32, -1.0, 1.0)
  d = pix.gaussian_blur(u, sigma, kernel_size=2 * radius + 1)
  return alpha * d[..., 0], alpha * d[..., 1]


def _spatial_axes(x: jnp.ndarray) -> Tuple[int, ...]:
  return tuple(range(x.ndim - 1))


def add_noise(x: jnp.ndarray, key: jax.Array, sigma) -> jnp.ndarray:
  """x + σ·n, n ~ N(0, 1) iid per voxel and channel. x [..., C] float; σ scalar."""
  return (x + sigma * jax.random.normal(key, x.shape, jnp.float32)).astype(x.dtype)


def blur(x: jnp.ndarray, sigma, radius: int) -> jnp.ndarray:
  """In-plane Gaussian blur of each channel (``pix.gaussian_blur``, std σ pixels,
  kernel 2·radius+1, zero padded); a volume [D, H, W, C] is blurred slice by slice."""
  return pix.gaussian_blur(x, sigma, kernel_size=2 * radius + 1).astype(x.dtype)


def scale_brightness(x: jnp.ndarray, factor) -> jnp.ndarray:
  """Multiplicative brightness: x · m (nnU-Net's BrightnessMultiplicativeTransform)."""
  return (x * factor).astype(x.dtype)


def adjust_contrast(x: jnp.ndarray, factor) -> jnp.ndarray:
  """Per channel: clip((x − μ) · f + μ, min x, max x), μ / min / max over the sample's
  voxels (``pix.adjust_contrast``, then nnU-Net's preserve_range clipping)."""
  flat = x.reshape((-1,) + x.shape[-2:])  # [D·H, W, C]: pix averages over the two spatial axes
  out = pix.adjust_contrast(flat, factor).reshape(x.shape)
  axes = _spatial_axes(x)
  return jnp.clip(out, x.min(axis=axes), x.max(axis=axes)).astype(x.dtype)


def adjust_gamma(x: jnp.ndarray, gamma) -> jnp.ndarray:
  """Per channel, on the sample's [0, 1]-normalised intensities:
  ``min + r · ((x − min) / (r + GAMMA_EPS))^γ`` with r = max − min
  (``pix.adjust_gamma``; nnU-Net's GammaTransform without retain_stats)."""
  axes = _spatial_axes(x)
  lo, hi = x.min(axis=axes), x.max(axis=axes)
  r = hi - lo
  x01 = (x - lo) / (r + GAMMA_EPS)
  return (lo + r * pix.adjust_gamma(x01, gamma)).astype(x.dtype)


# ---------------------------------------------------------------------------
# Config.

def _pair(value):
  """A (low, high) range as floats (its shape and order were checked by `_check_rules`)."""
  return tuple(float(v) for v in value)


def _read_ops(get) -> Dict[str, Dict[str, object]]:
  """The enabled op sections: {op: {key: value}} with pairs as float tuples."""
  ops = {}
  for op, keys in OPS.items():
    sec = get(op, None)
    if sec is None:
      continue
    sget = sec.get if hasattr(sec, "get") else (lambda k, d=None, s=sec: getattr(s, k, d))
    extra = set(sec.keys()) - set(keys) if hasattr(sec, "keys") else set()
    if extra:
      raise ValueError(f"unknown config.augment.{op} keys {sorted(extra)}; known: {sorted(keys)}")
    vals = {}
    for k in keys:
      v = sget(k, None)
      if v is None:
        raise ValueError(f"config.augment.{op}.{k} is missing (the {op} section needs {', '.join(keys)})")
      vals[k] = float(v) if k == "prob" else _pair(v)
    if vals["prob"] > 0:
      ops[op] = vals
  return ops


def _check_rules(cfg) -> None:
  """The ``augment.*`` rules of fedjax_seg.validate.RULES, for callers that skip launch.py."""
  from fedjax_seg import validate
  for key, value in validate.leaves(cfg, "augment."):
    rule = validate.RULES.get(key)
    why = None if rule is None else rule.check(value)
    if why is not None:
      raise validate.ConfigError(key, value, why)


def _uniform(key, lohi):
  return jax.random.uniform(key, (), jnp.float32, lohi[0], lohi[1])


def make_augment(cfg) -> AugmentFn:
  """Builds the augmentation from ``config.augment`` (a ConfigDict or dict).

  Spatial keys (required): rotation_deg (low, high) degrees, zoom (low, high), flip
  bool (configs/common.augment: seed 001's (0.0, 90.0), (1.0, 1.1), False). ``enabled``
  is read by the trainer, not here. Op sections (each optional, an absent op is off;
  see the module docstring and
  docs/data.md for the formulas): noise {prob, sigma}, blur {prob, sigma},
  brightness {prob, range}, contrast {prob, range}, gamma {prob, range},
  elastic {prob, alpha, sigma}; every pair is (low, high) of a per-sample
  uniform draw.
  """
  get = cfg.get if hasattr(cfg, "get") else (lambda k, d=None: getattr(cfg, k, d))
  known = set(SPATIAL_KEYS) | set(OPS)
  if hasattr(cfg, "keys"):
    extra = set(cfg.keys()) - known
    if extra:
      raise ValueError(f"unknown config.augment keys {sorted(extra)}; known: {sorted(known)}")
  _check_rules(cfg)
  rotation, zoom, flip = (get(key, None) for key in ("rotation_deg", "zoom", "flip"))
  for key, value in (("rotation_deg", rotation), ("zoom", zoom), ("flip", flip)):
    if value is None:
      raise ValueError(f"config.augment.{key} is missing (configs/common.py augment() has "
                       f"every key and its default)")
  rotation, zoom, flip = _pair(rotation), _pair(zoom), bool(flip)  # ranges: _check_rules
  ops = _read_ops(get)
  radius = {op: kernel_radius(ops[op]["sigma"][1]) for op in ("blur", "elastic") if op in ops}

  def draw(k, op):
    """(apply bool, key for the op's parameter draws) of one sample."""
    k_apply, k_op = jax.random.split(jax.random.fold_in(k, _FOLD[op]))
    return jax.random.bernoulli(k_apply, ops[op]["prob"]), k_op

  # nnU-Net's order; each op: (its range key, x' = f(x, drawn value, noise key))
  intensity_ops = (
      ("noise", "sigma", lambda x, v, k: add_noise(x, k, v)),
      ("blur", "sigma", lambda x, v, k: blur(x, v, radius["blur"])),
      ("brightness", "range", lambda x, v, k: scale_brightness(x, v)),
      ("contrast", "range", lambda x, v, k: adjust_contrast(x, v)),
      ("gamma", "range", lambda x, v, k: adjust_gamma(x, v)))

  def intensity(k, x):
    for op, rng, fn in intensity_ops:
      if op in ops:
        on, kk = draw(k, op)
        k_v, k_n = jax.random.split(kk) if op == "noise" else (kk, None)
        x = jnp.where(on, fn(x, _uniform(k_v, ops[op][rng]), k_n), x)
    return x

  def augment(key, x, y):
    if x.ndim not in (4, 5) or y.ndim != x.ndim - 1:
      raise ValueError(f"augment expects x [B, (D,) H, W, C] and y [B, (D,) H, W], got {x.shape} and {y.shape}")
    keys = jax.random.split(key, x.shape[0])
    h, w = x.shape[-3], x.shape[-2]

    def one(k, xi, yi):
      theta, z, fy, fx = draw_params(k, rotation, zoom, flip)
      disp = None
      if "elastic" in ops:
        on, kk = draw(k, "elastic")
        k_a, k_s, k_f = jax.random.split(kk, 3)
        e = ops["elastic"]
        dy, dx = elastic_field(k_f, h, w, _uniform(k_a, e["alpha"]), _uniform(k_s, e["sigma"]),
                               radius["elastic"])
        disp = (jnp.where(on, dy, 0.0), jnp.where(on, dx, 0.0))
      xi, yi = transform_pair(xi, yi, theta, z, fy, fx, disp)
      return intensity(k, xi), yi

    return jax.vmap(one)(keys, x, y)

  return augment
