"""Loading throughput: slices/second for Kaggle LGG and BraTS, with the N4 cache cold vs warm.

  python benchmarks/loading_speed.py            # default sizes (~1-2 min on 2 cores)
  python benchmarks/loading_speed.py --quick    # tiny, for a smoke check
  python benchmarks/loading_speed.py --json runs/loading_speed.json

Each row times `pipeline.build_dataset` end to end (layout discovery, file
reads + validation, [N4], resize / resample, normalisation, split) on a
phantom written once beforehand in the real layout. "slices" are axial
slices read from disk (an LGG TIFF pair; a BraTS slice carries all 4
modalities), so the rows are comparable per slice. All rows of one run are
on one machine, in one process, after one untimed warm-up read of the files
(OS page cache warm); only the N4 cache differs between "cold" (empty cache
folder) and "warm" (the same folder again). Both wall time and process CPU
time are reported: on a shared machine the CPU column is the stable one.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_collections  # noqa: E402

from fedjax_seg.data import phantom, pipeline  # noqa: E402


def data_cfg(layout, root, cache_dir, image_size, n4=None, ndim=2):
  d = dict(layout=layout, root=root, cache_dir=cache_dir, image_size=image_size, ndim=ndim, depth=0,
           target_spacing=(), normalize="slice_max", split_seed=0, stratify_by_site=True,
           val_fraction=0.2, test_fraction=0.15, skip_bad_patients=False, min_foreground_fraction=0.0,
           verbose=False)
  d["n4"] = dict(enabled=n4 is not None, cache_dir=os.path.join(cache_dir, "n4"), **(n4 or {}))
  return ml_collections.ConfigDict(d)


def timed(cfg, n_slices):
  """Wall and process-CPU seconds of one build_dataset (CPU time counts every thread of this process,
  so it is comparable across runs even when other jobs share the machine)."""
  c0, t0 = time.process_time(), time.perf_counter()
  ds = pipeline.build_dataset(cfg, verbose=False)
  dt, dc = time.perf_counter() - t0, time.process_time() - c0
  assert sum(len(p.labels) for p in ds.patients.values()) == n_slices or cfg.layout != "lgg"
  return {"seconds": dt, "cpu_seconds": dc, "slices": n_slices, "slices_per_s": n_slices / dt,
          "slices_per_cpu_s": n_slices / max(dc, 1e-9)}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="tiny sizes")
  ap.add_argument("--size", type=int, default=128, help="in-plane size of both phantoms")
  ap.add_argument("--lgg-patients-per-site", type=int, default=4)
  ap.add_argument("--lgg-slices", type=int, default=24)
  ap.add_argument("--brats-patients-per-site", type=int, default=2)
  ap.add_argument("--brats-slices", type=int, default=64)
  ap.add_argument("--n4-shrink", type=int, default=4)
  ap.add_argument("--n4-iterations", default="50,50,30")
  ap.add_argument("--workdir", default="", help="where phantoms + caches go (default: a temp dir, removed)")
  ap.add_argument("--json", default="", help="also write the results here")
  args = ap.parse_args(argv)
  if args.quick:
    args.size, args.lgg_patients_per_site, args.lgg_slices = 32, 1, 8
    args.brats_patients_per_site, args.brats_slices = 1, 16
  work = args.workdir or tempfile.mkdtemp(prefix="loading_speed_")
  os.makedirs(work, exist_ok=True)
  sites = ("CS", "DU", "HT")
  try:
    t0 = time.perf_counter()
    lgg_root = os.path.join(work, "lgg")
    phantom.write_lgg(lgg_root, seed=0, sites=sites, patients_per_site=args.lgg_patients_per_site,
                      slices_per_patient=args.lgg_slices, size=args.size, overwrite=True)
    brats_root = os.path.join(work, "brats")
    phantom.write_brats(brats_root, seed=0, sites=sites, patients_per_site=args.brats_patients_per_site,
                        slices_per_patient=args.brats_slices, size=args.size, overwrite=True)
    print(f"phantoms written in {time.perf_counter() - t0:.1f}s under {work}", flush=True)
    n_lgg = len(sites) * args.lgg_patients_per_site * args.lgg_slices
    n_brats = len(sites) * args.brats_patients_per_site * args.brats_slices
    n_vol = len(sites) * args.brats_patients_per_site * 4
    n4 = dict(shrink_factor=args.n4_shrink, iterations=tuple(int(i) for i in args.n4_iterations.split(",")))
    cache = os.path.join(work, "cache")
    shutil.rmtree(cache, ignore_errors=True)
    # untimed warm-up: page cache, imports, SimpleITK / nibabel first-use costs
    pipeline.build_dataset(data_cfg("lgg", lgg_root, cache, args.size), verbose=False)
    pipeline.build_dataset(data_cfg("brats", brats_root, cache, args.size), verbose=False)
    rows = {
        "LGG (TIFF)": timed(data_cfg("lgg", lgg_root, cache, args.size), n_lgg),
        "BraTS (NIfTI), no N4": timed(data_cfg("brats", brats_root, cache, args.size), n_brats),
        "BraTS, N4 cache cold": timed(data_cfg("brats", brats_root, cache, args.size, n4), n_brats),
        "BraTS, N4 cache warm": timed(data_cfg("brats", brats_root, cache, args.size, n4), n_brats),
    }
  finally:
    if not args.workdir:
      shutil.rmtree(work, ignore_errors=True)
  print(f"\nLoading throughput (build_dataset end to end; {os.cpu_count()} CPUs; size {args.size}; "
        f"LGG {n_lgg} slices; BraTS {n_brats} slices = {n_vol} volumes of {args.size}x{args.size}x"
        f"{args.brats_slices}; N4 shrink {n4['shrink_factor']}, iterations {list(n4['iterations'])})\n")
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  print(f"(1-min load average at the end: {load:.1f})\n")
  print("| data | slices | wall s | slices/s (wall) | CPU s | slices per CPU-s |\n|---|---|---|---|---|---|")
  for name, r in rows.items():
    print(f"| {name} | {r['slices']} | {r['seconds']:.2f} | {r['slices_per_s']:.1f} | {r['cpu_seconds']:.2f} | "
          f"{r['slices_per_cpu_s']:.1f} |")
  cold, warm = rows["BraTS, N4 cache cold"], rows["BraTS, N4 cache warm"]
  print(f"\nN4: {cold['seconds'] / n_vol:.2f}s wall / {cold['cpu_seconds'] / n_vol:.2f} CPU-s per volume fitted "
        f"(cold); warm cache is {cold['seconds'] / warm['seconds']:.1f}x faster than cold (wall)")
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "rows": rows}, f, indent=2)
  return rows


if __name__ == "__main__":
  main()
