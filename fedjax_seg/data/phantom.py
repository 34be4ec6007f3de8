"""Deterministic synthetic hospitals written in the real on-disk layouts (SPEC §1.4).

Real data sets cannot be downloaded here, so tests, smoke runs and benchmarks
use *phantoms*: head-like volumes with a tumour, rendered per hospital with
that hospital's scanner effects, and written to disk in exactly the layout the
loaders read (`fedjax_seg.data.layouts`): Kaggle LGG (SPEC §1.2), BraTS 2020
(§1.1) and ACDC (§1.3). The pieces:

* generic helpers: `rng_for` (stable seeding from strings), `grid_2d`,
  `smooth_noise`, `bias_field`, `irregular_blob`;
* `SiteEffects` + `site_effects(site, seed)`: the per-hospital scanner model;
* `head_labels`: a label volume (scalp, skull, CSF, GM, WM and three nested
  tumour sub-regions: edema halo, enhancing rim, necrotic core);
* `render_lgg` / `generate_lgg_patient` / `write_lgg`: the LGG contrasts,
  scanner effects and the TIFF writer;
* `brats_site_effects` / `render_brats` / `generate_brats_patient` /
  `write_brats`: four modalities (flair, t1, t1ce, t2) + seg {0, 1, 2, 4},
  NIfTI with a BraTS-like affine, per-site intensity scale, contrast and bias;
* `generate_acdc_patient` / `write_acdc`: heart-like rings (RV, myocardium,
  LV) at ED and ES, ``Info.cfg``, anisotropic oblique NIfTI, 5 groups;
* `main`: CLI, ``python -m fedjax_seg.data.phantom --layout lgg|brats|acdc --out DIR
  [--style geometric|anatomical]``.

Two styles for LGG and BraTS (``style=`` of `write_lgg` / `write_brats`):
``'geometric'`` (default; the ellipse head of `head_labels`, no extra
dependency, byte-stable) and ``'anatomical'`` (real brain anatomy from the
ICBM152 template, `fedjax_seg.data.anatomy`; needs the ``anatomy`` extra).
Both go through the same file writers, so the layouts are identical.

Determinism: every random draw comes from ``np.random.default_rng`` seeded by
``(seed, crc32(site), patient index, stream)``; TIFFs are written by Pillow
without compression or timestamp tags, NIfTI by nibabel whose gzip writer
zeroes the timestamp, so the same arguments give byte-identical files (in
one software environment).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import os
import re
import shutil
import sys
import types
import zlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from fedjax_seg import progress

# --------------------------------------------------------------------------
# Labels of the anatomical volume produced by `head_labels`.
# --------------------------------------------------------------------------
BACKGROUND, SCALP, SKULL, CSF, GREY, WHITE, EDEMA, ENHANCING, NECROTIC = range(9)
NUM_LABELS = 9
TUMOUR_LABELS = (EDEMA, ENHANCING, NECROTIC)

# Random streams (so adding draws to one stream never shifts another).
_STREAM_SITE, _STREAM_IDS, _STREAM_ANATOMY, _STREAM_TUMOUR, _STREAM_RENDER = range(5)
_STREAM_TUMOUR_SIZE = 9  # after the NIfTI streams (5..8): drawn only when a tumour_area range is set

# Named tumour settings for `write_lgg` / `write_brats` (``tumour_preset=``), per layout. Explicit
# keyword arguments win over the preset. 'classic' is the default phantom (site-dependent radius,
# few tumour-free slices); 'realistic' has small tumours (the widest cross-section 0.5 % to a few %
# of the slice area, log-uniform, so most are small and the tapered end slices smaller still) and
# most slices tumour-free, as in Kaggle LGG (about 2/3 of the slices have an empty mask) and BraTS.
TUMOUR_PRESETS: Mapping[str, Mapping[str, Mapping[str, object]]] = {
    "classic": {"lgg": {}, "brats": {}},
    "realistic": {"lgg": {"tumour_area": (0.005, 0.03), "tumour_free_fraction": 0.65},
                  "brats": {"tumour_area": (0.005, 0.06), "tumour_free_fraction": 0.55}},
}


def check_tumour_area(tumour_area) -> tuple[float, float] | None:
  """Validates a ``tumour_area`` range ``(low, high)`` (fractions of the slice area); None passes."""
  if tumour_area is None:
    return None
  t = tuple(float(v) for v in tumour_area)
  if len(t) != 2 or not 0.0 < t[0] <= t[1] <= 0.5:
    raise ValueError(f"tumour_area must be (low, high) fractions of the slice area with "
                     f"0 < low <= high <= 0.5, got {tuple(tumour_area)}")
  return t


def draw_tumour_area(tumour_area, seed: int, *keys: int | str) -> float | None:
  """Log-uniform draw from the ``tumour_area`` range on its own stream (None: no range, no draw)."""
  if tumour_area is None:
    return None
  lo, hi = check_tumour_area(tumour_area)
  rng = rng_for(seed, *keys, _STREAM_TUMOUR_SIZE)
  return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def tumour_options(layout: str, preset: str | None, tumour_area, tumour_free_fraction):
  """(tumour_area, tumour_free_fraction) after applying ``preset``; explicit values win.

  None means "not given" (the writer's default: the site's tumour radius, and a tumour-free
  fraction of 0.3 for LGG / 0.4 for BraTS). ``tumour_area`` comes back validated, as a tuple.
  `fedjax_seg.data.pipeline` keys its phantom cache on these resolved values.
  """
  if preset is not None:
    if preset not in TUMOUR_PRESETS:
      raise ValueError(f"tumour_preset must be one of {sorted(TUMOUR_PRESETS)}, got {preset!r}")
    opts = TUMOUR_PRESETS[preset][layout]
    tumour_area = opts.get("tumour_area") if tumour_area is None else tumour_area
    tumour_free_fraction = opts.get("tumour_free_fraction") if tumour_free_fraction is None else (
        tumour_free_fraction)
  return check_tumour_area(tumour_area), tumour_free_fraction


# --------------------------------------------------------------------------
# Generic helpers (shared by all layouts).
# --------------------------------------------------------------------------
def stable_hash(text: str) -> int:
  """A process-independent 32-bit hash of ``text`` (CRC32; Python's `hash` is salted)."""
  return zlib.crc32(text.encode("utf-8")) & 0xFFFFFFFF


def rng_for(seed: int, *keys: int | str) -> np.random.Generator:
  """`np.random.default_rng` seeded from ``seed`` and a path of int / str keys.

  Strings are hashed with `stable_hash`, so ``rng_for(0, "CS", 3, 2)`` is the
  same generator in every process.
  """
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be a non-negative int, got {seed!r}")
  entropy = [int(seed)] + [stable_hash(k) if isinstance(k, str) else int(k) for k in keys]
  return np.random.default_rng(entropy)


def grid_2d(size: int) -> tuple[np.ndarray, np.ndarray]:
  """Pixel-centre coordinates in [-1, 1]: ``(y, x)``, each float64 [size, size] (row, column)."""
  c = (np.arange(size, dtype=np.float64) + 0.5) / size * 2.0 - 1.0
  y, x = np.meshgrid(c, c, indexing="ij")
  return y, x


def gaussian_smooth(a: np.ndarray, sigma: Sequence[float] | float, mode: str = "reflect") -> np.ndarray:
  """Separable Gaussian filter in pure NumPy (truncated at 4 sigma).

  Args:
    a: float array, any shape.
    sigma: std in pixels, scalar or one per axis (0 = leave that axis alone).
    mode: border handling, "reflect" (mirror, edge sample repeated) or
      "nearest" (edge value repeated); same as `scipy.ndimage` modes.
  Returns:
    float64 array shaped like ``a``.
  """
  out = np.asarray(a, dtype=np.float64)
  sigmas = np.broadcast_to(np.asarray(sigma, dtype=np.float64), (out.ndim,))
  pad_mode = {"reflect": "symmetric", "nearest": "edge"}[mode]
  for axis, s in enumerate(sigmas):
    if s <= 0:
      continue
    radius = int(4.0 * s + 0.5)
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / s) ** 2)
    k /= k.sum()
    pad = [(0, 0)] * out.ndim
    pad[axis] = (radius, radius)
    padded = np.pad(out, pad, mode=pad_mode)
    windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * radius + 1, axis=axis)
    out = windows @ k
  return out


def smooth_noise(rng: np.random.Generator, shape: Sequence[int], sigma: Sequence[float] | float) -> np.ndarray:
  """Gaussian-smoothed white noise, rescaled to zero mean and unit std.

  Args:
    rng: source of randomness.
    shape: output shape, e.g. [S, H, W].
    sigma: Gaussian std in pixels, scalar or one per axis.
  Returns:
    float64 array of ``shape``.
  """
  field = gaussian_smooth(rng.standard_normal(tuple(shape)), sigma, mode="reflect")
  std = field.std()
  return (field - field.mean()) / (std if std > 0 else 1.0)


