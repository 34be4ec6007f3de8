"""Discover data sets in their real on-disk layouts → `Patient` records (paths only, no pixels).

Only the Kaggle LGG layout (SPEC §1.2) is implemented for now::

    <root>/kaggle_3m/<PATIENT>/<PATIENT>_<n>.tif
    <root>/kaggle_3m/<PATIENT>/<PATIENT>_<n>_mask.tif

with PATIENT like ``TCGA_CS_4941_19960909``; its second token is the
contributing institution (the natural federated split). Pixels are read by
`fedjax_seg.data.io.load_lgg_patient`.
"""

from __future__ import annotations

import dataclasses
import os
import re

from fedjax_seg.data.io import DataError

PathLike = str | os.PathLike

# A patient folder: >= 2 alphanumeric tokens joined by '_' (excludes e.g. '__MACOSX', '.ipynb_checkpoints').
_PATIENT_DIR_RE = re.compile(r"^[A-Za-z0-9]+(?:_[A-Za-z0-9]+)+$")


@dataclasses.dataclass(frozen=True)
class Patient:
  """One patient's files.

  Attributes:
    id: folder name, e.g. ``TCGA_CS_4941_19960909``.
    site: contributing institution, the second token of ``id`` (``CS``).
    folder: absolute path of the patient folder.
    images: slice image paths, in numeric slice order n = 1, 2, ..., 10, ...
    masks: mask paths aligned with ``images``.
  """

  id: str
  site: str
  folder: str
  images: tuple[str, ...]
  masks: tuple[str, ...]


def lgg_patient(folder: PathLike) -> Patient:
  """Index one Kaggle LGG patient folder.

  Slices are ``<ID>_<n>.tif`` with masks ``<ID>_<n>_mask.tif`` where ID is
  the folder name; they are sorted by the integer n. Other files are ignored.

  Args:
    folder: the patient folder.
  Returns:
    `Patient` (``images`` may be empty; `find_lgg` and
    `io.load_lgg_patient` reject that).
  Raises:
    DataError: folder missing, an image without its mask or a mask without
      its image (names the file), or two files with the same slice number.
  """
  folder = os.path.abspath(os.fspath(folder))
  if not os.path.isdir(folder):
    raise DataError(folder, "patient folder does not exist")
  pid = os.path.basename(folder)
  tokens = pid.split("_")
  if len(tokens) < 2 or not tokens[1]:
    raise DataError(folder, f"patient folder name {pid!r} has no site token (expected e.g. TCGA_CS_4941_19960909)")
  slice_re = re.compile(rf"^{re.escape(pid)}_(\d+)(_mask)?\.tif$")
  images: dict[int, str] = {}
  masks: dict[int, str] = {}
  for name in sorted(os.listdir(folder)):
    m = slice_re.match(name)
    if m is None:
      continue
    n, table = int(m.group(1)), (masks if m.group(2) else images)
    path = os.path.join(folder, name)
    if n in table:
      raise DataError(path, f"duplicate slice number {n} (also {table[n]})")
    table[n] = path
  for n, path in images.items():
    if n not in masks:
      raise DataError(path, f"missing mask {pid}_{n}_mask.tif for this slice")
  for n, path in masks.items():
    if n not in images:
      raise DataError(path, f"mask has no image {pid}_{n}.tif")
  order = sorted(images)
  return Patient(id=pid, site=tokens[1], folder=folder,
                 images=tuple(images[n] for n in order), masks=tuple(masks[n] for n in order))


def find_lgg(root: PathLike) -> list[Patient]:
  """Find all Kaggle LGG patients under ``root``.

  Args:
    root: the folder containing ``kaggle_3m/``, or ``kaggle_3m`` itself.
      Non-patient entries (``data.csv``, ``README.md``, hidden folders) are
      ignored.
  Returns:
    Patients sorted by id, each with slices in numeric order.
  Raises:
    DataError: root missing, no patient folders, a patient folder without
      slices (names it), or any `lgg_patient` error.
  """
  root = os.path.abspath(os.fspath(root))
  if not os.path.isdir(root):
    raise DataError(root, "Kaggle LGG root does not exist or is not a folder")
  base = os.path.join(root, "kaggle_3m")
  if not os.path.isdir(base):
    base = root
  patients = []
  for name in sorted(os.listdir(base)):
    path = os.path.join(base, name)
    if not (_PATIENT_DIR_RE.match(name) and os.path.isdir(path)):
      continue
    patient = lgg_patient(path)
    if not patient.images:
      raise DataError(path, f"patient folder has no slices ({name}_<n>.tif)")
    patients.append(patient)
  if not patients:
    raise DataError(base, "no Kaggle LGG patient folders found (expected <root>/kaggle_3m/<PATIENT>/"
                          "<PATIENT>_<n>.tif, PATIENT like TCGA_CS_4941_19960909)")
  return sorted(patients, key=lambda p: p.id)
