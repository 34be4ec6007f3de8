"""Loaders for the NIfTI layouts: BraTS 2020 (SPEC §1.1) and ACDC (§1.3).

Importing this module registers ``data.layout = 'brats'`` and ``'acdc'`` with
`fedjax_seg.data.pipeline` (``build_dataset`` imports it on demand). Each
loader returns *preprocessed* records, per patient::

    files --(layouts.find_*, io.load_*)--> raw volumes [Z, Y, X(, C)], spacing (dz, dy, dx)
      -> [N4, cached]          data.n4.enabled: SimpleITK N4 per channel (Otsu mask)
      -> [resample]            data.target_spacing = (dz, dy, dx) mm; 0 / None keeps an axis
      -> in-plane size         crop / pad to data.image_size if resampled, else resize (seed 001)
      -> [z crop]              3D: data.depth slices centred on the foreground (0 = keep all)
      -> normalise             data.normalize: 'slice_max' | 'max' | 'zscore' | 'none'
      -> labels                BraTS {0, 1, 2, 4} -> {0, 1, 2, 3}; ACDC 0..3 unchanged
      -> samples               2D (data.ndim = 2): the axial / short-axis slices [S, H, W, C]
                               3D (data.ndim = 3): whole volumes [1 or #frames, D, H, W, C]

and reports the voxel spacing of every patient's preprocessed grid (used for
HD95 in mm). Bad patients raise `io.DataError`, or with
``data.skip_bad_patients = True`` are skipped with a printed warning.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from fedjax_seg.data import io, layouts, pipeline, preprocess
from fedjax_seg.metrics import BRATS_CLASS_NAMES

ACDC_CLASS_NAMES = ("background", "RV", "myocardium", "LV")

# BraTS label -> training class (4 -> 3; there is no label 3 in BraTS).
_BRATS_LUT = np.array([0, 1, 2, 255, 3], np.uint8)

Record = Tuple[str, str, np.ndarray, np.ndarray]


def remap_brats_labels(seg: np.ndarray) -> np.ndarray:
  """BraTS labels {0, 1, 2, 4} -> training classes {0, 1, 2, 3} (uint8).

  Raises ValueError on any other value (validated files never have one).
  """
  seg = np.asarray(seg)
  bad = np.setdiff1d(np.unique(seg), np.asarray(io.BRATS_LABELS))
  if bad.size:
    raise ValueError(f"BraTS labels must be in {io.BRATS_LABELS}, got {bad.tolist()}")
  return _BRATS_LUT[seg.astype(np.intp)]


@dataclasses.dataclass(frozen=True)
class VolumeOptions:
  """The ``config.data`` keys the volume loaders read. ``from_config`` reads each from
  the config (configs/brats_3d_centralized.py, configs/acdc_centralized.py hold them);
  the field defaults (in brackets) serve code that builds options directly.

  ndim [2], image_size [128], depth [0 = all slices], target_spacing
  [() = none], normalize ['zscore'], n4 (ConfigDict: enabled [False],
  shrink_factor, iterations, convergence_threshold, otsu_bins,
  control_points, cache_dir ['' -> <cache_dir>/n4]), skip_bad_patients
  [False], min_foreground_fraction [0.0] (2D: drop slices whose non-zero
  area is smaller), frames [('ED', 'ES')] (ACDC), verbose [True].
  """
  ndim: int = 2
  image_size: int = 128
  depth: int = 0
  target_spacing: Tuple[Optional[float], ...] = ()
  normalize: str = "zscore"
  n4: Optional[preprocess.N4Params] = None
  n4_cache_dir: str = ""
  skip_bad_patients: bool = False
  min_foreground_fraction: float = 0.0
  frames: Tuple[str, ...] = ("ED", "ES")
  verbose: bool = True

  @classmethod
  def from_config(cls, data_cfg) -> "VolumeOptions":
    get = data_cfg.get
    ndim = int(data_cfg.ndim)
    if ndim not in (2, 3):
      raise ValueError(f"config.data.ndim={ndim}: expected 2 (slices) or 3 (volumes)")
    n4_cfg = data_cfg.n4
    n4 = None
    cache_dir = ""
    if n4_cfg.enabled:
      n4 = preprocess.N4Params.from_config(n4_cfg)
      from fedjax_seg import caches
      cache_dir = n4_cfg.cache_dir or os.path.join(caches.data_dir(data_cfg.cache_dir), "n4")
    target = tuple(data_cfg.target_spacing or ())
    if target and len(target) != 3:
      raise ValueError(f"config.data.target_spacing={target}: expected (dz, dy, dx) mm (0 keeps an axis)")
    frames = tuple(data_cfg.frames) if data_cfg.layout == "acdc" else ()  # an ACDC key
    for f in frames:
      if f not in ("ED", "ES"):
        raise ValueError(f"config.data.frames={frames}: entries must be 'ED' or 'ES'")
    depth = int(data_cfg.depth)
    if depth < 0:
      raise ValueError(f"config.data.depth={depth} must be >= 0 (0 keeps every slice)")
    return cls(ndim=ndim, image_size=int(data_cfg.image_size), depth=depth,
               target_spacing=tuple(None if (t is None or t <= 0) else float(t) for t in target),
               normalize=data_cfg.normalize, n4=n4, n4_cache_dir=cache_dir,
               skip_bad_patients=bool(data_cfg.skip_bad_patients),
               min_foreground_fraction=float(data_cfg.min_foreground_fraction),
               frames=frames, verbose=bool(get("verbose", True)))


@dataclasses.dataclass(frozen=True)
class VolumeGeometry:
  """Where the network grid of `prepare_volume` lies in the input volume.

  The training loaders and inference share `prepare_volume`; inference then
  maps its prediction back with `restore_geometry`, so the mask lies on the
  input's voxel grid.

  Attributes:
    input_shape, input_spacing: the input grid (Z, Y, X), (dz, dy, dx) mm.
    mode: 'resample' (``target_spacing``: resampled, then in-plane crop /
      pad), 'resize' (in-plane bilinear resize to ``image_size``) or 'none'.
    grid_shape, grid_spacing: the grid after resampling / resizing, before
      the crops.
    windows: per axis (src_lo, dst_lo, length) from the grid to the network
      grid (`preprocess.crop_or_pad_window`): in-plane crop / pad
      ('resample') and the 3D ``depth`` crop / pad along z.
    shape, spacing: the network grid (Z', S, S) and its spacing.
  """
  input_shape: Tuple[int, int, int]
  input_spacing: Tuple[float, float, float]
  mode: str
  grid_shape: Tuple[int, int, int]
  grid_spacing: Tuple[float, float, float]
  windows: Tuple[Tuple[int, int, int], ...]
  shape: Tuple[int, int, int]
  spacing: Tuple[float, float, float]


def prepare_volume(images: np.ndarray, labels: Optional[np.ndarray], spacing: Sequence[float],
                   opts: VolumeOptions):
  """The one volume preprocessing (after N4) of training, evaluation and inference.

  Resample (``target_spacing``) then crop / pad in-plane to ``image_size``
  around the centre of the non-zero bounding box, or resize in-plane to
  ``image_size`` without a target spacing; 3D with ``depth``: crop / pad z
  around the non-zero centre; then normalise (``normalize``; ``zscore``
  statistics over the cropped grid, i.e. exactly what the network sees).

  Args:
    images: float32 [Z, Y, X, C]; labels: uint8 [Z, Y, X] (training classes)
      or None (inference).
    spacing: (dz, dy, dx) mm.
  Returns:
    (images float32 [Z', S, S, C], labels uint8 [Z', S, S] or None,
    `VolumeGeometry`), S = ``opts.image_size``, Z' = ``opts.depth`` for 3D
    (if set).
  """
  spacing = tuple(float(s) for s in spacing)
  input_shape = tuple(int(n) for n in images.shape[:3])
  size = opts.image_size
  grid_spacing = spacing
  if opts.target_spacing:
    mode = "resample"
    images, grid_spacing = preprocess.resample_volume(images, spacing, opts.target_spacing)
    if labels is not None:
      labels, _ = preprocess.resample_volume(labels, spacing, opts.target_spacing, is_label=True)
  elif images.shape[1:3] != (size, size):
    mode = "resize"
    h, w = images.shape[1:3]
    dummy = np.zeros(images.shape[:3], np.uint8) if labels is None else labels
    images, resized = preprocess.resize_slices(images, dummy, size)
    labels = None if labels is None else resized
    grid_spacing = (spacing[0], spacing[1] * h / size, spacing[2] * w / size)
  else:
    mode = "none"
  grid_shape = tuple(int(n) for n in images.shape[:3])
  grid_spacing = tuple(float(s) for s in grid_spacing)
  windows = [(0, 0, n) for n in grid_shape]
  if mode == "resample":
    c = preprocess.foreground_center(images.max(axis=-1) > 0)
    windows[1:] = [preprocess.crop_or_pad_window(grid_shape[a], size, c[a]) for a in (1, 2)]
  out_shape = [grid_shape[0]] + [size if mode == "resample" else grid_shape[a] for a in (1, 2)]
  images = preprocess.apply_windows(images, windows, out_shape)
  if labels is not None:
    labels = preprocess.apply_windows(labels, windows, out_shape)
  if opts.ndim == 3 and opts.depth:
    c = preprocess.foreground_center(images.max(axis=-1) > 0)
    zw = preprocess.crop_or_pad_window(out_shape[0], opts.depth, c[0])
    images = preprocess.apply_windows(images, [zw], (opts.depth,))
    if labels is not None:
      labels = preprocess.apply_windows(labels, [zw], (opts.depth,))
    windows[0] = zw
    out_shape[0] = opts.depth
  images = preprocess.normalize_volume(images, opts.normalize)
  geo = VolumeGeometry(input_shape, spacing, mode, grid_shape, grid_spacing,
                       tuple(tuple(int(v) for v in w) for w in windows), tuple(out_shape), grid_spacing)
  return images.astype(np.float32), None if labels is None else labels.astype(np.uint8), geo


def preprocess_volume(images: np.ndarray, labels: np.ndarray, spacing: Sequence[float],
                      opts: VolumeOptions) -> Tuple[np.ndarray, np.ndarray, Tuple[float, float, float]]:
  """`prepare_volume` for the training loaders: (images, labels, spacing of the new grid)."""
  images, labels, geo = prepare_volume(images, labels, spacing, opts)
  return images, labels, geo.spacing


def _resize_inplane(p: np.ndarray, hw: Tuple[int, int]) -> np.ndarray:
  """Bilinear in-plane resize of [S, h, w, K] -> [S, H, W, K] (Pillow, as `preprocess.resize_slices`).

  Kept on Pillow, not `preprocess.resize_stack`: that one agrees to ~1e-6, but on one-hot
  probabilities many voxels are exact ties between two classes, and those differences flip
  their argmax (tests/test_volumes.py, the in-plane resize case: class-2 Dice 0.83 instead
  of 0.89, below the test's 0.85)."""
  from PIL import Image
  if p.shape[1:3] == tuple(hw):
    return p
  out = np.empty((p.shape[0],) + tuple(hw) + (p.shape[-1],), np.float32)
  for s in range(p.shape[0]):
    for k in range(p.shape[-1]):
      out[s, :, :, k] = np.asarray(Image.fromarray(p[s, :, :, k].astype(np.float32), mode="F").resize(
          (hw[1], hw[0]), Image.BILINEAR))
  return out


def restore_geometry(probs: np.ndarray, geo: VolumeGeometry) -> np.ndarray:
  """Maps class probabilities [Z', S, S, K] on the network grid back onto the input grid [Z, Y, X, K].

  Inverse of `prepare_volume`'s steps: the crop windows are put back in
  place (voxels outside the training crop get background, probability 1 for
  class 0; padding is dropped), then the grid is resampled (linear) or
  resized (bilinear) back to the input grid.
  """
  probs = np.asarray(probs, np.float32)
  if tuple(probs.shape[:3]) != tuple(geo.shape):
    raise ValueError(f"probabilities {probs.shape[:3]} are not on the network grid {geo.shape}")
  k = probs.shape[-1]
  out = np.zeros(tuple(geo.grid_shape) + (k,), np.float32)
  out[..., 0] = 1.0
  dst = tuple(slice(s, s + n) for s, _, n in geo.windows)   # grid side
  src = tuple(slice(d, d + n) for _, d, n in geo.windows)   # network side
  out[dst] = probs[src]
  z, h, w = geo.input_shape
  if geo.mode == "resample":
    out, _ = preprocess.resample_volume(out, geo.grid_spacing, geo.input_spacing)
    if out.shape[:3] != (z, h, w):  # rounding safety net: never expected
      out = preprocess.apply_windows(out, [(0, 0, min(a, b)) for a, b in zip(out.shape[:3], (z, h, w))],
                                     (z, h, w))
  elif geo.mode == "resize":
    out = _resize_inplane(out, (h, w))
  return out


def _keep_slices(images: np.ndarray, labels: np.ndarray, fraction: float):
  """2D: drop slices whose non-zero (any channel) area is below ``fraction``."""
  if fraction <= 0:
    return images, labels
  area = (np.abs(images).max(axis=-1) > 0).mean(axis=(1, 2))
  keep = area >= fraction
  return images[keep], labels[keep]


class _Progress:
  """N4 progress lines: one per patient, then a summary (stdout); on a terminal also a
  rich bar with ETA (`fedjax_seg.progress.Bar`)."""

  def __init__(self, what: str, total: int, cache: Optional[preprocess.N4Cache], verbose: bool):
    from fedjax_seg import progress
    self.what, self.total, self.cache, self.verbose = what, total, cache, verbose
    self.t0 = time.time()
    self.bar = progress.Bar(total, f"[n4] {what}", enabled=None if cache is not None and verbose else False)

  def patient(self, i: int, pid: str, hits: int, misses: int, seconds: float) -> None:
    if self.cache is not None and self.verbose:
      print(f"[n4] {i}/{self.total} {pid}: {hits + misses} volumes, {hits} from cache, {misses} fitted "
            f"({seconds:.1f}s)", flush=True)
    self.bar.update(i, pid)

  def done(self) -> None:
    self.bar.close()
    if self.cache is not None and self.verbose:
      c = self.cache
      print(f"[n4] {self.what}: {c.hits + c.misses} volumes, {c.hits} from cache, {c.misses} fitted in "
            f"{time.time() - self.t0:.1f}s (cache {c.dir})", flush=True)


def n4_channels(cache: Optional[preprocess.N4Cache], images: np.ndarray, spacing, paths: Sequence[str],
                 channel_of_path: Optional[Sequence[int]] = None) -> Tuple[np.ndarray, int, int]:
  """N4 per channel of [Z, Y, X, C] (channel c read from paths[c]); returns (images, hits, misses)."""
  if cache is None:
    return images, 0, 0
  hits = misses = 0
  out = np.empty_like(images, dtype=np.float32)
  for c in range(images.shape[-1]):
    out[..., c], hit = cache.correct(images[..., c], spacing, paths[c],
                                     0 if channel_of_path is None else channel_of_path[c])
    hits += hit
    misses += not hit
  return out, hits, misses


def _skip_or_raise(err: io.DataError, opts: VolumeOptions) -> None:
  if not opts.skip_bad_patients:
    raise err
  io.warn_skip(err)


def _finish(layout: str, root: str, records: List[Record], n_seen: int, class_names, spacing, opts):
  if not records:
    raise io.DataError(root, f"no usable {layout} patients: all {n_seen} were skipped as bad input")
  return records, class_names, {"preprocessed": True, "spacing": spacing}


def load_brats(root: str, data_cfg) -> Tuple[List[Record], Tuple[str, ...], Dict]:
  """``data.layout = 'brats'``: records (id, site, x, y) with 4 channels (flair, t1, t1ce, t2).

  2D: x float32 [S, H, W, 4], y [S, H, W]; 3D: x [1, D, H, W, 4], y [1, D, H, W]
  (y in {0, 1, 2, 3}, BraTS 4 remapped to 3). Site = the contributing site
  from ``name_mapping.csv`` (``other`` when absent).
  """
  opts = VolumeOptions.from_config(data_cfg)
  on_error = io.warn_skip if opts.skip_bad_patients else None
  patients = layouts.find_brats(root, on_error=on_error)
  cache = preprocess.N4Cache(opts.n4_cache_dir, opts.n4) if opts.n4 is not None else None
  progress = _Progress("BraTS", len(patients), cache, opts.verbose)
  records, spacing = [], {}
  for i, p in enumerate(patients, start=1):
    t0 = time.time()
    try:
      images, seg, ref = io.load_brats_patient(p)
      images, hits, misses = n4_channels(cache, images, ref.spacing, p.images)
    except io.DataError as e:
      _skip_or_raise(e, opts)
      continue
    progress.patient(i, p.id, hits, misses, time.time() - t0)
    x, y, sp = preprocess_volume(images, remap_brats_labels(seg), ref.spacing, opts)
    if opts.ndim == 2:
      x, y = _keep_slices(x, y, opts.min_foreground_fraction)
      if not len(x):
        _skip_or_raise(io.DataError(p.folder, "no slice left after min_foreground_fraction filtering"), opts)
        continue
    else:
      x, y = x[None], y[None]
    records.append((p.id, p.site, x, y))
    spacing[p.id] = sp
  progress.done()
  return _finish("BraTS", root, records, len(patients), BRATS_CLASS_NAMES, spacing, opts)


def load_acdc(root: str, data_cfg) -> Tuple[List[Record], Tuple[str, ...], Dict]:
  """``data.layout = 'acdc'``: records per patient from its ED / ES frames (``data.frames``).

  2D: x float32 [S, H, W, 1] = the short-axis slices of all chosen frames
  (ED slices then ES slices), y [S, H, W] in {0 bg, 1 RV, 2 myocardium,
  3 LV}; 3D: x [#frames, D, H, W, 1]. Site = the pathology Group of
  ``Info.cfg`` (NOR, MINF, DCM, HCM, RV), so ``fl.partition = 'by_site'``
  is the by-pathology split. In-plane only resampling: set
  ``data.target_spacing = (0, dy, dx)``.
  """
  opts = VolumeOptions.from_config(data_cfg)
  on_error = io.warn_skip if opts.skip_bad_patients else None
  patients = layouts.find_acdc(root, frames=opts.frames, on_error=on_error)
  cache = preprocess.N4Cache(opts.n4_cache_dir, opts.n4) if opts.n4 is not None else None
  progress = _Progress("ACDC", len(patients), cache, opts.verbose)
  records, spacing = [], {}
  for i, p in enumerate(patients, start=1):
    t0 = time.time()
    xs, ys, sp = [], [], None
    n_hits = n_misses = 0
    try:
      for image_path, gt_path in zip(p.images, p.masks):
        image, gt = io.load_acdc_frame(image_path, gt_path)
        x, hits, misses = n4_channels(cache, image.data[..., None], image.spacing, [image_path])
        n_hits, n_misses = n_hits + hits, n_misses + misses
        x, y, sp_frame = preprocess_volume(x, gt.data, image.spacing, opts)
        if sp is not None and xs and x.shape != xs[0].shape:
          raise io.DataError(image_path, f"frame grid {x.shape} differs from {p.images[0]} {xs[0].shape}")
        xs.append(x)
        ys.append(y)
        sp = sp_frame
    except io.DataError as e:
      _skip_or_raise(e, opts)
      continue
    progress.patient(i, p.id, n_hits, n_misses, time.time() - t0)
    if opts.ndim == 2:
      x, y = _keep_slices(np.concatenate(xs), np.concatenate(ys), opts.min_foreground_fraction)
    else:
      x, y = np.stack(xs), np.stack(ys)
    records.append((p.id, p.site, x, y))
    spacing[p.id] = sp
  progress.done()
  return _finish("ACDC", root, records, len(patients), ACDC_CLASS_NAMES, spacing, opts)


pipeline.register_loader("brats", load_brats)
pipeline.register_loader("acdc", load_acdc)
