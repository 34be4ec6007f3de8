"""Segment new images with a trained run: checkpoint -> mask (NIfTI / TIFF) + overlay PNG.

    python -m fedjax_seg.infer --workdir RUN --input PATH --output OUT [--gt PATH]

* ``RUN`` is a training workdir (``config.json`` + ``checkpoints/``); the
  latest orbax checkpoint is used (``--step`` picks another), or with
  ``--checkpoint best`` the one of the epoch/round with the highest validation
  Dice (``checkpoints_best/``), for centralised ({'variables', 'opt_state',
  'epoch'}) and federated (ServerState) runs alike.
* ``PATH`` is one of
    - a NIfTI volume (``.nii`` / ``.nii.gz``), 3D (one channel, e.g. ACDC) or
      4D ``[x, y, z, C]`` (C channels in the training order);
    - a BraTS patient folder ``<ID>/<ID>_{flair,t1,t1ce,t2}.nii.gz`` (4 channels);
    - a Kaggle LGG slice ``<...>.tif`` (RGB) or a folder of such slices
      (``*_mask.tif`` files in it are ignored; slices are ordered by their
      trailing number n, as in training).
* Preprocessing is the training one, chosen by the *training* layout
  (``config.data.layout``), through the very functions the loaders call
  (`preprocess_input`), so the network input equals the training sample of
  the same file bit for bit:
    - LGG (slices): `pipeline.preprocess_slices` (resize to
      ``data.image_size``, `preprocess.normalize(data.normalize)`);
    - BraTS / ACDC (volumes): optional N4 (`preprocess.N4Cache`, the
      training cache under ``data.n4.cache_dir``: same fit, same key), then
      `volumes.prepare_volume`: resampling to ``data.target_spacing`` and
      the in-plane crop / pad to ``image_size`` around the non-zero
      bounding box (or a resize to ``image_size`` without a target
      spacing), the 3D ``data.depth`` crop, and normalisation whose
      ``zscore`` statistics are taken over that same cropped grid.
* 2D models run slice by slice; 3D models on windows of
  ``(data.depth or Z', image_size, image_size)`` (one window when
  ``data.depth`` is set). Probabilities are mapped back onto the input grid
  with `volumes.restore_geometry` (the crop put back in place, voxels
  outside the training crop background, padding dropped, then linear
  resampling / bilinear resize back) before the argmax, so the mask has
  exactly the input's voxel grid and lines up with the input file.
* Outputs: NIfTI input -> a uint8 NIfTI mask with the input's affine and
  header (labels in the data set's convention: BraTS {0, 1, 2, 4}, ACDC
  0..3, LGG {0, 1}); TIFF input -> ``<stem>_mask.tif`` per slice, {0, 255}
  for binary LGG. Plus an overlay PNG: axial, coronal and sagittal planes
  through the centre of mass of the tumour (all foreground classes),
  SPEC §5 colours (blue 1 necrotic/core, green 2 edema, red 3 enhancing),
  with the ground truth beside the prediction when ``--gt`` is given (the
  planes then go through the ground-truth tumour's centre of mass). A
  single 2D slice gives a single (axial) plane.

Every expected problem (missing run / checkpoint, config-model mismatch,
channel mismatch, unreadable input) raises `InferError` (or
`io.DataError`); ``main`` prints ``error: ...`` and exits with status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

NIFTI_EXTS = (".nii.gz", ".nii")
TIFF_EXTS = (".tif", ".tiff")
# Channels the model was trained on, per training layout (SPEC §1).
LAYOUT_CHANNELS = {"lgg": 3, "brats": 4, "acdc": 1}
LAYOUT_CHANNEL_NAMES = {"lgg": ("pre-contrast", "FLAIR", "post-contrast"),
                        "brats": ("flair", "t1", "t1ce", "t2"), "acdc": ("cine MRI",)}
LAYOUT_CLASS_NAMES = {"lgg": ("background", "tumour"),
                      "brats": ("background", "necrotic", "edema", "enhancing"),
                      "acdc": ("background", "RV", "myocardium", "LV")}
# Channel shown under the overlay: FLAIR for LGG and BraTS (edema is visible on it).
DISPLAY_CHANNEL = {"lgg": 1, "brats": 0, "acdc": 0}


class InferError(Exception):
  """An expected problem with the run or the input; ``main`` prints it without a traceback."""


# ---------------------------------------------------------------------------
# The run: config.json + latest orbax checkpoint -> model + variables.
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class LoadedRun:
  workdir: str
  config: "object"          # ml_collections.ConfigDict rebuilt from config.json
  fns: "object"             # models.ModelFns
  variables: Dict
  step: int
  num_classes: int
  class_names: Tuple[str, ...]
  in_channels: int
  layout: str
  checkpoint: str = "latest"          # 'latest' | 'best'
  val_dice: Optional[float] = None    # the best checkpoint's validation Dice ('best')

  @property
  def ndim(self) -> int:
    return model_ndim(self.config)


def model_ndim(config) -> int:
  """config.model.ndim; a run written before the U-Net config had the key is 2D."""
  return int(config.model.get("ndim", 2))


def _config_from_json(path: str):
  import ml_collections
  with open(path) as f:
    blob = json.load(f)
  return ml_collections.ConfigDict(blob)


def _tree_shapes(tree, prefix: str = "") -> Dict[str, Tuple[int, ...]]:
  """{'params/Conv_0/kernel': shape} for a nested dict of arrays / metadata."""
  out = {}
  if isinstance(tree, dict) or hasattr(tree, "keys"):
    for k in tree.keys():
      out.update(_tree_shapes(tree[k], f"{prefix}/{k}" if prefix else str(k)))
  else:
    out[prefix] = tuple(int(s) for s in tree.shape)
  return out


def _checkpoint_variables_metadata(ckpt_dir: str, step: int):
  """Shape/dtype metadata of the saved state (no array is read)."""
  import orbax.checkpoint as ocp
  mngr = ocp.CheckpointManager(ckpt_dir, item_handlers=ocp.StandardCheckpointHandler())
  try:
    return mngr.item_metadata(step)
  finally:
    mngr.close()


CHECKPOINTS = ("latest", "best")


def load_run(workdir: str, step: Optional[int] = None, checkpoint: str = "latest") -> LoadedRun:
  """Rebuilds the model of ``workdir`` from its config.json and restores its variables.

  checkpoint: 'latest' (the final model, or the newest checkpoint) or 'best' (the
  checkpoint of the step with the highest validation Dice, ``checkpoints_best/``;
  InferError when the run has none). step: that checkpoint step, from
  ``checkpoints/`` or, when pruned there, ``checkpoints_best/`` (not with 'best').

  The restore target mirrors the saved state's structure (read from the
  checkpoint metadata), so centralised and federated states both restore; the
  variables are then checked leaf by leaf against a freshly initialised model
  built from the config, which catches a config.json that does not describe
  the checkpoint (edited config, checkpoint of another run).
  Raises InferError for a missing run / config / checkpoint or a mismatch.
  """
  import jax
  import jax.numpy as jnp
  import orbax.checkpoint as ocp
  from fedjax_seg import models, runlog

  workdir = os.path.abspath(workdir)
  if not os.path.isdir(workdir):
    raise InferError(f"run folder {workdir} does not exist")
  cfg_path = os.path.join(workdir, "config.json")
  if not os.path.isfile(cfg_path):
    raise InferError(f"{workdir} is not a training run: no config.json (pass the --workdir of launch.py)")
  try:
    config = _config_from_json(cfg_path)
  except (OSError, ValueError) as e:
    raise InferError(f"cannot read {cfg_path}: {e}") from e
  for key in ("model", "data"):
    if key not in config:
      raise InferError(f"{cfg_path} has no '{key}' section; is it a fedjax_seg run?")
  if checkpoint not in CHECKPOINTS:
    raise InferError(f"--checkpoint {checkpoint!r}: expected one of {', '.join(CHECKPOINTS)}")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  best_dir = os.path.join(workdir, runlog.BEST_DIR)
  steps_ = runlog.steps_in(ckpt_dir, "default")  # complete steps
  best_value = None
  if checkpoint == "best":
    if step is not None:
      raise InferError(f"--step {step} and --checkpoint best: give one of them")
    best = runlog.best_checkpoint(workdir)
    if best is None:
      raise InferError(f"{workdir} has no best checkpoint (no {runlog.BEST_DIR}/: no epoch/round "
                       f"with a validation Dice, e.g. FCL pre-training, or a run from before best "
                       f"checkpoints were kept); use --checkpoint latest")
    step, best_value = best
    ckpt_dir = best_dir
  elif not steps_:
    raise InferError(f"no checkpoint in {ckpt_dir}: the run has not finished an epoch/round yet "
                     f"(or the folder was moved without checkpoints/)")
  latest = step is None and checkpoint == "latest"
  if step is None:
    step = steps_[-1]
  elif checkpoint == "latest" and step not in steps_:
    best_steps = runlog.steps_in(best_dir, "default")
    if step not in best_steps:
      raise InferError(f"no checkpoint for step {step} in {ckpt_dir}; available: "
                       f"{sorted(set(steps_) | set(best_steps))}")
    ckpt_dir = best_dir  # the best step, pruned from checkpoints/

  layout = config.data.layout
  class_names = _class_names(workdir, layout)
  num_classes = len(class_names)
  in_channels = LAYOUT_CHANNELS.get(layout)
  if in_channels is None:
    raise InferError(f"config.data.layout={layout!r}: inference knows {sorted(LAYOUT_CHANNELS)}")
  try:
    fns = models.build(config.model, num_classes)
  except (ValueError, TypeError) as e:
    raise InferError(f"config/model mismatch: cannot build config.model from {cfg_path}: {e}") from e
  ndim = model_ndim(config)
  size = int(config.data.image_size)
  depth = int(config.model.depth)
  probe = (1,) + ((2 ** (depth - 1),) if ndim == 3 else ()) + (size, size, in_channels)
  try:
    like = jax.eval_shape(lambda: fns.init(jax.random.PRNGKey(0), jnp.zeros(probe, jnp.float32)))
  except Exception as e:  # a config Flax cannot instantiate
    raise InferError(f"config/model mismatch: cannot initialise config.model {dict(config.model)}: "
                     f"{type(e).__name__}: {e}") from e

  # Every run kind writes the model its tables evaluate as final_model.msgpack (a
  # semi-supervised run: its evaluated model of the dict; FCL: each fine-tuning run's U-Net).
  final = os.path.join(workdir, "final_model.msgpack")
  if latest and os.path.isfile(final):
    import flax
    try:
      with open(final, "rb") as f:
        restored = flax.serialization.msgpack_restore(f.read())
    except Exception as e:
      raise InferError(f"cannot read {final}: {type(e).__name__}: {e}") from e
    if _tree_shapes(restored) != _tree_shapes(dict(like)):
      raise InferError(f"config/model mismatch: {final} does not fit the model that {cfg_path} "
                       f"describes (config.model = {dict(config.model)})")
    variables = jax.tree.map(jnp.asarray, dict(restored))
    return LoadedRun(workdir, config, fns, variables, steps_[-1], num_classes,
                     tuple(class_names), in_channels, layout, checkpoint)

  try:
    meta = _checkpoint_variables_metadata(ckpt_dir, step)
  except Exception as e:
    raise InferError(f"cannot read checkpoint {ckpt_dir}/{step}: {type(e).__name__}: {e}") from e
  if not (hasattr(meta, "keys") and "variables" in meta.keys()):
    raise InferError(f"checkpoint {ckpt_dir}/{step} has no 'variables' (keys "
                     f"{sorted(meta.keys()) if hasattr(meta, 'keys') else type(meta).__name__})")
  want = _tree_shapes(dict(like))
  sub = _evaluated_model(workdir, meta["variables"])  # semi-supervised: {model name: variables}
  have = _tree_shapes(meta["variables"][sub] if sub else meta["variables"])
  if want != have:
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    diff = [f"{k}: checkpoint {have[k]} vs config {want[k]}" for k in sorted(set(want) & set(have))
            if want[k] != have[k]]
    lines = ([f"missing in checkpoint: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}"]
             if missing else []) + ([f"only in checkpoint: {', '.join(extra[:4])}"
                                     f"{' ...' if len(extra) > 4 else ''}"] if extra else []) + diff[:4]
    raise InferError(
        f"config/model mismatch: the checkpoint in {ckpt_dir} does not fit the model that "
        f"{cfg_path} describes (config.model = {dict(config.model)}, {num_classes} classes, "
        f"{in_channels} input channels): " + "; ".join(lines))

  # Restore target mirroring the saved state (centralised or federated alike).
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), dict(meta))
  mngr = ocp.CheckpointManager(ckpt_dir, item_handlers=ocp.StandardCheckpointHandler())
  try:
    state = mngr.restore(step, args=ocp.args.StandardRestore(abstract))
  except Exception as e:
    raise InferError(f"cannot restore checkpoint {ckpt_dir}/{step}: {type(e).__name__}: {e}") from e
  finally:
    mngr.close()
  variables = jax.tree.map(jnp.asarray, dict(state["variables"][sub] if sub else state["variables"]))
  return LoadedRun(workdir, config, fns, variables, step, num_classes, tuple(class_names),
                   in_channels, layout, checkpoint, best_value)


def _evaluated_model(workdir: str, variables) -> Optional[str]:
  """The key of the evaluated model when a checkpoint's ``variables`` hold several models by
  name (semi-supervised runs: ``{'model': ...}``, ``{'student': ..., 'teacher': ...}``):
  results.json's ``evaluated_model``, else the only key; None for a plain U-Net's variables."""
  keys = list(variables.keys()) if hasattr(variables, "keys") else []
  if not keys or "params" in keys:
    return None
  try:
    with open(os.path.join(workdir, "results.json")) as f:
      name = json.load(f).get("evaluated_model")
  except (OSError, ValueError, AttributeError):
    name = None
  if name in keys:
    return name
  return keys[0] if len(keys) == 1 else None


def _class_names(workdir: str, layout: str) -> Tuple[str, ...]:
  res = os.path.join(workdir, "results.json")
  if os.path.isfile(res):
    try:
      with open(res) as f:
        names = json.load(f).get("class_names")
      if names:
        return tuple(names)
    except (OSError, ValueError):
      pass
  if layout not in LAYOUT_CLASS_NAMES:
    raise InferError(f"config.data.layout={layout!r}: unknown number of classes")
  return LAYOUT_CLASS_NAMES[layout]


# ---------------------------------------------------------------------------
# Inputs.
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class InputImage:
  """A loaded input on its own grid.

  data: float32 [Z, Y, X, C] (a TIFF slice: Z = 1; a TIFF folder: Z = #slices).
  spacing: (dz, dy, dx) mm (1 mm for TIFF); kind: 'nifti' | 'tiff'.
  nifti: the nibabel image whose affine / header the mask copies.
  stems / paths: per-slice names (TIFF) or per-channel files (NIfTI).
  """
  data: np.ndarray
  spacing: Tuple[float, float, float]
  kind: str
  paths: Tuple[str, ...]
  stems: Tuple[str, ...] = ()
  nifti: object = None
  channel_of_path: Tuple[int, ...] = ()


def _is_nifti(path: str) -> bool:
  return path.lower().endswith(NIFTI_EXTS)


def _is_tiff(path: str) -> bool:
  return path.lower().endswith(TIFF_EXTS)


def _strip_ext(name: str) -> str:
  for ext in NIFTI_EXTS + TIFF_EXTS:
    if name.lower().endswith(ext):
      return name[: -len(ext)]
  return os.path.splitext(name)[0]


def _slice_key(path: str):
  m = re.search(r"_(\d+)$", _strip_ext(os.path.basename(path)))
  return (0, int(m.group(1)), path) if m else (1, 0, path)


def tiff_slices(folder: str) -> List[str]:
  """The image TIFFs of a folder (not ``*_mask.tif``), in numeric slice order."""
  names = [n for n in os.listdir(folder) if _is_tiff(n) and not _strip_ext(n).endswith("_mask")]
  return sorted((os.path.join(folder, n) for n in names), key=_slice_key)


def _read_nifti(path: str):
  """(nibabel image, data [Z, Y, X, C] float32, spacing (dz, dy, dx)); 3D or 4D files."""
  import nibabel as nib
  from fedjax_seg.data import io
  if not os.path.isfile(path):
    raise InferError(f"{path}: input file does not exist")
  try:
    img = nib.load(path)
  except Exception as e:
    raise InferError(f"{path}: cannot read NIfTI: {type(e).__name__}: {e}") from e
  if len(img.shape) == 4 and img.shape[3] > 1:
    try:
      data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as e:
      raise InferError(f"{path}: cannot read NIfTI voxel data: {type(e).__name__}: {e}") from e
    if not np.isfinite(data).all():
      raise InferError(f"{path}: image has {int((~np.isfinite(data)).sum())} NaN / Inf voxels")
    zooms = np.sqrt((np.asarray(img.affine)[:3, :3] ** 2).sum(axis=0))
    return img, np.ascontiguousarray(data.transpose(2, 1, 0, 3)), tuple(float(z) for z in zooms[::-1])
  vol = io.read_nifti_image(path)  # validates (3D, finite, affine) with DataError
  return img, vol.data[..., None], vol.spacing


def load_input(path: str) -> InputImage:
  """Reads a NIfTI file, a BraTS patient folder, a TIFF slice or a folder of TIFF slices."""
  from fedjax_seg.data import io
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise InferError(f"input {path} does not exist")
  if os.path.isfile(path) and _is_nifti(path):
    img, data, spacing = _read_nifti(path)
    return InputImage(data, spacing, "nifti", (path,) * data.shape[-1], (_strip_ext(os.path.basename(path)),),
                      img, tuple(range(data.shape[-1])))
  if os.path.isfile(path) and _is_tiff(path):
    return InputImage(io.read_lgg_image(path)[None].astype(np.float32), (1.0, 1.0, 1.0), "tiff", (path,),
                      (_strip_ext(os.path.basename(path)),))
  if os.path.isdir(path):
    niftis = sorted(n for n in os.listdir(path) if _is_nifti(n))
    if niftis:  # a BraTS patient folder: the 4 modalities in training order
      from fedjax_seg.data import layouts
      try:
        patient = layouts.brats_patient(path, require_seg=False)
      except io.DataError as e:
        raise InferError(f"{path}: a folder input must be a BraTS patient folder "
                         f"(<ID>_{{flair,t1,t1ce,t2}}.nii.gz); for other NIfTI data pass one file "
                         f"(e.g. an ACDC frame) ({e.problem})") from e
      reads = [_read_nifti(p) for p in patient.images]
      for (img, d, _), p in zip(reads[1:], patient.images[1:]):
        if d.shape != reads[0][1].shape or not np.allclose(img.affine, reads[0][0].affine, atol=1e-3):
          raise InferError(f"{p}: grid (shape / affine) differs from {patient.images[0]}")
      data = np.concatenate([d for _, d, _ in reads], axis=-1)
      return InputImage(data, reads[0][2], "nifti", tuple(patient.images), (patient.id,), reads[0][0],
                        tuple(0 for _ in patient.images))
    slices = tiff_slices(path)
    if not slices:
      raise InferError(f"{path}: folder has neither NIfTI files nor TIFF slices")
    images = [io.read_lgg_image(p) for p in slices]
    for p, im in zip(slices[1:], images[1:]):
      if im.shape != images[0].shape:
        raise InferError(f"{p}: slice shape {im.shape} differs from {slices[0]} shape {images[0].shape}")
    return InputImage(np.stack(images).astype(np.float32), (1.0, 1.0, 1.0), "tiff", tuple(slices),
                      tuple(_strip_ext(os.path.basename(p)) for p in slices))
  raise InferError(f"input {path}: expected a .nii / .nii.gz file, a BraTS patient folder, a .tif slice "
                   f"or a folder of .tif slices")


def load_ground_truth(gt: str, inp: InputImage, run: LoadedRun) -> np.ndarray:
  """Ground truth on the input grid in training classes, int32 [Z, Y, X]."""
  from fedjax_seg.data import io
  gt = os.path.abspath(gt)
  if not os.path.exists(gt):
    raise InferError(f"--gt {gt} does not exist")
  if inp.kind == "tiff":
    if os.path.isdir(gt):
      paths = [os.path.join(gt, s + "_mask.tif") for s in inp.stems]
    else:
      paths = [gt]
    if len(paths) != len(inp.stems):
      raise InferError(f"--gt {gt}: one mask file for {len(inp.stems)} slices; pass the folder holding "
                       f"<stem>_mask.tif")
    y = np.stack([io.read_lgg_mask(p) for p in paths]).astype(np.int32)
  else:
    if run.layout == "brats":
      from fedjax_seg.data import volumes
      y = volumes.remap_brats_labels(io.read_nifti_labels(gt, io.BRATS_LABELS).data)
    else:
      y = io.read_nifti_labels(gt, tuple(range(run.num_classes))).data
    y = y.astype(np.int32)
  if y.shape != inp.data.shape[:3]:
    raise InferError(f"--gt {gt}: shape {y.shape} (z, y, x) does not match the input {inp.data.shape[:3]}")
  return y


# ---------------------------------------------------------------------------
# Prediction.
# ---------------------------------------------------------------------------
def make_prob_fn(run: LoadedRun, batch_size: int) -> Callable[[np.ndarray], np.ndarray]:
  """probs(x [N, *spatial, C]) -> float32 [N, *spatial, K], fixed-size padded batches (one compile)."""
  import jax
  import jax.numpy as jnp
  fwd = jax.jit(lambda v, x: jax.nn.softmax(run.fns.apply(v, x)[0].astype(jnp.float32), axis=-1))

  def probs(x):
    out = []
    for i in range(0, len(x), batch_size):
      b = x[i:i + batch_size]
      n = len(b)
      if n < batch_size:
        b = np.concatenate([b, np.zeros((batch_size - n,) + b.shape[1:], b.dtype)])
      out.append(np.asarray(fwd(run.variables, jnp.asarray(b, jnp.float32)))[:n])
    return np.concatenate(out)
  return probs


def window_starts(n: int, w: int, stride: int) -> List[int]:
  """Start offsets covering [0, n) with windows of ``w`` (n >= w); the last one ends at n."""
  if n <= w:
    return [0]
  starts = list(range(0, n - w + 1, max(1, stride)))
  if starts[-1] != n - w:
    starts.append(n - w)
  return starts


def sliding_window(prob_fn, x: np.ndarray, window: Sequence[int], overlap: float = 0.5) -> np.ndarray:
  """Sliding-window class probabilities over the spatial axes of one sample.

  Args:
    prob_fn: probs(batch [B, *window, C]) -> [B, *window, K].
    x: float32 [*spatial, C]; each spatial axis must be >= its window (pad first).
    window: window size per spatial axis.
    overlap: fraction of a window shared with the next (stride = (1 - overlap) * w).
  Returns:
    float32 [*spatial, K]: the mean of the probabilities of all windows covering each voxel.
  """
  import itertools
  spatial = x.shape[:-1]
  if len(window) != len(spatial) or any(n < w for n, w in zip(spatial, window)):
    raise ValueError(f"window {tuple(window)} does not fit input {spatial}")
  starts = [window_starts(n, w, int(w * (1 - overlap))) for n, w in zip(spatial, window)]
  corners = list(itertools.product(*starts))
  acc = None
  count = np.zeros(spatial, np.float32)
  chunk = 8
  for i in range(0, len(corners), chunk):
    group = corners[i:i + chunk]
    batch = np.stack([x[tuple(slice(c, c + w) for c, w in zip(cn, window))] for cn in group])
    p = prob_fn(batch)
    if acc is None:
      acc = np.zeros(spatial + (p.shape[-1],), np.float32)
    for cn, pi in zip(group, p):
      sl = tuple(slice(c, c + w) for c, w in zip(cn, window))
      acc[sl] += pi
      count[sl] += 1
  return acc / count[..., None]


def _pad_to(x: np.ndarray, shape: Sequence[int]) -> np.ndarray:
  """Zero-pads the leading len(shape) axes at the end up to at least ``shape``."""
  pad = [(0, max(0, int(s) - n)) for n, s in zip(x.shape, shape)] + [(0, 0)] * (x.ndim - len(shape))
  return np.pad(x, pad) if any(p[1] for p in pad) else x


def _resize_probs(p: np.ndarray, hw: Tuple[int, int]) -> np.ndarray:
  """Bilinear in-plane resize of probabilities [S, h, w, K] -> [S, H, W, K] (`preprocess.resize_stack`)."""
  from fedjax_seg.data import preprocess
  return preprocess.resize_stack(np.asarray(p, np.float32), hw, "linear")


def _multiple(n: int, m: int) -> int:
  return int(np.ceil(n / m) * m)


def _check_channels(run: LoadedRun, inp: InputImage) -> None:
  c = inp.data.shape[-1]
  if c != run.in_channels:
    names = LAYOUT_CHANNEL_NAMES.get(run.layout, ())
    hint = {"brats": "; pass a BraTS patient folder (flair, t1, t1ce, t2) or a 4D NIfTI [x, y, z, 4]",
            "lgg": "; pass an RGB Kaggle LGG .tif slice or a folder of them",
            "acdc": "; pass a 3D NIfTI cine frame"}.get(run.layout, "")
    raise InferError(f"input {inp.paths[0]} has {c} channel(s) but the model of {run.workdir} was trained "
                     f"on {run.in_channels} ({', '.join(names)}; config.data.layout={run.layout!r}){hint}")


def preprocess_input(run: LoadedRun, inp: InputImage):
  """The network input of ``inp``, made by the training preprocessing of ``run``.

  Returns (x float32 [Z', S, S, C], geometry): for volumes (BraTS / ACDC)
  optional N4 (the training cache) then `volumes.prepare_volume` and its
  `volumes.VolumeGeometry`; for slices (LGG) `pipeline.preprocess_slices`
  and None. ``x`` equals the training samples of the same file bit for bit.
  """
  from fedjax_seg.data import pipeline, preprocess, volumes
  _check_channels(run, inp)
  d = run.config.data
  if run.layout == "lgg":
    if run.ndim != 2:
      raise InferError("config/model mismatch: an LGG run with a 3D model")
    x, _ = pipeline.preprocess_slices(inp.data, None, d)
    return x, None
  opts = volumes.VolumeOptions.from_config(d)
  x = inp.data.astype(np.float32)
  spacing = tuple(float(s) for s in inp.spacing)
  if opts.n4 is not None:  # the training cache: a file seen in training is not fitted again
    cache = preprocess.N4Cache(opts.n4_cache_dir, opts.n4)
    x, _, _ = volumes.n4_channels(cache, x, spacing, inp.paths, inp.channel_of_path)
  x, _, geo = volumes.prepare_volume(x, None, spacing, opts)
  return x, geo


def predict_probs(run: LoadedRun, x: np.ndarray, batch_size: Optional[int] = None) -> np.ndarray:
  """Class probabilities float32 [Z', S, S, K] of a preprocessed input [Z', S, S, C].

  2D models: slice by slice. 3D models: windows of ``(data.depth or Z'
  rounded up to the U-Net's multiple, S, S)`` (a single window when
  ``data.depth`` is set: the training crop), zero padded at the end.
  """
  bs = int(batch_size or run.config.eval_batch_size)
  prob_fn = make_prob_fn(run, bs)
  if run.ndim != 3:
    return prob_fn(x)
  size = int(run.config.data.image_size)
  m = 2 ** (int(run.config.model.depth) - 1)
  wd = int(run.config.data.depth) or _multiple(x.shape[0], m)
  window = (wd, size, size)
  p = sliding_window(prob_fn, _pad_to(x, window), window)
  return p[: x.shape[0]]


def segment(run: LoadedRun, inp: InputImage, batch_size: Optional[int] = None) -> np.ndarray:
  """Class map int32 [Z, Y, X] (training classes) on the input's grid.

  The input goes through the training preprocessing (`preprocess_input`),
  the model predicts on that grid, and the probabilities are mapped back
  (`volumes.restore_geometry`: uncrop / unpad, resample or resize back;
  LGG: bilinear resize) before the argmax.
  """
  from fedjax_seg.data import volumes
  x, geo = preprocess_input(run, inp)
  p = predict_probs(run, x, batch_size)
  if geo is None:
    p = _resize_probs(p, inp.data.shape[1:3])
  else:
    p = volumes.restore_geometry(p, geo)
  return np.argmax(p, axis=-1).astype(np.int32)


def to_file_labels(labels: np.ndarray, run: LoadedRun, kind: str) -> np.ndarray:
  """Training classes -> the data set's label convention (uint8)."""
  if run.layout == "brats":
    return np.array([0, 1, 2, 4], np.uint8)[labels]
  if kind == "tiff" and run.num_classes == 2:
    return (labels > 0).astype(np.uint8) * 255
  return labels.astype(np.uint8)


# ---------------------------------------------------------------------------
# Outputs.
# ---------------------------------------------------------------------------
def write_nifti_mask(labels_zyx: np.ndarray, like, path: str) -> None:
  """uint8 mask with ``like``'s affine and header (data type / scaling / dims updated)."""
  import nibabel as nib
  header = like.header.copy()
  header.set_data_dtype(np.uint8)
  data = np.ascontiguousarray(labels_zyx.transpose(2, 1, 0)).astype(np.uint8)
  img = nib.Nifti1Image(data, like.affine, header)
  img.header.set_slope_inter(1.0, 0.0)
  img.header["cal_min"], img.header["cal_max"] = 0, float(data.max())
  # Keep the input's qform / sform codes (nibabel would otherwise reset them).
  sform, scode = like.header.get_sform(coded=True)
  qform, qcode = like.header.get_qform(coded=True)
  img.set_sform(like.affine if sform is None else sform, int(scode) if scode else 1)
  if qform is not None:
    img.set_qform(qform, int(qcode))
  os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
  nib.save(img, path)


def write_tiff_masks(labels: np.ndarray, stems: Sequence[str], folder: str) -> List[str]:
  from PIL import Image
  os.makedirs(folder, exist_ok=True)
  out = []
  for lab, stem in zip(labels, stems):
    path = os.path.join(folder, f"{stem}_mask.tif")
    Image.fromarray(lab.astype(np.uint8), mode="L").save(path, format="TIFF")
    out.append(path)
  return out


def center_of_mass(*masks: Optional[np.ndarray]) -> Tuple[int, ...]:
  """Integer centre of mass of the first non-empty mask (foreground > 0); array centre otherwise."""
  for mask in masks:
    if mask is not None and (mask > 0).any():
      return tuple(int(round(float(c.mean()))) for c in np.nonzero(mask > 0))
  shape = next(m for m in masks if m is not None).shape
  return tuple(n // 2 for n in shape)


def plot_planes(image: np.ndarray, pred: np.ndarray, gt: Optional[np.ndarray], spacing: Sequence[float],
                path: str, class_names: Sequence[str] = (), title: str = "") -> List[str]:
  """Overlay PNG: axial / coronal / sagittal planes through the tumour centre of mass.

  The centre is the ground truth's foreground centre of mass when ``gt`` has
  foreground (so a missed tumour is visible), else the prediction's, else the
  volume centre. A single slice (Z = 1) gives only the axial plane.

  Args:
    image: grey values [Z, Y, X]; pred, gt: class maps [Z, Y, X] (gt optional).
    spacing: (dz, dy, dx), for the aspect ratio of each plane.
  Returns:
    the panel titles, e.g. ['axial z=12 (prediction)', 'axial z=12 (ground truth)', ...].
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.patches import Patch
  from fedjax_seg import runlog
  cz, cy, cx = center_of_mass(gt, pred)
  dz, dy, dx = (float(s) for s in spacing)
  planes = [("axial", f"z={cz}", lambda a: a[cz], dy / dx, False)]
  if image.shape[0] > 1:
    planes += [("coronal", f"y={cy}", lambda a: a[:, cy, :], dz / dx, True),
               ("sagittal", f"x={cx}", lambda a: a[:, :, cx], dz / dy, True)]
  cols = [("prediction", pred)] + ([("ground truth", gt)] if gt is not None else [])
  fig, axes = plt.subplots(len(cols), len(planes), figsize=(2.6 * len(planes), 2.8 * len(cols) + 0.6),
                           squeeze=False, layout="constrained")
  lo, hi = np.percentile(image, [0.5, 99.5]) if image.size else (0, 1)
  img = np.clip((image - lo) / max(hi - lo, 1e-8), 0, 1)
  titles = []
  for r, (what, lab) in enumerate(cols):
    for c, (plane, where, take, aspect, flip) in enumerate(planes):
      rgb = runlog.overlay(take(img), take(lab))
      ax = axes[r, c]
      ax.imshow(np.clip(rgb, 0, 1), aspect=aspect, origin="lower" if flip else "upper",
                interpolation="nearest")
      ax.set_axis_off()
      t = f"{plane} {where} ({what})"
      ax.set_title(t, fontsize=8)
      titles.append(t)
  present = sorted({int(v) for v in np.unique(pred)} | ({int(v) for v in np.unique(gt)} if gt is not None
                                                       else set()))
  handles = [Patch(color=runlog.LABEL_COLOURS[k], label=class_names[k] if k < len(class_names) else str(k))
             for k in present if 0 < k < len(runlog.LABEL_COLOURS)]
  if handles:
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
  if title:
    fig.suptitle(title, fontsize=8)
  os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
  fig.savefig(path, dpi=72)
  plt.close(fig)
  return titles


def dice_per_class(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> Dict[int, float]:
  """Dice per foreground class on the input grid (empty vs empty = 1)."""
  out = {}
  for k in range(1, num_classes):
    p, g = pred == k, gt == k
    s = int(p.sum()) + int(g.sum())
    out[k] = 1.0 if s == 0 else 2.0 * int((p & g).sum()) / s
  return out


def _output_paths(inp: InputImage, output: str, overlay: Optional[str]):
  """(mask file or folder, overlay path)."""
  output = os.path.abspath(output)
  if inp.kind == "nifti":
    mask = output if _is_nifti(output) else os.path.join(output, f"{inp.stems[0]}_pred.nii.gz")
    default_overlay = os.path.join(os.path.dirname(mask), _strip_ext(os.path.basename(mask)) + "_overlay.png")
  elif len(inp.stems) == 1 and _is_tiff(output):
    mask = output
    default_overlay = os.path.join(os.path.dirname(mask), _strip_ext(os.path.basename(mask)) + "_overlay.png")
  else:
    if _is_tiff(output):
      raise InferError(f"--output {output}: a folder of slices needs an output folder, not a .tif file")
    mask = output
    default_overlay = os.path.join(output, "overlay.png")
  return mask, os.path.abspath(overlay) if overlay else default_overlay


def infer(workdir: str, input_path: str, output: str, gt: Optional[str] = None,
          overlay: Optional[str] = None, step: Optional[int] = None,
          batch_size: Optional[int] = None, run: Optional[LoadedRun] = None,
          checkpoint: str = "latest") -> Dict:
  """Segments ``input_path`` with the run in ``workdir``; writes the mask(s) and the overlay PNG.

  Returns a summary dict: mask (path or list of paths), overlay, panels (titles
  of the overlay's panels), labels (sorted label values written), step,
  shape, checkpoint ('latest' | 'best'), val_dice (the best checkpoint's validation
  Dice, else None), and dice (per foreground class name) when ``gt`` is given.
  """
  run = run or load_run(workdir, step, checkpoint)
  inp = load_input(input_path)
  gt_labels = load_ground_truth(gt, inp, run) if gt else None
  pred = segment(run, inp, batch_size)
  mask_path, overlay_path = _output_paths(inp, output, overlay)
  file_labels = to_file_labels(pred, run, inp.kind)
  if inp.kind == "nifti":
    write_nifti_mask(file_labels, inp.nifti, mask_path)
    written = mask_path
  elif os.path.isdir(input_path) or not _is_tiff(mask_path):
    written = write_tiff_masks(file_labels, inp.stems, mask_path)
  else:
    from PIL import Image
    os.makedirs(os.path.dirname(mask_path) or ".", exist_ok=True)
    Image.fromarray(file_labels[0], mode="L").save(mask_path, format="TIFF")
    written = mask_path
  display = inp.data[..., min(DISPLAY_CHANNEL.get(run.layout, 0), inp.data.shape[-1] - 1)]
  panels = plot_planes(display, pred, gt_labels, inp.spacing, overlay_path, run.class_names,
                       title=f"{os.path.basename(os.path.abspath(input_path))} | "
                             f"{os.path.basename(run.workdir)} step {run.step}"
                             f"{' (best)' if run.checkpoint == 'best' else ''}")
  summary = {"mask": written, "overlay": overlay_path, "panels": panels, "step": run.step,
             "checkpoint": run.checkpoint, "val_dice": run.val_dice,
             "shape": list(pred.shape), "labels": sorted(int(v) for v in np.unique(file_labels)),
             "voxels_per_class": {run.class_names[k]: int((pred == k).sum()) for k in range(run.num_classes)}}
  if gt_labels is not None:
    summary["dice"] = {run.class_names[k]: v
                       for k, v in dice_per_class(pred, gt_labels, run.num_classes).items()}
  return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m fedjax_seg.infer", description=__doc__.split("\n\n")[0])
  ap.add_argument("--workdir", required=True, help="training run folder (config.json + checkpoints/)")
  ap.add_argument("--input", required=True,
                  help="NIfTI file, BraTS patient folder, LGG .tif slice or folder of slices")
  ap.add_argument("--output", required=True,
                  help="mask file (.nii.gz / .tif) or folder (for a folder of slices, or to name it "
                       "<input>_pred.nii.gz)")
  ap.add_argument("--gt", default=None, help="ground truth (NIfTI labels, a _mask.tif, or the folder "
                                             "holding <slice>_mask.tif): shown beside the prediction")
  ap.add_argument("--overlay", default=None, help="overlay PNG path (default: next to the mask)")
  ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  ap.add_argument("--checkpoint", choices=CHECKPOINTS, default="latest",
                  help="latest: the final model / newest checkpoint (default); best: the "
                       "epoch/round with the highest validation Dice (checkpoints_best/)")
  ap.add_argument("--batch_size", type=int, default=None, help="default: config.eval_batch_size")
  args = ap.parse_args(argv)
  from fedjax_seg.data import io
  try:
    s = infer(args.workdir, args.input, args.output, args.gt, args.overlay, args.step, args.batch_size,
              checkpoint=args.checkpoint)
  except (InferError, io.DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  which = f" (best, val Dice {s['val_dice']:.4f})" if s["checkpoint"] == "best" else ""
  print(f"[infer] checkpoint step {s['step']}{which}; segmented {args.input} {tuple(s['shape'])} (z, y, x)")
  print("[infer] voxels per class: " + ", ".join(f"{k} {v}" for k, v in s["voxels_per_class"].items()))
  if "dice" in s:
    print("[infer] Dice vs ground truth: " + ", ".join(f"{k} {v:.4f}" for k, v in s["dice"].items()))
  mask = s["mask"] if isinstance(s["mask"], str) else f"{len(s['mask'])} files in {os.path.dirname(s['mask'][0])}"
  print(f"[infer] mask: {mask}\n[infer] overlay: {s['overlay']} ({len(s['panels'])} panels)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
