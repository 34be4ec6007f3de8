"""Readers for on-disk medical images, with validation and clear errors.

Every problem with an input file raises `DataError`, whose message starts
with the offending path and says what is wrong, e.g.::

    DataError: /data/kaggle_3m/TCGA_CS_4941_19960909/TCGA_CS_4941_19960909_3_mask.tif:
    mask values must be in {0, 255}, found unexpected values [128]

Kaggle LGG TIFF readers (SPEC §1.2) and NIfTI readers for BraTS (§1.1) and
ACDC (§1.3): `read_nifti_image`, `read_nifti_labels`, `load_brats_patient`,
`load_acdc_frame`. NIfTI volumes are returned as `Volume` with data in the
internal axis order [z, y, x] (the file's (x, y, z) reversed) and spacing in
the same order, which is what `fedjax_seg.metrics.hd95` expects.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:
  from fedjax_seg.data.layouts import Patient

PathLike = str | os.PathLike


class DataError(ValueError):
  """A data file or folder is missing, unreadable or malformed; the message names it."""

  def __init__(self, path: PathLike | None, problem: str):
    self.path = None if path is None else os.fspath(path)
    self.problem = problem
    super().__init__(problem if path is None else f"{self.path}: {problem}")


def _open_tiff(path: PathLike) -> Image.Image:
  """Open and fully decode a TIFF with Pillow; any failure becomes `DataError`."""
  if not os.path.exists(path):
    raise DataError(path, "cannot read TIFF: file does not exist")
  if not os.path.isfile(path):
    raise DataError(path, "cannot read TIFF: not a regular file")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # Pillow warns (then raises) on truncated files
      img = Image.open(path)
      img.load()
  except (OSError, UnidentifiedImageError, SyntaxError, ValueError, EOFError) as e:
    raise DataError(path, f"cannot read TIFF: {e}") from e
  if img.format != "TIFF":
    raise DataError(path, f"cannot read TIFF: file is {img.format or 'unknown format'}, not TIFF")
  return img


def read_lgg_image(path: PathLike) -> np.ndarray:
  """Read one Kaggle LGG slice.

  Args:
    path: ``<PATIENT>_<n>.tif``, an 8-bit RGB TIFF.
  Returns:
    uint8 [H, W, 3], channels (pre-contrast, FLAIR, post-contrast).
  Raises:
    DataError: unreadable / corrupt / truncated file, or not 3 x 8-bit channels.
  """
  img = _open_tiff(path)
  if img.mode != "RGB":
    bands = img.getbands()
    raise DataError(path, f"expected an 8-bit image with 3 channels (RGB: pre-contrast, FLAIR, "
                          f"post-contrast), got mode {img.mode!r} with {len(bands)} channel(s)")
  arr = np.asarray(img, dtype=np.uint8)
  if arr.ndim != 3 or arr.shape[2] != 3:  # pragma: no cover - guaranteed by mode RGB
    raise DataError(path, f"expected shape [H, W, 3], got {arr.shape}")
  return np.ascontiguousarray(arr)


def read_lgg_mask(path: PathLike) -> np.ndarray:
  """Read one Kaggle LGG mask and binarise it.

  Accepts 8-bit grayscale (values in {0, 255}), bilevel (mode '1') and RGB
  masks whose three channels are identical.

  Args:
    path: ``<PATIENT>_<n>_mask.tif``.
  Returns:
    uint8 [H, W] in {0, 1}.
  Raises:
    DataError: unreadable file, unsupported mode, differing RGB channels, or
      values outside {0, 255} (the message lists them).
  """
  img = _open_tiff(path)
  if img.mode == "1":
    return np.asarray(img, dtype=bool).astype(np.uint8)
  if img.mode == "L":
    arr = np.asarray(img, dtype=np.uint8)
  elif img.mode == "RGB":
    rgb = np.asarray(img, dtype=np.uint8)
    if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
      raise DataError(path, "mask has 3 channels that differ; expected a single-channel {0, 255} mask")
    arr = rgb[..., 0]
  else:
    raise DataError(path, f"expected an 8-bit single-channel mask, got mode {img.mode!r}")
  bad = np.setdiff1d(np.unique(arr), np.array([0, 255], np.uint8))
  if bad.size:
    shown = ", ".join(str(int(v)) for v in bad[:10]) + (", ..." if bad.size > 10 else "")
    raise DataError(path, f"mask values must be in {{0, 255}}, found unexpected values [{shown}] "
                          f"({int(np.isin(arr, bad).sum())} pixels)")
  return (arr == 255).astype(np.uint8)


def load_lgg_patient(patient: Patient | PathLike) -> tuple[np.ndarray, np.ndarray]:
  """Load all slices of one Kaggle LGG patient, in slice order.

  Args:
    patient: a `fedjax_seg.data.layouts.Patient`, or the path of a patient
      folder (its slices are then discovered with `layouts.lgg_patient`).
  Returns:
    (images uint8 [S, H, W, 3], masks uint8 [S, H, W] in {0, 1}).
  Raises:
    DataError: no slices (names the folder), image / mask size mismatch
      (names both files and shapes), slices of differing sizes, or any
      per-file problem of `read_lgg_image` / `read_lgg_mask`.
  """
  if isinstance(patient, (str, os.PathLike)):
    from fedjax_seg.data import layouts  # local import: layouts imports this module

    patient = layouts.lgg_patient(patient)
  if not patient.images:
    raise DataError(patient.folder, "patient folder has no slices (<PATIENT>_<n>.tif)")
  if len(patient.images) != len(patient.masks):
    raise DataError(patient.folder, f"{len(patient.images)} images but {len(patient.masks)} masks")
  images, masks = [], []
  for img_path, mask_path in zip(patient.images, patient.masks):
    img = read_lgg_image(img_path)
    mask = read_lgg_mask(mask_path)
    if img.shape[:2] != mask.shape:
      raise DataError(img_path, f"image shape {img.shape[:2]} does not match mask {mask_path} "
                                f"shape {mask.shape}")
    if images and img.shape != images[0].shape:
      raise DataError(img_path, f"slice shape {img.shape} differs from {patient.images[0]} "
                                f"shape {images[0].shape} of the same patient")
    images.append(img)
    masks.append(mask)
  return np.stack(images), np.stack(masks)


# ---------------------------------------------------------------------------
# NIfTI (BraTS, ACDC).
# ---------------------------------------------------------------------------
BRATS_LABELS = (0, 1, 2, 4)
ACDC_LABELS = (0, 1, 2, 3)


@dataclasses.dataclass(frozen=True)
class Volume:
  """One NIfTI volume in the internal axis order.

  Attributes:
    data: [Z, Y, X] (the file's (x, y, z) axes reversed, so ``data[k]`` is
      axial / short-axis slice k); float32 for images, uint8 for labels.
    affine: float64 [4, 4], the file's affine for *file* axes (x, y, z)
      (sform if set, else qform); write predictions back with
      ``data.transpose(2, 1, 0)`` and this affine.
    spacing: (dz, dy, dx) mm, in the order of ``data``'s axes.
    path: the file read.
  """

  data: np.ndarray
  affine: np.ndarray
  spacing: tuple[float, float, float]
  path: str


def _load_nifti_array(path: PathLike, what: str):
  """nibabel load + full decode; every failure becomes `DataError` naming ``path``."""
  import nibabel as nib  # local import: LGG-only users never need it

  if not os.path.exists(path):
    raise DataError(path, f"cannot read {what}: file does not exist")
  if not os.path.isfile(path):
    raise DataError(path, f"cannot read {what}: not a regular file")
  try:
    img = nib.load(os.fspath(path))
  except Exception as e:  # nibabel raises ImageFileError, gzip / zlib / OSError, ValueError ...
    raise DataError(path, f"cannot read NIfTI: {type(e).__name__}: {e}") from e
  shape = tuple(int(s) for s in img.shape)
  if len(shape) == 4 and shape[3] == 1:
    shape = shape[:3]
  if 0 in shape:
    raise DataError(path, f"zero-size volume: shape {shape}")
  if len(shape) != 3:
    kind = f"{len(shape)}D"
    raise DataError(path, f"expected a 3D volume (x, y, z), got a {kind} array of shape {shape}")
  try:
    raw = np.asarray(img.dataobj)
  except Exception as e:  # truncated / corrupt gzip stream, short file
    raise DataError(path, f"cannot read NIfTI voxel data (truncated or corrupt file?): "
                          f"{type(e).__name__}: {e}") from e
  raw = raw.reshape(shape)
  affine = img.affine
  if affine is None or not np.all(np.isfinite(affine)):
    raise DataError(path, "NIfTI header has no valid affine (qform / sform)")
  zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
  if not np.all(zooms > 0):
    raise DataError(path, f"NIfTI affine has zero voxel size {tuple(zooms)}")
  return raw, np.asarray(affine, np.float64), tuple(float(z) for z in zooms[::-1])


def read_nifti_image(path: PathLike) -> Volume:
  """Read one 3D NIfTI image (a BraTS modality or an ACDC frame).

  Returns:
    `Volume` with float32 data [Z, Y, X].
  Raises:
    DataError: missing / unreadable / truncated file, not 3D (a 2D image or
      4D series), zero size, or NaN / Inf voxels (counted in the message).
  """
  raw, affine, spacing = _load_nifti_array(path, "NIfTI image")
  data = np.asarray(raw, dtype=np.float32)
  finite = np.isfinite(data)
  if not finite.all():
    n_nan, n_inf = int(np.isnan(data).sum()), int(np.isinf(data).sum())
    raise DataError(path, f"image has non-finite voxels: {n_nan} NaN and {n_inf} Inf of {data.size}")
  return Volume(np.ascontiguousarray(data.transpose(2, 1, 0)), affine, spacing, os.fspath(path))


def read_nifti_labels(path: PathLike, allowed: tuple[int, ...]) -> Volume:
  """Read one 3D NIfTI label map and check its values.

  Args:
    path: e.g. ``..._seg.nii.gz`` (BraTS) or ``..._frameYY_gt.nii.gz`` (ACDC).
    allowed: the permitted label values, e.g. `BRATS_LABELS` = (0, 1, 2, 4).
  Returns:
    `Volume` with uint8 data [Z, Y, X].
  Raises:
    DataError: as `read_nifti_image`, plus non-integer values or labels
      outside ``allowed`` (listed with their voxel count).
  """
  raw, affine, spacing = _load_nifti_array(path, "NIfTI label map")
  data = np.asarray(raw)
  if not np.issubdtype(data.dtype, np.integer):
    data = data.astype(np.float64)
    if not np.isfinite(data).all():
      raise DataError(path, f"label map has {int((~np.isfinite(data)).sum())} NaN / Inf voxels")
    if not np.array_equal(data, np.round(data)):
      raise DataError(path, "label map has non-integer values (expected integer labels "
                            f"{set(allowed)})")
  values = np.unique(data)
  bad = np.setdiff1d(values, np.asarray(allowed))
  if bad.size:
    shown = ", ".join(str(int(v)) for v in bad[:10]) + (", ..." if bad.size > 10 else "")
    raise DataError(path, f"label values must be in {{{', '.join(map(str, allowed))}}}, found unexpected "
                          f"values [{shown}] ({int(np.isin(data, bad).sum())} voxels)")
  data = data.astype(np.uint8)
  return Volume(np.ascontiguousarray(data.transpose(2, 1, 0)), affine, spacing, os.fspath(path))


def _same_grid(vol: Volume, ref: Volume, what: str) -> None:
  if vol.data.shape != ref.data.shape:
    raise DataError(vol.path, f"{what} shape {vol.data.shape[::-1]} (x, y, z) does not match "
                              f"{ref.path} shape {ref.data.shape[::-1]}")
  if not np.allclose(vol.affine, ref.affine, rtol=0.0, atol=1e-3):
    raise DataError(vol.path, f"{what} affine differs from {ref.path} (not co-registered): "
                              f"{np.round(vol.affine[:3], 4).tolist()} vs {np.round(ref.affine[:3], 4).tolist()}")


def load_brats_patient(patient: Patient) -> tuple[np.ndarray, np.ndarray, Volume]:
  """Load one BraTS patient: four co-registered modalities and the seg.

  Args:
    patient: from `layouts.find_brats` (``images`` = flair, t1, t1ce, t2;
      ``masks`` = (seg,)).
  Returns:
    (images float32 [Z, Y, X, 4] (flair, t1, t1ce, t2), seg uint8 [Z, Y, X]
     with the raw labels {0, 1, 2, 4}, the flair `Volume` header (affine,
     spacing; its ``data`` is the flair channel)).
  Raises:
    DataError: any reader problem, modalities of different shapes or
      affines, or a seg whose size / affine does not match the images.
  """
  if len(patient.images) != 4 or len(patient.masks) != 1:
    raise DataError(patient.folder, f"expected 4 modalities and 1 seg, got {len(patient.images)} and "
                                    f"{len(patient.masks)}")
  vols = [read_nifti_image(p) for p in patient.images]
  for vol in vols[1:]:
    _same_grid(vol, vols[0], "modality")
  seg = read_nifti_labels(patient.masks[0], BRATS_LABELS)
  if seg.data.shape != vols[0].data.shape:
    raise DataError(seg.path, f"image/mask size mismatch: seg shape {seg.data.shape[::-1]} (x, y, z) but "
                              f"{vols[0].path} has shape {vols[0].data.shape[::-1]}")
  _same_grid(seg, vols[0], "seg")
  return np.stack([v.data for v in vols], axis=-1), seg.data, vols[0]


def load_acdc_frame(image_path: PathLike, gt_path: PathLike) -> tuple[Volume, Volume]:
  """Load one ACDC frame and its ground truth (labels 0 bg, 1 RV, 2 myocardium, 3 LV).

  Raises:
    DataError: reader problems, or image / gt size (or affine) mismatch.
  """
  image = read_nifti_image(image_path)
  gt = read_nifti_labels(gt_path, ACDC_LABELS)
  if gt.data.shape != image.data.shape:
    raise DataError(gt.path, f"image/mask size mismatch: gt shape {gt.data.shape[::-1]} (x, y, z) but "
                             f"{image.path} has shape {image.data.shape[::-1]}")
  _same_grid(gt, image, "ground truth")
  return image, gt


def warn_skip(error: DataError, what: str = "patient") -> None:
  """The warning printed (to stderr) when ``data.skip_bad_patients`` drops a bad input."""
  print(f"[data] WARNING: skipping bad {what}: {error}", file=sys.stderr, flush=True)
