"""Reproduce the two tables of the FedWeP seed (SPEC §4.2) on phantom LGG.

Table 1 (label-at-server) and Table 2 (label-at-client): Dice (foreground,
test split) for every method × {IID, NonIID} × label fraction {1/16, 1/8, 1/4,
1/2}, mean ± std over seeds, and a Cost column measured from the byte
counters of the runs (bytes per client per round, down + up, relative to
exchanging two models both ways = CPS = 100%). Every run is a normal trainer
run in its own workdir (runs/fedwep_table[_quick]/<cell>), so the benchmark
is resumable: finished runs (results.json) are skipped, interrupted runs
resume from their checkpoint. All runs of one (method, scenario) share one
compiled round (client arrays padded to a common shape, semi.pad_rows = -1).

  python benchmarks/fedwep_table.py                 # 2 seeds, 48×48, R=20, E=8
  python benchmarks/fedwep_table.py --quick         # CI-sized: 2 seeds, 32×32, R=6, E=4
  python benchmarks/fedwep_table.py --quick --fractions 1/4 --tables client
  python benchmarks/fedwep_table.py --lr-grid 3e-3 1e-2 3e-2   # lr chosen on val per method

Writes benchmarks/results/fedwep_table[_quick].{md,json}.
IID: patients dealt evenly over K = #sites clients; NonIID: one client per
phantom scanner site (scanner effects, tumour-size distributions differ).

Protocol of the baselines (defaults = the original papers; the options reproduce the
earlier tables): Mean Teacher's EMA decay warms up as min(1 − 1/(t+1), α) (t = global
step; ``--mt-ema-warmup 0``: α from the first step) and the table evaluates the teacher,
with the student in a row of its own; CPS applies its cross pseudo-supervision loss to
labelled batches too (``--cps-on-labelled 0``: unlabelled only); "FixMatch-style PS"
(method key ``pseudoseg``) is confidence-thresholded pseudo-labelling on a strong view,
not PseudoSeg's CAM fusion; the seed's rows keep their name (PseudoSeg).

Learning rate: ``--lr`` (one value for every method), or ``--lr-grid`` (the same grid
for every method): every cell runs at every grid value, and each (table, method) takes
the value with the highest validation Dice averaged over all its cells (partitions,
fractions, seeds); the table reports the test Dice at that value and names it.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import logging  # noqa: E402

from benchmarks import _runs  # noqa: E402
from configs import lgg_fedwep  # noqa: E402
from fedjax_seg.fl import semi_train  # noqa: E402

FRACTIONS = ["1/16", "1/8", "1/4", "1/2"]
PARTS = ["iid", "noniid"]
TABLES = {
    "server": ("label_at_server", [("MT (+ FedAvg)", "mean_teacher"), ("CPS (+ FedAvg)", "cps"),
                                   ("FixMatch-style PS (+ FedAvg)", "pseudoseg"),
                                   ("FedWeP-Random (Ours)", "fedwep_random"),
                                   ("FedWeP-Real (Ours)", "fedwep_real"),
                                   ("Supervised-only (server alone; ours)", "supervised_only")]),
    "client": ("label_at_client", [("FedAvg (Fully sup.)", "fedavg_full"),
                                   ("MT (+ FedAvg)", "mean_teacher"), ("CPS (+ FedAvg)", "cps"),
                                   ("FixMatch-style PS (+ FedAvg)", "pseudoseg"),
                                   ("FedWeP (Ours)", "fedwep"),
                                   ("Supervised-only (labelled patients; ours)", "supervised_only")]),
}
# The seed's numbers (real data, Dice): IID 1/16..1/2, NonIID 1/16..1/2, Cost. Its PS is
# PseudoSeg (with CAM fusion); ours is the FixMatch-style row.
PAPER = {
    "server": {"MT (+ FedAvg)": ([.242, .236, .441, .340], [.235, .206, .362, .248], "100%"),
               "CPS (+ FedAvg)": ([.693, .711, .739, .765], [.677, .702, .730, .736], "100%"),
               "PseudoSeg (+ FedAvg)": ([.200, .293, .426, .441], [.293, .349, .367, .456], "50%"),
               "FedWeP-Random (Ours)": ([.557, .593, .662, .694], [.598, .631, .699, .703], "≈50%"),
               "FedWeP-Real (Ours)": ([.470, .659, .684, .737], [.579, .605, .642, .615], "≈50%")},
    "client": {"FedAvg (Fully sup.)": ([.744], [.742], "50%"),
               "MT (+ FedAvg)": ([.437, .451, .617, .714], [.395, .543, .589, .592], "100%"),
               "CPS (+ FedAvg)": ([.583, .700, .720, .727], [.599, .586, .674, .728], "100%"),
               "PseudoSeg (+ FedAvg)": ([.601, .661, .675, .693], [.542, .567, .631, .640], "50%"),
               "FedWeP (Ours)": ([.584, .681, .690, .716], [.554, .630, .687, .705], "≈50%")},
}


def make_config(method, scenario, fraction, part, seed, args, lr=None):
  c = lgg_fedwep.get_config(f"{method},{scenario},{fraction},{part}")
  c.seed = seed
  c.semi.label_seed = seed
  c.fl.partition_seed = seed
  if not args.fixed_split:  # the patient split varies with the seed too
    c.data.split_seed = seed
  if args.test_fraction is not None:
    c.data.test_fraction = args.test_fraction
  c.data.cache_dir = args.cache
  if args.root:
    c.data.root = args.root
  c.data.phantom.size = args.size
  c.data.phantom.patients_per_site = args.patients_per_site
  c.data.phantom.slices_per_patient = args.slices_per_patient
  c.data.image_size = args.size
  c.model.name = args.model
  c.model.base = args.base
  c.model.depth = args.depth
  c.model.dropout = 0.0
  c.optimizer.lr = args.lr if lr is None else lr
  c.semi.mt.ema_warmup = bool(args.mt_ema_warmup)
  c.semi.cps.on_labelled = bool(args.cps_on_labelled)
  if args.norm_k is not None:
    c.fl.norm_k = args.norm_k
  c.fl.rounds = args.rounds
  c.fl.local_steps = args.local_steps
  c.fl.client_batch_size = args.batch
  c.fl.eval_every = args.rounds
  c.fl.eval_clients = False
  c.fl.client_strategy = args.client_strategy
  c.fl.step_strategy = args.step_strategy
  c.semi.unlabelled_batch_size = args.batch
  c.semi.server_steps = args.local_steps
  c.semi.server_batch_size = args.batch
  c.semi.rampup_rounds = max(1, args.rounds // 4)
  if scenario == "label_at_server":
    # configs/lgg_fedwep.py: server at --lr, clients at --lr × client_lr_scale from
    # client_start_round on; the two options below override the config's rule
    if args.client_lr_scale is not None:
      c.semi.client_lr_scale = args.client_lr_scale
    if args.client_start_round is not None:
      c.semi.client_start_round = args.client_start_round
  c.semi.pad_rows = -1
  c.eval_batch_size = 32
  return c


def protocol_suffix(method, args):
  """Workdir suffix of a run with a non-default baseline protocol (a default run keeps
  its old name)."""
  if method == "mean_teacher" and not args.mt_ema_warmup:
    return "_emaconst"
  if method == "cps" and not args.cps_on_labelled:
    return "_cpsunl"
  return ""


def choose_lr(runs, table, row):
  """The grid value with the highest mean val Dice over all of (table, row)'s cells."""
  by_lr = {}
  for r in runs:
    if r["table"] == table and r["row"] == row:
      by_lr.setdefault(r["lr"], []).append(r["val_dice"])
  mean = lambda v: sum(v) / len(v)
  return max(sorted(by_lr), key=lambda lr: -1.0 if math.isnan(mean(by_lr[lr])) else mean(by_lr[lr]))


