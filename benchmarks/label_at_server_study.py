"""Why label-at-server FedWeP collapsed, measured.

FedWeP-Random, label_at_server, 1/4 of the patients at the server, IID, on the
tiny phantom budget of ``fedwep_table.py`` (3 sites × 8 patients, 32×32,
R = 12 rounds × E = 10 steps, server 10 supervised steps per round at Adam
1e-2), evaluated every round. Variants:

  server alone        supervised_only: clients idle, the server trains alone
  same lr, start 2    clients (unlabelled only) at the server's lr 1e-2 from round 2
  same lr, start 6    the same, clients join at round 6 (server model already segments)
  same lr, Dice+CE    start 6 and semi.pseudo_loss = dice_ce
  client lr/10, start 2 / 6   clients at 1e-3 (semi.client_lr_scale = 0.1; server stays at 1e-2)

Per round: val Dice of the model after the server's steps and the server's
mean supervised loss (which jumps when the averaged client models are far from
what the labels say). Writes benchmarks/results/label_at_server_study.{md,json}.

  python benchmarks/label_at_server_study.py
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import logging  # noqa: E402

from benchmarks import _runs, fedwep_table  # noqa: E402

VARIANTS = [  # name, method, client_start_round, client lr scale, pseudo_loss
    ("server alone", "supervised_only", 2, 1.0, "ce"),
    ("same lr, start 2", "fedwep_random", 2, 1.0, "ce"),
    ("same lr, start 6", "fedwep_random", 6, 1.0, "ce"),
    ("same lr, start 6, Dice+CE", "fedwep_random", 6, 1.0, "dice_ce"),
    ("client lr/10, start 2", "fedwep_random", 2, 0.1, "ce"),
    ("client lr/10, start 6", "fedwep_random", 6, 0.1, "ce"),
]


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--rounds", type=int, default=12)
  p.add_argument("--workdir", default="runs/label_at_server_study")
  p.add_argument("--cache", default="runs/_data")
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
  args = p.parse_args()
  logging.set_verbosity(logging.WARNING)
  base = argparse.Namespace(cache=args.cache, root="", size=32, patients_per_site=8,
                            slices_per_patient=4, model="unet", base=8, depth=3, lr=1e-2,
                            rounds=args.rounds, local_steps=10, batch=8, client_strategy="vmap",
                            step_strategy="scan", client_lr_scale=1.0, client_start_round=2)
  t0, load0 = time.time(), os.getloadavg()
  rows = []
  for name, method, start, scale, ploss in VARIANTS:
    ns = argparse.Namespace(**{**vars(base), "client_lr_scale": scale, "client_start_round": start})
    c = fedwep_table.make_config(method, "label_at_server", "1/4", "iid", args.seed, ns)
    c.fl.eval_every = 1
    c.semi.pseudo_loss = ploss
    wd = os.path.join(args.workdir, name.replace(" ", "_").replace(",", "").replace("/", "o")
                      .replace("+", ""))
    r = _runs.run_or_load(c, wd, "label_at_server_study")
    with open(os.path.join(wd, "metrics.csv")) as f:
      curve = [(int(x["round"]), float(x["val_dice_mean"] or "nan"),
                float(x["server_loss"]) if x.get("server_loss") else float("nan"))
               for x in csv.DictReader(f)]
    rows.append({"variant": name, "method": method, "client_start_round": start,
                 "client_lr": base.lr * scale, "pseudo_loss": ploss, "test_dice": r["metrics"]["test"]["dice_mean"],
                 "curve": curve})
    print(f"[study] {name}: test Dice {rows[-1]['test_dice']:.3f} "
          f"({time.time() - t0:.0f}s so far)", flush=True)
  rounds = list(range(1, args.rounds + 1))
  lines = ["| variant | test Dice | " + " | ".join(f"r{t}" for t in rounds) + " |",
           "|---|---|" + "---|" * len(rounds)]
  for row in rows:
    by = {t: (d, l) for t, d, l in row["curve"]}
    cells = [f"{by[t][0]:.2f} / {by[t][1]:.2g}" if t in by else "" for t in rounds]
    lines.append(f"| {row['variant']} | {row['test_dice']:.3f} | " + " | ".join(cells) + " |")
  cmd = "python benchmarks/label_at_server_study.py " + " ".join(sys.argv[1:])
  md = "\n".join([
      f"Command: `{cmd.strip()}`", "",
      f"FedWeP-Random, label_at_server, 1/4 labelled at the server, IID, seed {args.seed}; phantom "
      f"LGG 3 sites × 8 patients × 4 slices, 32×32; U-Net base 8 depth 3; R={args.rounds} × E=10 "
      "steps, batch 8; server: 10 supervised steps per round at Adam 1e-2. Cells: val Dice after "
      "the round / server's mean supervised loss in that round.", "", *lines, "",
      f"Wall time {time.time() - t0:.0f}s (load {load0[0]:.1f} at start, "
      f"{os.getloadavg()[0]:.1f} at end; shared 2-core machine).", ""])
  print("\n" + md)
  _runs.write_results(args.out, "label_at_server_study", md, {"command": cmd, "rows": rows})


if __name__ == "__main__":
  main()
