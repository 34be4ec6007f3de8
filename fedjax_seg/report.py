"""Markdown report over training runs: tables, learning curves, per-client Dice, weights, overlays.

    python -m fedjax_seg.report RUN [RUN ...] [--out report.md] [--split test]
    python -m fedjax_seg.report compare REF B [C ...] [--metric dice_mean] [--split test] [--out FILE]

Each RUN is a workdir of `launch.py` (config.json, metrics.jsonl,
results.json, overlays.png) or a folder holding such workdirs (a sweep's
``--workdir``: every sub-folder with a config.json is a run). Writes
``report.md`` and its figures under ``<report stem>_files/``:

* one table per split (test, then val) with one row per run: the final
  foreground means (background excluded), per-class Dice, pixel accuracy
  (background included), region Dice / HD95 when the run has them (BraTS
  WT / TC / ET, ACDC classes), communication per round for federated runs.
  Every number is the run's ``results.json`` value rounded to 4 decimals;
* when several runs share a config apart from ``seed``: mean ± sample
  standard deviation (ddof = 1) over those seeds, one row per config;
* learning curves of all runs (validation Dice and training loss against
  epoch / round);
* for federated runs: each client's validation Dice over rounds and the
  aggregation weights over rounds (so FedCostW / CostW+CE / DCEW weighting is
  visible next to FedAvg's sample-size weights), plus the mean weight per client;
* links to (and thumbnails of) each run's sample overlays.

Runs without results.json (still training, or interrupted) are listed as
unfinished and left out of the tables.

``compare``: paired comparison of methods (`fedjax_seg.stats`, docs/comparisons.md).
Each argument is a run (a workdir with results.json) or a sweep (a folder of
runs, one per seed; the seed is config.json's ``seed``); ``PATH@key=value,...``
keeps only the runs whose config matches (one algorithm of a
``seed=...;algorithm=...`` sweep). Runs are paired by
seed, patients by id, on the results.json ``per_patient`` records of
``--split``; the first argument is the reference. Prints a Markdown table
(mean paired difference, hierarchical bootstrap CI, Wilcoxon and Holm p,
wins / ties / losses, minimal detectable difference) and writes it as JSON
to ``--out`` when given.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

IGNORED_CONFIG_KEYS = ("seed", "data.cache_dir")


class ReportError(Exception):
  """No usable run; ``main`` prints it and exits with status 2."""


class Run:
  """One workdir's files, read once."""

  def __init__(self, workdir: str):
    self.workdir = os.path.abspath(workdir)
    with open(os.path.join(self.workdir, "config.json")) as f:
      self.config = json.load(f)
    self.rows = []
    path = os.path.join(self.workdir, "metrics.jsonl")
    if os.path.exists(path):
      with open(path) as f:
        self.rows = [json.loads(line) for line in f if line.strip()]
    self.results = None
    path = os.path.join(self.workdir, "results.json")
    if os.path.exists(path):
      with open(path) as f:
        self.results = json.load(f)
    self.name = os.path.basename(self.workdir)

  @property
  def finished(self) -> bool:
    return self.results is not None

  @property
  def federated(self) -> bool:
    return any("round" in r for r in self.rows) or bool(self.results and "clients" in self.results)

  @property
  def x_key(self) -> str:
    return "round" if self.federated else "epoch"

  @property
  def seed(self):
    return self.config.get("seed")

  @property
  def algorithm(self) -> str:
    return str(self.config.get("algorithm", "?"))

  def flat_config(self) -> Dict[str, object]:
    return flatten(self.config)

  def clients(self) -> List[str]:
    if self.results and self.results.get("clients"):
      return list(self.results["clients"])
    k = max((len(r.get("weights") or r.get("client_val_dice") or []) for r in self.rows), default=0)
    return [f"client{i}" for i in range(k)]


def flatten(d, prefix: str = "") -> Dict[str, object]:
  out = {}
  for k, v in (d or {}).items():
    key = f"{prefix}.{k}" if prefix else str(k)
    if isinstance(v, dict):
      out.update(flatten(v, key))
    else:
      out[key] = json.dumps(v, sort_keys=True) if isinstance(v, list) else v
  return out


