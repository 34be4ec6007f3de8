"""Discover data sets in their real on-disk layouts → `Patient` records (paths only, no pixels).

Kaggle LGG (SPEC §1.2)::

    <root>/kaggle_3m/<PATIENT>/<PATIENT>_<n>.tif
    <root>/kaggle_3m/<PATIENT>/<PATIENT>_<n>_mask.tif

with PATIENT like ``TCGA_CS_4941_19960909``; its second token is the
contributing institution (the natural federated split).

BraTS 2020 (SPEC §1.1)::

    <root>[/MICCAI_BraTS2020_TrainingData]/BraTS20_Training_XXX/BraTS20_Training_XXX_{flair,t1,t1ce,t2,seg}.nii[.gz]
    <root>[/MICCAI_BraTS2020_TrainingData]/name_mapping.csv       (optional: the site)

ACDC (SPEC §1.3)::

    <root>[/database][/training]/patientXXX/Info.cfg
    <root>[/database][/training]/patientXXX/patientXXX_frameYY[_gt].nii[.gz]

Pixels are read by `fedjax_seg.data.io` (`load_lgg_patient`,
`load_brats_patient`, `load_acdc_frame`). Every ``find_*`` takes an optional
``on_error(DataError)``: when given, a bad patient folder is reported to it
and skipped instead of raising (``data.skip_bad_patients``).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from typing import Optional

from fedjax_seg.data.io import DataError

OnError = Optional[Callable[[DataError], None]]

PathLike = str | os.PathLike

# The site of a patient whose contributing institution is unknown (BraTS without
# ``name_mapping.csv``, or with ``NA`` as its TCIA id). `partition.by_site`
# refuses a data set where every patient has it.
UNKNOWN_SITE = "other"

# A patient folder: >= 2 alphanumeric tokens joined by '_' (excludes e.g. '__MACOSX', '.ipynb_checkpoints').
_PATIENT_DIR_RE = re.compile(r"^[A-Za-z0-9]+(?:_[A-Za-z0-9]+)+$")


@dataclasses.dataclass(frozen=True)
class Patient:
  """One patient's files.

  Attributes:
    id: folder name, e.g. ``TCGA_CS_4941_19960909``, ``BraTS20_Training_001``,
      ``patient001``.
    site: what the by-site federated split uses: the LGG institution (the
      second token of ``id``, ``CS``), the BraTS contributing site (from
      ``name_mapping.csv``), the ACDC pathology group (``DCM``, ...).
    folder: absolute path of the patient folder.
    images: LGG: slice image paths, in numeric slice order n = 1, 2, ..., 10, ...;
      BraTS: the modalities (flair, t1, t1ce, t2); ACDC: the frames (ED, ES).
    masks: paths aligned with ``images`` (BraTS: just the seg).
    meta: extra per-patient facts (ACDC: the parsed ``Info.cfg``; BraTS:
      ``Grade``), not part of equality.
  """

  id: str
  site: str
  folder: str
  images: tuple[str, ...]
  masks: tuple[str, ...]
  meta: Mapping[str, object] = dataclasses.field(default_factory=dict, compare=False, hash=False)


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
      its image (names the file), two files with the same slice number, or
      a ``<ID>_<index>.tif`` whose index is not an integer.
  """
  folder = _existing_folder(folder, "patient folder does not exist")
  pid = os.path.basename(folder)
  tokens = pid.split("_")
  if len(tokens) < 2 or not tokens[1]:
    raise DataError(folder, f"patient folder name {pid!r} has no site token (expected e.g. TCGA_CS_4941_19960909)")
  slice_re = re.compile(rf"^{re.escape(pid)}_(\d+)(_mask)?\.tif$")
  any_slice_re = re.compile(rf"^{re.escape(pid)}_(.+?)(_mask)?\.tif$")
  images: dict[int, str] = {}
  masks: dict[int, str] = {}
  for name in sorted(os.listdir(folder)):
    m = slice_re.match(name)
    if m is None:
      bad = any_slice_re.match(name)
      if bad is not None:  # <ID>_<something>.tif: a slice file whose index is not a number
        raise DataError(os.path.join(folder, name), f"non-numeric slice index {bad.group(1)!r} "
                                                    f"(expected {pid}_<n>.tif with integer n)")
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


