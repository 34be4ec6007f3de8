"""Shared helper of the table benchmarks: run a config in its workdir, or reuse it.

A finished run (``results.json`` present) is reused only when the config stored
beside it equals the requested one; otherwise the benchmark stops with an error
naming the differing keys, so a table is never silently built from runs made
with another budget. Interrupted runs resume from their orbax checkpoint.
"""
from __future__ import annotations

import gzip
import json
import os
from typing import Dict


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _config_differs(old_blob: Dict, config) -> list:
  """The keys whose values differ between a stored run's config and ``config``; keys the
  stored run lacks (added to the configs after it ran) do not count, as for launch.py
  (runlog.config_diff)."""
  from fedjax_seg import runlog
  return [k for k, _, _ in runlog.config_diff(old_blob, json.loads(config.to_json_best_effort()),
                                              allowed=())]


def run_or_load(config, workdir: str, tag: str = "bench", keep: str = "") -> Dict:
  """Returns results.json of the run of ``config`` in ``workdir`` (running it if needed).

  keep: a folder (e.g. benchmarks/results/kept_runs/<table>, committed; not under a folder named runs/, which git ignores) holding
  ``<basename(workdir)>.json.gz`` = {"config", "results"} of each finished run: a run
  found there with the same config is not run again, so a table can be finished by a
  later session on another machine (runs/ does not survive)."""
  from fedjax_seg import compile_cache, train
  compile_cache.enable(config.get("compile_cache_dir"))  # as launch.py: programs persist across runs
  kept = os.path.join(keep, os.path.basename(os.path.normpath(workdir)) + ".json.gz") if keep else ""
  if kept and os.path.exists(kept):
    with gzip.open(kept, "rt") as f:
      blob = json.load(f)
    if not _config_differs(blob["config"], config):
      print(f"[{tag}] kept result -> {kept}", flush=True)
      return blob["results"]
  done = os.path.join(workdir, "results.json")
  stored = os.path.join(workdir, "config.json")
  if os.path.exists(stored):
    with open(stored) as f:
      old_blob = json.load(f)
    diff = _config_differs(old_blob, config)
    if diff:
      raise SystemExit(f"error: {workdir} holds a run with another config ({', '.join(diff[:8])}"
                       f"{' …' if len(diff) > 8 else ''}); delete it or pass another --workdir")
  if not os.path.exists(done):
    print(f"[{tag}] running -> {workdir}", flush=True)
    train.run(config, workdir)
  with open(done) as f:
    results = json.load(f)
  if kept:
    os.makedirs(keep, exist_ok=True)
    with open(stored) as f:
      blob = {"config": json.load(f), "results": results}
    with gzip.open(kept + ".tmp", "wt") as f:
      json.dump(blob, f)
    os.replace(kept + ".tmp", kept)
  return results


# The run-budget arguments the table benchmarks share: name -> (type, nargs).
BUDGET_ARGS = {"seeds": (int, "+"), "size": (int, None), "base": (int, None), "depth": (int, None),
               "rounds": (int, None), "local_steps": (int, None), "batch": (int, None),
               "lr": (float, None), "patients_per_site": (int, None),
               "slices_per_patient": (int, None), "test_fraction": (float, None)}


def add_budget_args(p, **defaults) -> None:
  """``--<name>`` (``local_steps``: ``--local-steps``) for each keyword, in the order given, with
  that default and the type (and nargs) of `BUDGET_ARGS`."""
  for name, default in defaults.items():
    type_, nargs = BUDGET_ARGS[name]
    p.add_argument("--" + name.replace("_", "-"), type=type_, nargs=nargs, default=default)


def write_results(out_dir: str, tag: str, md: str, blob: Dict) -> None:
  """A benchmark's outputs: the table ``<out_dir>/<tag>.md`` and its numbers ``<tag>.json``."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, f"{tag}.md"), "w") as f:
    f.write(md)
  with open(os.path.join(out_dir, f"{tag}.json"), "w") as f:
    json.dump(blob, f, indent=2)


def patient_dice(results: Dict, split: str = "test", metric: str = "dice_mean") -> Dict[str, float]:
  """{patient id: metric} of a run's results.json dict: the per-patient records that the
  paired comparisons (fedjax_seg.stats.compare) pair by seed and id."""
  return {str(x["id"]): float(x[metric]) for x in results["per_patient"][split]}


def mean_std(v):
  m = sum(v) / len(v)
  s = (sum((x - m) ** 2 for x in v) / max(len(v) - 1, 1)) ** 0.5
  return m, s
