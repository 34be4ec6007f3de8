"""Segmentation viewer: upload a scan, see the model's segmentation in three planes, keep the results.

    python -m fedjax_seg.serve --workdir RUN [--db sqlite:///results.db] [--port 8000]
                               [--host 127.0.0.1] [--data-dir DIR] [--max-upload-mb 512]

A small Flask app (one static page + a JSON API) on top of `fedjax_seg.infer`:
the run is loaded once with `infer.load_run`; every upload is read and
validated with `infer.load_input` (the training readers and checks:
`io.DataError` / `InferError` become a 4xx JSON error and nothing is stored),
its channel count is checked against the run's model, and `infer.segment`
runs in one worker thread (jobs are queued, their stage and progress fraction
are in the ``jobs`` table). A finished job stores

* the study (patient id, creation time, modality names, shape, spacing) and
  its per-region volumes (cm³: one row per foreground class, plus WT / TC / ET
  for BraTS label sets) in the database (any SQLAlchemy URL; default a SQLite
  file in the data dir);
* the mask (`infer.to_file_labels` + `infer.write_nifti_mask`: the data set's
  label convention, the input's affine and header) and the viewer's uint8
  copies of the image and class map under ``DATA_DIR/studies/<study id>/``
  (study ids are server-made UUIDs; uploaded file names are never used as
  paths).

Privacy defaults: binds 127.0.0.1, no external assets (a Content-Security-Policy
of 'self' only), upload size limit (413), patient ids only ever inserted into
the page as text.

API (all JSON unless noted; errors are ``{"error": "..."}`` with a 4xx status):

    GET  /api/info                          the run: modalities, classes, colours, limits
    POST /api/studies                       multipart: patient_id + files -> 202 {"job": ...}
    GET  /api/jobs/<job id>                 status, stage, progress (0..1), error, study_id
    GET  /api/studies?patient=<text>        studies (newest first), patient id contains text
    GET  /api/studies/<id>                  one study with its region volumes
    GET  /api/studies/<id>/image/<plane>/<index>?channel=c[&format=png]   uint8 slice
    GET  /api/studies/<id>/mask/<plane>/<index>[?format=png]             class slice
    GET  /api/studies/<id>/mask.nii.gz      the stored mask

``plane`` is axial (a [Y, X] slice at z), coronal ([Z, X] at y) or sagittal
([Z, Y] at x), in array order (row 0 = lowest z for coronal / sagittal); raw
slices are row-major uint8 bytes with an ``X-Shape: rows,cols`` header.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import io as _io
import json
import os
import queue
import re
import shutil
import sys
import tempfile
import threading
import traceback
import uuid
import zipfile
import zlib
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from sqlalchemy import JSON, DateTime, Float, ForeignKey, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from fedjax_seg import infer

PLANES = ("axial", "coronal", "sagittal")
# BraTS file labels (necrotic 1, edema 2, enhancing 4) -> composite regions (SPEC / BraTS convention).
BRATS_COMPOSITES = (("WT", (1, 2, 4)), ("TC", (1, 4)), ("ET", (4,)))
DEFAULT_MAX_UPLOAD_MB = 512
MAX_ZIP_MEMBERS = 5000
PATIENT_ID_MAX = 64
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


class UploadError(Exception):
  """A rejected upload: ``status`` (400 / 413 / 422) and a message for the page."""

  def __init__(self, message: str, status: int = 400):
    super().__init__(message)
    self.status = status


# ---------------------------------------------------------------------------
# Database (SQLAlchemy 2 ORM).
# ---------------------------------------------------------------------------
class Base(DeclarativeBase):
  pass


class Study(Base):
  __tablename__ = "studies"
  id: Mapped[str] = mapped_column(String(32), primary_key=True)
  patient_id: Mapped[str] = mapped_column(String(PATIENT_ID_MAX), index=True)
  created: Mapped[_dt.datetime] = mapped_column(DateTime, index=True)
  modalities: Mapped[list] = mapped_column(JSON)       # channel names, training order
  shape: Mapped[list] = mapped_column(JSON)            # [Z, Y, X] (file axes reversed)
  spacing: Mapped[list] = mapped_column(JSON)          # [dz, dy, dx] mm
  kind: Mapped[str] = mapped_column(String(16))        # 'nifti' | 'tiff'
  layout: Mapped[str] = mapped_column(String(16))      # the run's data layout
  run: Mapped[str] = mapped_column(String(512))        # run folder name
  step: Mapped[int] = mapped_column(Integer)           # checkpoint step
  display_range: Mapped[list] = mapped_column(JSON)    # per channel [lo, hi] mapped to 0..255
  focus: Mapped[list] = mapped_column(JSON)            # [z, y, x] tumour centre of mass (first view)
  volumes: Mapped[List["RegionVolume"]] = relationship(
      back_populates="study", cascade="all, delete-orphan", order_by="RegionVolume.position")


class RegionVolume(Base):
  __tablename__ = "region_volumes"
  id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
  study_id: Mapped[str] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
  position: Mapped[int] = mapped_column(Integer)
  region: Mapped[str] = mapped_column(String(64))
  labels: Mapped[list] = mapped_column(JSON)           # mask file label values in the region
  voxels: Mapped[int] = mapped_column(Integer)
  cm3: Mapped[float] = mapped_column(Float)
  study: Mapped[Study] = relationship(back_populates="volumes")


class Job(Base):
  __tablename__ = "jobs"
  id: Mapped[str] = mapped_column(String(32), primary_key=True)
  patient_id: Mapped[str] = mapped_column(String(PATIENT_ID_MAX))
  created: Mapped[_dt.datetime] = mapped_column(DateTime)
  status: Mapped[str] = mapped_column(String(16))      # queued | running | done | failed
  stage: Mapped[str] = mapped_column(String(64))
  progress: Mapped[float] = mapped_column(Float)
  error: Mapped[Optional[str]] = mapped_column(Text, nullable=True)
  study_id: Mapped[Optional[str]] = mapped_column(String(32), nullable=True)


def _now() -> _dt.datetime:
  return _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None)


def _iso(t: _dt.datetime) -> str:
  return t.replace(microsecond=0).isoformat() + "Z"


def study_json(s) -> Dict:
  return {"id": s.id, "patient_id": s.patient_id, "created": _iso(s.created), "modalities": list(s.modalities),
          "shape": list(s.shape), "spacing": list(s.spacing), "kind": s.kind, "layout": s.layout,
          "run": s.run, "step": s.step, "display_range": s.display_range, "focus": s.focus,
          "volumes": [{"region": v.region, "labels": list(v.labels), "voxels": v.voxels, "cm3": v.cm3}
                      for v in s.volumes]}


def job_json(j) -> Dict:
  return {"id": j.id, "patient_id": j.patient_id, "created": _iso(j.created), "status": j.status,
          "stage": j.stage, "progress": j.progress, "error": j.error, "study_id": j.study_id}


# ---------------------------------------------------------------------------
# Results: regions, volumes, viewer copies.
# ---------------------------------------------------------------------------
def regions(run: "infer.LoadedRun", kind: str) -> List[Tuple[str, Tuple[int, ...]]]:
  """(region name, mask file label values) for every foreground class, then WT / TC / ET for BraTS."""
  lut = infer.to_file_labels(np.arange(run.num_classes), run, kind)
  out = [(run.class_names[k], (int(lut[k]),)) for k in range(1, run.num_classes)]
  if run.layout == "brats":
    out += [(name, labs) for name, labs in BRATS_COMPOSITES]
  return out


def region_volumes(file_labels: np.ndarray, spacing: Sequence[float],
                   regions_: Sequence[Tuple[str, Tuple[int, ...]]]) -> List[Dict]:
  """Voxel counts and cm³ (voxel volume = product of the spacing in mm, / 1000) per region."""
  voxel_mm3 = float(np.prod([float(s) for s in spacing]))
  counts = np.bincount(file_labels.ravel().astype(np.int64), minlength=256)
  out = []
  for name, labs in regions_:
    n = int(sum(int(counts[v]) for v in labs))
    out.append({"region": name, "labels": list(labs), "voxels": n, "cm3": n * voxel_mm3 / 1000.0})
  return out


def to_display_uint8(data: np.ndarray) -> Tuple[np.ndarray, List[List[float]]]:
  """Per channel, [0.5, 99.5] percentiles -> 0..255 (the viewer's window/level works on these)."""
  out = np.empty(data.shape, np.uint8)
  ranges = []
  for c in range(data.shape[-1]):
    x = data[..., c]
    lo, hi = (float(v) for v in np.percentile(x, [0.5, 99.5]))
    if hi <= lo:
      lo, hi = float(x.min()), float(x.max()) if x.max() > x.min() else float(x.min()) + 1.0
    out[..., c] = np.clip(np.round((x - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)
    ranges.append([lo, hi])
  return out, ranges


def plane_slice(vol: np.ndarray, plane: str, index: int) -> np.ndarray:
  """[Z, Y, X, ...] -> axial [Y, X] at z, coronal [Z, X] at y, sagittal [Z, Y] at x."""
  axis = PLANES.index(plane)
  if not 0 <= index < vol.shape[axis]:
    raise IndexError(f"{plane} index {index} out of range 0..{vol.shape[axis] - 1}")
  return np.take(vol, index, axis=axis)


# ---------------------------------------------------------------------------
# Uploads: bytes -> files with server-made names in a temporary folder -> infer.load_input.
# ---------------------------------------------------------------------------
def _sniff(head: bytes) -> str:
  if head[:4] == b"PK\x03\x04" or head[:4] == b"PK\x05\x06":
    return "zip"
  if head[:2] == b"\x1f\x8b":
    return "nii.gz"
  if head[:4] in (b"II*\x00", b"MM\x00*"):
    return "tif"
  if len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
    return "nii"
  return "unknown"


def _nifti_too_big(path: str, limit_bytes: int) -> Optional[str]:
  """The NIfTI header's voxel count (as float32) against the limit, before any voxel is read."""
  try:
    import nibabel as nib
    shape = nib.load(path).shape
  except Exception:
    return None  # load_input reports unreadable files with the training readers' message
  need = int(np.prod([int(s) for s in shape])) * 4
  if need > limit_bytes:
    return (f"image of shape {tuple(shape)} needs {need / 2**20:.0f} MB as float32, over the "
            f"{limit_bytes / 2**20:.0f} MB limit for uncompressed data")
  return None


def _safe_member(name: str) -> bool:
  n = name.replace("\\", "/")
  if n.startswith("/") or re.match(r"^[A-Za-z]:", n):
    return False
  return ".." not in n.split("/")


def _extract_zip(zpath: str, dest: str, limit_bytes: int, modalities: Sequence[str]) -> str:
  """Safely extracts an uploaded zip into ``dest`` under server-made names; returns the input path.

  Accepted contents: TIFF slices (a Kaggle LGG patient folder; ``*_mask.tif`` ignored; written as
  ``slice_<rank>.tif`` in the training slice order), one NIfTI file, or one NIfTI per modality
  (``..._<modality>.nii[.gz]``; written as ``upload/upload_<modality>.nii[.gz]``). Rejects absolute
  or ``..`` member paths, more than MAX_ZIP_MEMBERS members and more than ``limit_bytes``
  uncompressed in total (declared sizes, and bytes actually inflated).
  """
  try:
    zf = zipfile.ZipFile(zpath)
  except (zipfile.BadZipFile, OSError) as e:
    raise UploadError(f"the zip file cannot be read: {e}")
  with zf:
    infos = [i for i in zf.infolist() if not i.is_dir()]
    for i in zf.infolist():
      if not _safe_member(i.filename):
        raise UploadError(f"zip member {i.filename!r} has an unsafe path (absolute or '..'); refused")
    if len(infos) > MAX_ZIP_MEMBERS:
      raise UploadError(f"zip has {len(infos)} files; at most {MAX_ZIP_MEMBERS} are accepted", 413)
    total = sum(i.file_size for i in infos)
    if total > limit_bytes:
      raise UploadError(f"zip expands to {total / 2**20:.0f} MB, over the {limit_bytes / 2**20:.0f} MB "
                        f"limit for uncompressed data", 413)
    base = lambda i: i.filename.replace("\\", "/").rsplit("/", 1)[-1]
    useful = [i for i in infos if not base(i).startswith(".") and "__MACOSX" not in i.filename]
    tiffs = [i for i in useful if infer._is_tiff(base(i))
             and not infer._strip_ext(base(i)).endswith("_mask")]
    niftis = [i for i in useful if infer._is_nifti(base(i))
              and not infer._strip_ext(base(i)).lower().endswith("_seg")]
    budget = [limit_bytes]

    def copy(info, path):
      with zf.open(info) as src, open(path, "wb") as dst:
        while True:
          chunk = src.read(1 << 20)
          if not chunk:
            break
          budget[0] -= len(chunk)
          if budget[0] < 0:
            raise UploadError(f"zip expands to more than the {limit_bytes / 2**20:.0f} MB limit for "
                              f"uncompressed data", 413)
          dst.write(chunk)

    try:
      if tiffs and not niftis:
        def key(i):
          m = re.search(r"_(\d+)$", infer._strip_ext(base(i)))
          return (0, int(m.group(1)), base(i)) if m else (1, 0, base(i))
        folder = os.path.join(dest, "slices")
        os.makedirs(folder)
        for rank, info in enumerate(sorted(tiffs, key=key)):
          copy(info, os.path.join(folder, f"slice_{rank}.tif"))
        return folder
      if niftis and not tiffs:
        if len(niftis) == 1:
          path = os.path.join(dest, "image.nii.gz" if base(niftis[0]).lower().endswith(".gz") else "image.nii")
          copy(niftis[0], path)
          return path
        folder = os.path.join(dest, "upload")
        os.makedirs(folder)
        seen = set()
        for info in niftis:
          stem = infer._strip_ext(base(info)).lower()
          mod = next((m for m in modalities if stem.endswith("_" + m.lower())), None)
          if mod is None or mod in seen:
            raise UploadError(f"zip holds {len(niftis)} NIfTI files; each must end in one of "
                              f"{', '.join('_' + m for m in modalities)} (once each); "
                              f"{base(info)!r} does not")
          seen.add(mod)
          ext = ".nii.gz" if base(info).lower().endswith(".gz") else ".nii"
          copy(info, os.path.join(folder, f"upload_{mod}{ext}"))
        return folder
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
      raise UploadError(f"the zip file is damaged: {type(e).__name__}: {e}")
  raise UploadError("the zip must hold TIFF slices (a Kaggle LGG patient folder) or NIfTI files "
                    "(one 4-channel file, or one per modality), not both and not neither")


def _write_nifti_bytes(data: bytes, path_no_ext: str) -> str:
  kind = _sniff(data[:352])
  if kind not in ("nii", "nii.gz"):
    raise UploadError("not a NIfTI file (neither gzip-compressed nor an uncompressed .nii header)")
  path = f"{path_no_ext}.{kind}"
  with open(path, "wb") as f:
    f.write(data)
  return path


def stage_upload(files: Sequence[Tuple[bytes, str]], dest: str, run: "infer.LoadedRun",
                 limit_bytes: int) -> str:
  """Writes the uploaded files (bytes, client name) into ``dest`` under server-made names.

  One file: a NIfTI (3D, or 4D with all channels), a zip, or a TIFF slice. Several files: one
  NIfTI per modality in the run's channel order. The client name is only used to tell ``.zip``
  apart in messages; the content decides the type. Returns the path to pass to `infer.load_input`.
  """
  names = infer.LAYOUT_CHANNEL_NAMES.get(run.layout, ())
  files = [(b, n) for b, n in files if b]
  if not files:
    raise UploadError("no file uploaded: choose one file per modality, one multi-channel NIfTI, or a zip")
  if len(files) == 1:
    data = files[0][0]
    kind = _sniff(data[:352])
    if kind == "zip":
      zpath = os.path.join(dest, "upload.zip")
      with open(zpath, "wb") as f:
        f.write(data)
      out = os.path.join(dest, "x")
      os.makedirs(out)
      path = _extract_zip(zpath, out, limit_bytes, names)
      os.remove(zpath)
      return path
    if kind == "tif":
      path = os.path.join(dest, "slice_0.tif")
      with open(path, "wb") as f:
        f.write(data)
      return path
    if kind in ("nii", "nii.gz"):
      return _write_nifti_bytes(data, os.path.join(dest, "image"))
    raise UploadError("unrecognised file: expected a NIfTI (.nii / .nii.gz), a TIFF slice or a zip")
  if run.layout != "brats" or len(files) != run.in_channels:
    raise UploadError(f"wrong modality count: {len(files)} files uploaded, but the model of this run "
                      f"takes {run.in_channels} channel(s) ({', '.join(names)}); upload one NIfTI per "
                      f"modality in that order, one {run.in_channels}-channel NIfTI, or a zip"
                      if run.layout == "brats" else
                      f"{len(files)} files uploaded; the model of this run ({run.layout}) takes one "
                      f"file (a NIfTI, a TIFF slice, or a zip of TIFF slices)")
  folder = os.path.join(dest, "upload")
  os.makedirs(folder)
  for (data, _), mod in zip(files, names):
    try:
      _write_nifti_bytes(data, os.path.join(folder, f"upload_{mod}"))
    except UploadError as e:
      raise UploadError(f"modality {mod}: {e}")
  return folder


def validate(path: str, run: "infer.LoadedRun", limit_bytes: int, tmp: str = "") -> "infer.InputImage":
  """`infer.load_input` (training readers and checks) + the run's channel count; UploadError on failure."""
  from fedjax_seg.data import io
  nifti_files = [path] if os.path.isfile(path) else [
      os.path.join(path, n) for n in os.listdir(path)] if os.path.isdir(path) else []
  for p in nifti_files:
    if infer._is_nifti(p):
      msg = _nifti_too_big(p, limit_bytes)
      if msg:
        raise UploadError(msg, 413)
  try:
    inp = infer.load_input(path)
  except (infer.InferError, io.DataError) as e:
    raise UploadError(_scrub(str(e), tmp), 422)
  c = inp.data.shape[-1]
  if c != run.in_channels:
    names = infer.LAYOUT_CHANNEL_NAMES.get(run.layout, ())
    raise UploadError(f"wrong modality count: the upload has {c} channel(s) but the model of this run "
                      f"was trained on {run.in_channels} ({', '.join(names)}; layout {run.layout!r})", 422)
  if inp.data.size == 0:
    raise UploadError("the image is empty", 422)
  return inp


def _scrub(message: str, tmp: str) -> str:
  """The server's temporary folder out of messages shown in the page (names there are server-made)."""
  return message.replace(tmp + os.sep, "").replace(tmp, "") if tmp else message


# ---------------------------------------------------------------------------
# The service: DB + data dir + worker thread.
# ---------------------------------------------------------------------------
class Service:
  def __init__(self, run: "infer.LoadedRun", db_url: str, data_dir: str, max_upload_mb: float,
               max_unzipped_mb: Optional[float] = None, start_worker: bool = True):
    from sqlalchemy import create_engine, select
    from sqlalchemy.orm import sessionmaker
    self.run = run
    self.data_dir = os.path.abspath(data_dir)
    os.makedirs(os.path.join(self.data_dir, "studies"), exist_ok=True)
    self.max_upload_mb = float(max_upload_mb)
    self.max_unzipped_bytes = int(float(max_unzipped_mb or 8 * max_upload_mb) * 2**20)
    kw = {"connect_args": {"check_same_thread": False}} if db_url.startswith("sqlite") else {}
    self.engine = create_engine(db_url, **kw)
    Base.metadata.create_all(self.engine)
    self.Session = sessionmaker(self.engine, expire_on_commit=False)
    with self.Session.begin() as s:  # jobs of an earlier server process cannot finish any more
      for j in s.scalars(select(Job).where(Job.status.in_(("queued", "running")))):
        j.status, j.stage, j.error = "failed", "interrupted", "the server stopped before the job finished"
    self.queue: "queue.Queue" = queue.Queue()
    self.worker = None
    if start_worker:
      self.worker = threading.Thread(target=self._work, name="fedjax-seg-serve-worker", daemon=True)
      self.worker.start()
    self._lock = threading.Lock()
    self._done = threading.Condition(self._lock)

  # -- upload
  def submit(self, patient_id: str, files: Sequence[Tuple[bytes, str]]) -> Dict:
    pid = (patient_id or "").strip()
    if not pid:
      raise UploadError("patient id is required")
    if len(pid) > PATIENT_ID_MAX or any(ord(ch) < 32 or ord(ch) == 127 for ch in pid):
      raise UploadError(f"patient id must be 1..{PATIENT_ID_MAX} printable characters")
    # The staged files live until the job ends: segment() may read them again (the N4 cache keys
    # on the file content). They are outside the data dir and removed on every path.
    tmp = tempfile.mkdtemp(prefix="fedjax_seg_upload_")
    try:
      path = stage_upload(files, tmp, self.run, self.max_unzipped_bytes)
      inp = validate(path, self.run, self.max_unzipped_bytes, tmp)
      job = Job(id=uuid.uuid4().hex, patient_id=pid, created=_now(), status="queued", stage="queued",
                progress=0.0)
      with self.Session.begin() as s:
        s.add(job)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
    self.queue.put((job.id, pid, inp, tmp))
    return job_json(job)

  def _update(self, job_id: str, **kw) -> None:
    with self.Session.begin() as s:
      j = s.get(Job, job_id)
      for k, v in kw.items():
        setattr(j, k, v)
    if kw.get("status") in ("done", "failed"):
      with self._done:
        self._done.notify_all()

  def _work(self) -> None:
    while True:
      item = self.queue.get()
      if item is None:
        return
      job_id, pid, inp, tmp = item
      try:
        self._process(job_id, pid, inp)
      except Exception as e:  # an unexpected failure: the job says so, nothing is stored
        traceback.print_exc()
        self._update(job_id, status="failed", stage="failed",
                     error=_scrub(f"{type(e).__name__}: {e}", tmp))
      finally:
        shutil.rmtree(tmp, ignore_errors=True)

  def _process(self, job_id: str, pid: str, inp: "infer.InputImage") -> None:
    run = self.run
    self._update(job_id, status="running", stage="segmenting", progress=0.1)
    pred = infer.segment(run, inp)
    self._update(job_id, stage="writing mask", progress=0.8)
    file_labels = infer.to_file_labels(pred, run, inp.kind)
    study_id = uuid.uuid4().hex
    final = os.path.join(self.data_dir, "studies", study_id)
    partial = final + ".partial"
    os.makedirs(partial)
    try:
      like = inp.nifti
      if like is None:  # TIFF slices: a NIfTI with 1 mm voxels ([Z, Y, X] -> file axes x, y, z)
        import nibabel as nib
        like = nib.Nifti1Image(np.zeros(file_labels.shape[::-1], np.uint8), np.eye(4))
      infer.write_nifti_mask(file_labels, like, os.path.join(partial, "mask.nii.gz"))
      image_u8, ranges = to_display_uint8(inp.data)
      np.save(os.path.join(partial, "image_u8.npy"), image_u8)
      view = np.clip(pred, 0, 255).astype(np.uint8)
      np.save(os.path.join(partial, "classes.npy"), view)
      self._update(job_id, stage="computing volumes", progress=0.9)
      vols = region_volumes(file_labels, inp.spacing, regions(run, inp.kind))
      os.rename(partial, final)
      names = list(infer.LAYOUT_CHANNEL_NAMES.get(run.layout, ()))
      names = names if len(names) == inp.data.shape[-1] else [f"channel {i}" for i in range(inp.data.shape[-1])]
      with self.Session.begin() as s:
        st = Study(id=study_id, patient_id=pid, created=_now(), modalities=names,
                   shape=[int(v) for v in inp.data.shape[:3]], spacing=[float(v) for v in inp.spacing],
                   kind=inp.kind, layout=run.layout, run=os.path.basename(run.workdir), step=int(run.step),
                   display_range=ranges, focus=[int(v) for v in infer.center_of_mass(pred)])
        st.volumes = [RegionVolume(position=i, **v) for i, v in enumerate(vols)]
        s.add(st)
        j = s.get(Job, job_id)
        j.status, j.stage, j.progress, j.study_id = "done", "done", 1.0, study_id
      with self._done:
        self._done.notify_all()
    except BaseException:
      shutil.rmtree(partial, ignore_errors=True)
      shutil.rmtree(final, ignore_errors=True)
      raise

  def wait(self, job_id: str, timeout: float = 60.0) -> Dict:
    """Blocks until the job is done or failed (tests, scripts)."""
    import time
    end = time.monotonic() + timeout
    while True:
      j = self.job(job_id)
      if j is None or j["status"] in ("done", "failed") or time.monotonic() > end:
        return j
      with self._done:
        self._done.wait(0.2)

  # -- queries
  def job(self, job_id: str) -> Optional[Dict]:
    with self.Session() as s:
      j = s.get(Job, job_id)
      return job_json(j) if j else None

  def studies(self, patient: str = "", limit: int = 500) -> List[Dict]:
    from sqlalchemy import select
    from sqlalchemy.orm import selectinload
    q = select(Study).options(selectinload(Study.volumes)).order_by(Study.created.desc()).limit(limit)
    if patient:
      q = q.where(Study.patient_id.contains(patient, autoescape=True))
    with self.Session() as s:
      return [study_json(st) for st in s.scalars(q)]

  def study(self, study_id: str) -> Optional[Dict]:
    from sqlalchemy.orm import selectinload
    from sqlalchemy import select
    if not re.fullmatch(r"[0-9a-f]{32}", study_id or ""):
      return None
    with self.Session() as s:
      st = s.scalars(select(Study).options(selectinload(Study.volumes)).where(Study.id == study_id)).first()
      return study_json(st) if st else None

  def study_dir(self, study_id: str) -> str:
    return os.path.join(self.data_dir, "studies", study_id)

  def array(self, study_id: str, name: str) -> np.ndarray:
    return np.load(os.path.join(self.study_dir(study_id), name), mmap_mode="r")

  def close(self) -> None:
    """Stops the worker after the current job; queued jobs are dropped (their staged files
    removed; the next start marks them failed)."""
    while True:
      try:
        item = self.queue.get_nowait()
      except queue.Empty:
        break
      if item is not None:
        shutil.rmtree(item[3], ignore_errors=True)
    if self.worker is not None:
      self.queue.put(None)
      self.worker.join(timeout=30)
    self.engine.dispose()


# ---------------------------------------------------------------------------
# Flask app.
# ---------------------------------------------------------------------------
def create_app(workdir: Optional[str] = None, *, run: Optional["infer.LoadedRun"] = None,
               db_url: Optional[str] = None, data_dir: Optional[str] = None,
               max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, max_unzipped_mb: Optional[float] = None,
               start_worker: bool = True):
  """The viewer app. ``run`` (an `infer.LoadedRun`) or ``workdir`` (loaded with `infer.load_run`).

  ``data_dir`` defaults to ``<workdir>/viewer``; ``db_url`` to a SQLite file ``results.db`` in it.
  The service is ``app.extensions['fedjax_seg']``.
  """
  from flask import Flask, Response, abort, jsonify, request, send_file
  from werkzeug.exceptions import HTTPException

  if run is None:
    if workdir is None:
      raise ValueError("create_app needs workdir or run")
    run = infer.load_run(workdir)
  data_dir = os.path.abspath(data_dir or os.path.join(run.workdir, "viewer"))
  os.makedirs(data_dir, exist_ok=True)
  db_url = db_url or "sqlite:///" + os.path.join(data_dir, "results.db")
  service = Service(run, db_url, data_dir, max_upload_mb, max_unzipped_mb, start_worker)

  app = Flask(__name__, static_folder=STATIC_DIR, static_url_path="/static")
  app.config["MAX_CONTENT_LENGTH"] = int(float(max_upload_mb) * 2**20)
  app.extensions["fedjax_seg"] = service

  def error(message: str, status: int):
    r = jsonify({"error": message})
    r.status_code = status
    return r

  @app.after_request
  def headers(resp):
    # No external assets: everything from this origin only; nothing cached by proxies.
    resp.headers["Content-Security-Policy"] = ("default-src 'self'; img-src 'self' blob: data:; "
                                               "object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Referrer-Policy"] = "no-referrer"
    resp.headers["Cache-Control"] = "no-store"
    return resp

  @app.errorhandler(413)
  def too_large(e):
    return error(f"upload too large: the limit is {service.max_upload_mb:g} MB "
                 f"(start the server with --max-upload-mb to change it)", 413)

  @app.errorhandler(HTTPException)
  def http_error(e):
    if request.path.startswith("/api/"):
      return error(e.description or e.name, e.code or 500)
    return e

  @app.errorhandler(UploadError)
  def upload_error(e):
    return error(str(e), e.status)

  @app.get("/")
  def index():
    return send_file(os.path.join(STATIC_DIR, "index.html"), mimetype="text/html")

  @app.get("/favicon.ico")
  def favicon():
    return Response(status=204)

  @app.get("/api/info")
  def info():
    from fedjax_seg import runlog
    colours = [[int(round(255 * c)) for c in col] for col in runlog.LABEL_COLOURS]
    return jsonify({"run": os.path.basename(run.workdir), "step": int(run.step), "layout": run.layout,
                    "ndim": run.ndim, "modalities": list(infer.LAYOUT_CHANNEL_NAMES.get(run.layout, ())),
                    "in_channels": run.in_channels, "classes": list(run.class_names),
                    "colours": colours, "max_upload_mb": service.max_upload_mb,
                    "regions": [r for r, _ in regions(run, "nifti")]})

  @app.post("/api/studies")
  def upload():
    files = [(f.read(), f.filename or "") for f in request.files.getlist("files")]
    job = service.submit(request.form.get("patient_id", ""), files)
    r = jsonify({"job": job})
    r.status_code = 202
    r.headers["Location"] = f"/api/jobs/{job['id']}"
    return r

  @app.get("/api/jobs/<job_id>")
  def job(job_id):
    j = service.job(job_id)
    if j is None:
      return error(f"no job {job_id}", 404)
    return jsonify(j)

  @app.get("/api/studies")
  def studies():
    return jsonify({"studies": service.studies(request.args.get("patient", "").strip())})

  def get_study(study_id):
    st = service.study(study_id)
    if st is None:
      abort(404, description=f"no study {study_id}")
    return st

  @app.get("/api/studies/<study_id>")
  def study(study_id):
    return jsonify(get_study(study_id))

  def slice_response(arr: np.ndarray, fmt: str, palette: bool = False):
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    if fmt == "png":
      from PIL import Image
      if palette:
        from fedjax_seg import runlog
        im = Image.fromarray(arr, mode="P")
        pal = (np.clip(runlog.LABEL_COLOURS, 0, 1) * 255).astype(np.uint8).ravel().tolist()
        im.putpalette(pal + [0] * (768 - len(pal)))
      else:
        im = Image.fromarray(arr, mode="L")
      buf = _io.BytesIO()
      im.save(buf, format="PNG")
      return Response(buf.getvalue(), mimetype="image/png")
    if fmt not in ("", "raw"):
      abort(400, description="format must be raw or png")
    r = Response(arr.tobytes(), mimetype="application/octet-stream")
    r.headers["X-Shape"] = f"{arr.shape[0]},{arr.shape[1]}"
    return r

  def check_plane(plane):
    if plane not in PLANES:
      abort(400, description=f"plane must be one of {', '.join(PLANES)}")

  @app.get("/api/studies/<study_id>/image/<plane>/<int:index>")
  def image_slice(study_id, plane, index):
    st = get_study(study_id)
    check_plane(plane)
    try:
      channel = int(request.args.get("channel", 0))
    except ValueError:
      abort(400, description="channel must be an integer")
    if not 0 <= channel < len(st["modalities"]):
      abort(400, description=f"channel must be in 0..{len(st['modalities']) - 1}")
    try:
      sl = plane_slice(service.array(study_id, "image_u8.npy")[..., channel], plane, index)
    except IndexError as e:
      abort(400, description=str(e))
    return slice_response(sl, request.args.get("format", "raw"))

  @app.get("/api/studies/<study_id>/mask/<plane>/<int:index>")
  def mask_slice(study_id, plane, index):
    get_study(study_id)
    check_plane(plane)
    try:
      sl = plane_slice(service.array(study_id, "classes.npy"), plane, index)
    except IndexError as e:
      abort(400, description=str(e))
    return slice_response(sl, request.args.get("format", "raw"), palette=True)

  @app.get("/api/studies/<study_id>/mask.nii.gz")
  def mask_file(study_id):
    get_study(study_id)
    return send_file(os.path.join(service.study_dir(study_id), "mask.nii.gz"),
                     mimetype="application/gzip", as_attachment=True,
                     download_name=f"{study_id}_mask.nii.gz")

  return app


def main(argv: Optional[Sequence[str]] = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m fedjax_seg.serve", description=__doc__.split("\n\n")[0])
  ap.add_argument("--workdir", required=True, help="training run folder (config.json + checkpoints/)")
  ap.add_argument("--db", default=None, help="SQLAlchemy URL (default sqlite:///DATA_DIR/results.db); "
                                             "e.g. postgresql+psycopg://user@host/dbname")
  ap.add_argument("--data-dir", default=None, help="masks and viewer arrays (default WORKDIR/viewer)")
  ap.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
  ap.add_argument("--port", type=int, default=8000)
  ap.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB,
                  help="largest accepted upload (HTTP 413 above it)")
  ap.add_argument("--max-unzipped-mb", type=float, default=None,
                  help="largest uncompressed data per upload (zip contents, NIfTI voxels as float32; "
                       "default 8x --max-upload-mb)")
  args = ap.parse_args(argv)
  from fedjax_seg.data import io
  try:
    app = create_app(args.workdir, db_url=args.db, data_dir=args.data_dir, max_upload_mb=args.max_upload_mb,
                     max_unzipped_mb=args.max_unzipped_mb)
  except (infer.InferError, io.DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  svc = app.extensions["fedjax_seg"]
  print(f"[serve] run {svc.run.workdir} step {svc.run.step} ({svc.run.layout}); data dir {svc.data_dir}; "
        f"db {svc.engine.url.render_as_string(hide_password=True)}")
  if args.host not in ("127.0.0.1", "localhost", "::1"):
    print(f"[serve] WARNING: listening on {args.host}: other machines can reach the viewer "
          f"(no authentication; put it behind an authenticating proxy)", file=sys.stderr)
  from werkzeug.serving import run_simple
  run_simple(args.host, args.port, app, threaded=True, use_reloader=False)
  return 0


if __name__ == "__main__":
  sys.exit(main())