def find_lgg(root: PathLike, on_error: OnError = None) -> list[Patient]:
  """Find all Kaggle LGG patients under ``root``.

  Args:
    root: the folder containing ``kaggle_3m/``, or ``kaggle_3m`` itself.
      Non-patient entries (``data.csv``, ``README.md``, hidden folders) are
      ignored.
    on_error: if given, called with the `DataError` of a bad patient folder,
      which is then skipped (otherwise the error is raised).
  Returns:
    Patients sorted by id, each with slices in numeric order.
  Raises:
    DataError: root missing, no (usable) patient folders, a patient folder
      without slices (names it), or any `lgg_patient` error.
  """
  root = _existing_folder(root, "Kaggle LGG root does not exist or is not a folder")
  base = os.path.join(root, "kaggle_3m")
  if not os.path.isdir(base):
    base = root

  def index(path, name):
    patient = lgg_patient(path)
    if not patient.images:
      raise DataError(path, f"patient folder has no slices ({name}_<n>.tif)")
    return patient

  patients = _scan(base, _PATIENT_DIR_RE, "Kaggle LGG", index, on_error)
  if not patients:
    raise DataError(base, "no Kaggle LGG patient folders found (expected <root>/kaggle_3m/<PATIENT>/"
                          "<PATIENT>_<n>.tif, PATIENT like TCGA_CS_4941_19960909)")
  return sorted(patients, key=lambda p: p.id)


def _existing_folder(path: PathLike, problem: str) -> str:
  """``path`` made absolute; `DataError` ``problem`` unless it is a folder."""
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise DataError(path, problem)
  return path


def _patient_folder(folder: PathLike, expected: str) -> tuple[str, str]:
  """(absolute folder, patient id = its name); `DataError` if it is missing or empty
  (``expected``, with ``{pid}`` for the id, says what it should hold)."""
  folder = _existing_folder(folder, "patient folder does not exist")
  pid = os.path.basename(folder)
  if not os.listdir(folder):
    raise DataError(folder, f"empty patient folder (expected {expected.format(pid=pid)})")
  return folder, pid


def _scan(base: str, pattern: re.Pattern, what: str, index: Callable[[str, str], Patient],
          on_error: OnError) -> list[Patient]:
  """``index(path, name)`` of each folder of ``base`` whose name matches ``pattern``, in name order.

  A `DataError` of one folder goes to ``on_error`` (the folder is skipped) when it is given, else
  it is raised; when every folder was skipped that is a `DataError` of ``base``.
  """
  patients, skipped = [], 0
  for name in sorted(os.listdir(base)):
    path = os.path.join(base, name)
    if not (pattern.match(name) and os.path.isdir(path)):
      continue
    try:
      patients.append(index(path, name))
    except DataError as e:
      if on_error is None:
        raise
      on_error(e)
      skipped += 1
  if skipped and not patients:
    raise DataError(base, f"no usable {what} patient: all {skipped} skipped as bad input")
  return patients


# ---------------------------------------------------------------------------
# BraTS 2020.
# ---------------------------------------------------------------------------
BRATS_MODALITIES = ("flair", "t1", "t1ce", "t2")
_BRATS_DIR_RE = re.compile(r"^BraTS[A-Za-z0-9]*_[A-Za-z0-9_]*\d+$")
NIFTI_EXTS = (".nii.gz", ".nii")


def _nifti_path(folder: str, stem: str) -> Optional[str]:
  """``folder/stem.nii.gz`` or ``folder/stem.nii`` (first that exists), else None."""
  for ext in NIFTI_EXTS:
    path = os.path.join(folder, stem + ext)
    if os.path.isfile(path):
      return path
  return None


def _present_files(folder: str, limit: int = 12) -> str:
  """``'a.nii.gz, b.nii.gz'`` (sorted, at most ``limit`` names) of what ``folder`` holds, for error messages."""
  try:
    names = sorted(os.listdir(folder))
  except OSError:
    return "(folder unreadable)"
  if not names:
    return "(nothing)"
  shown = ", ".join(names[:limit])
  return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _missing(folder: str, expected: str, problem: str) -> DataError:
  """A one-line `DataError` for a missing file: names it and lists what the patient folder holds."""
  return DataError(os.path.join(folder, expected),
                   f"{problem}; {os.path.basename(folder)}/ holds: {_present_files(folder)}")


# Known misnamed files of the official data sets: patient id -> accepted stems of
# its seg file besides ``<ID>_seg``. The Kaggle copy of BraTS 2020 names patient
# 355's label map ``W39_1998.09.19_Segm.nii``.
BRATS_SEG_ALIASES: Mapping[str, tuple[str, ...]] = {
    "BraTS20_Training_355": ("W39_1998.09.19_Segm",),
}


def brats_seg_path(folder: str, pid: str) -> Optional[str]:
  """The seg file of a BraTS patient folder: ``<ID>_seg.nii[.gz]``, else a `BRATS_SEG_ALIASES` name, else None."""
  for stem in (f"{pid}_seg",) + tuple(BRATS_SEG_ALIASES.get(pid, ())):
    path = _nifti_path(folder, stem)
    if path is not None:
      return path
  return None


