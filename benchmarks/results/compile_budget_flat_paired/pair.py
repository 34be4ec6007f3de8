"""Paired before/after table of the compile-budget runs in this folder (README.md)."""
import json, glob, os, sys
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", ".."))
from benchmarks.round_speed import paired_ratio
import numpy as np
R = {}
for f in glob.glob(os.path.join(HERE, "cbp_*.json")):
  arm, rep = f.split("cbp_")[1][:-5].split("_")
  for r in json.load(open(f))["rows"]:
    for phase in ("cold", "cached"):
      cs = r[phase]["compile_s"]
      R.setdefault((r["algorithm"], phase), {}).setdefault(arm, {})[int(rep)] = {
          "round": sum(v for k, v in cs.items() if "eval" not in k),
          "post": sum(v for k, v in cs.items() if k.endswith("_post") or "_post_stage1" in k),
          "load": r[phase]["load"]}
for (alg, phase), d in sorted(R.items()):
  reps = sorted(set(d.get("new", {})) & set(d.get("old", {})))
  for what in ("round", "post"):
    o = [d["old"][i][what] for i in reps]; n = [d["new"][i][what] for i in reps]
    g, ci, p = paired_ratio(o, n)
    cis = f"[{ci[0]:.2f}, {ci[1]:.2f}], p = {p:.2g}" if ci else ""
    print(f"| {alg} | {phase} | {what} | {', '.join(f'{x:.1f}' for x in o)} | {', '.join(f'{x:.1f}' for x in n)} | {np.median(o):.1f} → {np.median(n):.1f} | {g:.2f}× {cis} |")
