"""Preprocessing shared by every layout (SPEC §1.5).

All functions are host-side NumPy (run once before training), deterministic.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
from PIL import Image


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


def resize_slices(images: np.ndarray, masks: np.ndarray, size: int):
  """Resizes [S, H, W, C] images (bilinear) and [S, H, W] masks (nearest).

  Returns (images float32 [S, size, size, C], masks uint8 [S, size, size]).
  A no-op (apart from dtype) when H == W == size.
  """
  s, h, w, c = images.shape
  if (h, w) == (size, size):
    return images.astype(np.float32), masks.astype(np.uint8)
  out_i = np.empty((s, size, size, c), np.float32)
  out_m = np.empty((s, size, size), np.uint8)
  for i in range(s):
    for ch in range(c):
      im = Image.fromarray(images[i, :, :, ch].astype(np.float32), mode="F")
      out_i[i, :, :, ch] = np.asarray(im.resize((size, size), Image.BILINEAR))
    out_m[i] = np.asarray(Image.fromarray(masks[i].astype(np.uint8)).resize(
        (size, size), Image.NEAREST))
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