def brats_site_table(base: str) -> dict[str, dict[str, str]]:
  """``name_mapping.csv`` of a BraTS folder → {BraTS id: {'site', 'grade'}} ({} if absent).

  The site is the institution token of ``TCGA_TCIA_subject_ID``
  (``TCGA-CS-4941`` → ``CS``, ``TCGA-02-0006`` → ``02``); patients without
  a TCIA id (``NA``) get site `UNKNOWN_SITE` (``other``).
  """
  path = os.path.join(base, "name_mapping.csv")
  if not os.path.isfile(path):
    return {}
  table = {}
  try:
    with open(path, newline="") as f:
      for row in csv.DictReader(f):
        pid = (row.get("BraTS_2020_subject_ID") or "").strip()
        if not pid:
          continue
        tcia = (row.get("TCGA_TCIA_subject_ID") or "").strip()
        tokens = tcia.split("-")
        site = tokens[1] if len(tokens) >= 3 and tokens[1] else UNKNOWN_SITE
        table[pid] = {"site": site, "grade": (row.get("Grade") or "").strip()}
  except (OSError, csv.Error, UnicodeDecodeError) as e:
    raise DataError(path, f"cannot read name_mapping.csv: {e}") from e
  return table


def brats_patient(folder: PathLike, site: str = UNKNOWN_SITE, require_seg: bool = True) -> Patient:
  """Index one BraTS patient folder ``<ID>/<ID>_{flair,t1,t1ce,t2,seg}.nii[.gz]``.

  The seg may also have a known alias name (`BRATS_SEG_ALIASES`: patient
  355's ``W39_1998.09.19_Segm.nii``).

  Raises:
    DataError: folder missing or empty, a missing modality or seg (names the
      expected file and lists the files the folder holds).
  """
  folder, pid = _patient_folder(folder, "{pid}_{{flair,t1,t1ce,t2,seg}}.nii.gz")
  images = []
  for modality in BRATS_MODALITIES:
    path = _nifti_path(folder, f"{pid}_{modality}")
    if path is None:
      raise _missing(folder, f"{pid}_{modality}.nii.gz",
                     f"missing modality {modality!r} (neither .nii.gz nor .nii exists); BraTS needs "
                     f"{', '.join(BRATS_MODALITIES)}")
    images.append(path)
  seg = brats_seg_path(folder, pid)
  if seg is None and require_seg:
    aliases = BRATS_SEG_ALIASES.get(pid, ())
    also = f" (nor its known alias {', '.join(a + '.nii[.gz]' for a in aliases)})" if aliases else ""
    raise _missing(folder, f"{pid}_seg.nii.gz", f"missing segmentation (seg) file{also}")
  return Patient(id=pid, site=site, folder=folder, images=tuple(images),
                 masks=(seg,) if seg else ())


def _brats_base(root: str) -> str:
  for sub in ("MICCAI_BraTS2020_TrainingData", os.path.join("BraTS2020_TrainingData",
                                                            "MICCAI_BraTS2020_TrainingData")):
    if os.path.isdir(os.path.join(root, sub)):
      return os.path.join(root, sub)
  return root


def find_brats(root: PathLike, on_error: OnError = None) -> list[Patient]:
  """Find all BraTS patients under ``root``.

  Args:
    root: the folder holding ``BraTS20_Training_XXX/`` folders, or a parent
      with ``MICCAI_BraTS2020_TrainingData/`` (optionally under
      ``BraTS2020_TrainingData/``). Other entries are ignored.
    on_error: see module docstring.
  Returns:
    Patients sorted by id; ``site`` from ``name_mapping.csv`` (`UNKNOWN_SITE`
    without it), ``meta['grade']`` HGG / LGG when known.
  Raises:
    DataError: root missing, no patient folders, or a bad patient folder
      (empty, missing modality or seg) unless ``on_error`` is given.
  """
  root = _existing_folder(root, "BraTS root does not exist or is not a folder")
  base = _brats_base(root)
  sites = brats_site_table(base)

  def index(path, name):
    info = sites.get(name, {})
    p = brats_patient(path, site=info.get("site", UNKNOWN_SITE))
    return dataclasses.replace(p, meta={"grade": info.get("grade", "")})

  patients = _scan(base, _BRATS_DIR_RE, "BraTS", index, on_error)
  if not patients:
    raise DataError(base, "no BraTS patient folders found (expected <root>/BraTS20_Training_XXX/"
                          "BraTS20_Training_XXX_{flair,t1,t1ce,t2,seg}.nii.gz)")
  return patients