def find_runs(paths: Sequence[str]) -> List[str]:
  """Workdirs among ``paths``: a path with config.json, or the sub-folders of a sweep root."""
  out: List[str] = []
  for p in paths:
    p = os.path.abspath(p)
    if not os.path.isdir(p):
      raise ReportError(f"{p} does not exist or is not a folder")
    if os.path.isfile(os.path.join(p, "config.json")):
      out.append(p)
      continue
    subs = sorted(os.path.join(p, n) for n in os.listdir(p)
                  if os.path.isfile(os.path.join(p, n, "config.json")))
    if not subs:
      raise ReportError(f"{p} is neither a run folder (no config.json) nor a folder of runs")
    out += subs
  seen, unique = set(), []
  for p in out:
    if p not in seen:
      seen.add(p)
      unique.append(p)
  return unique


def _labels(runs: List[Run]) -> None:
  """Short unique names: the basename, or the path below the runs' common parent."""
  names = [r.name for r in runs]
  if len(set(names)) < len(names):
    common = os.path.commonpath([r.workdir for r in runs])
    for r in runs:
      r.name = os.path.relpath(r.workdir, common)


def varying_keys(runs: List[Run]) -> List[str]:
  """Config keys (dot paths) whose values differ between runs, ``seed`` and cache paths excluded."""
  flats = [r.flat_config() for r in runs]
  keys = sorted(set().union(*flats)) if flats else []
  out = []
  for k in keys:
    if k in IGNORED_CONFIG_KEYS:
      continue
    vals = {json.dumps(f.get(k), sort_keys=True, default=str) for f in flats}
    if len(vals) > 1:
      out.append(k)
  # algorithm first: it is what comparisons are usually about
  return sorted(out, key=lambda k: (k != "algorithm", k))


def group_runs(runs: List[Run]) -> List[Tuple[str, List[Run]]]:
  """Runs grouped by their config apart from the seed, labelled by the keys that differ."""
  groups: Dict[str, List[Run]] = {}
  for r in runs:
    ident = json.dumps({k: v for k, v in r.flat_config().items() if k not in IGNORED_CONFIG_KEYS},
                       sort_keys=True, default=str)
    groups.setdefault(ident, []).append(r)
  keys = varying_keys(runs)
  # Prefer keys set in every run (e.g. 'algorithm' rather than the fl.* section a
  # centralised config lacks) when they alone tell the groups apart.
  present = [k for k in keys if all(r.flat_config().get(k) is not None for r in runs)]
  label = lambda r, ks: ",".join(f"{k}={_fmt_value(r.flat_config().get(k))}" for k in ks) or r.algorithm
  for ks in (present, keys):
    labels = [label(rs[0], ks) for rs in groups.values()]
    if len(set(labels)) == len(labels):
      break
  return list(zip(labels, groups.values()))


def _fmt_value(v) -> str:
  return v if isinstance(v, str) else json.dumps(v)


# ---------------------------------------------------------------------------
# Tables.
# ---------------------------------------------------------------------------
def metric_columns(runs: List[Run], split: str) -> List[Tuple[str, str]]:
  """(column title, key) pairs: means, per-class Dice, accuracy, region Dice / HD95, bytes."""
  cols = [("Dice (fg mean)", "dice_mean"), ("IoU (fg mean)", "iou_mean")]
  classes: List[str] = []
  for r in runs:
    for c in (r.results or {}).get("class_names", [])[1:]:
      if c not in classes:
        classes.append(c)
  cols += [(f"Dice {c}", f"dice/{c}") for c in classes]
  cols += [("precision", "precision_mean"), ("sensitivity", "sensitivity_mean"),
           ("pixel acc. (incl. bg)", "pixel_accuracy")]
  regions: List[str] = []
  for r in runs:
    for k in ((r.results or {}).get("region_metrics", {}).get(split) or {}):
      if k.startswith(("dice/", "hd95/")) and k not in regions:
        regions.append(k)
  title = lambda k: (f"{k[5:]} Dice (region)" if k.startswith("dice/") else f"{k[5:]} HD95 (mm)")
  order = lambda k: (not k.startswith("dice"), {"WT": 0, "TC": 1, "ET": 2}.get(k[5:], 3))  # BraTS order
  cols += [(title(k), f"region/{k}") for k in sorted(regions, key=order)]
  return cols


def run_value(run: Run, split: str, key: str) -> Optional[float]:
  """The number a table cell shows for ``key`` (from results.json)."""
  res = run.results or {}
  if key.startswith("region/"):
    v = (res.get("region_metrics", {}).get(split) or {}).get(key[len("region/"):])
  else:
    v = (res.get("metrics", {}).get(split) or {}).get(key)
  if isinstance(v, bool) or not isinstance(v, (int, float)):
    return None
  return float(v)