def bias_field(coeffs: np.ndarray, z: np.ndarray, y: np.ndarray, x: np.ndarray, *, clip: float = 0.7) -> np.ndarray:
  """Smooth multiplicative bias field ``exp(sum_k c_k phi_k(z, y, x))``, low-order polynomial.

  Basis phi = (x, y, z, x^2 - 1/3, y^2 - 1/3, x*y, x*z, y*z), i.e. a
  second-order polynomial with (roughly) zero mean on [-1, 1]^3; the log
  field is clipped to [-clip, clip] so no region is wiped out.

  Args:
    coeffs: float [8] polynomial coefficients (log-domain).
    z, y, x: broadcastable coordinate arrays in [-1, 1].
  Returns:
    float64 positive field of the broadcast shape.
  """
  coeffs = np.asarray(coeffs, dtype=np.float64)
  if coeffs.shape != (8,):
    raise ValueError(f"bias_field needs 8 coefficients, got shape {coeffs.shape}")
  basis = (x, y, z, x * x - 1 / 3, y * y - 1 / 3, x * y, x * z, y * z)
  log_field = sum(c * b for c, b in zip(coeffs, basis))
  return np.exp(np.clip(log_field, -clip, clip))


def irregular_blob(
    y: np.ndarray,
    x: np.ndarray,
    center: tuple[float, float],
    radii: tuple[float, float],
    angle: float,
    harmonics: Sequence[tuple[int, float, float]] = (),
) -> np.ndarray:
  """Normalised distance of an irregular (star-shaped) ellipse; inside is ``< 1``.

  ``d = ||R(angle) (p - center) / radii|| / (1 + sum_k a_k cos(k theta + phase_k))``
  with harmonics ``(k, a_k, phase_k)``. Thresholds of ``d`` at < 1 give nested
  sub-regions (e.g. necrotic core ``d < 0.35``).

  Args:
    y, x: float coordinate arrays (same shape).
    center: (cy, cx); radii: (ry, rx) in the same units; angle in radians.
  Returns:
    float64 array shaped like ``y``.
  """
  dy, dx = y - center[0], x - center[1]
  ca, sa = np.cos(angle), np.sin(angle)
  u = (ca * dx + sa * dy) / radii[1]
  v = (-sa * dx + ca * dy) / radii[0]
  theta = np.arctan2(v, u)
  boundary = np.ones_like(theta)
  for k, amp, phase in harmonics:
    boundary = boundary + amp * np.cos(k * theta + phase)
  return np.sqrt(u * u + v * v) / np.maximum(boundary, 0.2)


# --------------------------------------------------------------------------
# Per-hospital scanner effects.
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SiteEffects:
  """Scanner / population effects of one hospital (makes the federation non-IID).

  Intensities are in [0, 1] units before conversion to uint8. Per channel
  values are ordered (pre-contrast, FLAIR, post-contrast).

  Attributes:
    gain: per-channel multiplicative intensity scale.
    offset: per-channel additive offset (applied everywhere, background too).
    bias_coeffs: [8] site-fixed log-polynomial bias-field coefficients (the
      coil profile, see `bias_field`); each patient adds jitter of
      ``0.5 * bias_strength``.
    bias_strength: scale of the bias field coefficients.
    noise_sigma: std of the additive Gaussian noise.
    flair_contrast: multiplier on the FLAIR contrast between tumour and
      normal tissue (1 = nominal).
    tumour_radius: median tumour in-plane radius, fraction of brain radius.
    tumour_spread: lognormal sigma of the per-patient tumour radius.
    enhancing_prob: probability that a patient's tumour has an enhancing
      rim and necrotic core (LGG tumours mostly do not enhance).
  """

  gain: tuple[float, float, float]
  offset: tuple[float, float, float]
  bias_coeffs: tuple[float, ...]
  bias_strength: float
  noise_sigma: float
  flair_contrast: float
  tumour_radius: float
  tumour_spread: float
  enhancing_prob: float


# Nominal effects of the five real LGG institutions; chosen so that no single
# intensity threshold separates tumour from normal tissue on every site (DU's
# FLAIR tumour is darker than HT's normal grey matter / scalp) and tumour sizes
# differ (DU large, HT small). `site_effects` jitters them slightly by seed;
# sites not listed here get effects drawn from the same ranges by name + seed.
SITE_PRESETS: Mapping[str, Mapping[str, object]] = types.MappingProxyType({
    "CS": types.MappingProxyType(dict(gain=(1.00, 1.00, 1.00), offset=(0.00, 0.00, 0.00), bias_strength=0.10,
                                      noise_sigma=0.020, flair_contrast=1.00, tumour_radius=0.24,
                                      tumour_spread=0.25, enhancing_prob=0.3)),
    "DU": types.MappingProxyType(dict(gain=(0.80, 0.70, 0.90), offset=(0.05, 0.08, 0.03), bias_strength=0.32,
                                      noise_sigma=0.035, flair_contrast=0.85, tumour_radius=0.32,
                                      tumour_spread=0.30, enhancing_prob=0.5)),
    "HT": types.MappingProxyType(dict(gain=(1.15, 1.20, 1.05), offset=(0.00, -0.03, 0.02), bias_strength=0.22,
                                      noise_sigma=0.050, flair_contrast=0.90, tumour_radius=0.18,
                                      tumour_spread=0.20, enhancing_prob=0.2)),
    "FG": types.MappingProxyType(dict(gain=(0.90, 1.10, 0.85), offset=(0.03, 0.00, 0.05), bias_strength=0.28,
                                      noise_sigma=0.030, flair_contrast=0.95, tumour_radius=0.27,
                                      tumour_spread=0.35, enhancing_prob=0.4)),
    "EZ": types.MappingProxyType(dict(gain=(1.10, 0.85, 1.20), offset=(0.02, 0.05, 0.00), bias_strength=0.18,
                                      noise_sigma=0.045, flair_contrast=0.90, tumour_radius=0.20,
                                      tumour_spread=0.25, enhancing_prob=0.3)),
})


def site_effects(site: str, seed: int = 0) -> SiteEffects:
  """Scanner effects of ``site``, a deterministic function of (site name, seed).

  Known sites (`SITE_PRESETS`) keep their nominal values with small seed
  jitter (gain x exp(N(0, 0.04)), offset + N(0, 0.01), bias strength and
  noise x exp(N(0, 0.1)), tumour radius x exp(N(0, 0.05))). Unknown sites
  draw gain ~ exp(U(-0.25, 0.2)), offset ~ U(0, 0.08), bias strength ~
  U(0.1, 0.35), noise ~ U(0.02, 0.05), FLAIR contrast ~ U(0.85, 1.0),
  tumour radius ~ U(0.17, 0.32), enhancing probability ~ U(0.2, 0.5).
  The bias-field coefficients are N(0, bias_strength) per basis term.
  """
  rng = rng_for(seed, site, _STREAM_SITE)
  preset = SITE_PRESETS.get(site)
  if preset is None:
    base = dict(
        gain=tuple(np.exp(rng.uniform(-0.25, 0.2, 3))),
        offset=tuple(rng.uniform(0.0, 0.08, 3)),
        bias_strength=rng.uniform(0.10, 0.35),
        noise_sigma=rng.uniform(0.02, 0.05),
        flair_contrast=rng.uniform(0.85, 1.0),
        tumour_radius=rng.uniform(0.17, 0.32),
        tumour_spread=0.25,
        enhancing_prob=rng.uniform(0.2, 0.5),
    )
  else:
    base = dict(preset)
  gain = np.asarray(base["gain"]) * np.exp(rng.normal(0.0, 0.04, 3))
  offset = np.asarray(base["offset"]) + rng.normal(0.0, 0.01, 3)
  strength = float(base["bias_strength"]) * float(np.exp(rng.normal(0.0, 0.1)))
  noise = float(base["noise_sigma"]) * float(np.exp(rng.normal(0.0, 0.1)))
  radius = float(base["tumour_radius"]) * float(np.exp(rng.normal(0.0, 0.05)))
  coeffs = rng.normal(0.0, strength, 8)
  return SiteEffects(
      gain=tuple(float(g) for g in gain),
      offset=tuple(float(o) for o in offset),
      bias_coeffs=tuple(float(c) for c in coeffs),
      bias_strength=strength,
      noise_sigma=noise,
      flair_contrast=float(base["flair_contrast"]),
      tumour_radius=radius,
      tumour_spread=float(base["tumour_spread"]),
      enhancing_prob=float(base["enhancing_prob"]),
  )


# --------------------------------------------------------------------------
# Anatomy.
# --------------------------------------------------------------------------
def tumour_slice_range(rng: np.random.Generator, n_slices: int, tumour_free_fraction: float) -> tuple[int, int]:
  """Contiguous tumour slice range ``[lo, hi)`` in the middle of the volume.

  About ``tumour_free_fraction`` of the slices (±1 slice of jitter) lie
  outside it; when ``0 < tumour_free_fraction`` and ``n_slices >= 3`` the
  first and last slices are always tumour-free. Returns ``(0, 0)`` when no
  slice carries tumour.
  """
  if tumour_free_fraction >= 1.0 or n_slices <= 0:
    return (0, 0)
  if tumour_free_fraction <= 0.0:
    return (0, n_slices)
  n_tumour = int(round(n_slices * (1.0 - tumour_free_fraction))) + int(rng.integers(-1, 2))
  max_tumour = n_slices - 2 if n_slices >= 3 else n_slices
  n_tumour = int(np.clip(n_tumour, 1, max(max_tumour, 1)))
  first_ok, last_ok = (1, n_slices - 1 - n_tumour) if n_slices >= 3 else (0, n_slices - n_tumour)
  lo = (n_slices - n_tumour) // 2 + int(rng.integers(-1, 2))
  lo = int(np.clip(lo, first_ok, max(last_ok, first_ok)))
  return (lo, lo + n_tumour)


