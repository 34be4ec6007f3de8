"""Data-set specific final evaluation, called by `fedjax_seg.train.finish`.

For data sets whose voxel spacing is known (the NIfTI layouts, BraTS and
ACDC) this adds, per split, region Dice and HD95 in mm:

* BraTS: regions WT = {1,2,4}, TC = {1,4}, ET = {4} (on remapped labels,
  `metrics.BRATS_REGIONS`), plus the seed 001 metric table
  (brats_3d_unet_report.md, table 3) with columns Train / Validation / Test
  and the seed's reported test column beside ours;
* ACDC (or any other layout with spacing): one region per foreground class.

HD95 is computed per patient volume with `metrics.hd95` and the spacing of
the preprocessed grid (2D models: a patient's slices are stacked back along z),
then averaged over volumes. Conventions (from `metrics.hd95`): both masks
empty -> 0 mm; exactly one empty -> the image diagonal in mm (a missed or
hallucinated region is maximally penalised). Region Dice is one global Dice
over all voxels of the split (empty vs empty = 1).

For every data set, `per_patient_report` adds one record per validation and
test patient (results.json ``per_patient``): per-class Dice and IoU over all
of the patient's voxels, per-class HD95 on the patient's 3D volume (in mm
when the spacing is known, else in pixels with unit spacing on every axis,
z = slice index for stacked 2D slices), their foreground means, and for
BraTS the WT / TC / ET region Dice and HD95. These records are what
``python -m fedjax_seg.report compare`` pairs across runs (`fedjax_seg.stats`).
"""
from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_seg import metrics, runlog, steps

# Seed 001 (brats_3d_unet_report.md, table 3), reported test column.
SEED001_TEST = {
    "Loss": 0.0269, "Accuracy": 0.9939, "mean IoU (incl. background)": 0.8212, "Dice Coef": 0.5927,
    "Precision": 0.9940, "Sensitivity": 0.9928, "Specificity": 0.9980, "Necrotic Dice coef": 0.5407,
    "Edema Dice coef": 0.7163, "Enhancing Dice coef": 0.5731,
}


# The HD95 reduction used for every HD95 in results.json (`metrics.hd95`):
# 'pooled' = the 95th percentile of both directions' surface distances
# pooled (medpy's hd95). Recorded in results.json as ``hd95_convention``.
HD95_CONVENTION = "pooled"


def make_predict(fns) -> Callable:
  """Jitted ``predict(variables, x) -> int32 class map`` (argmax of the logits)."""
  return jax.jit(lambda v, x: jnp.argmax(fns.apply(v, x)[0], axis=-1).astype(jnp.int32))


def predict(predict_fn, variables, x: np.ndarray, batch_size: int) -> np.ndarray:
  """Class maps for samples ``x`` [N, ...], in fixed-size padded batches (one compile)."""
  out = []
  for i in range(0, len(x), batch_size):
    bx, _, bm = steps.pad_batch(x[i:i + batch_size], np.zeros((len(x[i:i + batch_size]),), np.int32),
                                batch_size)
    out.append(np.asarray(predict_fn(variables, bx))[: int(bm.sum())])
  return np.concatenate(out) if out else np.zeros((0,) + x.shape[1:-1], np.int32)


def predict_patients(predict_fn, variables, ds, ids: Sequence[str], batch_size: int
                     ) -> Dict[str, np.ndarray]:
  """Class maps of patients ``ids``: {id: int32 [S, ...] (the patient's samples)}.

  The patients' samples are pooled and run in fixed-size padded batches of
  ``batch_size`` (one compile whatever the patients' sizes), then split back.
  """
  ids = list(ids)
  if not ids:
    return {}
  x, _ = ds.arrays(ids)
  pred = predict(predict_fn, variables, x, batch_size)
  out, i = {}, 0
  for pid in ids:
    n = len(ds.patients[pid].labels)
    out[pid] = pred[i:i + n]
    i += n
  return out


def patient_volumes(labels: np.ndarray, pred: np.ndarray) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
  """A patient's (pred, gt) 3D volumes: 2D slices [S, H, W] stacked as one volume; 3D samples one each."""
  if labels.ndim == 3:
    yield pred, labels
  else:
    for p, g in zip(pred, labels):
      yield p, g


def regions_for(class_names: Sequence[str]) -> Tuple[Tuple[str, Tuple[int, ...]], ...]:
  """Evaluation regions: BraTS WT / TC / ET, else one per foreground class."""
  if tuple(class_names) == metrics.BRATS_CLASS_NAMES:
    return metrics.BRATS_REGIONS
  return tuple((name, (c,)) for c, name in enumerate(class_names) if c > 0)