def fmt(v: Optional[float], digits: int = 4) -> str:
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return "–"
  return f"{v:.{digits}f}"


def _digits(key: str) -> int:
  return 2 if "hd95" in key else 4


def runs_table(runs: List[Run], split: str) -> str:
  cols = metric_columns(runs, split)
  head = ["run", "algorithm", "seed", "epochs / rounds"] + [c for c, _ in cols] + ["MB / round"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in runs:
    res = r.results
    length = res.get("rounds", res.get("epochs", "–"))
    mb = res.get("bytes_per_round")
    cells = [r.name, r.algorithm, str(r.seed), str(length)]
    cells += [fmt(run_value(r, split, k), _digits(k)) for _, k in cols]
    cells.append(fmt(mb / 1e6, 3) if mb else "–")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
  """Mean and sample standard deviation (ddof = 1; 0 for a single value)."""
  a = np.asarray(values, np.float64)
  return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def groups_table(groups: List[Tuple[str, List[Run]]], split: str) -> str:
  runs = [r for _, rs in groups for r in rs]
  cols = metric_columns(runs, split)
  head = ["config", "n", "seeds"] + [c for c, _ in cols]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for label, rs in groups:
    cells = [label, str(len(rs)), ",".join(str(r.seed) for r in rs)]
    for _, k in cols:
      vals = [v for v in (run_value(r, split, k) for r in rs) if v is not None and not math.isnan(v)]
      if not vals:
        cells.append("–")
        continue
      m, s = mean_std(vals)
      d = _digits(k)
      cells.append(f"{m:.{d}f} ± {s:.{d}f}" if len(vals) > 1 else f"{m:.{d}f}")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def weights_table(run: Run) -> str:
  """Mean (min–max) aggregation weight per client over rounds."""
  ws = np.array([r["weights"] for r in run.rows if r.get("weights")], np.float64)
  if not ws.size:
    return ""
  names = run.clients()
  lines = ["| client | mean weight | min | max |", "|---|---|---|---|"]
  for i in range(ws.shape[1]):
    n = names[i] if i < len(names) else f"client{i}"
    lines.append(f"| {n} | {ws[:, i].mean():.4f} | {ws[:, i].min():.4f} | {ws[:, i].max():.4f} |")
  return "\n".join(lines)


# ---------------------------------------------------------------------------
# Figures.
# ---------------------------------------------------------------------------
def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def plot_learning_curves(runs: List[Run], path: str) -> bool:
  runs = [r for r in runs if r.rows]
  if not runs:
    return False
  plt = _plt()
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  for r in runs:
    xs = [row.get(r.x_key) for row in r.rows]
    dice = [row.get("val_dice_mean") for row in r.rows]
    pts = [(x, y) for x, y in zip(xs, dice) if y is not None]
    if pts:
      axes[0].plot(*zip(*pts), marker=".", label=r.name)
    loss = [(x, row.get("train_loss")) for x, row in zip(xs, r.rows) if row.get("train_loss") is not None]
    if loss:
      axes[1].plot(*zip(*loss), marker=".", label=r.name)
  kinds = sorted({r.x_key for r in runs})
  axes[0].set_xlabel(" / ".join(kinds)); axes[0].set_ylabel("val Dice (foreground mean)")
  axes[0].set_ylim(0, 1); axes[0].grid(alpha=.3)
  axes[1].set_xlabel(" / ".join(kinds)); axes[1].set_ylabel("train loss"); axes[1].grid(alpha=.3)
  axes[0].legend(fontsize=7)
  from matplotlib.ticker import MaxNLocator
  for ax in axes:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  fig.tight_layout(); fig.savefig(path, dpi=80); plt.close(fig)
  return True


def _client_series(run: Run, key: str) -> Tuple[List[int], np.ndarray]:
  rows = [r for r in run.rows if r.get(key)]
  xs = [r["round"] for r in rows]
  vals = np.array([[np.nan if v is None else v for v in r[key]] for r in rows], np.float64)
  return xs, vals


def plot_clients(runs: List[Run], key: str, ylabel: str, path: str, stacked: bool = False) -> bool:
  """One panel per federated run: ``key`` (a per-client list per round) over rounds."""
  runs = [r for r in runs if r.federated and any(row.get(key) for row in r.rows)]
  if not runs:
    return False
  plt = _plt()
  n = len(runs)
  cols = min(n, 3)
  rows_ = int(math.ceil(n / cols))
  fig, axes = plt.subplots(rows_, cols, figsize=(4.2 * cols, 3.2 * rows_), squeeze=False)
  for ax, r in zip(axes.flat, runs):
    xs, vals = _client_series(r, key)
    names = r.clients()
    if stacked:
      ax.stackplot(xs, np.nan_to_num(vals).T, labels=[names[i] if i < len(names) else str(i)
                                                      for i in range(vals.shape[1])], alpha=.8)
      ax.set_ylim(0, 1)
    else:
      for i in range(vals.shape[1]):
        ax.plot(xs, vals[:, i], marker=".", label=names[i] if i < len(names) else str(i))
      if key == "client_val_dice":
        ax.set_ylim(0, 1)
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(r.name, fontsize=9); ax.set_xlabel("round"); ax.set_ylabel(ylabel)
    ax.grid(alpha=.3); ax.legend(fontsize=7)
  for ax in list(axes.flat)[n:]:
    ax.set_axis_off()
  fig.tight_layout(); fig.savefig(path, dpi=80); plt.close(fig)
  return True


# ---------------------------------------------------------------------------
def write_report(paths: Sequence[str], out: str = "report.md", splits: Sequence[str] = ("test", "val"),
                 title: str = "fedjax_seg report", command: Optional[str] = None) -> str:
  """Writes the Markdown report for the runs under ``paths``; returns its text."""
  runs = [Run(p) for p in find_runs(paths)]
  if not runs:
    raise ReportError("no runs")
  _labels(runs)
  out = os.path.abspath(out)
  base = os.path.dirname(out)
  files = os.path.splitext(out)[0] + "_files"
  os.makedirs(files, exist_ok=True)
  rel = lambda p: os.path.relpath(p, base)
  done = [r for r in runs if r.finished]
  pending = [r for r in runs if not r.finished]

  lines = [f"# {title}", ""]
  if command:
    lines += ["```", command, "```", ""]
  lines += [f"{len(runs)} run(s), {len(done)} finished. Foreground means exclude the background "
            "class; pixel accuracy includes it. Numbers are the runs' `results.json`, rounded.", ""]
  if pending:
    lines += ["Unfinished (no results.json; re-run the same command to resume): " + ", ".join(
        f"`{r.name}` ({r.x_key} {r.rows[-1].get(r.x_key) if r.rows else 0})" for r in pending), ""]
  groups = group_runs(done) if done else []
  for split in splits:
    have = [r for r in done if (r.results.get("metrics") or {}).get(split)]
    if not have:
      continue
    lines += [f"## Results: {split} split", "", runs_table(have, split), ""]
    multi = [(label, [r for r in rs if r in have]) for label, rs in groups]
    multi = [(label, rs) for label, rs in multi if rs]
    if any(len(rs) > 1 for _, rs in multi):
      lines += [f"### Mean ± std over seeds ({split})", "",
                "Runs with the same config apart from `seed`; std is the sample standard deviation "
                "(ddof = 1).", "", groups_table(multi, split), ""]

  lc = os.path.join(files, "learning_curves.png")
  if plot_learning_curves(runs, lc):
    lines += ["## Learning curves", "", f"![learning curves]({rel(lc)})", ""]
  cd = os.path.join(files, "client_val_dice.png")
  if plot_clients(runs, "client_val_dice", "client val Dice", cd):
    lines += ["## Per-client validation Dice (federated runs)", "",
              "The global model after each round, evaluated on each hospital's own validation "
              "patients (round 0 = the initial model).", "", f"![per-client Dice]({rel(cd)})", ""]
  wp = os.path.join(files, "aggregation_weights.png")
  if plot_clients(runs, "weights", "aggregation weight", wp, stacked=True):
    lines += ["## Aggregation weights over rounds", "",
              "Weight of each client's model in the server average (stacked; they sum to 1). "
              "FedAvg gives s_k / S; FedCostW / CostW+CE / DCEW move weight towards clients whose "
              "cost fell (and, for DCEW, whose Dice rose) during the round (SPEC §4.1).", "",
              f"![aggregation weights]({rel(wp)})", ""]
    for r in runs:
      t = weights_table(r)
      if t:
        lines += [f"`{r.name}` ({r.algorithm}): mean weight per client over rounds", "", t, ""]
  overlays = [(r, os.path.join(r.workdir, "overlays.png")) for r in runs
              if os.path.exists(os.path.join(r.workdir, "overlays.png"))]
  if overlays:
    lines += ["## Sample overlays", "",
              "Test slices: image, ground truth, prediction (blue 1 necrotic/core or tumour, green 2 "
              "edema, red 3 enhancing).", ""]
    for r, p in overlays:
      lines += [f"- [`{r.name}`]({rel(p)})"]
    r, p = overlays[0]
    lines += ["", f"![overlays {r.name}]({rel(p)})", ""]
  text = "\n".join(lines).rstrip() + "\n"
  tmp = out + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, out)
  return text