def head_labels(
    rng: np.random.Generator,
    n_slices: int,
    size: int,
    *,
    tumour_slices: tuple[int, int],
    tumour_radius: float,
    enhancing: bool,
    tumour_area: float | None = None,
) -> np.ndarray:
  """A head-like label volume with one tumour.

  Slices run inferior → superior (z in [-1, 1]); the brain's cross-section,
  the white-matter boundary and the ventricles change smoothly with z.
  The tumour is an irregular ellipsoid present exactly on
  ``tumour_slices = [lo, hi)``: edema halo (labels `EDEMA`), and, if
  ``enhancing``, an enhancing rim (`ENHANCING`) around a necrotic core
  (`NECROTIC`).

  Args:
    rng: patient-specific generator.
    n_slices, size: output is [n_slices, size, size].
    tumour_slices: slice range ``[lo, hi)`` carrying tumour.
    tumour_radius: in-plane radius at the widest slice, fraction of brain radius.
    enhancing: whether to add the enhancing rim and necrotic core.
    tumour_area: if given, overrides ``tumour_radius``: the tumour's
      cross-section at its widest slice, as a fraction of the slice area
      (an ellipse of that area before its irregular border; at least one
      pixel). Draws are the same either way, so only the size changes.
  Returns:
    uint8 [n_slices, size, size] with values in ``range(NUM_LABELS)``.
  """
  y, x = grid_2d(size)
  z = np.linspace(-1.0, 1.0, n_slices) if n_slices > 1 else np.zeros(1)
  z3 = z[:, None, None]

  # Head geometry (per patient), scaled down towards the top/bottom slices.
  ry, rx = rng.uniform(0.70, 0.78), rng.uniform(0.58, 0.65)
  angle = rng.uniform(-0.15, 0.15)
  cy, cx = rng.uniform(-0.04, 0.04, 2)
  profile = np.sqrt(1.0 - (0.75 * z3) ** 2)  # [S,1,1] in (0.66, 1]
  gyri = [(9, 0.03, rng.uniform(0, 2 * np.pi)), (13, 0.015, rng.uniform(0, 2 * np.pi))]
  d_brain = np.stack([
      irregular_blob(y, x, (cy, cx), (ry * p, rx * p), angle, [(k, a, ph + 2.0 * zi) for k, a, ph in gyri])
      for p, zi in zip(profile[:, 0, 0], z)
  ])
  d_head = np.stack([irregular_blob(y, x, (cy, cx), (ry * p, rx * p), angle) for p in profile[:, 0, 0]])

  labels = np.zeros((n_slices, size, size), np.uint8)
  labels[d_head < 1.17] = SCALP
  labels[d_head < 1.08] = SKULL
  brain = d_brain < 1.0
  labels[brain] = GREY

  # White matter: wavy inner region, smaller near the ends.
  wm_phase = rng.uniform(0, 2 * np.pi, 2)
  d_wm = np.stack([
      irregular_blob(y, x, (cy, cx), (ry * p, rx * p), angle,
                     [(6, 0.08, wm_phase[0] + 3.0 * zi), (11, 0.05, wm_phase[1] - 2.0 * zi)])
      for p, zi in zip(profile[:, 0, 0], z)
  ])
  wm_size = 0.70 * (0.55 + 0.45 * (profile - 0.66) / 0.34)
  labels[brain & (d_wm < wm_size)] = WHITE

  # Ventricles: two elongated ellipses, largest slightly above the middle.
  vz = np.exp(-(((z - rng.uniform(0.0, 0.2)) / 0.45) ** 2))
  for side in (-1.0, 1.0):
    vcx = cx + side * 0.13 * rx
    for s in range(n_slices):
      if vz[s] < 0.25:
        continue
      d_v = irregular_blob(y, x, (cy - 0.05 * ry, vcx), (0.30 * ry * vz[s], 0.08 * rx * vz[s]),
                           angle + side * 0.15)
      labels[s][(d_v < 1.0) & brain[s]] = CSF

  # Tumour: irregular ellipsoid on slices [lo, hi).
  lo, hi = tumour_slices
  if hi > lo:
    r_mid = max(tumour_radius * rx, 5.0 / size)  # at least ~2.5 px radius
    aspect = rng.uniform(0.75, 1.3)
    r_min = 4.0 / size
    if tumour_area is not None:  # slice area = 4 in grid units; ellipse area = pi r^2 aspect
      r_mid = max(float(np.sqrt(4.0 * float(tumour_area) / (np.pi * aspect))), 1.0 / size)
      r_min = min(r_mid, 4.0 / size)
    t_angle = rng.uniform(0, np.pi)
    room = max(rx - r_mid * max(aspect, 1.0), 0.0)
    rho, phi = rng.uniform(0.1, 0.65) * room, rng.uniform(0, 2 * np.pi)
    tcy, tcx = cy + rho * np.sin(phi), cx + rho * np.cos(phi)
    drift = rng.normal(0.0, 0.03, 2)
    harm = [(k, rng.uniform(0.0, 0.12), rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4)]
    n_t = hi - lo
    for s in range(lo, hi):
      t = 0.0 if n_t == 1 else (2.0 * (s - lo) / (n_t - 1) - 1.0)
      scale = np.sqrt(max(1.0 - 0.8 * t * t, 0.0))
      r = max(r_mid * scale, r_min)
      d_t = irregular_blob(y, x, (tcy + drift[0] * t, tcx + drift[1] * t), (r * aspect, r), t_angle,
                           [(k, a, ph + 0.8 * t) for k, a, ph in harm])
      inside = d_t < 1.0
      if not inside.any():  # keep every slice of the range non-empty
        inside = d_t <= d_t.min()
      labels[s][inside] = EDEMA
      if enhancing:
        labels[s][d_t < 0.6] = ENHANCING
        labels[s][d_t < 0.35] = NECROTIC
  return labels


# --------------------------------------------------------------------------
# LGG (Kaggle 3m) rendering and writer.
# --------------------------------------------------------------------------
# Nominal tissue intensities per label, channels (pre-contrast, FLAIR, post-contrast).
LGG_CONTRAST = np.array([
    [0.00, 0.00, 0.00],  # BACKGROUND
    [0.75, 0.55, 0.75],  # SCALP (fat: bright on T1)
    [0.06, 0.05, 0.06],  # SKULL
    [0.15, 0.08, 0.18],  # CSF (suppressed on FLAIR)
    [0.45, 0.50, 0.47],  # GREY
    [0.62, 0.40, 0.62],  # WHITE
    [0.38, 0.88, 0.42],  # EDEMA (bright on FLAIR)
    [0.40, 0.85, 0.80],  # ENHANCING (bright on post-contrast)
    [0.25, 0.78, 0.30],  # NECROTIC
], dtype=np.float64)
LGG_CONTRAST.setflags(write=False)


def render_lgg(labels: np.ndarray, effects: SiteEffects, rng: np.random.Generator) -> np.ndarray:
  """Render a label volume as Kaggle-LGG-like slices with the site's scanner effects.

  Steps: nominal contrast table (FLAIR tumour contrast scaled by
  ``effects.flair_contrast``) → smooth tissue texture (±5 %) → in-plane
  partial-volume blur → multiplicative bias field (site coefficients +
  patient jitter) → per-channel gain / offset → Gaussian noise → clip to
  [0, 1] → uint8.

  Args:
    labels: uint8 [S, H, W] from `head_labels`.
    effects: the hospital's `SiteEffects`.
    rng: patient-specific generator.
  Returns:
    uint8 [S, H, W, 3], channels (pre-contrast, FLAIR, post-contrast).
  """
  n_slices, size = labels.shape[0], labels.shape[1]
  table = LGG_CONTRAST.copy()
  tissue_flair = 0.45
  for lab in TUMOUR_LABELS:
    table[lab, 1] = tissue_flair + effects.flair_contrast * (table[lab, 1] - tissue_flair)
  img = table[labels]  # [S,H,W,3]
  texture = smooth_noise(rng, labels.shape, sigma=(0.8, size / 24, size / 24))
  img = img * (1.0 + 0.05 * texture)[..., None]
  px = size / 64.0
  img = gaussian_smooth(img, (0.0, 0.6 * px, 0.6 * px, 0.0), mode="nearest")

  y, x = grid_2d(size)
  z = np.linspace(-1.0, 1.0, n_slices) if n_slices > 1 else np.zeros(1)
  coeffs = np.asarray(effects.bias_coeffs) + rng.normal(0.0, 0.5 * effects.bias_strength, 8)
  field = bias_field(coeffs, z[:, None, None], y[None], x[None])
  img = img * field[..., None]
  img = img * np.asarray(effects.gain) + np.asarray(effects.offset)
  img = img + rng.normal(0.0, effects.noise_sigma, img.shape)
  return np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


