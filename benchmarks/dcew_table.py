"""Reproduce the SPEC §4.1 / seed DCEW table on a non-IID by-site phantom federation.

Runs CL (centralised), FedAvg, FedCostW-Avg, CostW-Avg+CE and DCEW-Avg for
several seeds with the same data, model and compute budget, and writes the
table (test mIoU and Dice, foreground, mean ± std over seeds) to
benchmarks/results/dcew_table.{md,json}. Every run is a normal launch.py-style
run in its own workdir (runs/dcew_table/<method>_s<seed>), so the benchmark is
resumable: finished runs (results.json present) are skipped, interrupted runs
resume from their checkpoint.

  python benchmarks/dcew_table.py                      # 3 seeds, 48×48, 30 rounds × 5 local steps, Adam 3e-3
  python benchmarks/dcew_table.py --quick              # 2 seeds, 32×32, tiny budget
  python benchmarks/dcew_table.py --root /data/lgg     # real Kaggle LGG (folder with kaggle_3m/)
  python benchmarks/dcew_table.py --quick --phantom-style anatomical   # ICBM152-anatomy phantom
                                   # (runs/dcew_table_anatomical*, results dcew_table_anatomical*.md)

Compute budget: every federated client does E local steps of batch b per
round for R rounds; CL gets the same number of optimiser steps in total
(R·E·K steps of batch b), i.e. the same number of samples processed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import logging  # noqa: E402

from benchmarks import _runs  # noqa: E402
from configs import lgg_centralized, lgg_fedavg  # noqa: E402

METHODS = [("CL", "centralized"), ("FedAvg", "fedavg"), ("FedCostW-Avg", "fedcostw"),
           ("FedCostW-Avg (rounds reading)", "fedcostw_rounds"),
           ("CostW-Avg+CE", "costw_ce"), ("DCEW-Avg", "dcew")]
# method key -> (config.algorithm, config.fl overrides)
VARIANTS = {"fedcostw_rounds": ("fedcostw", {"cost_ratio": "rounds"})}
PAPER = {"CL": (37.45, 54.49), "FedAvg": (30.17, 46.32), "CostW-Avg+CE": (36.95, 53.96),
         "DCEW-Avg": (36.98, 53.99)}


def make_config(key, seed, args):
  algorithm, fl_over = VARIANTS.get(key, (key, {}))
  c = lgg_centralized.get_config() if algorithm == "centralized" else lgg_fedavg.get_config()
  c.algorithm = algorithm
  c.seed = seed
  if not args.fixed_split:  # the patient split varies with the seed too
    c.data.split_seed = seed
  c.data.phantom.slices_per_patient = args.slices_per_patient
  c.data.test_fraction = args.test_fraction
  c.data.cache_dir = args.cache
  if args.root:
    c.data.root = args.root
  c.data.phantom.size = args.size
  c.data.phantom.patients_per_site = args.patients_per_site
  c.data.phantom.sites = tuple(args.sites.split(","))
  c.data.phantom.style = args.phantom_style
  c.data.image_size = args.size
  c.model.base = args.base
  c.model.depth = args.depth
  c.optimizer.lr = args.lr
  if algorithm != "centralized":
    c.fl.rounds = args.rounds
    c.fl.local_steps = args.local_steps
    c.fl.client_batch_size = args.batch
    c.fl.eval_clients = True
    for k, v in fl_over.items():
      c.fl[k] = v
  c.batch_size = args.batch
  return c


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--methods", nargs="+", default=[m for m, _ in METHODS])
  p.add_argument("--size", type=int, default=48)
  p.add_argument("--base", type=int, default=16)
  p.add_argument("--depth", type=int, default=4)
  p.add_argument("--rounds", type=int, default=30)
  p.add_argument("--local-steps", type=int, default=5)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--sites", default="CS,DU,HT,FG")
  p.add_argument("--patients-per-site", type=int, default=4)
  p.add_argument("--slices-per-patient", type=int, default=16)
  p.add_argument("--test-fraction", type=float, default=0.15)
  p.add_argument("--fixed-split", action="store_true",
                 help="data.split_seed = 0 for every seed (the earlier tables); default: = seed")
  p.add_argument("--n-boot", type=int, default=2000)
  p.add_argument("--root", default="", help="real Kaggle LGG root (default: phantom)")
  p.add_argument("--phantom-style", default="geometric", choices=["geometric", "anatomical"],
                 help="phantom anatomy: geometric ellipses or ICBM152 brain (fedjax_seg/data/anatomy.py)")
  p.add_argument("--cache", default="runs/_data")
  p.add_argument("--workdir", default="runs/dcew_table")
  p.add_argument("--quick", action="store_true")
  p.add_argument("--name", default="",
                 help="file stem of the written table (default: dcew_table[_style][_splits][_quick])")
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
  args = p.parse_args()
  if args.phantom_style != "geometric":
    args.workdir += f"_{args.phantom_style}"
  if args.quick:
    args.seeds, args.size, args.base, args.depth, args.rounds, args.local_steps = [0, 1], 32, 8, 3, 4, 4
    args.workdir += "_quick"
  logging.set_verbosity(logging.WARNING)
  from fedjax_seg.data import pipeline

  results, per_patient = {}, {}
  t0 = time.time()
  for name, algorithm in METHODS:
    if name not in args.methods:
      continue
    for seed in args.seeds:
      c = make_config(algorithm, seed, args)
      if algorithm == "centralized":
        ds = pipeline.build_dataset(c.data, verbose=False)
        n_train = sum(len(ds.patients[i].labels) for i in ds.splits["train"])
        k = len({ds.patients[i].site for i in ds.splits["train"]})
        c.num_epochs = max(1, round(args.rounds * args.local_steps * k * args.batch / n_train))
      wd = os.path.join(args.workdir + ("" if args.fixed_split else "_splits"),
                        f"{algorithm}_s{seed}")
      full = _runs.run_or_load(c, wd, "dcew_table")
      r = full["metrics"]["test"]
      per_patient.setdefault(name, {})[seed] = _runs.patient_dice(full)
      results.setdefault(name, []).append({"seed": seed, "iou": r["iou_mean"], "dice": r["dice_mean"],
                                           "worst_site_dice": full.get("per_site", {}).get(
                                               "test", {}).get("worst_dice")})
      print(f"[dcew_table] {name} seed {seed}: test mIoU {r['iou_mean']:.4f} Dice {r['dice_mean']:.4f} "
            f"({time.time() - t0:.0f}s so far)", flush=True)

  ms = _runs.mean_std
  lines = ["| method | mIoU (fg) % | Dice (fg) % | worst-site Dice % | seeds | paper mIoU / Dice (real LGG) |",
           "|---|---|---|---|---|---|"]
  summary = {}
  for name, _ in METHODS:
    if name not in results:
      continue
    iou, dice = ms([100 * r["iou"] for r in results[name]]), ms([100 * r["dice"] for r in results[name]])
    summary[name] = {"miou_mean": iou[0], "miou_std": iou[1], "dice_mean": dice[0], "dice_std": dice[1],
                     "runs": results[name]}
    paper = PAPER.get(name)
    worst = [r["worst_site_dice"] for r in results[name] if r["worst_site_dice"] is not None]
    worst_txt = f"{100 * sum(worst) / len(worst):.2f}" if worst else "–"
    lines.append(f"| {name} | {iou[0]:.2f} ± {iou[1]:.2f} | {dice[0]:.2f} ± {dice[1]:.2f} | {worst_txt} | "
                 f"{len(results[name])} | {f'{paper[0]:.2f} / {paper[1]:.2f}' if paper else '–'} |")
  cmd = "python benchmarks/dcew_table.py " + " ".join(sys.argv[1:])
  data_desc = f"real LGG at {args.root}" if args.root else f"phantom LGG ({args.phantom_style})"
  md = (f"Command: `{cmd.strip()}`\n\nData: {data_desc}, "
        f"sites {args.sites}, {args.size}×{args.size}; U-Net base {args.base} depth {args.depth}; "
        f"R={args.rounds} rounds × E={args.local_steps} steps × batch {args.batch}, Adam lr {args.lr}; "
        f"CL gets the same number of optimiser steps. Test split pooled over sites; mean ± std over seeds "
        f"{args.seeds}. mIoU/Dice are foreground (tumour) means, background excluded.\n\n"
        + "\n".join(lines) + "\n")
  fed = [n for n, _ in METHODS if n in per_patient and n != "CL"]
  comparison = None
  if "FedAvg" in fed and len(fed) > 1 and len(args.seeds) > 1:
    from fedjax_seg import stats
    comparison = stats.compare({n: per_patient[n] for n in fed}, "FedAvg", "dice_mean",
                               args.n_boot, 0, 0.95)
    md += (f"\nSplit: {'data.split_seed = 0 for every seed' if args.fixed_split else 'drawn per seed (data.split_seed = seed)'}; "
           f"{args.patients_per_site} patients/site, test fraction {args.test_fraction}; "
           f"wall time {time.time() - t0:.0f} s.\n\n" + stats.markdown(comparison))
    if "CL" in per_patient:  # centralised vs FedAvg: a comparison of its own (not in the Holm set)
      comparison_cl = stats.compare({"FedAvg": per_patient["FedAvg"], "CL": per_patient["CL"]},
                                    "FedAvg", "dice_mean", args.n_boot, 0, 0.95)
      md += "\n\nCentralised training against FedAvg (same seeds, same test patients):\n\n" + (
          stats.markdown(comparison_cl))
      comparison = {**comparison, "centralised": comparison_cl}
  print("\n" + md)
  tag = "dcew_table" + ("" if args.phantom_style == "geometric" else f"_{args.phantom_style}") + (
      "" if args.fixed_split else "_splits") + ("_quick" if args.quick else "")
  tag = args.name or tag
  _runs.write_results(args.out, tag, md, {"args": vars(args), "command": cmd, "summary": summary,
                                         "comparison": comparison})


if __name__ == "__main__":
  main()