def comparisons(table, runs, args):
  """Paired per-patient comparisons against the table's supervised-only row, per
  (partition, fraction): Markdown and the ``stats.compare`` results.

  Fully supervised FedAvg (run at fraction 1) is compared in every fraction's block.
  """
  from fedjax_seg import stats
  _, rows = TABLES[table]
  ref = next(n for n, m in rows if m == "supervised_only")
  if len(args.seeds) < 2 or not any(r["row"] == ref for r in runs):
    return "", {}
  out_md, out = [], {}
  for part in PARTS:
    for frac in args.fractions:
      data = {}
      for name, method in rows:
        sel = [r for r in runs if r["table"] == table and r["row"] == name and r["part"] == part
               and (r["fraction"] == frac or method == "fedavg_full")]
        if sel:
          data[name] = {r["seed"]: r["per_patient"] for r in sel}
      if ref not in data or len(data) < 2:
        continue
      res = stats.compare(data, ref, "dice_mean", args.n_boot, 0, 0.95)
      out[f"{part}_{frac}"] = res
      out_md.append(f"Paired comparison, {part.upper() if part == 'iid' else 'NonIID'} {frac} "
                    f"(test patients paired by seed and id):\n\n" + stats.markdown(res))
  return "\n\n".join(out_md), out


def cells(table, args):
  scenario, rows = TABLES[table]
  for name, method in rows:
    if args.methods and method not in args.methods:
      continue
    for part in args.parts:
      fracs = ["1"] if method == "fedavg_full" else args.fractions
      for frac in fracs:
        for seed in args.seeds:
          yield name, method, scenario, part, frac, seed


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  p.add_argument("--tables", nargs="+", default=["server", "client"], choices=list(TABLES))
  p.add_argument("--methods", nargs="*", default=[], help="restrict to these config methods")
  p.add_argument("--fractions", nargs="+", default=FRACTIONS)
  p.add_argument("--parts", nargs="+", default=PARTS, choices=PARTS,
                 help="partitions (columns) to run; a dropped one is named in the table")
  p.add_argument("--size", type=int, default=48)
  p.add_argument("--model", default="unet")
  p.add_argument("--base", type=int, default=8)
  p.add_argument("--depth", type=int, default=3)
  p.add_argument("--rounds", type=int, default=20)
  p.add_argument("--local-steps", type=int, default=8)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--client-lr-scale", type=float, default=None,
                 help="label-at-server clients step at --lr × this (default: the config's 0.1)")
  p.add_argument("--client-start-round", type=int, default=None,
                 help="label-at-server: clients join at this round (default: the config's "
                      "--rounds // 2)")
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--lr-grid", type=float, nargs="+", default=[],
                 help="the same learning-rate grid for every method; each (table, method) "
                      "takes the value with the best mean val Dice (replaces --lr)")
  p.add_argument("--method-lr", nargs="+", default=[], metavar="METHOD=LR",
                 help="a learning rate per config method (e.g. chosen beforehand on validation "
                      "Dice by a --lr-grid pilot); the methods not named take --lr / --lr-grid")
  p.add_argument("--keep", default="", help="keep each finished run's config and results "
                 "here (committed: a later session finishes the table without re-running them)")
  p.add_argument("--mt-ema-warmup", type=int, choices=[0, 1], default=1,
                 help="Mean Teacher EMA warm-up min(1 - 1/(t+1), decay) (1, the paper's) or "
                      "the constant decay from the first step (0, the earlier tables)")
  p.add_argument("--cps-on-labelled", type=int, choices=[0, 1], default=1,
                 help="CPS loss on labelled batches too (1, the paper's) or unlabelled only (0)")
  p.add_argument("--norm-k", type=float, default=None,
                 help="config fl.norm_k (divergence guard; default: the config's)")
  p.add_argument("--patients-per-site", type=int, default=16)
  p.add_argument("--test-fraction", type=float, default=None,
                 help="config data.test_fraction (default: the config's)")
  p.add_argument("--fixed-split", action="store_true",
                 help="data.split_seed = 0 for every seed (the earlier tables); default: = seed")
  p.add_argument("--n-boot", type=int, default=2000)
  p.add_argument("--slices-per-patient", type=int, default=4)
  p.add_argument("--client-strategy", default="vmap")
  p.add_argument("--step-strategy", default="scan")
  p.add_argument("--root", default="", help="real Kaggle LGG root (default: phantom)")
  p.add_argument("--cache", default="runs/_data")
  p.add_argument("--workdir", default="runs/fedwep_table")
  p.add_argument("--quick", action="store_true")
  p.add_argument("--name", default="", help="results file stem (default fedwep_table[_quick])")
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
  args = p.parse_args()
  if args.quick:
    args.size, args.rounds, args.local_steps, args.lr = 32, 6, 4, 1e-2
    args.workdir += "_quick"
  logging.set_verbosity(logging.WARNING)

  t0 = time.time()
  load0 = os.getloadavg()
  grid = args.lr_grid or [args.lr]
  try:
    method_lr = {m: float(v) for m, v in (kv.split("=", 1) for kv in args.method_lr)}
  except ValueError:
    p.error(f"--method-lr takes METHOD=LR pairs, got {args.method_lr}")
  per_lr = bool(args.lr_grid or method_lr)  # workdirs and the table name the lr
  all_runs = []
  for table in args.tables:
    for name, method, scenario, part, frac, seed in cells(table, args):
      for lr in ([method_lr[method]] if method in method_lr else grid):
        c = make_config(method, scenario, frac, part, seed, args, lr)
        tag = (f"{scenario}_{method}_{part}_f{frac.replace('/', 'o')}_s{seed}"
               + protocol_suffix(method, args) + (f"_lr{lr:g}" if per_lr else ""))
        wd = os.path.join(args.workdir, tag)
        r = _runs.run_or_load(c, wd, "fedwep_table", keep=args.keep)
        all_runs.append({"table": table, "row": name, "method": method, "part": part,
                         "fraction": frac, "seed": seed, "lr": lr,
                         "dice": r["metrics"]["test"]["dice_mean"],
                         "val_dice": r["metrics"]["val"]["dice_mean"],
                         "student_dice": r.get("student_test_dice"),
                         "labelled_fraction_realised": r["labelled_fraction_realised"],
                         "cost_percent": r["cost_percent"], "bytes": r["bytes_per_client_round"],
                         "model_bytes": r["model_bytes"], "wall_time_s": r["wall_time_s"],
                         "per_patient": _runs.patient_dice(r)})
        print(f"[fedwep_table] {tag}: test Dice {all_runs[-1]['dice']:.4f} "
              f"(val {all_runs[-1]['val_dice']:.4f}; {time.time() - t0:.0f}s so far, "
              f"load {os.getloadavg()[0]:.1f})", flush=True)
  chosen = {(t, n): choose_lr(all_runs, t, n) for t, n in {(r["table"], r["row"]) for r in all_runs}}
  runs = [r for r in all_runs if r["lr"] == chosen[(r["table"], r["row"])]]

  md_parts, summary = [], {}
  for table in args.tables:
    scenario, rows = TABLES[table]
    head = ("| Method | " + " | ".join(f"IID {f}" for f in args.fractions) + " | "
            + " | ".join(f"NonIID {f}" for f in args.fractions) + " | Cost (measured) | bytes/client/round |"
            + (" lr (val-chosen) |" if per_lr else ""))
    lines = [f"**Table {1 if table == 'server' else 2}: {scenario.replace('_', '-')}** "
             f"(test Dice, foreground; mean ± std over seeds {args.seeds})", "", head,
             "|" + "---|" * (2 * len(args.fractions) + 3 + per_lr)]
    for name, method in rows:
      rr = [r for r in runs if r["table"] == table and r["row"] == name]
      if not rr:
        continue
      # MT: the teacher (the evaluated model), then its student
      variants = [(name, "dice")] + ([(f"{name}: student", "student_dice")]
                                     if rr[0].get("student_dice") is not None else [])
      for label, key in variants:
        cols = []
        for part in PARTS:
          for frac in args.fractions:
            sel = [r[key] for r in rr if r["part"] == part and (r["fraction"] == frac or
                                                                 method == "fedavg_full")]
            if method == "fedavg_full" and frac != args.fractions[0]:
              cols.append("")
              continue
            m, s = _runs.mean_std(sel) if sel else (float("nan"), 0)
            cols.append(f"{m:.3f} ± {s:.3f}" if sel else "–")
            summary.setdefault(table, {}).setdefault(label, {})[f"{part}_{frac}"] = {
                "mean": m, "std": s, "runs": sel}
        b = rr[0]["bytes"]
        lines.append(f"| {label} | " + " | ".join(cols) + f" | {rr[0]['cost_percent']:.2f}% | "
                     f"{b['down']:,} ↓ + {b['up']:,} ↑ |"
                     + (f" {chosen[(table, name)]:g} |" if per_lr else ""))
    paper = ["", f"Seed's numbers (real data, {scenario.replace('_', '-')}):", "",
             "| Method | " + " | ".join(f"IID {f}" for f in FRACTIONS) + " | "
             + " | ".join(f"NonIID {f}" for f in FRACTIONS) + " | Cost |",
             "|" + "---|" * 10]
    for name, (iid, non, cost) in PAPER[table].items():
      pad = lambda v: [f"{x:.3f}" for x in v] + [""] * (4 - len(v))
      paper.append(f"| {name} | " + " | ".join(pad(iid) + pad(non)) + f" | {cost} |")
    md_parts.append("\n".join(lines + paper))
    comp_md, comp = comparisons(table, runs, args)
    if comp_md:
      md_parts.append(comp_md)
      summary.setdefault(table, {})["comparisons"] = comp
  srv = make_config("fedwep", "label_at_server", args.fractions[0], "iid", args.seeds[0], args)
  srv_clients = (f"lr × {srv.semi.client_lr_scale:g} from round {semi_train.start_round(srv)}")
  lr_text = (f"lr from the grid {grid} chosen per method on mean val Dice" if args.lr_grid
             else f"lr {args.lr}")
  if method_lr:
    lr_text += (" (" + ", ".join(f"{m} {v:g}" for m, v in sorted(method_lr.items()))
                + ": given per method, chosen beforehand on validation Dice)")
  cmd = "python benchmarks/fedwep_table.py " + " ".join(sys.argv[1:])
  elapsed = time.time() - t0
  mb = runs[0]["model_bytes"] if runs else 0
  md = (f"Command: `{cmd.strip()}`\n\n"
        f"Data: {'real LGG at ' + args.root if args.root else 'phantom LGG'} "
        f"({args.patients_per_site} patients/site × 3 sites, {args.slices_per_patient} slices/patient, "
        f"{args.size}×{args.size}); {args.model} base {args.base} depth {args.depth} "
        f"({mb:,} B per model); R={args.rounds} rounds × E={args.local_steps} local steps × "
        f"batch {args.batch} (labelled and unlabelled), Adam {lr_text}; label_at_server: "
        f"{args.local_steps} server steps per round at {lr_text}, clients (unlabelled only) at "
        f"{srv_clients}. Baselines: Mean Teacher EMA warm-up "
        f"{'on' if args.mt_ema_warmup else 'off (constant decay)'} (table: teacher; student "
        f"row beside it), CPS loss on labelled data {'on' if args.cps_on_labelled else 'off'}, "
        f"FixMatch-style PS = thresholded pseudo-labels on a strong view (no PseudoSeg CAM "
        f"fusion). Test split pooled "
        f"over sites; {'data.split_seed = 0 for every seed' if args.fixed_split else 'patient split drawn per seed (data.split_seed = seed)'}"
        f"{'' if args.test_fraction is None else f', test fraction {args.test_fraction}'}"
        f"{'' if set(args.parts) == set(PARTS) else '; not run (columns –): ' + ', '.join(x for x in PARTS if x not in args.parts)}. Wall time {elapsed:.0f}s, load average {load0[0]:.1f} at start / "
        f"{os.getloadavg()[0]:.1f} at end (shared 2-core machine).\n\n"
        + "\n\n".join(md_parts) + "\n")
  print("\n" + md)
  tag = args.name or ("fedwep_table_quick" if args.quick else "fedwep_table")
  _runs.write_results(args.out, tag, md, {
      "args": vars(args), "command": cmd, "summary": summary, "runs": runs, "grid_runs": all_runs,
      "chosen_lr": {f"{t}/{n}": v for (t, n), v in chosen.items()}, "wall_time_s": elapsed,
      "load_start": load0, "load_end": os.getloadavg()})


if __name__ == "__main__":
  main()