def generate_lgg_patient(
    seed: int,
    site: str,
    index: int,
    *,
    n_slices: int = 12,
    size: int = 64,
    tumour_free_fraction: float = 0.3,
    tumour_area: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """One synthetic LGG patient, in memory (no files).

  Args:
    seed: global phantom seed; site: institution code; index: patient
      index within the site (0-based).
    n_slices, size: volume is [n_slices, size, size].
    tumour_free_fraction: ≈ fraction of slices with an empty mask.
    tumour_area: None (the site's tumour radius) or a range ``(low, high)``:
      the widest tumour cross-section as a fraction of the slice area,
      log-uniform per patient (own random stream: nothing else changes).
  Returns:
    (images uint8 [S, size, size, 3] (pre-contrast, FLAIR, post-contrast),
     masks uint8 [S, size, size] in {0, 255}).
  """
  effects = site_effects(site, seed)
  rng_t = rng_for(seed, site, index, _STREAM_TUMOUR)
  tumour_slices = tumour_slice_range(rng_t, n_slices, tumour_free_fraction)
  radius = effects.tumour_radius * float(np.exp(rng_t.normal(0.0, effects.tumour_spread)))
  radius = float(np.clip(radius, 0.08, 0.45))
  enhancing = bool(rng_t.random() < effects.enhancing_prob)
  labels = head_labels(rng_for(seed, site, index, _STREAM_ANATOMY), n_slices, size,
                       tumour_slices=tumour_slices, tumour_radius=radius, enhancing=enhancing,
                       tumour_area=draw_tumour_area(tumour_area, seed, site, index))
  images = render_lgg(labels, effects, rng_for(seed, site, index, _STREAM_RENDER))
  masks = np.where(labels >= EDEMA, 255, 0).astype(np.uint8)
  return images, masks


def lgg_patient_names(seed: int, site: str, n_patients: int) -> list[str]:
  """Folder names ``TCGA_<SITE>_<4 digits>_<YYYYMMDD>`` for a site (distinct ids, dates 1995–2005)."""
  rng = rng_for(seed, site, _STREAM_IDS)
  if n_patients > 9000:
    raise ValueError(f"at most 9000 patients per site, got {n_patients}")
  ids = rng.choice(9000, size=n_patients, replace=False) + 1000
  days = rng.integers(0, 11 * 365, size=n_patients)
  start = datetime.date(1995, 1, 1)
  return [f"TCGA_{site}_{int(i):04d}_{(start + datetime.timedelta(days=int(d))).strftime('%Y%m%d')}"
          for i, d in zip(ids, days)]


def _save_tiff(array: np.ndarray, path: str) -> None:
  """Write uint8 [H,W] or [H,W,3] as an uncompressed TIFF with no time-varying tags."""
  Image.fromarray(array).save(path, format="TIFF")


def _prepare_out_dir(out: str, overwrite: bool) -> None:
  if os.path.isdir(out) and os.listdir(out):
    if not overwrite:
      raise FileExistsError(
          f"{out} already exists and is not empty; pass overwrite=True (CLI: --overwrite) to replace it")
    shutil.rmtree(out)
  os.makedirs(out, exist_ok=True)


_SITE_RE = re.compile(r"^[A-Za-z0-9]+$")

PHANTOM_STYLES = ("geometric", "anatomical")
# Keyword options that only the anatomical style takes, per layout.
_ANATOMY_OPTIONS = {"lgg": ("fov_mm", "mass_effect"), "brats": ("mass_effect",)}


def _anatomy_module(style: str, layout: str, options: Mapping[str, object]):
  """`fedjax_seg.data.anatomy` for ``style='anatomical'``, None for geometric; validates the options."""
  if style not in PHANTOM_STYLES:
    raise ValueError(f"style must be one of {PHANTOM_STYLES}, got {style!r}")
  unknown = sorted(set(options) - set(_ANATOMY_OPTIONS[layout]))
  if unknown:
    raise TypeError(f"write_{layout}: unexpected keyword arguments {unknown} "
                    f"(anatomical-only options: {list(_ANATOMY_OPTIONS[layout])})")
  if style == "geometric":
    if options:
      raise ValueError(f"write_{layout}: options {sorted(options)} apply only to style='anatomical'")
    return None
  from fedjax_seg.data import anatomy  # local import: needs the template (extra 'anatomy')

  anatomy.template_dir()  # fail early, naming the extra to install
  return anatomy


def write_lgg(
    root: str | os.PathLike,
    *,
    seed: int = 0,
    sites: Sequence[str] = ("CS", "DU", "HT"),
    patients_per_site: int = 4,
    slices_per_patient: int = 12,
    size: int = 64,
    tumour_free_fraction: float | None = None,
    overwrite: bool = False,
    style: str = "geometric",
    tumour_area: Sequence[float] | None = None,
    tumour_preset: str | None = None,
    **anatomy_options,
) -> list[str]:
  """Write a phantom Kaggle LGG data set (SPEC §1.2) under ``root``.

  Layout: ``<root>/kaggle_3m/TCGA_<SITE>_<dddd>_<YYYYMMDD>/`` holding
  ``<PATIENT>_<n>.tif`` (uint8 RGB [size, size, 3]: pre-contrast, FLAIR,
  post-contrast) and ``<PATIENT>_<n>_mask.tif`` (uint8 [size, size] in
  {0, 255}) for n = 1..slices_per_patient.

  Args:
    root: output folder (created); ``kaggle_3m`` is made inside it.
    seed: non-negative int; same arguments → byte-identical files.
    sites: institution codes (alphanumeric, no '_'), each with its own
      `site_effects`.
    patients_per_site, slices_per_patient, size: data set dimensions.
    tumour_free_fraction: ≈ fraction of slices with empty masks (first and
      last slices of each patient are tumour-free when > 0); default 0.3
      (or the preset's).
    tumour_area: geometric only: None (site-dependent tumour radius) or a
      range ``(low, high)`` of the widest tumour cross-section, fraction of
      the slice area (log-uniform per patient).
    tumour_preset: a name of `TUMOUR_PRESETS` ('classic' = the defaults;
      'realistic': small tumours, most slices tumour-free); explicit
      ``tumour_area`` / ``tumour_free_fraction`` win over it.
    overwrite: replace an existing non-empty ``<root>/kaggle_3m``;
      otherwise that is an error (stale slices would silently mix in).
    style: ``'geometric'`` (`generate_lgg_patient`) or ``'anatomical'``
      (`fedjax_seg.data.anatomy.generate_lgg_patient`: ICBM152 anatomy,
      whole head, axial slab around a tumour grown in white matter).
    **anatomy_options: anatomical only: ``fov_mm`` (in-plane field of
      view, default 220), ``mass_effect`` (default 0.3).
  Returns:
    The patient folder paths, sorted by patient id.
  """
  if not sites or len(set(sites)) != len(sites):
    raise ValueError(f"sites must be non-empty and distinct, got {tuple(sites)}")
  for site in sites:
    if not isinstance(site, str) or not _SITE_RE.match(site):
      raise ValueError(f"site code must be alphanumeric without '_', got {site!r}")
  if patients_per_site < 1 or slices_per_patient < 1:
    raise ValueError(f"need patients_per_site >= 1 and slices_per_patient >= 1, "
                     f"got {patients_per_site} and {slices_per_patient}")
  if size < 16:
    raise ValueError(f"size must be >= 16, got {size}")
  tumour_area, tumour_free_fraction = tumour_options("lgg", tumour_preset, tumour_area, tumour_free_fraction)
  tumour_free_fraction = 0.3 if tumour_free_fraction is None else tumour_free_fraction
  if not 0.0 <= tumour_free_fraction <= 1.0:
    raise ValueError(f"tumour_free_fraction must be in [0, 1], got {tumour_free_fraction}")
  rng_for(seed)  # validates the seed
  anatomy = _anatomy_module(style, "lgg", anatomy_options)
  if anatomy is not None and tumour_area is not None:
    raise ValueError("write_lgg: tumour_area applies only to style='geometric'")
  generate = (functools.partial(generate_lgg_patient, tumour_area=tumour_area) if anatomy is None
              else functools.partial(anatomy.generate_lgg_patient, **anatomy_options))

  out = os.path.join(os.fspath(root), "kaggle_3m")
  _prepare_out_dir(out, overwrite)
  folders = []
  bar = progress.Bar(len(sites) * patients_per_site, "[data] phantom LGG patients")
  for site in sites:
    for index, name in enumerate(lgg_patient_names(seed, site, patients_per_site)):
      images, masks = generate(seed, site, index, n_slices=slices_per_patient, size=size,
                               tumour_free_fraction=tumour_free_fraction)
      folder = os.path.join(out, name)
      os.makedirs(folder, exist_ok=True)
      for n in range(slices_per_patient):
        _save_tiff(images[n], os.path.join(folder, f"{name}_{n + 1}.tif"))
        _save_tiff(masks[n], os.path.join(folder, f"{name}_{n + 1}_mask.tif"))
      folders.append(folder)
      bar.advance(info=name)
  bar.close()
  return sorted(folders, key=os.path.basename)


# --------------------------------------------------------------------------
# NIfTI helper shared by the BraTS and ACDC writers.
# --------------------------------------------------------------------------
# Streams appended after the LGG ones, so LGG draws never shift.
_STREAM_MODALITY, _STREAM_HEART, _STREAM_SCANNER, _STREAM_INFO = range(5, 9)


def nifti_affine(shape_zyx: Sequence[int], spacing_xyz: Sequence[float], angle: float = 0.0) -> np.ndarray:
  """A scanner-like 4x4 affine for a volume stored with file axes (x, y, z).

  BraTS convention: x and y flipped (LPS-like ``diag(-sx, -sy, sz)``), origin
  chosen so that world y is non-negative; ``angle`` (radians) rotates the
  in-plane axes about z (an oblique short-axis plane, as in ACDC). Column
  norms are the voxel spacing, so ``header.get_zooms() == spacing_xyz``.
  """
  sx, sy, sz = (float(s) for s in spacing_xyz)
  nz, ny, _ = (int(n) for n in shape_zyx)
  ca, sa = np.cos(angle), np.sin(angle)
  rot = np.array([[ca, -sa, 0.0], [sa, ca, 0.0], [0.0, 0.0, 1.0]])
  lin = rot @ np.diag([-sx, -sy, sz])
  affine = np.eye(4)
  affine[:3, :3] = lin
  affine[:3, 3] = rot @ np.array([0.0, (ny - 1) * sy, -0.5 * (nz - 1) * sz])
  return affine


def save_nifti(volume_zyx: np.ndarray, affine: np.ndarray, path: str | os.PathLike, dtype) -> None:
  """Write an internal [Z, Y, X] (or [Z, Y, X, ...]) array as NIfTI-1 with file axes (x, y, z).

  The data are stored unscaled in ``dtype``; qform and sform both hold
  ``affine`` (code 1, scanner); units mm. nibabel's gzip writer zeroes the
  timestamp, so the same array gives the same bytes.
  """
  import nibabel as nib  # local import: LGG-only users never need it

  arr = np.asarray(volume_zyx)
  axes = (2, 1, 0) + tuple(range(3, arr.ndim))
  data = np.ascontiguousarray(np.transpose(arr, axes)).astype(dtype)
  img = nib.Nifti1Image(data, affine)
  img.header.set_data_dtype(dtype)
  img.set_qform(affine, code=1)
  img.set_sform(affine, code=1)
  img.header.set_xyzt_units("mm", "sec")
  nib.save(img, os.fspath(path))


# --------------------------------------------------------------------------
# BraTS 2020 (SPEC §1.1): flair, t1, t1ce, t2 + seg with labels {0, 1, 2, 4}.
# --------------------------------------------------------------------------
BRATS_MODALITIES = ("flair", "t1", "t1ce", "t2")
BRATS_FOLDER = "MICCAI_BraTS2020_TrainingData"

# Anatomical label (`head_labels`) -> BraTS label; skull-stripped, so scalp and skull are 0.
BRATS_LABEL_OF = np.array([0, 0, 0, 0, 0, 0, 2, 4, 1], np.uint8)
BRATS_LABEL_OF.setflags(write=False)

# Nominal tissue intensities per anatomical label, columns (flair, t1, t1ce, t2).
BRATS_CONTRAST = np.array([
    [0.00, 0.00, 0.00, 0.00],  # BACKGROUND
    [0.00, 0.00, 0.00, 0.00],  # SCALP (stripped)
    [0.00, 0.00, 0.00, 0.00],  # SKULL (stripped)
    [0.10, 0.20, 0.22, 0.95],  # CSF: dark on FLAIR / T1, bright on T2
    [0.52, 0.45, 0.47, 0.55],  # GREY
    [0.40, 0.65, 0.66, 0.38],  # WHITE: bright on T1
    [0.90, 0.38, 0.40, 0.82],  # EDEMA: bright on FLAIR and T2
    [0.78, 0.42, 0.95, 0.66],  # ENHANCING: bright on T1ce
    [0.62, 0.22, 0.24, 0.92],  # NECROTIC: dark on T1 / T1ce, bright on T2
], dtype=np.float64)
BRATS_CONTRAST.setflags(write=False)


@dataclasses.dataclass(frozen=True)
class BratsSiteEffects:
  """Scanner effects of one BraTS contributing site.

  Attributes:
    base: the site's `SiteEffects` (bias field, noise, tumour size) shared
      with the LGG model.
    scale: stored integer units per unit intensity (sites store different
      intensity ranges, so normalisation matters).
    modality_gain, modality_offset: per modality (flair, t1, t1ce, t2);
      the offset applies inside the brain only (background stays 0, as in
      skull-stripped BraTS).
    tumour_contrast: per modality multiplier of the tumour-vs-grey-matter
      contrast (contrast differs between sites' protocols).
    enhancing_prob: probability of an enhancing (high-grade) tumour with a
      necrotic core; the rest are LGG-like (edema / non-enhancing only).
  """

  base: SiteEffects
  scale: float
  modality_gain: tuple[float, float, float, float]
  modality_offset: tuple[float, float, float, float]
  tumour_contrast: tuple[float, float, float, float]
  enhancing_prob: float


def brats_site_effects(site: str, seed: int = 0) -> BratsSiteEffects:
  """Deterministic BraTS scanner model of ``site``: `site_effects` plus per-modality draws.

  scale ~ exp(U(log 400, log 3000)); gain_m ~ exp(N(0, 0.12));
  offset_m ~ U(0, 0.05); tumour contrast_m ~ U(0.8, 1.1);
  enhancing probability = min(0.95, 0.55 + 0.8 * base.enhancing_prob).
  """
  base = site_effects(site, seed)
  rng = rng_for(seed, "brats", site, _STREAM_MODALITY)
  return BratsSiteEffects(
      base=base,
      scale=float(np.exp(rng.uniform(np.log(400.0), np.log(3000.0)))),
      modality_gain=tuple(float(g) for g in np.exp(rng.normal(0.0, 0.12, 4))),
      modality_offset=tuple(float(o) for o in rng.uniform(0.0, 0.05, 4)),
      tumour_contrast=tuple(float(c) for c in rng.uniform(0.8, 1.1, 4)),
      enhancing_prob=float(min(0.95, 0.55 + 0.8 * base.enhancing_prob)),
  )


def render_brats(labels: np.ndarray, effects: BratsSiteEffects, rng: np.random.Generator) -> np.ndarray:
  """Render a `head_labels` volume as the four BraTS modalities with a site's scanner effects.

  Steps: contrast table (tumour contrast scaled per modality) → smooth
  tissue texture (±5 %) → partial-volume blur → smooth multiplicative 3D
  bias field (site coefficients + patient jitter + small per-modality
  jitter) → per-modality gain, offset (brain only) → Gaussian noise (brain
  only) → background forced to 0 (skull-stripped) → × scale → int16.

  Args:
    labels: uint8 [D, H, W] anatomical labels.
    effects: the site's `BratsSiteEffects`.
    rng: patient-specific generator.
  Returns:
    int16 [D, H, W, 4], channels (flair, t1, t1ce, t2).
  """
  n_slices, size = labels.shape[0], labels.shape[1]
  base = effects.base
  table = BRATS_CONTRAST.copy()
  tissue = table[GREY].copy()
  for lab in TUMOUR_LABELS:
    table[lab] = tissue + np.asarray(effects.tumour_contrast) * (table[lab] - tissue)
  img = table[labels]  # [D,H,W,4]
  px, pz = size / 64.0, max(n_slices / 32.0, 0.5)
  texture = smooth_noise(rng, labels.shape, sigma=(1.5 * pz, size / 24, size / 24))
  img = img * (1.0 + 0.05 * texture)[..., None]
  img = gaussian_smooth(img, (0.6 * pz, 0.6 * px, 0.6 * px, 0.0), mode="nearest")

  y, x = grid_2d(size)
  z = np.linspace(-1.0, 1.0, n_slices) if n_slices > 1 else np.zeros(1)
  coeffs = np.asarray(base.bias_coeffs) + rng.normal(0.0, 0.5 * base.bias_strength, 8)
  fields = [bias_field(coeffs + rng.normal(0.0, 0.25 * base.bias_strength, 8), z[:, None, None], y[None], x[None])
            for _ in BRATS_MODALITIES]
  img = img * np.stack(fields, axis=-1)
  brain = (labels >= CSF)[..., None]
  img = img * np.asarray(effects.modality_gain) + np.asarray(effects.modality_offset) * brain
  img = img + rng.normal(0.0, base.noise_sigma, img.shape) * brain
  img = np.where(brain, np.clip(img, 0.0, None), 0.0)
  return np.clip(np.round(img * effects.scale), 0, np.iinfo(np.int16).max).astype(np.int16)


def generate_brats_patient(
    seed: int,
    site: str,
    index: int,
    *,
    n_slices: int = 32,
    size: int = 64,
    tumour_free_fraction: float = 0.4,
    tumour_area: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray, str]:
  """One synthetic BraTS patient, in memory, in the internal axis order [z, y, x].

  Returns:
    (images int16 [D, H, W, 4] (flair, t1, t1ce, t2),
     seg uint8 [D, H, W] in {0, 1, 2, 4} (necrotic core 1 inside enhancing
     rim 4 inside edema 2), grade 'HGG' (enhancing tumour) or 'LGG').
  ``tumour_area``: as `generate_lgg_patient` (the whole tumour, edema included).
  """
  effects = brats_site_effects(site, seed)
  base = effects.base
  rng_t = rng_for(seed, "brats", site, index, _STREAM_TUMOUR)
  tumour_slices = tumour_slice_range(rng_t, n_slices, tumour_free_fraction)
  # High-grade tumours with their edema are large: ~1.8x the LGG radius.
  radius = 1.8 * base.tumour_radius * float(np.exp(rng_t.normal(0.0, base.tumour_spread)))
  radius = float(np.clip(radius, 0.2, 0.6))
  enhancing = bool(rng_t.random() < effects.enhancing_prob)
  labels = head_labels(rng_for(seed, "brats", site, index, _STREAM_ANATOMY), n_slices, size,
                       tumour_slices=tumour_slices, tumour_radius=radius, enhancing=enhancing,
                       tumour_area=draw_tumour_area(tumour_area, seed, "brats", site, index))
  images = render_brats(labels, effects, rng_for(seed, "brats", site, index, _STREAM_RENDER))
  return images, BRATS_LABEL_OF[labels], ("HGG" if enhancing else "LGG")


def _check_common(seed, sites, per_site, n_slices, size, what="sites") -> None:
  if not sites or len(set(sites)) != len(sites):
    raise ValueError(f"{what} must be non-empty and distinct, got {tuple(sites)}")
  for site in sites:
    if not isinstance(site, str) or not _SITE_RE.match(site):
      raise ValueError(f"site code must be alphanumeric without '_', got {site!r}")
  if per_site < 1 or n_slices < 1:
    raise ValueError(f"need >= 1 patient per site and >= 1 slice, got {per_site} and {n_slices}")
  if size < 16:
    raise ValueError(f"size must be >= 16, got {size}")
  rng_for(seed)  # validates the seed


def write_brats(
    root: str | os.PathLike,
    *,
    seed: int = 0,
    sites: Sequence[str] = ("CS", "DU", "HT"),
    patients_per_site: int = 4,
    slices_per_patient: int = 32,
    size: int = 64,
    tumour_free_fraction: float | None = None,
    spacing: Sequence[float] | None = None,
    compress: bool = True,
    overwrite: bool = False,
    style: str = "geometric",
    tumour_area: Sequence[float] | None = None,
    tumour_preset: str | None = None,
    **anatomy_options,
) -> list[str]:
  """Write a phantom BraTS 2020 training set (SPEC §1.1) under ``root``.

  Layout (as in the official download)::

      <root>/MICCAI_BraTS2020_TrainingData/name_mapping.csv
      <root>/MICCAI_BraTS2020_TrainingData/BraTS20_Training_XXX/
          BraTS20_Training_XXX_{flair,t1,t1ce,t2}.nii.gz   int16 [size, size, slices]
          BraTS20_Training_XXX_seg.nii.gz                   uint8, labels {0, 1, 2, 4}

  File axes are (x, y, z) with a BraTS-like affine (``nifti_affine``,
  ``spacing`` mm in x, y, z; 1 mm³ by default). ``name_mapping.csv`` has the
  official columns; its ``TCGA_TCIA_subject_ID`` (``TCGA-<SITE>-<dddd>``)
  carries the phantom site, which the loader reads as the hospital. Patient
  numbers are a seeded shuffle over sites (ids do not reveal the site).
  Real size is ``size=240, slices_per_patient=155``.

  Args:
    root: output folder (created).
    seed: non-negative int; same arguments → byte-identical files.
    sites: site codes (alphanumeric), each with its own `brats_site_effects`.
    patients_per_site, slices_per_patient, size: data set dimensions.
    tumour_free_fraction: ≈ fraction of axial slices without tumour
      (geometric style; the anatomical volume spans the whole brain and
      the tumour's own extent decides which slices carry it); default 0.4
      (or the preset's).
    tumour_area, tumour_preset: as `write_lgg` (geometric style; the
      'realistic' preset: whole tumour 0.5–6 % of the slice, 55 % of the
      slices tumour-free).
    spacing: voxel size (x, y, z) in mm, written into the affine. None:
      1 mm³ (geometric) or the real BraTS field of view 240×240×155 mm
      divided by the shape (anatomical; `anatomy.brats_spacing`).
    compress: ``.nii.gz`` (default) or ``.nii``.
    overwrite: replace an existing non-empty output folder.
    style: ``'geometric'`` (`generate_brats_patient`) or ``'anatomical'``
      (`fedjax_seg.data.anatomy.generate_brats_patient`: ICBM152 anatomy,
      skull-stripped, tumour grown in white matter).
    **anatomy_options: anatomical only: ``mass_effect`` (default 0.3).
  Returns:
    The patient folder paths, sorted.
  """
  _check_common(seed, sites, patients_per_site, slices_per_patient, size)
  tumour_area, tumour_free_fraction = tumour_options("brats", tumour_preset, tumour_area,
                                                      tumour_free_fraction)
  tumour_free_fraction = 0.4 if tumour_free_fraction is None else tumour_free_fraction
  if not 0.0 <= tumour_free_fraction <= 1.0:
    raise ValueError(f"tumour_free_fraction must be in [0, 1], got {tumour_free_fraction}")
  anatomy = _anatomy_module(style, "brats", anatomy_options)
  if anatomy is not None and tumour_area is not None:
    raise ValueError("write_brats: tumour_area applies only to style='geometric'")
  if anatomy is None:
    spacing = (1.0, 1.0, 1.0) if spacing is None else tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
      raise ValueError(f"spacing must be 3 positive numbers (x, y, z mm), got {spacing}")
    generate = functools.partial(generate_brats_patient, tumour_free_fraction=tumour_free_fraction,
                                 tumour_area=tumour_area)
  else:
    spacing = anatomy.brats_spacing(slices_per_patient, size, spacing)
    generate = functools.partial(anatomy.generate_brats_patient, spacing=spacing, **anatomy_options)
  out = os.path.join(os.fspath(root), BRATS_FOLDER)
  _prepare_out_dir(out, overwrite)
  ext = ".nii.gz" if compress else ".nii"
  pairs = [(site, i) for site in sites for i in range(patients_per_site)]
  order = rng_for(seed, "brats", _STREAM_IDS).permutation(len(pairs))
  rows, folders = [], []
  bar = progress.Bar(len(pairs), "[data] phantom BraTS patients")
  for number, k in enumerate(order, start=1):
    site, index = pairs[int(k)]
    tcia = rng_for(seed, "brats", site, _STREAM_IDS).choice(9000, size=patients_per_site, replace=False)[index]
    name = f"BraTS20_Training_{number:03d}"
    images, seg, grade = generate(seed, site, index, n_slices=slices_per_patient, size=size)
    folder = os.path.join(out, name)
    os.makedirs(folder, exist_ok=True)
    affine = nifti_affine(seg.shape, spacing)
    for m, modality in enumerate(BRATS_MODALITIES):
      save_nifti(images[..., m], affine, os.path.join(folder, f"{name}_{modality}{ext}"), np.int16)
    save_nifti(seg, affine, os.path.join(folder, f"{name}_seg{ext}"), np.uint8)
    rows.append(f"{grade},NA,NA,TCGA-{site}-{int(tcia) + 1000:04d},NA,{name}")
    folders.append(folder)
    bar.advance(info=name)
  bar.close()
  with open(os.path.join(out, "name_mapping.csv"), "w", newline="\n") as f:
    f.write("Grade,BraTS_2017_subject_ID,BraTS_2018_subject_ID,TCGA_TCIA_subject_ID,"
            "BraTS_2019_subject_ID,BraTS_2020_subject_ID\n")
    f.write("\n".join(sorted(rows, key=lambda r: r.rsplit(",", 1)[1])) + "\n")
  return sorted(folders)


# --------------------------------------------------------------------------
# ACDC (SPEC §1.3): cardiac cine short-axis ED / ES frames + ground truth.
# --------------------------------------------------------------------------
ACDC_GROUPS = ("DCM", "HCM", "MINF", "NOR", "RV")
ACDC_LABELS = ("background", "RV", "myocardium", "LV")

# Per pathology group, in mm at end-diastole: LV cavity radius at the base,
# LV wall thickness, ES/ED LV cavity radius ratio, RV size factor, ES/ED RV
# ratio, infarct wall thinning (fraction of the wall lost in one sector).
ACDC_GROUP_PRESETS: Mapping[str, Mapping[str, float]] = types.MappingProxyType({
    "NOR": types.MappingProxyType(dict(lv_radius=24.0, wall=8.0, es_ratio=0.66, rv_scale=1.0, rv_es=0.62,
                                       infarct=0.0)),
    "DCM": types.MappingProxyType(dict(lv_radius=33.0, wall=6.0, es_ratio=0.90, rv_scale=1.05, rv_es=0.80,
                                       infarct=0.0)),
    "HCM": types.MappingProxyType(dict(lv_radius=19.0, wall=15.0, es_ratio=0.50, rv_scale=0.9, rv_es=0.62,
                                       infarct=0.0)),
    "MINF": types.MappingProxyType(dict(lv_radius=28.0, wall=8.0, es_ratio=0.84, rv_scale=1.0, rv_es=0.70,
                                        infarct=0.55)),
    "RV": types.MappingProxyType(dict(lv_radius=22.0, wall=8.0, es_ratio=0.68, rv_scale=1.6, rv_es=0.88,
                                      infarct=0.0)),
})

# Image intensities (bSSFP-like cine): air, body, fat, lung, blood, myocardium.
_ACDC_AIR, _ACDC_BODY, _ACDC_FAT, _ACDC_LUNG, _ACDC_BLOOD, _ACDC_MYO = 0.0, 0.35, 0.75, 0.06, 0.9, 0.25


@dataclasses.dataclass(frozen=True)
class AcdcPatient:
  """One synthetic ACDC patient (in memory).

  Attributes:
    group: pathology group (``NOR``, ``DCM``, ``HCM``, ``MINF``, ``RV``).
    info: the ``Info.cfg`` entries (ED, ES, Group, Height, NbFrame, Weight).
    spacing: voxel size (x, y, z) mm (in-plane varies per patient).
    angle: in-plane rotation of the affine (oblique short-axis plane), rad.
    frames: {frame number: (image int16 [Z, H, W], gt uint8 [Z, H, W] in 0..3)}
      for the ED and ES frames.
  """

  group: str
  info: Mapping[str, object]
  spacing: tuple[float, float, float]
  angle: float
  frames: Mapping[int, tuple[np.ndarray, np.ndarray]]


def _heart_frame(geo: Mapping[str, float], phase: str, n_slices: int, size: int, spacing_yx: float,
                 rng: np.random.Generator, scanner: Mapping[str, float]) -> tuple[np.ndarray, np.ndarray]:
  """Labels and image of one cardiac phase: rings LV cavity (3) / myocardium (2) / RV cavity (1)."""
  fov = size * spacing_yx
  y, x = grid_2d(size)
  y, x = y * fov / 2.0, x * fov / 2.0  # mm, image centre = 0
  es = phase == "ES"
  labels = np.zeros((n_slices, size, size), np.uint8)
  image = np.zeros((n_slices, size, size), np.float64)
  d_body = irregular_blob(y, x, (0.0, 0.0), (0.40 * fov, 0.47 * fov), 0.0, [(2, 0.03, geo["phase_body"])])
  for s in range(n_slices):
    t = s / max(n_slices - 1, 1)  # 0 = base, 1 = apex
    im = np.full((size, size), _ACDC_AIR)
    im[d_body < 1.0] = _ACDC_FAT
    im[d_body < 0.93] = _ACDC_BODY
    for side in (-1.0, 1.0):
      d_lung = irregular_blob(y, x, (-0.04 * fov, side * 0.25 * fov), (0.24 * fov * (1 - 0.2 * t), 0.14 * fov),
                              side * 0.2)
      im[d_lung < 1.0] = _ACDC_LUNG
    r_in = geo["lv_radius"] * (1.0 - 0.72 * t ** 1.5)
    wall = geo["wall"] * (1.0 - 0.25 * t)
    r_out = r_in + wall
    if es:
      r_in_es = r_in * geo["es_ratio"]
      r_out = float(np.sqrt(r_in_es ** 2 + r_out ** 2 - r_in ** 2))  # myocardial area conserved
      r_in = r_in_es
    cy, cx = geo["cy"] + geo["drift_y"] * t, geo["cx"] + geo["drift_x"] * t
    harm = [(2, 0.04, geo["phase_lv"]), (3, 0.03, geo["phase_lv"] * 1.7)]
    d_in = irregular_blob(y, x, (cy, cx), (r_in * geo["aspect"], r_in), geo["angle"], harm)
    # Infarct: the wall loses a sector (thinner, akinetic) on the free wall.
    theta = np.arctan2(y - cy, x - cx)
    thin = 1.0 - geo["infarct"] * np.clip(np.cos(theta - geo["infarct_dir"]), 0.0, 1.0) ** 2
    r_wall = r_in + (r_out - r_in) * thin
    d_out = irregular_blob(y, x, (cy, cx), (r_wall * geo["aspect"], r_wall), geo["angle"], harm)
    myo = d_out < 1.0
    lv = d_in < 1.0
    # RV: crescent wrapped around the septum, on the image left, absent near the apex.
    rv_scale = geo["rv_scale"] * (geo["rv_es"] if es else 1.0) * max(1.0 - 1.1 * t ** 1.3, 0.0)
    rv = np.zeros_like(lv)
    rv_wall = np.zeros_like(lv)
    if rv_scale > 0.08:
      r_rv = (geo["lv_radius"] + geo["wall"]) * rv_scale
      rcy, rcx = cy - 0.15 * r_rv, cx - 0.55 * (r_out + r_rv)
      d_rv = irregular_blob(y, x, (rcy, rcx), (1.15 * r_rv, 0.85 * r_rv), 0.3, [(2, 0.05, geo["phase_rv"])])
      septum = np.hypot((y - cy) / geo["aspect"], x - cx) < r_out + 0.6 * spacing_yx + 1.5
      rv = (d_rv < 1.0) & ~septum & ~myo
      rv_wall = (d_rv < 1.0 + 3.0 / max(r_rv, 1.0)) & ~rv & ~myo & ~septum
    im[rv_wall] = _ACDC_MYO + 0.05
    im[myo] = _ACDC_MYO
    im[rv] = _ACDC_BLOOD
    im[lv] = _ACDC_BLOOD
    lab = np.zeros((size, size), np.uint8)
    lab[rv] = 1
    lab[myo & ~lv] = 2
    lab[lv] = 3
    labels[s], image[s] = lab, im
  # Scanner: texture, blur, bias field, gain, noise (Rician-like magnitude).
  texture = smooth_noise(rng, image.shape, sigma=(0.0, size / 32, size / 32))
  image = image * (1.0 + 0.04 * texture)
  image = gaussian_smooth(image, (0.0, 0.5 * size / 64, 0.5 * size / 64), mode="nearest")
  yy, xx = grid_2d(size)
  z = np.linspace(-1.0, 1.0, n_slices) if n_slices > 1 else np.zeros(1)
  field = bias_field(np.asarray(scanner["bias"]), 0.3 * z[:, None, None], yy[None], xx[None])
  image = image * field * scanner["gain"]
  noise = scanner["noise"]
  image = np.hypot(image + rng.normal(0.0, noise, image.shape), rng.normal(0.0, noise, image.shape))
  stored = np.clip(np.round(image * scanner["scale"]), 0, np.iinfo(np.int16).max).astype(np.int16)
  return stored, labels


def generate_acdc_patient(
    seed: int,
    group: str,
    index: int,
    *,
    n_slices: int = 8,
    size: int = 64,
    fov_mm: tuple[float, float] = (150.0, 190.0),
    slice_thickness: float = 10.0,
) -> AcdcPatient:
  """One synthetic ACDC patient: geometry from the group preset + jitter, ED and ES frames.

  The LV is an irregular ring (cavity 3 inside myocardium 2) tapering from
  base to apex; the RV cavity (1) is a crescent beside the septum that
  vanishes near the apex. ES shrinks the cavities by the group's ratios and
  thickens the wall (myocardial area conserved). Per-patient scanner: 1.5 T
  or 3 T (bias strength, noise), gain, stored intensity scale, FOV
  (in-plane spacing = FOV / size).
  """
  if group not in ACDC_GROUP_PRESETS:
    raise ValueError(f"unknown ACDC group {group!r}; expected one of {ACDC_GROUPS}")
  p = ACDC_GROUP_PRESETS[group]
  rng = rng_for(seed, "acdc", group, index, _STREAM_HEART)
  geo = dict(
      lv_radius=p["lv_radius"] * float(np.exp(rng.normal(0.0, 0.08))),
      wall=p["wall"] * float(np.exp(rng.normal(0.0, 0.10))),
      es_ratio=float(np.clip(p["es_ratio"] + rng.normal(0.0, 0.04), 0.35, 0.97)),
      rv_scale=p["rv_scale"] * float(np.exp(rng.normal(0.0, 0.08))),
      rv_es=float(np.clip(p["rv_es"] + rng.normal(0.0, 0.04), 0.4, 0.97)),
      infarct=p["infarct"] * float(rng.uniform(0.7, 1.0)) if p["infarct"] else 0.0,
      infarct_dir=float(rng.uniform(-np.pi, np.pi)),
      aspect=float(rng.uniform(0.9, 1.12)),
      angle=float(rng.uniform(0.0, np.pi)),
      cy=float(rng.normal(2.0, 4.0)), cx=float(rng.normal(8.0, 4.0)),
      drift_y=float(rng.normal(0.0, 3.0)), drift_x=float(rng.normal(4.0, 3.0)),
      phase_body=float(rng.uniform(0, 2 * np.pi)), phase_lv=float(rng.uniform(0, 2 * np.pi)),
      phase_rv=float(rng.uniform(0, 2 * np.pi)),
  )
  r_scan = rng_for(seed, "acdc", group, index, _STREAM_SCANNER)
  tesla3 = bool(r_scan.random() < 0.4)
  strength = 0.30 if tesla3 else 0.15
  scanner = dict(bias=tuple(r_scan.normal(0.0, strength, 8)), gain=float(np.exp(r_scan.normal(0.0, 0.1))),
                 noise=float(r_scan.uniform(0.015, 0.04)),
                 scale=float(np.exp(r_scan.uniform(np.log(150.0), np.log(600.0)))))
  fov = float(r_scan.uniform(*fov_mm))
  spacing = (fov / size, fov / size, float(slice_thickness))
  angle = float(r_scan.uniform(-0.6, 0.6))
  r_info = rng_for(seed, "acdc", group, index, _STREAM_INFO)
  n_frames = int(r_info.integers(12, 36))
  ed = 1
  es = int(np.clip(round(0.36 * n_frames + r_info.normal(0.0, 1.0)), 3, n_frames))
  info = {"ED": ed, "ES": es, "Group": group, "Height": round(float(r_info.normal(172.0, 9.0)), 1),
          "NbFrame": n_frames, "Weight": round(float(r_info.normal(76.0, 14.0)), 1)}
  r_render = rng_for(seed, "acdc", group, index, _STREAM_RENDER)
  frames = {ed: _heart_frame(geo, "ED", n_slices, size, spacing[0], r_render, scanner),
            es: _heart_frame(geo, "ES", n_slices, size, spacing[0], r_render, scanner)}
  return AcdcPatient(group=group, info=types.MappingProxyType(info), spacing=spacing, angle=angle,
                     frames=types.MappingProxyType(frames))


def format_info_cfg(info: Mapping[str, object]) -> str:
  """``Info.cfg`` text as in ACDC: ``key: value`` lines in the order ED, ES, Group, Height, NbFrame, Weight."""
  keys = ("ED", "ES", "Group", "Height", "NbFrame", "Weight")
  return "".join(f"{k}: {info[k]}\n" for k in keys if k in info)


def write_acdc(
    root: str | os.PathLike,
    *,
    seed: int = 0,
    groups: Sequence[str] = ACDC_GROUPS,
    patients_per_group: int = 3,
    slices_per_patient: int = 8,
    size: int = 64,
    fov_mm: Sequence[float] = (150.0, 190.0),
    slice_thickness: float = 10.0,
    overwrite: bool = False,
) -> list[str]:
  """Write a phantom ACDC training set (SPEC §1.3) under ``root``.

  Layout (as in the official download)::

      <root>/training/patientXXX/Info.cfg          ED, ES, Group, Height, NbFrame, Weight
      <root>/training/patientXXX/patientXXX_frameYY.nii.gz      int16 [size, size, slices]
      <root>/training/patientXXX/patientXXX_frameYY_gt.nii.gz   uint8 labels 0 bg, 1 RV, 2 myo, 3 LV

  for YY = ED and ES (the 4D cine file is not written). Patients are
  numbered in blocks of ``patients_per_group`` per group, in the order of
  ``groups`` (ACDC: DCM, HCM, MINF, NOR, RV). Spacing is anisotropic:
  in-plane FOV/size with FOV ~ U(fov_mm) per patient, ``slice_thickness``
  mm between slices; the affine is oblique (rotated in-plane).

  Args:
    root: output folder (created).
    seed: non-negative int; same arguments → byte-identical files.
    groups: pathology groups, a subset of `ACDC_GROUPS`.
    patients_per_group, slices_per_patient, size: data set dimensions
      (real ACDC: 20 per group, 6–18 slices, ~ 216×256 in-plane).
    fov_mm: range of the in-plane field of view, mm.
    slice_thickness: mm.
    overwrite: replace an existing non-empty ``<root>/training``.
  Returns:
    The patient folder paths, sorted.
  """
  _check_common(seed, groups, patients_per_group, slices_per_patient, size, what="groups")
  for g in groups:
    if g not in ACDC_GROUP_PRESETS:
      raise ValueError(f"unknown ACDC group {g!r}; expected a subset of {ACDC_GROUPS}")
  if len(fov_mm) != 2 or not 0 < fov_mm[0] <= fov_mm[1]:
    raise ValueError(f"fov_mm must be (low, high) mm with 0 < low <= high, got {tuple(fov_mm)}")
  if slice_thickness <= 0:
    raise ValueError(f"slice_thickness must be > 0, got {slice_thickness}")
  out = os.path.join(os.fspath(root), "training")
  _prepare_out_dir(out, overwrite)
  folders = []
  number = 0
  bar = progress.Bar(len(groups) * patients_per_group, "[data] phantom ACDC patients")
  for group in groups:
    for index in range(patients_per_group):
      number += 1
      name = f"patient{number:03d}"
      pat = generate_acdc_patient(seed, group, index, n_slices=slices_per_patient, size=size,
                                  fov_mm=tuple(fov_mm), slice_thickness=slice_thickness)
      folder = os.path.join(out, name)
      os.makedirs(folder, exist_ok=True)
      with open(os.path.join(folder, "Info.cfg"), "w", newline="\n") as f:
        f.write(format_info_cfg(pat.info))
      affine = nifti_affine((slices_per_patient, size, size), pat.spacing, pat.angle)
      for frame, (image, gt) in pat.frames.items():
        save_nifti(image, affine, os.path.join(folder, f"{name}_frame{frame:02d}.nii.gz"), np.int16)
        save_nifti(gt, affine, os.path.join(folder, f"{name}_frame{frame:02d}_gt.nii.gz"), np.uint8)
      folders.append(folder)
      bar.advance(info=name)
  bar.close()
  return sorted(folders)


# Layout name -> writer (used by the CLI and by `pipeline.ensure_phantom`).
WRITERS: Mapping[str, Callable[..., list[str]]] = types.MappingProxyType(
    {"lgg": write_lgg, "brats": write_brats, "acdc": write_acdc})


# --------------------------------------------------------------------------
# CLI.
# --------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
  """``python -m fedjax_seg.data.phantom --layout {lgg,brats,acdc} --out DIR [--seed 0 --size 64 ...]``.

  Options left out take the writer's defaults. For ACDC, ``--sites`` lists
  pathology groups and ``--patients-per-site`` is patients per group.
  """
  parser = argparse.ArgumentParser(prog="python -m fedjax_seg.data.phantom",
                                   description="Write a deterministic phantom data set in a real layout.")
  parser.add_argument("--layout", choices=sorted(WRITERS), required=True)
  parser.add_argument("--out", required=True, help="output root (the layout's folders are made inside)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--size", type=int, default=None, help="in-plane size (default 64)")
  parser.add_argument("--sites", default=None,
                      help="comma-separated institution codes (ACDC: groups); default per layout")
  parser.add_argument("--patients-per-site", type=int, default=None, help="(ACDC: per group)")
  parser.add_argument("--slices-per-patient", type=int, default=None,
                      help="slices (LGG default 12, BraTS 32, ACDC 8)")
  parser.add_argument("--tumour-free-fraction", type=float, default=None, help="LGG / BraTS only")
  parser.add_argument("--tumour-area", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                      help="LGG / BraTS geometric: widest tumour cross-section, fraction of the slice area")
  parser.add_argument("--tumour-preset", choices=sorted(TUMOUR_PRESETS), default=None,
                      help="LGG / BraTS: named tumour setting (realistic: small tumours, most slices empty)")
  parser.add_argument("--style", choices=PHANTOM_STYLES, default=None,
                      help="LGG / BraTS: geometric (default) or anatomical (ICBM152 anatomy; extra 'anatomy')")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output")
  args = parser.parse_args(argv)

  kwargs: dict[str, object] = {"seed": args.seed, "overwrite": args.overwrite}
  group_key, count_key = ("groups", "patients_per_group") if args.layout == "acdc" else (
      "sites", "patients_per_site")
  if args.sites is not None:
    kwargs[group_key] = tuple(s.strip() for s in args.sites.split(",") if s.strip())
  for key, value in ((count_key, args.patients_per_site), ("slices_per_patient", args.slices_per_patient),
                     ("size", args.size), ("tumour_free_fraction", args.tumour_free_fraction),
                     ("tumour_area", tuple(args.tumour_area) if args.tumour_area else None),
                     ("tumour_preset", args.tumour_preset)):
    if value is not None:
      kwargs[key] = value
  for key in ("tumour_free_fraction", "tumour_area", "tumour_preset"):
    if args.layout == "acdc" and key in kwargs:
      parser.error(f"--{key.replace('_', '-')} does not apply to --layout acdc")
  if args.style is not None:
    if args.layout == "acdc":
      parser.error("--style does not apply to --layout acdc")
    kwargs["style"] = args.style
  try:
    folders = WRITERS[args.layout](args.out, **kwargs)
  except ImportError as e:  # anatomy.TemplateUnavailable: names the extra to install
    print(f"error: {e}", file=sys.stderr)
    return 2
  except (ValueError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  n_files = 0
  for folder in folders:
    files = sorted(os.listdir(folder))
    n_files += len(files)
    if args.layout == "lgg":
      print(f"{folder}: {sum(not f.endswith('_mask.tif') for f in files)} slices")
    else:
      print(f"{folder}: {len(files)} files")
  style = f", {args.style}" if args.style else ""
  print(f"wrote {len(folders)} patients, {n_files} files ({args.layout}{style}, seed {args.seed}, "
        f"size {kwargs.get('size', 64)}) under {os.path.abspath(args.out)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
