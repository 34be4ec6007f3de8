"""From a ``config.data`` to in-memory, preprocessed, patient-indexed arrays.

    files on disk (real layout, or a phantom written on demand)
      -> Patient records (layouts.py) -> validated arrays (io.py)
      -> resize + normalise (preprocess.py) -> SegDataset (patients + splits)

A ``SegDataset`` keeps arrays *per patient* so that the federated code can
partition patients over clients (never slices) and the centralised trainer
can pool them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from fedjax_seg.data import preprocess


@dataclasses.dataclass
class PatientArrays:
  """One patient's preprocessed samples.

  images: float32 [S, H, W, C] (2D slices) or [S, D, H, W, C] (3D volumes);
  labels: int32 [S, H, W] or [S, D, H, W] in [0, num_classes).
  spacing: voxel size (dz, dy, dx) mm of one sample's grid when the layout
  knows it (NIfTI), stacking the S slices along z for 2D; None otherwise.
  """
  id: str
  site: str
  images: np.ndarray
  labels: np.ndarray
  spacing: Optional[Tuple[float, ...]] = None


@dataclasses.dataclass
class SegDataset:
  patients: Dict[str, PatientArrays]
  splits: Dict[str, List[str]]
  num_classes: int
  class_names: Tuple[str, ...]
  root: str
  layout: str = ""

  def arrays(self, ids: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
    """Pools the slices of ``ids``: (images [N, H, W, C], labels [N, H, W])."""
    if not ids:
      p = next(iter(self.patients.values()))
      return (np.zeros((0,) + p.images.shape[1:], np.float32),
              np.zeros((0,) + p.labels.shape[1:], np.int32))
    xs = [self.patients[i].images for i in ids]
    ys = [self.patients[i].labels for i in ids]
    return np.concatenate(xs), np.concatenate(ys)

  def split(self, name: str) -> Tuple[np.ndarray, np.ndarray]:
    return self.arrays(self.splits[name])

  def summary(self) -> str:
    lines = []
    for name, ids in self.splits.items():
      _, y = self.arrays(ids)
      tumour = float((y.reshape(len(y), -1).max(axis=1) > 0).mean()) if len(y) else 0.0
      sites = sorted({self.patients[i].site for i in ids})
      unit = "volumes" if y.ndim == 4 else "slices"
      lines.append(f"  {name:5s}: {len(ids):3d} patients, {len(y):5d} {unit}, "
                   f"{tumour:5.1%} with foreground, sites {','.join(sites)}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Phantom data on demand.

# The tumour keys of ``data.phantom`` (LGG and BraTS). ml_collections cannot override a None-valued
# key from the command line, so the configs hold typed "not given" placeholders: tumour_preset
# 'classic' (the writer's defaults), tumour_area () and tumour_free_fraction -1 (the preset's value).
TUMOUR_KEYS = ("tumour_preset", "tumour_area", "tumour_free_fraction")


def phantom_writer_kwargs(layout: str, phantom_cfg: dict) -> dict:
  """``data.phantom`` -> keyword arguments of the layout's phantom writer.

  The placeholders ``tumour_preset=''``, ``tumour_area=()`` and ``tumour_free_fraction=-1`` become
  None ("not given": the preset's value, else the writer's default); other keys pass unchanged.
  """
  kw = dict(phantom_cfg)
  if kw.get("tumour_preset") == "":
    kw["tumour_preset"] = None
  if "tumour_area" in kw and kw["tumour_area"] is not None and len(kw["tumour_area"]) == 0:
    kw["tumour_area"] = None
  if kw.get("tumour_free_fraction") is not None and kw["tumour_free_fraction"] == -1:
    kw["tumour_free_fraction"] = None
  if "tumour_area" in kw and kw["tumour_area"] is not None:
    kw["tumour_area"] = tuple(kw["tumour_area"])  # a JSON round trip gives a list
  return kw


def _phantom_key(layout: str, phantom_cfg: dict) -> str:
  """Cache folder key: a hash of the layout and the writer's arguments.

  The tumour keys enter resolved (`phantom.tumour_options`: the preset applied, explicit values
  winning) and only when they set something, so the default phantom keeps the key it had before
  the configs carried these keys, and a preset and the same explicit values share one folder.
  """
  kw = phantom_writer_kwargs(layout, phantom_cfg)
  from fedjax_seg.data import phantom  # local import: phantom is optional tooling
  if layout in phantom.TUMOUR_PRESETS["classic"] and any(k in kw for k in TUMOUR_KEYS):
    area, free = phantom.tumour_options(layout, *(kw.pop(k, None) for k in TUMOUR_KEYS))
    if area is not None:
      kw["tumour_area"] = list(area)
    if free is not None:
      kw["tumour_free_fraction"] = float(free)
  blob = json.dumps({"layout": layout, **kw}, sort_keys=True, default=str)
  return hashlib.sha1(blob.encode()).hexdigest()[:10]


def ensure_phantom(layout: str, phantom_cfg: dict, cache_dir: str, verbose: bool = True) -> str:
  """Writes a deterministic phantom data set once and returns its root.

  The folder name hashes (layout, phantom config; `_phantom_key`), so a changed config never
  reuses stale files. Written to a temporary folder then renamed, so an
  interrupted write never leaves a half data set behind.
  """
  from fedjax_seg.data import phantom  # local import: phantom is optional tooling

  writers: Dict[str, Callable] = {"lgg": phantom.write_lgg}
  for name in ("brats", "acdc"):
    if hasattr(phantom, f"write_{name}"):
      writers[name] = getattr(phantom, f"write_{name}")
  if layout not in writers:
    raise ValueError(f"no phantom writer for data.layout={layout!r}; have {sorted(writers)}")
  kwargs = phantom_writer_kwargs(layout, phantom_cfg)
  root = os.path.abspath(os.path.join(cache_dir, f"phantom_{layout}_{_phantom_key(layout, phantom_cfg)}"))
  if os.path.isdir(root):
    return root
  tmp = root + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  t0 = time.time()
  if verbose:
    print(f"[data] writing phantom {layout} data set to {root} ...", flush=True)
  writers[layout](tmp, **kwargs)
  os.replace(tmp, root)
  if verbose:
    print(f"[data] phantom written in {time.time() - t0:.1f}s", flush=True)
  return root


# ---------------------------------------------------------------------------
# Layout loaders: root -> list of (id, site, images uint8/float [S,H,W,C], labels [S,H,W]).

def _load_lgg(root: str, data_cfg) -> Tuple[List[Tuple[str, str, np.ndarray, np.ndarray]], Tuple[str, ...]]:
  from fedjax_seg.data import io, layouts
  skip = bool(data_cfg.skip_bad_patients)
  out = []
  patients = layouts.find_lgg(root, on_error=io.warn_skip if skip else None)
  for p in patients:
    try:
      images, masks = io.load_lgg_patient(p)
    except io.DataError as e:
      if not skip:
        raise
      io.warn_skip(e)
      continue
    out.append((p.id, p.site, images, masks))
  if not out:
    raise io.DataError(root, f"no usable Kaggle LGG patients: all {len(patients)} were skipped as bad input")
  return out, ("background", "tumour")


LOADERS: Dict[str, Callable] = {"lgg": _load_lgg}


def register_loader(layout: str, fn: Callable) -> None:
  """Adds a layout loader ``fn(root, data_cfg) -> (records, class_names[, info])``.

  records: [(id, site, images, labels)]. Without ``info`` (or with
  ``info['preprocessed']`` false) images are raw slices [S, H, W(, C)] that
  `build_dataset` resizes and normalises. With ``info = {'preprocessed':
  True, 'spacing': {id: (dz, dy, dx)}}`` they are final float32 samples
  (2D [S, H, W, C] or 3D [S, D, H, W, C]) used as they are.
  """
  LOADERS[layout] = fn


def preprocess_slices(images: np.ndarray, labels: Optional[np.ndarray], data_cfg):
  """The one slice preprocessing (Kaggle LGG) of training, evaluation and inference.

  images [S, H, W(, C)] -> float32 [S, size, size, C] resized (bilinear) to
  ``data.image_size`` and normalised (``data.normalize``, default
  'slice_max'); labels [S, H, W] (nearest) -> uint8, or None (inference).
  """
  if images.ndim == 3:
    images = images[..., None]
  dummy = np.zeros(images.shape[:3], np.uint8) if labels is None else labels
  x, y = preprocess.resize_slices(images, dummy, int(data_cfg.image_size))
  x = preprocess.normalize(x, data_cfg.normalize)
  return x, None if labels is None else y


def resolve_root(data_cfg, verbose: bool = True) -> str:
  if data_cfg.root:
    return os.path.abspath(os.path.expanduser(data_cfg.root))
  from fedjax_seg import caches
  return ensure_phantom(data_cfg.layout, dict(data_cfg.phantom), caches.data_dir(data_cfg.cache_dir),
                        verbose)


# data.split_seed = 'seed' (or -1, which an int-typed config field accepts from the command line, and
# which was never a valid NumPy seed): the split follows the run's config.seed.
SPLIT_SEED_FROM_RUN = "seed"
SPLIT_SEED_FROM_RUN_INT = -1


def resolve_split_seed(data_cfg, seed: Optional[int] = None) -> int:
  """``data.split_seed`` as an int: an int >= 0 as given, ``'seed'`` or -1 -> ``seed`` (config.seed)."""
  value = data_cfg.split_seed
  if isinstance(value, str):
    if value.strip().lower() != SPLIT_SEED_FROM_RUN:
      raise ValueError(f"config.data.split_seed={value!r}: expected an int >= 0, {SPLIT_SEED_FROM_RUN!r} "
                       f"or {SPLIT_SEED_FROM_RUN_INT} (follow config.seed)")
    value = SPLIT_SEED_FROM_RUN_INT
  value = int(value)
  if value == SPLIT_SEED_FROM_RUN_INT:
    if seed is None:
      raise ValueError(f"config.data.split_seed={data_cfg.split_seed!r} (follow config.seed) needs the "
                       f"run's seed: call build_dataset(config.data, seed=config.seed), or set "
                       f"data.split_seed to an int >= 0")
    return int(seed)
  if value < 0:
    raise ValueError(f"config.data.split_seed={value}: expected an int >= 0, {SPLIT_SEED_FROM_RUN!r} or "
                     f"{SPLIT_SEED_FROM_RUN_INT} (follow config.seed)")
  return value


def make_splits(patient_ids: Sequence[str], data_cfg, strata: Optional[Dict[str, str]] = None,
                seed: Optional[int] = None) -> Dict[str, List[str]]:
  """Train / val / test patient ids from ``config.data``.

  With ``data.fold`` None: `preprocess.split_patients` with
  ``split_seed``, ``val_fraction``, ``test_fraction`` (the historical
  split). With ``data.fold = f``: `preprocess.kfold_split`, k =
  ``data.num_folds`` folds by patient, stratified by site
  (``strata``), fold f the test split, validation ``val_fraction`` of the
  rest; ``test_fraction`` is then unused. ``split_seed`` may be ``'seed'``
  or -1 (`resolve_split_seed`), so that every run seed evaluates other patients.
  """
  split_seed = resolve_split_seed(data_cfg, seed)
  fold = data_cfg.fold
  if fold is None:
    return preprocess.split_patients(patient_ids, split_seed, data_cfg.val_fraction, data_cfg.test_fraction,
                                     strata)
  return preprocess.kfold_split(patient_ids, int(fold), int(data_cfg.num_folds), split_seed,
                                data_cfg.val_fraction, strata)


def build_dataset(data_cfg, verbose: bool = True, seed: Optional[int] = None) -> SegDataset:
  """Loads, validates, preprocesses and splits a data set described by config.

  ``data_cfg`` keys: layout ('lgg', ...), root ('' = phantom), phantom
  (writer kwargs), cache_dir, image_size, normalize, split_seed,
  val_fraction, test_fraction, stratify_by_site, fold / num_folds (see
  `make_splits`). ``seed``: the run's seed (``config.seed``), used when
  ``split_seed`` is ``'seed'`` or -1.
  """
  if data_cfg.layout not in LOADERS:
    # Importing layout modules registers further loaders (BraTS, ACDC).
    try:
      import fedjax_seg.data.volumes  # noqa: F401
    except ImportError:
      pass
  if data_cfg.layout not in LOADERS:
    raise ValueError(f"data.layout={data_cfg.layout!r} unknown; available: {sorted(LOADERS)}")
  root = resolve_root(data_cfg, verbose)
  t0 = time.time()
  loaded = LOADERS[data_cfg.layout](root, data_cfg)
  records, class_names = loaded[0], loaded[1]
  info = loaded[2] if len(loaded) > 2 else {}
  patients = {}
  for pid, site, images, labels in records:
    if info.get("preprocessed", False):  # NIfTI volume loaders (fedjax_seg.data.volumes)
      patients[pid] = PatientArrays(pid, site, images.astype(np.float32), labels.astype(np.int32),
                                    info.get("spacing", {}).get(pid))
      continue
    x, y = preprocess_slices(images, labels, data_cfg)
    patients[pid] = PatientArrays(pid, site, x, y.astype(np.int32))
  strata = ({p.id: p.site for p in patients.values()}
            if data_cfg.stratify_by_site else None)
  splits = make_splits(list(patients), data_cfg, strata, seed)
  ds = SegDataset(patients, splits, len(class_names), tuple(class_names), root, data_cfg.layout)
  if verbose:
    n = sum(len(p.labels) for p in patients.values())
    unit = "volumes" if next(iter(patients.values())).labels.ndim == 4 else "slices"
    print(f"[data] {data_cfg.layout}: {len(patients)} patients, {n} {unit} from {root} "
          f"in {time.time() - t0:.1f}s\n{ds.summary()}", flush=True)
  return ds
