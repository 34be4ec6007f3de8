"""Paired A/B of config overrides on the seconds per federated round of a real run.

Each arm is a set of ``--config.KEY=VALUE`` overrides; every repeat runs each arm's
``launch.py`` once (a process of its own) with the arms in a rotated order, all sharing one
persistent compilation cache (warmed by one untimed run per arm first, so compiles do not
enter the round times). Seconds per round = (time_s of the last round − time_s of round 1)
/ (rounds − 1), from the run's metrics.csv: round 1's compile is excluded. Ratios are
paired over repeats (``round_speed.paired_ratio``: geometric mean of reference / arm, a
95 % t interval, paired-t p); the first arm is the reference.

  python benchmarks/config_ab.py --config 'configs/lgg_fedwep.py:fedwep,label_at_client,1/4,iid' \\
      --arm vmap semi.fedwep.search_strategy=vmap --arm unrolled semi.fedwep.search_strategy=unrolled \\
      --repeats 3 --tag fedwep_seed_search_ab

An arm named NAME@DIR runs ``launch.py`` of the checkout in DIR (e.g. a ``git worktree``
of another commit) instead of this one: a paired A/B of two code versions on the same
config (``--arm before@/tmp/old --arm after``).

Every run: K = --clients clients × E = --local-steps steps, --rounds rounds, 64×64 phantom
LGG slices and the demo U-Net (base 16, depth 4) unless --set says otherwise. Writes
benchmarks/results/<tag>.{md,json}.
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks._runs import write_results  # noqa: E402
from benchmarks.compile_budget import (add_run_args, arm_name, arm_root, launch, rotated,  # noqa: E402
                                       run_overrides)
from benchmarks.round_speed import paired_ratio  # noqa: E402


def round_seconds(workdir: str) -> float:
  """Seconds per round after the first, from metrics.csv's cumulative time_s."""
  with open(os.path.join(workdir, "metrics.csv")) as f:
    t = [float(r["time_s"]) for r in csv.DictReader(f) if r["round"] not in ("0", "")]
  if len(t) < 2:
    raise SystemExit(f"config_ab: {workdir}/metrics.csv has {len(t)} trained rounds; "
                     f"need --rounds >= 2")
  return (t[-1] - t[0]) / (len(t) - 1)


def run_arm(args, arm, workdir, cache) -> dict:
  name, sets = arm
  load = os.getloadavg()[0]
  p = launch(arm_root(name), args.config, workdir, cache,
             [*run_overrides(args, args.rounds), *[f"--config.{kv}" for kv in sets]])
  if p.returncode:
    tail = " | ".join((p.stdout + p.stderr).strip().splitlines()[-3:])
    raise SystemExit(f"config_ab: arm {name} failed: {tail}")
  return {"s_per_round": round_seconds(workdir), "load": load}


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, help="a launch.py --config spec")
  p.add_argument("--arm", nargs="+", action="append", required=True, metavar="NAME KEY=VALUE",
                 help="an arm: its name (NAME@DIR: launch.py of the checkout in DIR), then "
                      "its config overrides (none: the config as is)")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--rounds", type=int, default=4)
  add_run_args(p)
  p.add_argument("--tag", default="config_ab")
  p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
  args = p.parse_args()
  arms = [(a[0], a[1:]) for a in args.arm]
  if len(arms) < 2 or len({n for n, _ in arms}) != len(arms):
    raise SystemExit("config_ab: give at least two --arm with distinct names")
  t0 = time.time()
  tmp = tempfile.mkdtemp(prefix="config_ab_")
  times = {n: [] for n, _ in arms}
  loads = {n: [] for n, _ in arms}
  try:
    cache = os.path.join(tmp, "cache")
    for arm in arms:  # warm the compile cache: one untimed run per arm
      run_arm(args, arm, os.path.join(tmp, f"warm_{arm_name(arm[0])}"), cache)
      print(f"[config_ab] warmed {arm[0]}", flush=True)
    for rep in range(args.repeats):
      for arm in rotated(arms, rep):
        wd = os.path.join(tmp, f"{arm_name(arm[0])}_{rep}")
        r = run_arm(args, arm, wd, cache)
        shutil.rmtree(wd, ignore_errors=True)
        times[arm[0]].append(r["s_per_round"])
        loads[arm[0]].append(r["load"])
        print(f"[config_ab] repeat {rep} {arm[0]}: {r['s_per_round']:.3f} s/round "
              f"(load {r['load']:.2f})", flush=True)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  ref = arms[0][0]
  rows = []
  for name, sets in arms:
    ts = sorted(times[name])
    row = {"arm": name, "overrides": sets, "s_per_round": times[name],
           "median_s": ts[len(ts) // 2], "load": loads[name]}
    if name != ref:
      g, ci, pv = paired_ratio(times[ref], times[name])
      row.update(ratio_vs_ref=g, ci=ci, p=pv)
    rows.append(row)
  machine = (f"{platform.machine()}, {os.cpu_count()} cores, python "
             f"{platform.python_version()}")
  lines = [f"Command: `python benchmarks/config_ab.py {' '.join(sys.argv[1:])}`", "",
           f"Machine: {machine}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; wall "
           f"{time.time() - t0:.0f} s. {args.config}, K = {args.clients}, E = "
           f"{args.local_steps}, {args.rounds} rounds, {args.size}×{args.size}, U-Net base "
           f"{args.base}, depth {args.depth}; s/round after round 1 (compiles excluded), one "
           f"process per run, {args.repeats} repeats with the arms in a rotated order. "
           f"Ratio = {ref}'s time / the arm's (> 1: the arm is faster), geometric mean over "
           f"the repeats with its 95 % t interval and paired-t p.", "",
           "| arm | overrides | s/round (median) | per repeat | ratio vs " + ref + " | 95 % CI | p | load |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    ci = "–" if r.get("ci") is None else f"{r['ci'][0]:.3f}–{r['ci'][1]:.3f}×"
    ratio = "–" if "ratio_vs_ref" not in r else f"{r['ratio_vs_ref']:.3f}×"
    pv = "–" if r.get("p") is None else f"{r['p']:.2g}"
    lines.append(f"| {r['arm']} | {' '.join(r['overrides']) or '–'} | {r['median_s']:.2f} | "
                 + ", ".join(f"{t:.2f}" for t in r["s_per_round"])
                 + f" | {ratio} | {ci} | {pv} | {min(r['load']):.1f}–{max(r['load']):.1f} |")
  write_results(args.out, args.tag, "\n".join(lines) + "\n", {"args": vars(args), "rows": rows})
  print("\n".join(lines))


if __name__ == "__main__":
  main()
