"""Table: FedAvg vs FedProx, FedBN, SiloBN, SCAFFOLD, Ditto and client sampling on the
by-site phantom LGG federation with a batch-norm U-Net, paired over seeds and test
patients.

Every row is configs/lgg_fedavg.py (or lgg_fedprox / lgg_fedbn / lgg_scaffold / lgg_ditto)
with one shared small budget and model.norm='batch'; each seed draws its own patient split
(data.split_seed = seed) and its own training keys, on one fixed phantom data set (4 sites
with their scanner effects). Runs go to runs/personal_table/<row>/s<seed> (resumable,
benchmarks/_runs.py). The comparison is ``fedjax_seg.stats.compare``: mean difference in
per-patient test Dice against the reference row, hierarchical bootstrap 95% CI over
(seed, patient) with seeds as the resampling unit, Wilcoxon signed-rank p, Holm-corrected
over the rows compared with one reference. SCAFFOLD runs plain SGD (its analysis needs
it), so it is also compared with FedAvg under the same SGD.

  python benchmarks/personal_table.py                  # 3 seeds, R=12, E=4, 32x32
  python benchmarks/personal_table.py --quick          # 2 seeds, R=3: a smoke run

Writes docs/results/personal.md (--out-md) and benchmarks/results/<its stem>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import logging  # noqa: E402

from benchmarks import _runs  # noqa: E402
from configs import lgg_ditto, lgg_fedavg, lgg_fedbn, lgg_fedprox, lgg_scaffold  # noqa: E402

# (row, key, config module, config arg, fl overrides, optimizer overrides, which evaluation)
ROWS = [
    ("FedAvg", "fedavg", lgg_fedavg, None, {}, {}, "metrics"),
    ("FedProx (μ=0.01)", "fedprox", lgg_fedprox, None, {}, {}, "metrics"),
    ("FedBN", "fedbn", lgg_fedbn, "fedbn", {}, {}, "metrics"),
    ("SiloBN", "silobn", lgg_fedbn, "silobn", {}, {}, "metrics"),
    ("Ditto (λ=0.1): global model", "ditto", lgg_ditto, None, {}, {}, "metrics"),
    ("Ditto (λ=0.1): personalised", "ditto", lgg_ditto, None, {}, {}, "personalised"),
    ("FedAvg, m = K/2 clients per round", "fedavg_half", lgg_fedavg, None,
     {"clients_per_round": 2}, {}, "metrics"),
    ("FedAvg (SGD)", "fedavg_sgd", lgg_fedavg, None, {}, {"name": "sgd"}, "metrics"),
    ("SCAFFOLD (SGD)", "scaffold", lgg_scaffold, None, {}, {}, "metrics"),
]
REFERENCES = {"FedAvg (SGD)": ["SCAFFOLD (SGD)"]}
SGD_ROWS = ("fedavg_sgd", "scaffold")


def make_config(mod, arg, fl_over, opt_over, seed, args):
  c = mod.get_config(arg) if arg else mod.get_config()
  c.seed = seed
  c.data.split_seed = seed
  c.data.cache_dir = args.cache_dir
  c.data.phantom.sites = ("CS", "DU", "HT", "FG")
  c.data.phantom.patients_per_site = args.patients_per_site
  c.data.phantom.slices_per_patient = args.slices_per_patient
  c.data.phantom.size = args.size
  c.data.image_size = args.size
  c.data.test_fraction = args.test_fraction
  c.model.norm = "batch"
  c.model.base = args.base
  c.model.depth = args.depth
  c.model.dropout = 0.0
  c.eval_batch_size = 32
  c.fl.rounds = args.rounds
  c.fl.local_steps = args.local_steps
  c.fl.client_batch_size = args.batch
  c.fl.stats_samples = 8
  c.fl.eval_every = args.rounds
  c.fl.eval_clients = False
  c.fl.client_strategy = args.client_strategy
  c.fl.step_strategy = "scan"
  c.optimizer.lr = args.lr
  for k, v in fl_over.items():
    c.fl[k] = v
  for k, v in opt_over.items():
    c.optimizer[k] = v
  return c


def per_patient(res, which):
  src = res["personalised"] if which == "personalised" else res
  if which == "metrics" and res.get("evaluated") == "personalised":
    src = res  # FedBN / SiloBN: the headline numbers are the personalised ones
  return src["per_patient"]["test"], src["per_site"]["test"], src["metrics"]["test"]["dice_mean"]


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  _runs.add_budget_args(p, seeds=[0, 1, 2], rounds=12, local_steps=4, batch=8, lr=3e-3, size=32, base=8,
                        depth=3, patients_per_site=40, slices_per_patient=4, test_fraction=0.2)
  p.add_argument("--client-strategy", default="vmap")
  p.add_argument("--rows", nargs="+", default=None, help="row keys to run (default: all)")
  p.add_argument("--quick", action="store_true", help="2 seeds, 3 rounds (smoke run)")
  p.add_argument("--workdir", default="runs/personal_table")
  p.add_argument("--cache-dir", default="runs/_data")
  p.add_argument("--n-boot", type=int, default=2000)
  p.add_argument("--out-md", default=None)
  p.add_argument("--sgd-lr-grid", type=float, nargs="+", default=[0.05],
                 help="SGD learning rates for FedAvg (SGD) on the first seed; the one with the "
                      "best validation Dice is used for FedAvg (SGD) and SCAFFOLD on every seed")
  args = p.parse_args()
  if args.quick:
    args.seeds, args.rounds = args.seeds[:2], 3
  logging.set_verbosity(logging.WARNING)
  from fedjax_seg import stats

  t0, load0 = time.time(), os.getloadavg()
  rows = [r for r in ROWS if args.rows is None or r[1] in args.rows]
  root = args.workdir + ("_quick" if args.quick else "")
  sgd_lr, sgd_grid = args.sgd_lr_grid[0], {}
  if any(r[1] in SGD_ROWS for r in rows) and len(args.sgd_lr_grid) > 1:
    for lr in args.sgd_lr_grid:  # chosen on the validation split of the first seed
      c = make_config(lgg_fedavg, None, {}, {"name": "sgd", "lr": lr}, args.seeds[0], args)
      res = _runs.run_or_load(c, os.path.join(root, f"fedavg_sgd_lr{lr:g}", f"s{args.seeds[0]}"),
                              "personal_table")
      sgd_grid[lr] = res["metrics"]["val"]["dice_mean"]
      print(f"[personal_table] SGD lr {lr:g}: val Dice {sgd_grid[lr]:.4f}", flush=True)
    sgd_lr = max(sgd_grid, key=lambda lr: sgd_grid[lr])
  data, table, per_seed = {}, [], {}
  for name, key, mod, arg, fl_over, opt_over, which in rows:
    data[name] = {}
    if key in SGD_ROWS:
      opt_over = {**opt_over, "lr": sgd_lr}
    for seed in args.seeds:
      c = make_config(mod, arg, fl_over, opt_over, seed, args)
      wkey = key + (f"_lr{sgd_lr:g}" if key in SGD_ROWS else "")
      wd = os.path.join(root, wkey, f"s{seed}")
      res = _runs.run_or_load(c, wd, "personal_table")
      recs, site, dice = per_patient(res, which)
      data[name][seed] = {str(r["id"]): float(r["dice_mean"]) for r in recs}
      per_seed.setdefault(name, []).append({"seed": seed, "dice": dice, "per_site": site,
                                             "wall_time_s": res.get("wall_time_s")})
      print(f"[personal_table] {name} seed {seed}: test Dice {dice:.4f}, worst site "
            f"{site.get('worst_site')} {site.get('worst_dice', float('nan')):.4f} "
            f"({time.time() - t0:.0f}s so far)", flush=True)
  names = [r[0] for r in rows]
  ref = names[0]
  comps = {}
  main_rows = [n for n in names if n not in sum(REFERENCES.values(), [])]
  if len(main_rows) > 1:
    comps[ref] = stats.compare({n: data[n] for n in main_rows}, ref, "dice_mean", args.n_boot,
                               0, 0.95)
  for r, others in REFERENCES.items():
    if r in data and all(o in data for o in others):
      comps[r] = stats.compare({n: data[n] for n in [r] + others}, r, "dice_mean",
                               args.n_boot, 0, 0.95)
  elapsed = time.time() - t0
  sites = sorted({s for n in names for e in per_seed[n] for s in e["per_site"]["sites"]})
  mean = lambda v: sum(v) / len(v)
  sd = lambda v: (sum((x - mean(v)) ** 2 for x in v) / max(len(v) - 1, 1)) ** 0.5
  lines = ["| method | test Dice (pooled, mean ± sd over seeds) | "
           + " | ".join(f"{s}" for s in sites) + " | worst site | spread |",
           "|---|---|" + "---|" * len(sites) + "---|---|"]
  for n in names:
    e = per_seed[n]
    d = [x["dice"] for x in e]
    site_means = [mean([x["per_site"]["sites"][s]["dice_mean"] for x in e
                        if s in x["per_site"]["sites"]]) for s in sites]
    worst = [x["per_site"]["worst_dice"] for x in e]
    spread = [x["per_site"]["spread"] for x in e]
    lines.append(f"| {n} | {mean(d):.3f} ± {sd(d):.3f} | "
                 + " | ".join(f"{v:.3f}" for v in site_means)
                 + f" | {mean(worst):.3f} | {mean(spread):.3f} |")
  cmd = "python benchmarks/personal_table.py " + " ".join(sys.argv[1:])
  head = (f"# FedBN, SiloBN, SCAFFOLD, Ditto, client sampling vs FedAvg\n\n"
          f"Measured {time.strftime('%Y-%m-%d', time.gmtime())} on a {os.cpu_count()}-core CPU "
          f"container ({platform.processor() or platform.machine()}, no GPU), wall time "
          f"{elapsed:.0f} s (load {load0[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end).\n\n"
          f"Command: `{cmd}`\n\n"
          f"Setup: phantom LGG federation, 4 sites (CS, DU, HT, FG: scanner effects), "
          f"{args.patients_per_site} patients/site × {args.slices_per_patient} slices, "
          f"{args.size}×{args.size}; test fraction {args.test_fraction} per site; the split "
          f"drawn per seed (data.split_seed = seed); U-Net base {args.base} depth {args.depth} "
          f"with batch norm; K = 4 clients by site; R = {args.rounds} rounds × E = "
          f"{args.local_steps} local steps × batch {args.batch}; Adam lr {args.lr} "
          f"(SCAFFOLD and its FedAvg reference: SGD lr {sgd_lr:g}"
          + (f", chosen from {sorted(sgd_grid)} on the validation Dice of FedAvg (SGD), seed "
             f"{args.seeds[0]}: " + ", ".join(f"{lr:g} → {v:.3f}" for lr, v in sorted(sgd_grid.items()))
             if sgd_grid else "") +
          f"); seeds {args.seeds}. FedBN / SiloBN "
          f"and 'Ditto: personalised' segment each test patient with its own hospital's model. "
          f"Per-site columns: mean over seeds of the site's mean per-patient Dice. 'Ditto: global "
          f"model' is FedAvg's model by construction (the personal models never reach the "
          f"server; same keys), so it equals the FedAvg row.\n\n")
  md = head + "\n".join(lines) + "\n"
  for r, comp in comps.items():
    md += f"\n## Paired comparison against {r}\n\n" + stats.markdown(comp)
  md += ("\nReading: a row 'beats' the reference only where its CI excludes 0; where it "
         "covers 0 the table reports no difference detected (the smallest detectable "
         "difference is in the comparison above).\n")
  out_md = args.out_md or ("docs/results/personal.md" if not args.quick else
                           "benchmarks/results/personal_table_quick.md")
  os.makedirs(os.path.dirname(out_md), exist_ok=True)
  with open(out_md, "w") as f:
    f.write(md)
  os.makedirs("benchmarks/results", exist_ok=True)
  stem = os.path.splitext(os.path.basename(out_md))[0]   # personal, personal_early, ...
  with open(os.path.join("benchmarks/results", f"{stem}.json"), "w") as f:
    json.dump({"args": vars(args), "command": cmd, "per_seed": per_seed, "comparisons": comps,
               "sgd_lr": sgd_lr, "sgd_lr_grid_val_dice": sgd_grid,
               "wall_time_s": elapsed}, f, indent=1, default=str)
  print(md)
  print(f"[personal_table] written {out_md}")


if __name__ == "__main__":
  main()
