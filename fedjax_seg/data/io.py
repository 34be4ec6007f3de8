"""Readers for on-disk medical images, with validation and clear errors.

Every problem with an input file raises `DataError`, whose message starts
with the offending path and says what is wrong, e.g.::

    DataError: /data/kaggle_3m/TCGA_CS_4941_19960909/TCGA_CS_4941_19960909_3_mask.tif:
    mask values must be in {0, 255}, found unexpected values [128]

Only the Kaggle LGG TIFF readers (SPEC §1.2) live here for now; NIfTI readers
for BraTS / ACDC belong here too.
"""

from __future__ import annotations

import os
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