def region_metrics(ds, ids: Sequence[str], predict_fn, variables, batch_size: int,
                   preds: Optional[Dict[str, np.ndarray]] = None) -> Dict[str, float]:
  """Region Dice (global over the split) and mean HD95 (mm, per volume) for patients ``ids``.

  ``preds``: {id: class map} already computed (`predict_patients`); patients
  missing from it are predicted here. Returns {'dice/<R>', 'hd95/<R>',
  'num_volumes'} for each region R.
  """
  regions = regions_for(ds.class_names)
  counts = np.zeros((len(regions), 3))
  hd: Dict[str, List[float]] = {name: [] for name, _ in regions}
  n_vol = 0
  for pid in ids:
    p = ds.patients[pid]
    pred = preds[pid] if preds is not None and pid in preds else predict(
        predict_fn, variables, p.images, batch_size)
    for pv, gv in patient_volumes(p.labels, pred):
      n_vol += 1
      for r, (name, classes) in enumerate(regions):
        a, b = np.isin(pv, classes), np.isin(gv, classes)
        counts[r] += [np.sum(a & b), np.sum(a & ~b), np.sum(~a & b)]
        hd[name].append(metrics.hd95(a, b, p.spacing, convention=HD95_CONVENTION))
  out: Dict[str, float] = {}
  for r, (name, _) in enumerate(regions):
    tp, fp, fn = counts[r]
    out[f"dice/{name}"] = float(2 * tp / (2 * tp + fp + fn)) if (tp + fp + fn) > 0 else 1.0
    out[f"hd95/{name}"] = float(np.mean(hd[name])) if hd[name] else float("nan")
  out["num_volumes"] = n_vol
  return out


def _hd95_over_volumes(labels: np.ndarray, pred: np.ndarray, classes: Sequence[int],
                       spacing: Optional[Sequence[float]]) -> float:
  """Mean over the patient's volumes (one for 2D slices, one per 3D sample) of the HD95 of ``classes``."""
  vals = [metrics.hd95(np.isin(pv, classes), np.isin(gv, classes), spacing, convention=HD95_CONVENTION)
          for pv, gv in patient_volumes(labels, pred)]
  return float(np.mean(vals))


def patient_record(patient, pred: np.ndarray, class_names: Sequence[str], use_spacing: bool) -> Dict:
  """One patient's metrics (JSON-ready).

  Args:
    patient: `pipeline.PatientArrays` (labels int [S, H, W] or [S, D, H, W]).
    pred: int class map of the same shape as ``patient.labels``.
    class_names: C names, class 0 = background.
    use_spacing: HD95 in mm with ``patient.spacing``; False: unit spacing (pixels).
  Returns {'id', 'site', 'num_samples', 'dice': {class: v} (all C classes),
  'iou': {class: v}, 'hd95': {class: v} (foreground classes), 'gt_voxels':
  {class: int} (foreground), 'dice_mean' / 'iou_mean' / 'hd95_mean' (over
  the foreground classes)} and for BraTS 'region_dice' / 'region_hd95'
  {WT, TC, ET}. Dice / IoU count every voxel of the patient (empty vs empty
  = 1); HD95 as `metrics.hd95` (both empty 0, one empty the image diagonal).
  """
  labels = np.asarray(patient.labels)
  pred = np.asarray(pred)
  if pred.shape != labels.shape:
    raise ValueError(f"patient {patient.id}: prediction {pred.shape} vs labels {labels.shape}")
  m = _confusion(labels, pred, len(class_names))
  pooled = metrics.metrics_from_counts(_counts(m), class_names=tuple(class_names))
  spacing = patient.spacing if use_spacing else None
  fg = list(enumerate(class_names))[1:]
  rec: Dict = {"id": patient.id, "site": patient.site, "num_samples": int(len(labels)),
               "dice": {n: pooled[f"dice/{n}"] for n in class_names},
               "iou": {n: pooled[f"iou/{n}"] for n in class_names},
               "hd95": {n: _hd95_over_volumes(labels, pred, (k,), spacing) for k, n in fg},
               "gt_voxels": {n: int(m[k].sum()) for k, n in fg}}
  for key in ("dice", "iou", "hd95"):
    rec[f"{key}_mean"] = float(np.mean([rec[key][n] for _, n in fg])) if fg else float("nan")
  if tuple(class_names) == metrics.BRATS_CLASS_NAMES:
    rec["region_dice"] = metrics.brats_region_dice(pred, labels)
    rec["region_hd95"] = {name: _hd95_over_volumes(labels, pred, cls, spacing)
                          for name, cls in metrics.BRATS_REGIONS}
  return rec


def _confusion(labels: np.ndarray, pred: np.ndarray, c: int) -> np.ndarray:
  """int64 [C, C] confusion matrix (rows: ground truth, columns: prediction)."""
  return np.bincount((np.asarray(labels).astype(np.int64) * c + np.asarray(pred)).reshape(-1),
                     minlength=c * c).reshape(c, c)


