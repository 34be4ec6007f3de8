"""Preprocessing shared by every layout (SPEC §1.5).

All functions are host-side NumPy / SimpleITK / `jax.image` on the CPU (run
once before training), deterministic. Slices: `resize_slices`, `normalize`; volumes ([Z, Y, X(, C)],
spacing (dz, dy, dx) mm): `resample_volume`, `crop_or_pad`,
`normalize_volume`, N4 bias field correction (`N4Params`, `n4_log_bias`,
`apply_log_bias`, `N4Cache`); patient splits: `split_patients`, `kfold_split`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np


def split_patients(patient_ids: Sequence[str], seed: int, val_fraction: float = 0.2,
                   test_fraction: float = 0.15, strata: Dict[str, str] | None = None
                   ) -> Dict[str, List[str]]:
  """Patient-level train/val/test split (SPEC §1.5, seed 001).

  First train:val = (1-val_fraction):val_fraction, then ``test_fraction`` of
  the train patients become test. Splitting by patient (never by slice) means
  no patient's slices leak across splits. Each split gets ≥ 1 patient when
  there are ≥ 3 patients.

  With ``strata`` (patient id -> site) the split is done within each site
  that has ≥ 3 patients (smaller sites go to train), so every hospital has
  validation and test patients; this keeps the federated by-site split and
  the centralised baseline on exactly the same train/val/test patients.

  Returns {'train': [...], 'val': [...], 'test': [...]} (sorted ids).
  """
  if strata is not None:
    out: Dict[str, List[str]] = {"train": [], "val": [], "test": []}
    groups: Dict[str, List[str]] = {}
    for p in sorted(patient_ids):
      groups.setdefault(strata[p], []).append(p)
    for i, name in enumerate(sorted(groups)):
      if len(groups[name]) < 3:
        out["train"] += groups[name]
        continue
      part = split_patients(groups[name], seed + 7919 * (i + 1), val_fraction, test_fraction)
      for k in out:
        out[k] += part[k]
    if not out["val"] or not out["test"]:
      return split_patients(patient_ids, seed, val_fraction, test_fraction)
    return {k: sorted(v) for k, v in out.items()}
  ids = sorted(patient_ids)
  if len(ids) < 3:
    raise ValueError(f"need at least 3 patients to split train/val/test, got {len(ids)}")
  order = np.random.default_rng(seed).permutation(len(ids))
  shuffled = [ids[i] for i in order]
  n_val = max(1, int(round(len(ids) * val_fraction)))
  val, train = shuffled[:n_val], shuffled[n_val:]
  n_test = max(1, int(round(len(train) * test_fraction)))
  test, train = train[:n_test], train[n_test:]
  if not train:
    raise ValueError(f"split left no training patients ({len(ids)} patients, "
                     f"val_fraction={val_fraction}, test_fraction={test_fraction})")
  return {"train": sorted(train), "val": sorted(val), "test": sorted(test)}


def _stratum_rng(seed: int, name: str, salt: int = 0) -> np.random.Generator:
  import zlib
  return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode()), int(salt)])


def kfold_assignment(patient_ids: Sequence[str], num_folds: int, seed: int,
                     strata: Dict[str, str] | None = None) -> Dict[str, int]:
  """Patient -> fold in ``range(num_folds)``, stratified by site.

  Each site's patients (sorted, then shuffled with a generator seeded by
  ``(seed, site)``) are dealt round-robin over the folds; each site starts
  where the previous one stopped, so fold sizes differ by at most one
  overall and each site's count differs by at most one between folds. The
  assignment does not depend on which fold is held out, so the folds
  partition the patients. Without ``strata`` all patients are one site.
  """
  num_folds = int(num_folds)
  ids = sorted(patient_ids)
  if num_folds < 2:
    raise ValueError(f"data.num_folds={num_folds}: need at least 2 folds")
  if len(ids) < num_folds:
    raise ValueError(f"data.num_folds={num_folds} folds but only {len(ids)} patients")
  groups: Dict[str, List[str]] = {}
  for p in ids:
    groups.setdefault("" if strata is None else str(strata[p]), []).append(p)
  out: Dict[str, int] = {}
  start = 0
  for name in sorted(groups):
    members = groups[name]
    order = _stratum_rng(seed, name).permutation(len(members))
    for j, i in enumerate(order):
      out[members[int(i)]] = (start + j) % num_folds
    start = (start + len(members)) % num_folds
  return out


def kfold_split(patient_ids: Sequence[str], fold: int, num_folds: int, seed: int,
                val_fraction: float = 0.2, strata: Dict[str, str] | None = None) -> Dict[str, List[str]]:
  """Patient-level k-fold split: fold ``fold`` of `kfold_assignment` is the test split.

  The validation patients are drawn from the other folds, per site
  (``round(val_fraction * n)`` of a site's remaining n patients, seeded by
  ``(seed, site, fold)``; at least one overall), the rest is train. Every
  patient is a test patient in exactly one fold.

  Returns {'train': [...], 'val': [...], 'test': [...]} (sorted ids).
  """
  fold, num_folds = int(fold), int(num_folds)
  if not 0 <= fold < num_folds:
    raise ValueError(f"data.fold={fold}: must be in [0, data.num_folds={num_folds})")
  assign = kfold_assignment(patient_ids, num_folds, seed, strata)
  test = sorted(p for p, f in assign.items() if f == fold)
  rest = sorted(p for p, f in assign.items() if f != fold)
  groups: Dict[str, List[str]] = {}
  for p in rest:
    groups.setdefault("" if strata is None else str(strata[p]), []).append(p)
  val: List[str] = []
  leftovers: List[str] = []
  for name in sorted(groups):
    members = groups[name]
    shuffled = [members[int(i)] for i in _stratum_rng(seed, name, fold + 1).permutation(len(members))]
    n_val = int(round(len(members) * float(val_fraction)))
    val += shuffled[:n_val]
    leftovers += shuffled[n_val:]
  if not val and val_fraction > 0 and len(leftovers) > 1:
    val = [leftovers.pop(int(_stratum_rng(seed, "", fold + 1).integers(len(leftovers))))]
  train = leftovers
  if not train:
    raise ValueError(f"k-fold split left no training patients ({len(assign)} patients, "
                     f"num_folds={num_folds}, val_fraction={val_fraction})")
  return {"train": sorted(train), "val": sorted(val), "test": test}


_RESIZE_CHUNK = 16  # slices per jax.image.resize call: one compilation per (H, W, C, size), whatever S is


def resize_stack(x: np.ndarray, hw: Tuple[int, int], method: str = "linear") -> np.ndarray:
  """In-plane resize of a stack [S, h, w, C] -> [S, H, W, C] with `jax.image.resize`.

  ``method='linear'``: bilinear with half-pixel centres and, when shrinking,
  the kernel widened by the scale (``antialias=True``), which is Pillow's
  ``Image.BILINEAR`` (the implementation before; equal to float32 rounding,
  ~1e-7 relative, tests/test_library_swaps.py). ``method='nearest'``: source
  index ``floor((i + 0.5) * h / H)``, values and dtype kept (no new labels).
  Runs on the CPU backend (host-side preprocessing, identical on every
  machine) in chunks of `_RESIZE_CHUNK` slices (zero-padded), so one
  compilation serves every stack of the same in-plane shape.
  """
  import jax
  hw = (int(hw[0]), int(hw[1]))
  if x.shape[1:3] == hw:
    return x
  s, c = x.shape[0], x.shape[-1]
  out = np.empty((s,) + hw + (c,), x.dtype)
  n = _RESIZE_CHUNK
  try:
    cpu = jax.devices("cpu")[0]
  except RuntimeError:  # JAX_PLATFORMS without cpu: the default backend
    cpu = None
  with jax.default_device(cpu):
    for lo in range(0, s, n):
      chunk = x[lo:lo + n]
      m = chunk.shape[0]
      if m < n:
        chunk = np.concatenate([chunk, np.zeros((n - m,) + chunk.shape[1:], chunk.dtype)])
      r = jax.image.resize(chunk, (n,) + hw + (c,), method=method, antialias=True)
      out[lo:lo + m] = np.asarray(r)[:m]
  return out


def resize_slices(images: np.ndarray, masks: np.ndarray, size: int):
  """Resizes [S, H, W, C] images (bilinear) and [S, H, W] masks (nearest) with `resize_stack`.

  Returns (images float32 [S, size, size, C], masks uint8 [S, size, size]).
  A no-op (apart from dtype) when H == W == size.
  """
  images = images.astype(np.float32)
  masks = masks.astype(np.uint8)
  if images.shape[1:3] == (size, size):
    return images, masks
  out_i = resize_stack(images, (size, size), "linear")
  out_m = resize_stack(masks[..., None], (size, size), "nearest")[..., 0]
  return out_i, out_m


def normalize(images: np.ndarray, mode: str = "slice_max", foreground: np.ndarray | None = None):
  """Intensity normalisation per slice and channel.

  images: float [S, H, W, C].
  mode 'slice_max': divide each slice/channel by its max -> [0, 1] (seed 001);
       all-zero slices stay zero.
  mode 'zscore': zero mean, unit std within the foreground (image > 0 by
       default, or the given boolean ``foreground`` [S, H, W]); background = 0.
  mode 'none': unchanged.
  """
  x = images.astype(np.float32)
  if mode == "none":
    return x
  if mode == "slice_max":
    mx = x.max(axis=(1, 2), keepdims=True)
    return np.where(mx > 0, x / np.maximum(mx, 1e-12), 0.0).astype(np.float32)
  if mode == "zscore":
    fg = (x.max(axis=-1) > 0) if foreground is None else foreground.astype(bool)
    fg = fg[..., None]
    n = np.maximum(fg.sum(axis=(1, 2), keepdims=True), 1)
    mean = (x * fg).sum(axis=(1, 2), keepdims=True) / n
    var = (((x - mean) ** 2) * fg).sum(axis=(1, 2), keepdims=True) / n
    z = (x - mean) / np.sqrt(var + 1e-8)
    return np.where(fg, z, 0.0).astype(np.float32)
  raise ValueError(f"data.normalize={mode!r}: expected 'slice_max', 'zscore' or 'none'")


# ---------------------------------------------------------------------------
# Volumes (BraTS, ACDC): axes [Z, Y, X] (+ channels), spacing (dz, dy, dx) mm.
# ---------------------------------------------------------------------------
def _to_sitk(volume: np.ndarray, spacing: Sequence[float]):
  import SimpleITK as sitk
  img = sitk.GetImageFromArray(np.ascontiguousarray(volume, dtype=np.float32))
  img.SetSpacing([float(s) for s in reversed(spacing)])  # SimpleITK axes are (x, y, z)
  return img


def resample_volume(volume: np.ndarray, spacing: Sequence[float], target_spacing: Sequence[float | None],
                    is_label: bool = False) -> Tuple[np.ndarray, Tuple[float, ...]]:
  """Resamples a [Z, Y, X] or [Z, Y, X, C] volume to a target voxel spacing.

  Args:
    volume: image (linear interpolation) or label map (``is_label``:
      nearest neighbour, values and dtype preserved).
    spacing: current (dz, dy, dx) mm.
    target_spacing: wanted (dz, dy, dx) mm; an entry ``None`` or <= 0 keeps
      that axis (ACDC: ``(None, 1.25, 1.25)`` resamples in-plane only).
  Returns:
    (resampled volume, new spacing). The grid keeps the volume's physical
    extent: n' = max(1, round(n * s / s')), first/last voxel edges aligned
    (voxel centres map with x' = (x + 0.5) * s / s' - 0.5); edge voxels are
    extrapolated from their nearest neighbour (no zero rim).
  """
  import SimpleITK as sitk
  spacing = tuple(float(s) for s in spacing)
  if len(spacing) != 3 or len(target_spacing) != 3:
    raise ValueError(f"spacing and target_spacing need 3 entries (z, y, x), got {spacing} and "
                     f"{tuple(target_spacing)}")
  new_spacing = tuple(s if (t is None or t <= 0) else float(t) for s, t in zip(spacing, target_spacing))
  shape = volume.shape[:3]
  new_shape = tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, new_spacing))
  if new_shape == shape and np.allclose(new_spacing, spacing):
    return volume, spacing
  # Exact spacing so the extent is preserved: s' = n s / n'.
  new_spacing = tuple(n * s / m for n, s, m in zip(shape, spacing, new_shape))
  f = sitk.ResampleImageFilter()
  f.SetOutputSpacing([float(s) for s in reversed(new_spacing)])
  f.SetSize([int(n) for n in reversed(new_shape)])
  f.SetOutputOrigin([0.5 * (t - s) for s, t in zip(reversed(spacing), reversed(new_spacing))])
  f.SetInterpolator(sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear)
  f.SetUseNearestNeighborExtrapolator(True)
  f.SetDefaultPixelValue(0.0)
  channels = volume[..., None] if volume.ndim == 3 else volume
  out = np.stack([sitk.GetArrayFromImage(f.Execute(_to_sitk(channels[..., c], spacing)))
                  for c in range(channels.shape[-1])], axis=-1)
  out = out[..., 0] if volume.ndim == 3 else out
  if is_label:
    out = np.rint(out).astype(volume.dtype)
  else:
    out = out.astype(np.float32)
  return out, new_spacing


def crop_or_pad_window(n: int, target: int, center: float | None = None) -> Tuple[int, int, int]:
  """The window `crop_or_pad` uses on one axis of length ``n``: (src_lo, dst_lo, length).

  ``out[dst_lo:dst_lo + length] = in[src_lo:src_lo + length]``; the rest of
  ``out`` (length ``target``) is zero padding. A crop (n > target) is
  centred on ``center`` (default the axis centre) and shifted to stay
  inside; a pad (n < target) is symmetric, the extra voxel at the end.
  """
  n, target = int(n), int(target)
  if n > target:
    c = (n - 1) / 2.0 if center is None else float(center)
    lo = int(np.clip(int(round(c - (target - 1) / 2.0)), 0, n - target))
    return lo, 0, target
  return 0, (target - n) // 2, n


def apply_windows(volume: np.ndarray, windows: Sequence[Tuple[int, int, int]], shape: Sequence[int]) -> np.ndarray:
  """Crops / zero-pads the leading ``len(windows)`` axes with `crop_or_pad_window` windows to ``shape``."""
  if all(src == 0 and dst == 0 and length == n == t
         for (src, dst, length), n, t in zip(windows, volume.shape, shape)):
    return volume
  out = np.zeros(tuple(int(t) for t in shape) + volume.shape[len(windows):], volume.dtype)
  dst = tuple(slice(d, d + length) for _, d, length in windows)
  src = tuple(slice(s, s + length) for s, _, length in windows)
  out[dst] = volume[src]
  return out


def crop_or_pad(volume: np.ndarray, shape: Sequence[int], center: Sequence[float] | None = None) -> np.ndarray:
  """Crops / zero-pads the leading ``len(shape)`` axes of ``volume`` to ``shape``.

  The window is centred on ``center`` (index coordinates per axis; default
  the array centre) and shifted to stay inside the array where it fits;
  axes shorter than the target are padded symmetrically (extra voxel at
  the end). Trailing axes (channels) are untouched. The windows are
  `crop_or_pad_window`'s (an inverse mapping can reuse them).
  """
  windows = [crop_or_pad_window(volume.shape[a], t, None if center is None else center[a])
             for a, t in enumerate(shape)]
  return apply_windows(volume, windows, shape)


def foreground_center(mask: np.ndarray) -> Tuple[float, ...]:
  """Centre of the bounding box of ``mask`` (index coordinates); array centre if empty."""
  idx = np.nonzero(mask)
  if not idx[0].size:
    return tuple((n - 1) / 2.0 for n in mask.shape)
  return tuple((float(i.min()) + float(i.max())) / 2.0 for i in idx)


def normalize_volume(volume: np.ndarray, mode: str = "zscore", foreground: np.ndarray | None = None) -> np.ndarray:
  """Intensity normalisation of one [Z, Y, X, C] volume.

  mode 'slice_max': per axial slice and channel, divide by the max (seed 001;
       same as `normalize` on the slices).
  mode 'max': per channel, divide by the volume max -> [0, 1].
  mode 'zscore': per channel, zero mean / unit std within the foreground
       (default: voxels where any channel > 0, i.e. the skull-stripped
       brain); background set to 0.
  mode 'none': unchanged (float32).
  """
  x = volume.astype(np.float32)
  if mode in ("slice_max", "none"):
    return normalize(x, mode)
  if mode == "max":
    mx = x.max(axis=(0, 1, 2), keepdims=True)
    return np.where(mx > 0, x / np.maximum(mx, 1e-12), 0.0).astype(np.float32)
  if mode == "zscore":
    fg = (x.max(axis=-1) > 0) if foreground is None else foreground.astype(bool)
    if not fg.any():
      return np.zeros_like(x)
    vals = x[fg]  # [N, C]
    mean, std = vals.mean(axis=0), vals.std(axis=0)
    z = (x - mean) / np.sqrt(std ** 2 + 1e-8)
    return np.where(fg[..., None], z, 0.0).astype(np.float32)
  raise ValueError(f"data.normalize={mode!r}: expected 'slice_max', 'max', 'zscore' or 'none'")


# ---------------------------------------------------------------------------
# N4 bias field correction (SimpleITK), cached on disk.
# ---------------------------------------------------------------------------
N4_VERSION = "n4-v1"  # bump when the computation changes: invalidates old cache entries


@dataclasses.dataclass(frozen=True)
class N4Params:
  """N4 settings (SPEC §1.5); every field enters the cache key.

  Attributes:
    shrink_factor: the fit runs on the image shrunk by this factor per axis
      (ITK's recommended speed-up; 2–4).
    iterations: max iterations per fitting level (its length = #levels).
    convergence_threshold: stop a level when the field changes less.
    otsu_bins: histogram bins of the Otsu foreground mask.
    control_points: B-spline control points per axis at the first level
      (>= 4: more than the cubic spline order).
  """
  shrink_factor: int = 4
  iterations: Tuple[int, ...] = (50, 50, 30)
  convergence_threshold: float = 1e-3
  otsu_bins: int = 200
  control_points: int = 4

  @classmethod
  def from_config(cls, cfg) -> "N4Params":
    cfg = dict(cfg or {})
    known = {f.name for f in dataclasses.fields(cls)}
    extra = set(cfg) - known - {"enabled", "cache_dir", "verbose"}
    if extra:
      raise ValueError(f"unknown config.data.n4 keys {sorted(extra)}; known: {sorted(known | {'enabled', 'cache_dir'})}")
    kw = {k: cfg[k] for k in known if k in cfg}
    if "iterations" in kw:
      kw["iterations"] = tuple(int(i) for i in kw["iterations"])
    p = cls(**kw)
    if p.shrink_factor < 1 or not p.iterations or min(p.iterations) < 1 or p.control_points < 4:
      raise ValueError(f"config.data.n4: need shrink_factor >= 1, iterations >= 1 per level and "
                       f"control_points >= 4 (> the cubic spline order), got {p}")
    return p

  def key(self) -> str:
    return json.dumps({"version": N4_VERSION, **dataclasses.asdict(self)}, sort_keys=True)


def n4_log_bias(image: np.ndarray, spacing: Sequence[float], params: N4Params = N4Params()) -> np.ndarray:
  """Fits N4 on the shrunk image; returns the log bias field on the *shrunk* grid.

  The foreground mask is Otsu's threshold of the image (SimpleITK
  ``OtsuThreshold``, ``params.otsu_bins`` bins). The shrunk grid is
  ``sitk.Shrink``'s (n // shrink_factor voxels per axis). Use
  `apply_log_bias` to correct the full-resolution image.

  Args:
    image: float [Z, Y, X], non-negative.
    spacing: (dz, dy, dx) mm.
  Returns:
    float32 [Z', Y', X'] log bias field (0 = no correction when the mask is
    too small to fit, e.g. an all-zero image).
  """
  import SimpleITK as sitk
  img = _to_sitk(image, spacing)
  factors = _shrink_factors(image.shape, params.shrink_factor)
  shrunk = sitk.Shrink(img, factors)
  mask = sitk.Shrink(sitk.OtsuThreshold(img, 0, 1, int(params.otsu_bins)), factors)
  if int(sitk.GetArrayViewFromImage(mask).sum()) < 8:
    return np.zeros(sitk.GetArrayViewFromImage(shrunk).shape, np.float32)
  n4 = sitk.N4BiasFieldCorrectionImageFilter()
  n4.SetMaximumNumberOfIterations([int(i) for i in params.iterations])
  n4.SetConvergenceThreshold(float(params.convergence_threshold))
  n4.SetNumberOfControlPoints([int(params.control_points)] * img.GetDimension())
  n4.Execute(shrunk, mask)
  log_bias = n4.GetLogBiasFieldAsImage(shrunk)
  return sitk.GetArrayFromImage(log_bias).astype(np.float32)


def _shrink_factors(shape_zyx: Sequence[int], shrink_factor: int) -> List[int]:
  """Per-axis shrink factors in SimpleITK (x, y, z) order (never more than the axis length)."""
  return [max(1, min(int(shrink_factor), int(n))) for n in reversed(shape_zyx)]


def apply_log_bias(image: np.ndarray, spacing: Sequence[float], log_bias_shrunk: np.ndarray,
                   shrink_factor: int) -> np.ndarray:
  """Corrects a [Z, Y, X] image with a log bias field fitted on its shrunk grid (`n4_log_bias`).

  The field is placed on the exact grid ``sitk.Shrink`` produced (same
  origin and spacing), resampled onto the image grid (linear, nearest-
  neighbour extrapolation at the borders), and ``image / exp(field)``
  returned as float32.
  """
  import SimpleITK as sitk
  img = _to_sitk(image, spacing)
  shrunk = sitk.Shrink(img, _shrink_factors(image.shape, shrink_factor))
  field = sitk.GetImageFromArray(np.ascontiguousarray(log_bias_shrunk, np.float32))
  if field.GetSize() != shrunk.GetSize():
    raise ValueError(f"log bias field of shape {log_bias_shrunk.shape} does not fit image {image.shape} "
                     f"shrunk by {shrink_factor}")
  field.CopyInformation(shrunk)
  f = sitk.ResampleImageFilter()
  f.SetReferenceImage(img)
  f.SetInterpolator(sitk.sitkLinear)
  f.SetUseNearestNeighborExtrapolator(True)
  full = sitk.GetArrayFromImage(f.Execute(field))
  return (np.asarray(image, np.float32) / np.exp(full)).astype(np.float32)


def _content_hash(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


class N4Cache:
  """On-disk cache of N4 log bias fields, keyed by (file content, `N4Params`, channel).

  Entries are small: the field on the shrunk grid (float32, shrink³ times
  smaller than the image), so a BraTS modality costs ~0.5 MB at shrink 4.
  Both a cache miss and a hit correct the image through the same
  `apply_log_bias` path, so cold and warm runs give identical arrays.
  Writes are atomic (temporary file + rename).
  """

  def __init__(self, cache_dir: str, params: N4Params = N4Params()):
    self.dir = os.path.abspath(cache_dir)
    self.params = params
    self.hits = 0
    self.misses = 0

  def key(self, path: str, channel: int = 0) -> str:
    blob = f"{_content_hash(path)}|{channel}|{self.params.key()}"
    return hashlib.sha256(blob.encode()).hexdigest()

  def correct(self, image: np.ndarray, spacing: Sequence[float], path: str, channel: int = 0) -> Tuple[np.ndarray, bool]:
    """N4-corrected ``image`` (read from ``path``); returns (corrected float32, cache hit?)."""
    key = self.key(path, channel)
    entry = os.path.join(self.dir, key[:2], key + ".npy")
    log_bias = None
    if os.path.exists(entry):
      try:
        log_bias = np.load(entry)
      except (OSError, ValueError):  # corrupt entry: recompute
        log_bias = None
    hit = log_bias is not None
    if log_bias is None:
      log_bias = n4_log_bias(image, spacing, self.params)
      os.makedirs(os.path.dirname(entry), exist_ok=True)
      tmp = f"{entry}.{os.getpid()}.tmp"
      with open(tmp, "wb") as f:
        np.save(f, log_bias)
      os.replace(tmp, entry)
    self.hits += hit
    self.misses += not hit
    return apply_log_bias(image, spacing, log_bias, self.params.shrink_factor), hit