# ---------------------------------------------------------------------------
# compare: paired (seed, patient) comparison of methods.
# ---------------------------------------------------------------------------
def _read_json(path: str):
  with open(path) as f:
    return json.load(f)


def method_runs(path: str) -> List[str]:
  """Run workdirs of one compare argument: the folder itself when it holds
  results.json or config.json (a run), else its sub-folders that do (a sweep)."""
  p = os.path.abspath(path)
  if not os.path.isdir(p):
    raise ReportError(f"{path}: does not exist or is not a folder")
  is_run = lambda d: any(os.path.isfile(os.path.join(d, f)) for f in ("results.json", "config.json"))
  if is_run(p):
    return [p]
  subs = sorted(os.path.join(p, n) for n in os.listdir(p) if is_run(os.path.join(p, n)))
  if not subs:
    raise ReportError(f"{path}: neither a run (no results.json) nor a sweep (no sub-folder with one)")
  return subs


def split_method_arg(arg: str) -> Tuple[str, Dict[str, str]]:
  """'runs/cmp@algorithm=dcew,fl.rounds=5' -> ('runs/cmp', {'algorithm': 'dcew', 'fl.rounds': '5'}).

  No '@' (or an existing path containing one): the whole argument, no filter.
  """
  if "@" not in arg or os.path.exists(arg):
    return arg, {}
  path, _, spec = arg.rpartition("@")
  filt = {}
  for item in spec.split(","):
    key, eq, value = item.partition("=")
    if not eq or not key:
      raise ReportError(f"{arg}: filter {item!r} is not key=value")
    filt[key.strip()] = value.strip()
  return path, filt


