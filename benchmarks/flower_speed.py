"""Flower speed: wall time per round of a real Flower federation on localhost against the
in-process simulation (``fl/train.train_federated``) of the same config, in one run.

Both run the same tiny config (the phantom's 3 sites, 16×16 slices, U-Net base 4,
E = 2 local steps; ``--config.x=y`` style overrides via ``--set x=y``) for ``--rounds``
rounds, one after the other:

  in-process  ``train_federated`` in this process: K clients vmapped in one jitted round.
              Per-round time = the difference of consecutive ``time_s`` in its
              metrics.jsonl (round t+1's step + round t's orbax checkpoint).
  flower      ``fedjax_seg.flower.localhost.start``: a server process and one process per
              hospital (each reading its own folder), gRPC on 127.0.0.1, insecure.
              Per-round time = the server's ``round_s`` (from one aggregation to the next:
              broadcast, K client updates in K processes, uploads, aggregation, the
              previous round's orbax checkpoint).

Round 1 is reported apart: in-process it includes compiling the round; over Flower the
hospitals compile their client update while connecting (before round 1 starts) and round
1 includes compiling the server step. "Steady" = the median of rounds 2..R-1 (round R of
the in-process run also evaluates on val). Also reported: the total wall time of each,
from start to the final model: in-process that is train_federated's wall time (data,
compilation, rounds, val/test evaluation); over Flower, from starting the 4 Python
processes to the server's exit (no evaluation: the server holds no data). The
persistent compilation cache is off by default (``--compile_cache DIR`` to use one), so
both pay a cold compile.

  python benchmarks/flower_speed.py                         # FedAvg, R = 6
  python benchmarks/flower_speed.py --algorithm dcew --rounds 8
  python benchmarks/flower_speed.py --json /tmp/flower_speed.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONFIGS = {"fedavg": "lgg_fedavg", "fedprox": "lgg_fedprox", "fedcostw": "lgg_fedcostw",
           "costw_ce": "lgg_costw_ce", "dcew": "lgg_dcew"}
# The tests' tiny federation (tests/test_flower.py): 3 hospitals (phantom sites CS, DU, HT),
# 4 patients each (2 train, 16 slices), 16x16 slices, U-Net base 4, depth 3.
TINY = {"data.phantom.size": 32, "data.phantom.patients_per_site": 4,
        "data.phantom.slices_per_patient": 8, "data.image_size": 16, "model.base": 4,
        "model.depth": 3, "model.dropout": 0.0, "fl.local_steps": 2, "fl.client_batch_size": 4,
        "fl.stats_samples": 4, "fl.client_strategy": "vmap", "fl.step_strategy": "scan",
        "fl.eval_clients": False, "eval_batch_size": 16}


def _parse_value(text):
  try:
    return json.loads(text)
  except ValueError:
    return text


def make_config(name, overrides):
  import importlib
  c = importlib.import_module(f"configs.{CONFIGS[name]}").get_config()
  c.update_from_flattened_dict(overrides)  # dotted keys
  return c


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def in_process(name, overrides, workdir):
  from fedjax_seg.fl import train as fl_train
  t0 = time.perf_counter()
  fl_train.train_federated(make_config(name, overrides), workdir)
  total = time.perf_counter() - t0
  rows = [r for r in _rows(workdir)]
  t = [r["time_s"] for r in rows]  # rows[0] = round 0 (initial eval)
  return {"round_s": [b - a for a, b in zip(t, t[1:])], "total_s": total}


def flower(name, overrides, workdir, roots, timeout_s):
  from fedjax_seg.flower import localhost
  args = ([f"--config={os.path.join(ROOT, 'configs', CONFIGS[name] + '.py')}"]
          + [f"--config.{k}={v}" for k, v in overrides.items()])
  t0 = time.perf_counter()
  fed = localhost.start(args, workdir, roots)
  codes = fed.wait(timeout_s)
  total = time.perf_counter() - t0
  if codes != {"server": 0, "clients": [0] * len(roots)}:
    raise SystemExit(f"the Flower federation failed: {codes}\n{fed.log(0)[-3000:]}")
  fit = re.compile(r"\[flower\] hospital \d+ round (\d+): .*\(([\d.]+)s\)")
  client_s = {}
  for i in range(1, len(roots) + 1):
    for m in fit.finditer(fed.log(i)):
      client_s.setdefault(int(m.group(1)), []).append(float(m.group(2)))
  return {"round_s": [r["round_s"] for r in _rows(workdir)], "total_s": total,
          "client_fit_max_s": [max(client_s[r]) for r in sorted(client_s)]}


def steady(xs):
  """Median of rounds 2..R-1 (1-based), or of rounds 2..R when R <= 3."""
  core = xs[1:-1] if len(xs) > 3 else xs[1:]
  return statistics.median(core) if core else float("nan")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--algorithm", default="fedavg", choices=sorted(CONFIGS))
  ap.add_argument("--rounds", type=int, default=6)
  ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                  help="config overrides on top of the tiny config, e.g. model.base=8")
  ap.add_argument("--workdir", default=None, help="default: a fresh temporary folder")
  ap.add_argument("--compile_cache", default="", help="persistent compilation cache folder "
                  "(default: none, both runs compile cold)")
  ap.add_argument("--timeout_s", type=float, default=1200)
  ap.add_argument("--json", default=None, help="also write the numbers to this file")
  a = ap.parse_args(argv)
  if a.rounds < 2:
    ap.error("--rounds must be >= 2 (round 1 compiles)")

  os.environ["FEDJAX_SEG_COMPILE_CACHE"] = a.compile_cache  # read by every process
  os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  from fedjax_seg import compile_cache
  compile_cache.enable(a.compile_cache or None)
  import jax

  wd = a.workdir or tempfile.mkdtemp(prefix="flower_speed_")
  ov = {**TINY, "data.cache_dir": os.path.join(wd, "phantom_cache"), "fl.rounds": a.rounds,
        "fl.eval_every": a.rounds}
  for kv in a.set:
    k, _, v = kv.partition("=")
    ov[k] = _parse_value(v)
  from fedjax_seg.flower import localhost
  c = make_config(a.algorithm, ov)
  roots = localhost.split_sites(c, os.path.join(wd, "hospitals"), verbose=False)

  load0 = os.getloadavg()[0]
  print(f"[flower_speed] {a.algorithm}, R={a.rounds}, K={len(roots)}: in-process ...", flush=True)
  ref = in_process(a.algorithm, ov, os.path.join(wd, "in_process"))
  print(f"[flower_speed] Flower (server + {len(roots)} hospital processes on 127.0.0.1) ...",
        flush=True)
  flw = flower(a.algorithm, ov, os.path.join(wd, "flower"), roots, a.timeout_s)
  load1 = os.getloadavg()[0]

  res = {"algorithm": a.algorithm, "rounds": a.rounds, "hospitals": len(roots),
         "overrides": {k: v for k, v in ov.items() if k != "data.cache_dir"},
         "in_process": ref, "flower": flw,
         "steady_s": {"in_process": steady(ref["round_s"]), "flower": steady(flw["round_s"])},
         "machine": {"platform": platform.platform(), "cores": os.cpu_count(),
                     "jax": jax.__version__, "devices": [d.platform for d in jax.devices()],
                     "load_start": load0, "load_end": load1},
         "compile_cache": a.compile_cache or None,
         "date_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
  import flwr
  res["machine"]["flwr"] = flwr.__version__
  s_in, s_fl = res["steady_s"]["in_process"], res["steady_s"]["flower"]
  print(f"\n{a.algorithm}, K={len(roots)} hospitals, R={a.rounds} rounds; "
        f"{os.cpu_count()} cores, jax {jax.__version__}, flwr {flwr.__version__}, "
        f"load {load0:.2f} -> {load1:.2f}\n")
  print("| | round 1 s | steady round s (median of rounds 2..R-1) | "
        "total wall s (start to final model) |")
  print("|---|---|---|---|")
  print(f"| in-process (train_federated) | {ref['round_s'][0]:.2f} | {s_in:.3f} | "
        f"{ref['total_s']:.1f} |")
  print(f"| Flower (4 processes, gRPC) | {flw['round_s'][0]:.2f} | {s_fl:.3f} | "
        f"{flw['total_s']:.1f} |")
  print(f"| ratio Flower / in-process | {flw['round_s'][0] / ref['round_s'][0]:.2f} | "
        f"{s_fl / s_in:.2f} | {flw['total_s'] / ref['total_s']:.2f} |")
  print(f"\nper round s, in-process: {' '.join(f'{x:.3f}' for x in ref['round_s'])}")
  print(f"per round s, Flower:     {' '.join(f'{x:.3f}' for x in flw['round_s'])}")
  print(f"slowest hospital's client update per round s (its own timer): "
        f"{' '.join(f'{x:.3f}' for x in flw['client_fit_max_s'])}")
  if a.json:
    with open(a.json, "w") as f:
      json.dump(res, f, indent=1)
  return res


if __name__ == "__main__":
  main()