# ---------------------------------------------------------------------------
# ACDC.
# ---------------------------------------------------------------------------
_ACDC_DIR_RE = re.compile(r"^patient\d+$")
ACDC_INFO_INT = ("ED", "ES", "NbFrame")
ACDC_INFO_FLOAT = ("Height", "Weight")


def read_info_cfg(path: PathLike) -> dict[str, object]:
  """Parse an ACDC ``Info.cfg`` (``key: value`` lines).

  Returns:
    {'ED': int, 'ES': int, 'Group': str, 'Height': float, 'NbFrame': int,
     'Weight': float} (keys present in the file; ED, ES and Group required).
  Raises:
    DataError: file missing / unreadable, a malformed line, ED / ES / Group
      missing, or a non-integer ED / ES / NbFrame (names the key).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise DataError(path, "missing Info.cfg (needs ED, ES and Group)")
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(path, f"cannot read Info.cfg: {e}") from e
  info: dict[str, object] = {}
  for n, line in enumerate(lines, start=1):
    if not line.strip() or line.lstrip().startswith("#"):
      continue
    if ":" not in line:
      raise DataError(path, f"line {n} is not 'key: value': {line!r}")
    key, value = (t.strip() for t in line.split(":", 1))
    try:
      if key in ACDC_INFO_INT:
        number = float(value)
        if not number.is_integer():
          raise ValueError(value)
        info[key] = int(number)
      elif key in ACDC_INFO_FLOAT:
        info[key] = float(value)
      else:
        info[key] = value
    except ValueError:
      raise DataError(path, f"{key} must be {'an integer' if key in ACDC_INFO_INT else 'a number'}, "
                            f"got {value!r}") from None
  missing = [k for k in ("ED", "ES", "Group") if k not in info]
  if missing:
    raise DataError(path, f"Info.cfg is missing {', '.join(missing)} (needs ED, ES and Group)")
  return info


def acdc_patient(folder: PathLike, frames: tuple[str, ...] = ("ED", "ES")) -> Patient:
  """Index one ACDC patient folder: ``Info.cfg`` + the ED / ES frames and their ``_gt``.

  Args:
    folder: ``.../patientXXX``.
    frames: which ``Info.cfg`` phases to use, in order.
  Returns:
    `Patient` with site = Group, images = frame paths, masks = gt paths,
    meta = the parsed Info.cfg plus ``frame_numbers``.
  Raises:
    DataError: folder missing or empty, Info.cfg problems, a missing frame
      or gt file (names it).
  """
  folder, pid = _patient_folder(folder, "Info.cfg and {pid}_frameYY[_gt].nii.gz")
  info = read_info_cfg(os.path.join(folder, "Info.cfg"))
  images, masks, numbers = [], [], []
  for phase in frames:
    if phase not in ("ED", "ES"):
      raise ValueError(f"data.frames entries must be 'ED' or 'ES', got {phase!r}")
    number = int(info[phase])
    stem = f"{pid}_frame{number:02d}"
    image, gt = _nifti_path(folder, stem), _nifti_path(folder, stem + "_gt")
    if image is None:
      raise _missing(folder, stem + ".nii.gz", f"missing {phase} frame {number} (Info.cfg says {phase}: {number})")
    if gt is None:
      raise _missing(folder, stem + "_gt.nii.gz", f"missing ground truth of the {phase} frame")
    images.append(image)
    masks.append(gt)
    numbers.append(number)
  return Patient(id=pid, site=str(info["Group"]), folder=folder, images=tuple(images), masks=tuple(masks),
                 meta={**info, "frames": tuple(frames), "frame_numbers": tuple(numbers)})


def _acdc_base(root: str) -> str:
  for sub in ("training", os.path.join("database", "training")):
    if os.path.isdir(os.path.join(root, sub)):
      return os.path.join(root, sub)
  return root


def find_acdc(root: PathLike, frames: tuple[str, ...] = ("ED", "ES"), on_error: OnError = None) -> list[Patient]:
  """Find all ACDC patients under ``root`` (``training/`` or ``database/training/`` or the folder itself).

  Returns:
    Patients sorted by id; site = pathology group.
  Raises:
    DataError: root missing, no patient folders, or a bad patient (see
      `acdc_patient`) unless ``on_error`` is given.
  """
  root = _existing_folder(root, "ACDC root does not exist or is not a folder")
  base = _acdc_base(root)
  patients = _scan(base, _ACDC_DIR_RE, "ACDC", lambda path, name: acdc_patient(path, tuple(frames)), on_error)
  if not patients:
    raise DataError(base, "no ACDC patient folders found (expected <root>/training/patientXXX/Info.cfg "
                          "and patientXXX_frameYY[_gt].nii.gz)")
  return patients