def _matches(config: Dict, filt: Dict[str, str]) -> bool:
  flat = flatten(config)
  return all(k in flat and value in (str(flat[k]), json.dumps(flat[k])) for k, value in filt.items())


def load_method(path: str, split: str, metric: str) -> Dict[object, Dict[str, float]]:
  """{seed: {patient id: value of ``metric``}} of the run or sweep at ``path``.

  ``path`` may end in ``@key=value[,key=value]`` (config dot paths) to keep
  only the runs of a sweep whose config.json matches, e.g. one algorithm of
  a ``seed=...;algorithm=...`` sweep. ``metric`` names a per-patient record
  field: 'dice_mean', 'iou_mean', 'hd95_mean', or '<field>/<name>' such as
  'dice/tumour', 'hd95/LV', 'region_dice/WT'.
  """
  path, filt = split_method_arg(path)
  out: Dict[object, Dict[str, float]] = {}
  where: Dict[object, str] = {}
  for wd in method_runs(path):
    cfg_path = os.path.join(wd, "config.json")
    config = _read_json(cfg_path) if os.path.isfile(cfg_path) else None
    if filt and (config is None or not _matches(config, filt)):
      continue
    res_path = os.path.join(wd, "results.json")
    if not os.path.isfile(res_path):
      raise ReportError(f"{wd}: no results.json (unfinished run?)")
    if config is None or "seed" not in config:
      raise ReportError(f"{wd}: no config.json with a 'seed' to pair runs by")
    seed = config["seed"]
    recs = (_read_json(res_path).get("per_patient") or {}).get(split)
    if not recs:
      raise ReportError(f"{wd}: results.json has no per_patient records for split {split!r} "
                        "(written by train.finish; re-run the evaluation)")
    if seed in out:
      raise ReportError(f"{path}: two runs with seed {seed} ({where[seed]}, {wd}): "
                        "select one config's runs, e.g. PATH@algorithm=NAME")
    vals = {}
    for r in recs:
      v = _record_value(r, metric)
      if v is None:
        raise ReportError(f"{wd}: no per-patient metric {metric!r}; available: "
                          + ", ".join(_record_metrics(r)))
      vals[str(r["id"])] = v
    out[seed], where[seed] = vals, wd
  if not out:
    raise ReportError(f"{path}: no run matches {','.join(f'{k}={v}' for k, v in filt.items())}")
  return out