def _counts(m: np.ndarray) -> np.ndarray:
  """[C, 4] (tp, fp, fn, tn) of a confusion matrix, as `metrics.metrics_from_counts` reads."""
  tp = np.diag(m).astype(np.float64)
  fp, fn = m.sum(0) - tp, m.sum(1) - tp
  return np.stack([tp, fp, fn, m.sum() - tp - fp - fn], axis=1)


def per_patient_report(ds, preds: Dict[str, Dict[str, np.ndarray]]) -> Dict:
  """results.json ``per_patient``: {split: [`patient_record`, ...] in ``ds.splits[split]`` order,
  'hd95_convention', 'hd95_units' ('mm' when every patient has a spacing, else 'pixels')}.

  ``preds``: {split: {patient id: class map}} (`predict_patients`).
  """
  use_spacing = bool(ds.patients) and all(p.spacing is not None for p in ds.patients.values())
  out: Dict = {split: [patient_record(ds.patients[pid], pred, ds.class_names, use_spacing)
                       for pid, pred in by_id.items()] for split, by_id in preds.items()}
  out["hd95_convention"] = HD95_CONVENTION
  out["hd95_units"] = "mm" if use_spacing else "pixels"
  return out


def _with_background_means(m: Dict[str, float], class_names: Sequence[str]) -> Dict[str, float]:
  out = dict(m)
  for metric in ("dice", "iou"):
    vals = [m[f"{metric}/{n}"] for n in class_names if f"{metric}/{n}" in m]
    if vals:
      out[f"{metric}_mean_with_background"] = float(np.mean(vals))
  return out


