"""Table: FedAvg, FedProx, FedAdam and DP-FedAvg at two ε on the phantom LGG federation.

Every row is the matching config (configs/lgg_{fedavg,fedprox,fedadam,dp_fedavg}.py)
with one shared small budget (below), run for each seed in its own workdir
(runs/beyond_table/<row>_s<seed>; resumable through benchmarks/_runs.py).
Writes benchmarks/results/beyond_table[_quick].{md,json}: test Dice / IoU of the
tumour class (mean ± std over seeds) and, for DP rows, the noise multiplier z,
the per-coordinate noise std zC/K on the aggregate and the ε(δ) that the
dp-accounting RDP accountant reports after the last round (results.json).

  python benchmarks/beyond_table.py                 # 2 seeds, 32×32, 15 rounds × 8 local steps
  python benchmarks/beyond_table.py --quick         # 1 seed, 4 rounds
  python benchmarks/beyond_table.py --epsilons 1 100
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import logging  # noqa: E402

from benchmarks import _runs  # noqa: E402
from configs import lgg_dp_fedavg, lgg_fedadam, lgg_fedavg, lgg_fedprox  # noqa: E402


def rows(epsilons):
  out = [("FedAvg", "fedavg", lgg_fedavg, {}),
         ("FedProx (μ=0.01)", "fedprox", lgg_fedprox, {}),
         ("FedAdam (server lr 1e-2)", "fedadam", lgg_fedadam, {}),
         ("FedAdam (server lr 3e-2)", "fedadam_lr3e-2", lgg_fedadam, {"server_lr": 3e-2}),
         ("DP-FedAvg clipping only (z=0, ε=∞, C=3)", "dp_clip_only", lgg_dp_fedavg,
          {"dp.target_epsilon": 0.0, "dp.noise_multiplier": 0.0, "dp.clip_norm": 3.0})]
  for eps in epsilons:
    out.append((f"DP-FedAvg (ε={eps:g}, δ=1e-5, C=3)", f"dp_eps{eps:g}", lgg_dp_fedavg,
                {"dp.target_epsilon": float(eps), "dp.clip_norm": 3.0}))
  return out


def make_config(module, fl_over, seed, args):
  c = module.get_config()
  c.seed = seed
  c.data.cache_dir = args.cache
  c.data.phantom.size = args.size
  c.data.image_size = args.size
  c.model.base, c.model.depth, c.model.dropout = args.base, args.depth, 0.0
  c.optimizer.lr = args.lr
  c.fl.rounds = args.rounds
  c.fl.local_steps = args.local_steps
  c.fl.eval_clients = False
  for k, v in fl_over.items():
    if "." in k:
      sub, key = k.split(".")
      c.fl[sub][key] = v
    else:
      c.fl[k] = v
  return c


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  _runs.add_budget_args(p, seeds=[0, 1])
  p.add_argument("--epsilons", type=float, nargs="+", default=[10.0, 1000.0])
  _runs.add_budget_args(p, size=32, base=8, depth=3, rounds=15, local_steps=8, lr=1e-2)
  p.add_argument("--cache", default="runs/_data")
  p.add_argument("--workdir", default="runs/beyond_table")
  p.add_argument("--quick", action="store_true")
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
  args = p.parse_args()
  if args.quick:
    args.seeds, args.rounds = [0], 4
    args.workdir += "_quick"
  logging.set_verbosity(logging.WARNING)
  t0 = time.time()
  table, summary = [], {}
  for name, slug, module, over in rows(args.epsilons):
    dice, iou, dp_info = [], [], {}
    for seed in args.seeds:
      wd = os.path.join(args.workdir, f"{slug}_s{seed}")
      c = make_config(module, over, seed, args)
      k = len(c.data.phantom.sites)
      r = _runs.run_or_load(c, wd, "beyond_table")
      t = r["metrics"]["test"]
      dice.append(100 * t["dice_mean"])
      iou.append(100 * t["iou_mean"])
      dp_info = r.get("dp", {})
      print(f"[beyond_table] {name} seed {seed}: Dice {dice[-1]:.2f} IoU {iou[-1]:.2f} "
            f"({time.time() - t0:.0f}s so far)", flush=True)
    d, i = _runs.mean_std(dice), _runs.mean_std(iou)
    summary[name] = {"dice": dice, "iou": iou, "dp": dp_info}
    eps_s = "∞" if dp_info and dp_info["epsilon"] > 1e300 else f"{dp_info.get('epsilon', 0):.3g}"
    dp_col = (f"ε={eps_s} (δ={dp_info['delta']:g}), z={dp_info['noise_multiplier']:.3g}, "
              f"noise std zC/K={dp_info['noise_multiplier'] * dp_info['clip_norm'] / k:.3g}"
              if dp_info else "–")
    table.append(f"| {name} | {d[0]:.2f} ± {d[1]:.2f} | {i[0]:.2f} ± {i[1]:.2f} | {dp_col} |")
  cmd = ("python benchmarks/beyond_table.py " + " ".join(sys.argv[1:])).strip()
  md = (f"Command: `{cmd}`\n\nPhantom LGG, 3 hospitals by site (CS, DU, HT), {args.size}×{args.size}, U-Net base "
        f"{args.base} depth {args.depth} (no dropout), client Adam lr {args.lr}, R={args.rounds} rounds × "
        f"E={args.local_steps} local steps; seeds {args.seeds}; test Dice / IoU of the tumour class "
        f"(%, mean ± std over seeds). Wall time of this invocation {time.time() - t0:.0f} s "
        f"(finished runs are reused).\n\n"
        "| method | Dice (tumour) % | IoU (tumour) % | DP after the last round |\n|---|---|---|---|\n"
        + "\n".join(table) + "\n")
  print("\n" + md)
  _runs.write_results(args.out, "beyond_table" + ("_quick" if args.quick else ""), md,
                      {"args": vars(args), "command": cmd, "summary": summary})


if __name__ == "__main__":
  main()