def _record_value(rec: Dict, metric: str) -> Optional[float]:
  v = rec
  for part in metric.split("/", 1):
    v = v.get(part) if isinstance(v, dict) else None
  if isinstance(v, bool) or not isinstance(v, (int, float)):
    return None
  return float(v)


def _record_metrics(rec: Dict) -> List[str]:
  out = []
  for k, v in rec.items():
    if isinstance(v, dict):
      out += [f"{k}/{n}" for n in v]
    elif isinstance(v, float):
      out.append(k)
  return out


def _method_names(args: Sequence[str]) -> List[str]:
  """Short unique names: the folder's basename (or the filter, for PATH@key=value), else the argument."""
  def short(arg):
    path, filt = split_method_arg(arg)
    return ",".join(f"{k}={v}" for k, v in filt.items()) if filt else os.path.basename(os.path.normpath(path))
  names = [short(a) for a in args]
  return names if len(set(names)) == len(names) else [os.path.normpath(a) for a in args]


def compare_main(argv: Sequence[str]) -> int:
  from fedjax_seg import stats
  ap = argparse.ArgumentParser(
      prog="python -m fedjax_seg.report compare",
      description="Paired (seed, patient) comparison of runs or sweeps against the first one.")
  ap.add_argument("methods", nargs="+",
                  help="runs or sweeps (PATH@key=value,... keeps a sweep's matching runs); "
                       "the first is the reference")
  ap.add_argument("--metric", default="dice_mean",
                  help="per-patient metric: dice_mean, iou_mean, hd95_mean, dice/<class>, hd95/<class>, "
                       "region_dice/<R>, region_hd95/<R> (default dice_mean)")
  ap.add_argument("--split", default="test", help="test or val (default test)")
  ap.add_argument("--out", default=None, help="also write the result as JSON here")
  ap.add_argument("--n-boot", type=int, default=stats.DEFAULT_N_BOOT,
                  help=f"bootstrap resamples (default {stats.DEFAULT_N_BOOT})")
  ap.add_argument("--rng-seed", type=int, default=stats.DEFAULT_RNG_SEED,
                  help=f"bootstrap RNG seed (default {stats.DEFAULT_RNG_SEED})")
  ap.add_argument("--ci", type=float, default=stats.DEFAULT_CI_LEVEL,
                  help=f"confidence level (default {stats.DEFAULT_CI_LEVEL})")
  args = ap.parse_args(list(argv))
  try:
    if len(args.methods) < 2:
      raise ReportError("compare needs a reference and at least one more run or sweep")
    if args.n_boot < 2 or not 0.0 < args.ci < 1.0:
      raise ReportError(f"--n-boot must be >= 2 and --ci in (0, 1), got {args.n_boot}, {args.ci}")
    names = _method_names(args.methods)
    data = {n: load_method(p, args.split, args.metric) for n, p in zip(names, args.methods)}
    for n in names[1:]:
      if not set(data[names[0]]) & set(data[n]):
        raise ReportError(f"no common seeds between {names[0]} (seeds {sorted(data[names[0]], key=str)}) "
                          f"and {n} (seeds {sorted(data[n], key=str)})")
    result = stats.compare(data, names[0], args.metric, args.n_boot, args.rng_seed, args.ci)
  except (ReportError, OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  result["split"] = args.split
  result["paths"] = dict(zip(names, args.methods))
  print(f"## Paired comparison ({args.split} split)\n\n" + stats.markdown(result), end="")
  if args.out:
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
      json.dump(result, f, indent=1)
    os.replace(tmp, args.out)
    print(f"\n[compare] JSON written to {os.path.abspath(args.out)}")
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv and argv[0] == "compare":
    return compare_main(argv[1:])
  ap = argparse.ArgumentParser(prog="python -m fedjax_seg.report",
                               description="Markdown report over training runs (or sweep folders). "
                               "'python -m fedjax_seg.report compare --help': paired comparisons.")
  ap.add_argument("runs", nargs="+", help="run workdirs, or folders of runs (a sweep's --workdir)")
  ap.add_argument("--out", default="report.md", help="Markdown file to write (figures in <stem>_files/)")
  ap.add_argument("--splits", default="test,val", help="comma-separated splits to tabulate")
  args = ap.parse_args(argv)
  try:
    write_report(args.runs, args.out, tuple(s for s in args.splits.split(",") if s),
                 command="python -m fedjax_seg.report " + " ".join(args.runs))
  except (ReportError, OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"[report] written to {os.path.abspath(args.out)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