def seed001_table(named: Dict[str, Dict[str, float]], with_seed: bool = True) -> Tuple[str, Dict]:
  """Seed 001's table (rows = metrics, columns = splits) + our extra rows.

  ``named``: {'Train' | 'Validation' | 'Test': metrics dict with the keys of
  `metrics.METRIC_TABLE_KEYS`, ``*_mean_with_background`` and
  ``region/dice/<R>``, ``region/hd95/<R>``}.
  Returns (Markdown text, {row: {column: value}}).
  """
  rows: List[Tuple[str, str]] = []
  for row, key in metrics.METRIC_TABLE_KEYS.items():
    rows.append((row, key))
    if row == "mean IoU":
      rows.append(("mean IoU (incl. background)", "iou_mean_with_background"))
    if row == "Dice Coef":
      rows.append(("Dice Coef (incl. background)", "dice_mean_with_background"))
  for name, _ in metrics.BRATS_REGIONS:
    rows.append((f"{name} Dice", f"region/dice/{name}"))
  for name, _ in metrics.BRATS_REGIONS:
    rows.append((f"{name} HD95 (mm)", f"region/hd95/{name}"))
  cols = list(named) + (["seed 001 Test"] if with_seed else [])
  table: Dict[str, Dict[str, Optional[float]]] = {}
  lines = ["| | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
  for row, key in rows:
    vals = {c: named[c].get(key) for c in named}
    if with_seed:
      vals["seed 001 Test"] = SEED001_TEST.get(row)
    table[row] = vals
    cells = ["–" if v is None else (f"{v:.2f}" if "HD95" in row else f"{v:.4f}") for v in vals.values()]
    lines.append(f"| {row} | " + " | ".join(cells) + " |")
  return "\n".join(lines), table


def dataset_report(config, fns, variables, ds, eval_batch, split_metrics: Dict[str, Dict],
                   predict_fn: Optional[Callable] = None,
                   preds: Optional[Dict[str, Dict[str, np.ndarray]]] = None) -> Optional[Dict]:
  """Extra final metrics for data sets with known voxel spacing; None for the others (LGG).

  ``predict_fn`` (`make_predict`) and ``preds`` ({split: {id: class map}})
  reuse what the caller already compiled / predicted.
  Returns {'results': {...merged into results.json...}, 'text': printed block}.
  """
  if not ds.patients or any(p.spacing is None for p in ds.patients.values()):
    return None
  bs = config.eval_batch_size
  predict_fn = make_predict(fns) if predict_fn is None else predict_fn
  preds = preds or {}
  region = {name: region_metrics(ds, ds.splits[name], predict_fn, variables, bs, preds.get(name))
            for name in ("train", "val", "test") if ds.splits.get(name)}
  results: Dict = {"region_metrics": region, "hd95_units": "mm", "hd95_convention": HD95_CONVENTION}
  is_brats = tuple(ds.class_names) == metrics.BRATS_CLASS_NAMES
  if not is_brats:
    names = [n for n, _ in regions_for(ds.class_names)]
    keys = [f"dice/{n}" for n in names] + [f"hd95/{n}" for n in names]
    text = ("\n[results] per-class Dice (global) and HD95 (mm, mean over volumes)\n"
            + runlog.metrics_table(region, keys))
    return {"results": results, "text": text}
  # BraTS: the seed 001 table, Train / Validation / Test.
  per_split = dict(split_metrics)
  if "train" in region:
    x, y = ds.split("train")
    per_split["train"] = steps.evaluate(eval_batch, variables, x, y, bs, ds.class_names)
  named = {}
  for split, col in (("train", "Train"), ("val", "Validation"), ("test", "Test")):
    if split in per_split and split in region:
      m = _with_background_means(per_split[split], ds.class_names)
      m.update({f"region/{k}": v for k, v in region[split].items()})
      named[col] = m
  text, table = seed001_table(named)
  results["seed001_table"] = table
  results["train_metrics"] = per_split.get("train")
  note = ("\n[results] seed 001 metric table (brats_3d_unet_report.md). Dice Coef / mean IoU / Precision / "
          "Sensitivity / Specificity: mean over the 3 tumour classes (background excluded); '(incl. "
          "background)' rows and Accuracy include it. The seed's Precision / Sensitivity / Specificity are "
          "Keras voxel-wise averages dominated by background, so not comparable to our class means. "
          "WT/TC/ET Dice: global over the split; HD95: mean over volumes, mm, from the preprocessed "
          "voxel spacing (one empty mask -> image diagonal).\n")
  return {"results": results, "text": note + text}


def overlay_samples(x: np.ndarray, y: np.ndarray, pred: np.ndarray):
  """2D views for `runlog.plot_overlays`: 3D samples [N, D, H, W, C] -> their most-foreground axial slice."""
  if x.ndim != 5:
    return x, y, pred
  idx = [int(np.argmax((yi > 0).sum(axis=(1, 2)))) for yi in y]
  take = lambda a: np.stack([ai[k] for ai, k in zip(a, idx)])
  return take(x), take(y), take(pred)


def per_site_summary(records: Sequence[Dict]) -> Dict:
  """Per-site Dice of one split's `patient_record` list: {'sites': {site: {'dice_mean':
  mean over the site's patients of their foreground Dice, 'patients': n}}, 'worst_site',
  'worst_dice', 'best_dice', 'spread' (best − worst), 'sd' (over sites)}; {} when empty."""
  by_site: Dict[str, List[float]] = {}
  for r in records:
    if np.isfinite(r["dice_mean"]):
      by_site.setdefault(str(r["site"]), []).append(float(r["dice_mean"]))
  if not by_site:
    return {}
  sites = {s: {"dice_mean": float(np.mean(v)), "patients": len(v)}
           for s, v in sorted(by_site.items())}
  vals = np.array([v["dice_mean"] for v in sites.values()])
  worst = min(sites, key=lambda s: sites[s]["dice_mean"])
  return {"sites": sites, "worst_site": worst, "worst_dice": float(vals.min()),
          "best_dice": float(vals.max()), "spread": float(vals.max() - vals.min()),
          "sd": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0}


def per_site_text(summary: Dict, split: str = "test") -> str:
  """One printed line of `per_site_summary`."""
  if not summary:
    return ""
  parts = " ".join(f"{s} {v['dice_mean']:.3f} (n={v['patients']})"
                   for s, v in summary["sites"].items())
  return (f"[results] per-site {split} Dice (mean over patients): {parts}; worst "
          f"{summary['worst_site']} {summary['worst_dice']:.3f}, spread {summary['spread']:.3f}")


def metrics_from_preds(ds, preds: Dict[str, np.ndarray]) -> Dict[str, float]:
  """Pooled metrics of a split from per-patient class maps (the counts `steps.evaluate`
  accumulates, without the loss): for models that differ by patient (FedBN, Ditto)."""
  if not preds:
    return {}
  c = len(ds.class_names)
  total = sum(_confusion(ds.patients[pid].labels, pred, c) for pid, pred in preds.items())
  return metrics.metrics_from_counts(_counts(total), class_names=tuple(ds.class_names))


def predict_by_model(predict_fn, models: Sequence, model_of_patient: Dict[str, int], fallback,
                     ds, ids: Sequence[str], batch_size: int) -> Dict[str, np.ndarray]:
  """Class maps of patients ``ids``, each by ``models[model_of_patient[id]]`` (``fallback``
  for a patient not in the map, e.g. of a site that never trained)."""
  groups: Dict[int, List[str]] = {}
  for pid in ids:
    groups.setdefault(model_of_patient.get(pid, -1), []).append(pid)
  out: Dict[str, np.ndarray] = {}
  for g, gids in groups.items():
    out.update(predict_patients(predict_fn, models[g] if g >= 0 else fallback, ds, gids,
                                batch_size))
  return {pid: out[pid] for pid in ids}
