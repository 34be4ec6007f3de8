"""Compile time of every algorithm's round programs at the demo size, cold and cached.

For each algorithm, ``launch.py`` runs one round of K = 8 clients × E = 8 local steps on
64×64 phantom LGG slices with the demo's U-Net (base 16, depth 4) under the shipped
client/step strategies (``auto``: on a CPU the 'loop' round above
``backends.AUTO_UNROLL_MAX`` client-steps), twice, in two processes sharing one fresh
persistent compilation cache: the first compiles cold, the second reads the cache. The
seconds per program come from each run's results.json (``compile_s``, timed by
``runlog.cached_jit``: trace + lower + compile, or the cache read).

  python benchmarks/compile_budget.py                       # every algorithm
  python benchmarks/compile_budget.py --only fedavg fedwep  # some
  python benchmarks/compile_budget.py --local-steps 2 --clients 3 --size 32 --base 8   # quick
  python benchmarks/compile_budget.py --set fl.step_strategy=host --tag compile_budget_host

Paired A/B of two code versions (``--arm NAME@DIR``: launch.py of the checkout in DIR,
e.g. a ``git worktree`` of another commit; a bare NAME: this checkout): every repeat runs
each arm's cold and cached pair, the arms in a rotated order, and the table gives each
arm's round-program seconds per repeat and the paired ratio (first arm / later arm,
geometric mean over the repeats, 95 % t interval, paired-t p):

  python benchmarks/compile_budget.py --only fedwep_real --arm before@/tmp/old --arm after \\
      --repeats 3 --tag modelfns_jit_ab

Writes benchmarks/results/compile_budget.{md,json} (``--tag`` changes the stem).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks._runs import write_results  # noqa: E402

# label -> (config spec, extra overrides)
ALGORITHMS = {
    "fedavg": ("configs/lgg_fedavg.py", []),
    "dcew": ("configs/lgg_dcew.py", []),
    "fedprox": ("configs/lgg_fedprox.py", []),
    "scaffold": ("configs/lgg_scaffold.py", []),
    "fedwep": ("configs/lgg_fedwep.py:fedwep,label_at_client,1/4,iid", []),
    "cps": ("configs/lgg_fedwep.py:cps,label_at_client,1/4,iid", []),
    "mean_teacher": ("configs/lgg_fedwep.py:mean_teacher,label_at_client,1/4,iid", []),
    "pseudoseg": ("configs/lgg_fedwep.py:pseudoseg,label_at_client,1/4,iid", []),
    "fedwep_real": ("configs/lgg_fedwep.py:fedwep_real,label_at_server,1/4,iid", []),
}


def add_run_args(p):
  """The demo-size run options shared with config_ab.py (K, E, image size, U-Net, overrides)."""
  p.add_argument("--clients", type=int, default=8)
  p.add_argument("--local-steps", type=int, default=8)
  p.add_argument("--size", type=int, default=64)
  p.add_argument("--base", type=int, default=16)
  p.add_argument("--depth", type=int, default=4)
  p.add_argument("--patients-per-site", type=int, default=8)
  p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                 help="config overrides for every run, e.g. fl.step_strategy=host")


def run_overrides(args, rounds: int, extra=()):
  """launch.py arguments of one run of :func:`add_run_args`' options: IID phantom LGG
  slices, evaluation every round, ``extra`` then ``--set`` last."""
  o = {"fl.rounds": rounds, "fl.local_steps": args.local_steps, "fl.partition": "iid",
       "fl.num_clients": args.clients, "fl.eval_every": 1, "data.phantom.size": args.size,
       "data.image_size": args.size, "model.base": args.base, "model.depth": args.depth,
       "data.phantom.patients_per_site": args.patients_per_site,
       "data.phantom.slices_per_patient": 4}
  return ([f"--config.{k}={v}" for k, v in o.items()] + list(extra)
          + [f"--config.{kv}" for kv in args.set])


def arm_root(name: str) -> str:
  """The checkout an arm runs: DIR of NAME@DIR, else this one."""
  _, _, tree = name.partition("@")
  return os.path.abspath(tree) if tree else ROOT


def arm_name(name: str) -> str:
  """NAME of NAME@DIR (a label and a folder name)."""
  return name.partition("@")[0]


def launch(root, spec, workdir, cache, overrides):
  """``launch.py`` of the checkout in ``root`` on one config (its own process, the
  persistent compile cache in ``cache``): the CompletedProcess, output captured."""
  cmd = [sys.executable, os.path.join(root, "launch.py"), "--config", spec, "--workdir", workdir,
         *overrides]
  env = {**os.environ, "FEDJAX_SEG_COMPILE_CACHE": cache}
  return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)


def rotated(arms, rep):
  """The arms of repeat ``rep`` in a rotated order (each arm first in turn)."""
  r = rep % len(arms)
  return arms[r:] + arms[:r]


def run_once(spec, extra, args, workdir, cache, root=ROOT):
  t0 = time.time()
  p = launch(root, spec, workdir, cache, run_overrides(args, 1, extra))
  wall = time.time() - t0
  if p.returncode:
    tail = (p.stdout + p.stderr).strip().splitlines()[-3:]
    return {"error": " | ".join(tail), "wall_s": wall}
  with open(os.path.join(workdir, "results.json")) as f:
    r = json.load(f)
  strategy = next((l.split("client strategy ", 1)[1].split(", step strategy")[0]
                   for l in p.stdout.splitlines() if "client strategy " in l), "?")
  return {"compile_s": r.get("compile_s", {}), "trace_s": r.get("trace_s"), "wall_s": wall,
          "strategy": strategy,
          "load": os.getloadavg()[0]}


def round_seconds(run, part: str = "compile_s") -> Optional[float]:
  """Compile seconds of a run's round programs (every program but 'eval'); part
  'trace_s': their trace + lower part (None when the run did not record it)."""
  secs = run.get(part)
  if secs is None:
    return None
  return sum(v for k, v in secs.items() if "eval" not in k)


def cold_and_cached(name, args, root=ROOT):
  """One cold run into a fresh persistent cache and one cached run reading it."""
  spec, extra = ALGORITHMS[name]
  tmp = tempfile.mkdtemp(prefix=f"compile_budget_{name}_")
  try:
    cache = os.path.join(tmp, "cache")
    load0 = os.getloadavg()[0]
    cold = run_once(spec, extra, args, os.path.join(tmp, "cold"), cache, root)
    cached = run_once(spec, extra, args, os.path.join(tmp, "cached"), cache, root) \
        if "error" not in cold else {"error": "cold run failed"}
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return {"algorithm": name, "config": spec, "load_start": load0, "cold": cold, "cached": cached}


def paired(args):
  """--arm mode: every repeat runs each arm's cold + cached pair (arms rotated); the table
  compares the round-program seconds of the later arms with the first arm's."""
  from benchmarks.round_speed import paired_ratio
  arms, rows, t0 = args.arm, [], time.time()
  for name in args.only:
    for rep in range(args.repeats):
      for arm in rotated(arms, rep):
        row = cold_and_cached(name, args, arm_root(arm))
        row.update(arm=arm, repeat=rep)
        rows.append(row)
        if "error" in row["cold"] or "error" in row["cached"]:
          raise SystemExit(f"compile_budget: {name} arm {arm} failed: "
                           f"{row['cold'].get('error') or row['cached'].get('error')}")
        print(f"[compile_budget] {name} repeat {rep + 1} {arm}: round programs cold "
              f"{round_seconds(row['cold']):.1f} s, cached {round_seconds(row['cached']):.1f} s "
              f"(load {row['load_start']:.1f})", flush=True)
  lines = [f"Command: `python benchmarks/compile_budget.py {' '.join(sys.argv[1:])}`", "",
           f"Machine: {platform.machine()}, {os.cpu_count()} cores, python "
           f"{platform.python_version()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
           f"wall {time.time() - t0:.0f} s; load {min(r['load_start'] for r in rows):.1f}–"
           f"{max(r['load_start'] for r in rows):.1f}.",
           f"Round-program compile seconds (every program but 'eval') of one round of K = "
           f"{args.clients}, E = {args.local_steps}; each repeat ran every arm's cold + cached "
           f"pair, the arms in a rotated order; 'trace + lower' rows: the part of those seconds "
           f"spent tracing and lowering (results.json trace_s). Ratio = {arm_name(arms[0])} / arm (> 1: the arm "
           f"compiles faster), geometric mean over the {args.repeats} repeats, 95 % t interval, "
           f"paired-t p; an interval that covers 1 = no difference detected.", "",
           "| algorithm | phase | " + " | ".join(f"{arm_name(a)} s" for a in arms)
           + " | arm | ratio [95 % CI] | p |", "|---|---|" + "---|" * len(arms) + "---|---|---|"]
  for name in args.only:
    for phase, part in [(p, q) for q in ("compile_s", "trace_s") for p in ("cold", "cached")]:
      secs = {a: [round_seconds(r[phase], part) for r in rows if r["algorithm"] == name
                  and r["arm"] == a] for a in arms}
      if any(x is None for v in secs.values() for x in v):
        continue  # a checkout that does not record trace_s
      cells = " | ".join(", ".join(f"{x:.1f}" for x in secs[a]) for a in arms)
      phase = phase if part == "compile_s" else f"{phase}, trace + lower"
      for a in arms[1:]:
        g, ci, pv = paired_ratio(secs[arms[0]], secs[a])
        ci_s = f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "–"
        lines.append(f"| {name} | {phase} | {cells} | {arm_name(a)} | {g:.2f}× {ci_s} | "
                     f"{'–' if pv is None else f'{pv:.2g}'} |")
  write_results(args.out, args.tag, "\n".join(lines) + "\n", {"args": vars(args), "rows": rows})
  print("\n".join(lines))


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--only", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
  add_run_args(p)
  p.add_argument("--tag", default="compile_budget")
  p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
  p.add_argument("--arm", action="append", default=[], metavar="NAME[@DIR]",
                 help="paired A/B: each arm's cold + cached runs per repeat (at least two "
                      "arms; NAME@DIR runs the checkout in DIR)")
  p.add_argument("--repeats", type=int, default=3, help="repeats of the --arm mode")
  args = p.parse_args()
  if args.arm:
    if len(args.arm) < 2 or args.repeats < 1:
      p.error("--arm needs at least two arms and --repeats >= 1")
    for a in args.arm:
      if not os.path.isfile(os.path.join(arm_root(a), "launch.py")):
        p.error(f"--arm {a}: no launch.py in {arm_root(a)}")
    return paired(args)
  rows = []
  t0 = time.time()
  for name in args.only:
    row = cold_and_cached(name, args)
    cold, cached, load0 = row["cold"], row["cached"], row["load_start"]
    rows.append(row)
    print(f"[compile_budget] {name}: " + (cold["error"] if "error" in cold else
          f"round programs cold {round_seconds(cold):.1f} s, cached {round_seconds(cached):.1f} s "
          f"({cold['strategy']}; load {load0:.1f})"), flush=True)
  machine = (f"{platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
             f"load at start {rows[0]['load_start']:.1f}" if rows else "")
  lines = [f"Command: `python benchmarks/compile_budget.py {' '.join(sys.argv[1:])}`".rstrip(), "",
           f"Machine: {machine}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
           f"wall {time.time() - t0:.0f} s.",
           f"One round of K = {args.clients} clients × E = {args.local_steps} local steps, "
           f"{args.size}×{args.size}, U-Net base {args.base}, depth {args.depth}; compile "
           f"seconds per program from results.json (cold: empty persistent cache; cached: "
           f"a second process reading it). Round programs exclude 'eval'.", "",
           "| algorithm | client strategy | round programs cold s | cached s | per program (cold) | eval cold s | load |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    c, k = r["cold"], r["cached"]
    if "error" in c:
      lines.append(f"| {r['algorithm']} | – | error: {c['error'][:120]} | – | – | – | {r['load_start']:.1f} |")
      continue
    rp = {n: v for n, v in c["compile_s"].items() if "eval" not in n}
    ev = sum(c["compile_s"].values()) - round_seconds(c)
    lines.append(f"| {r['algorithm']} | {c['strategy']} | {round_seconds(c):.1f} | {round_seconds(k):.1f} | "
                 + ", ".join(f"{n} {v:.1f}" for n, v in rp.items()) + f" | {ev:.1f} | {r['load_start']:.1f} |")
  write_results(args.out, args.tag, "\n".join(lines) + "\n", {"args": vars(args), "rows": rows})
  print("\n".join(lines))


if __name__ == "__main__":
  main()
