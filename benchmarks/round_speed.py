"""Round speed: execution strategies of one federated round, measured in one run.

For each K, the same client update (E local Adam steps of a U-Net on batches
sampled from the client's data + the aggregator statistics) is executed as
  loop      a Python loop over K clients of the *jitted single-client update*
            (what a per-client framework does), then a jitted FedAvg
  vmap      one jitted program: jax.vmap over clients + FedAvg
  unrolled  one jitted program: clients unrolled in Python inside the jit + FedAvg
and the time per round (median of --reps after a warm-up/compile call) and the
ratios vs `loop` are printed, with compile times. Markdown + JSON results go to
benchmarks/results/round_speed.{md,json}.

  python benchmarks/round_speed.py                 # K = 1 2 4 8 16, 64×64, base 16
  python benchmarks/round_speed.py --quick         # K = 1 2 4, 32×32, base 8
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from fedjax_seg import models  # noqa: E402
from fedjax_seg.data import federated  # noqa: E402
from fedjax_seg.fl import aggregators, core  # noqa: E402


def _block(tree):
  jax.tree.map(lambda a: a.block_until_ready(), tree)
  return tree


def _time(fn, reps):
  t0 = time.perf_counter()
  _block(fn())
  compile_s = time.perf_counter() - t0
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    _block(fn())
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts)), compile_s


def bench(k, args):
  fns = models.build({"name": "unet", "base": args.base, "depth": args.depth, "dropout": 0.0}, 2)
  rng = np.random.default_rng(0)
  n = args.samples
  per = []
  for _ in range(k):
    x = rng.normal(size=(n, args.size, args.size, 3)).astype(np.float32)
    per.append((x, (x[..., 0] > 0.8).astype(np.int32)))
  data = federated.stack_clients(per)
  variables = fns.init(jax.random.PRNGKey(0), jnp.zeros((1, args.size, args.size, 3)))
  tx = optax.adam(1e-3)
  out = {"K": k}
  key = jax.random.PRNGKey(1)
  state = core.ServerState(variables, jnp.int32(0))
  for strategy in args.strategies:
    step_strategy = "unrolled" if strategy == "unrolled" else args.step_strategy
    hp = core.ClientHParams(local_steps=args.local_steps, batch_size=args.batch,
                            stats_samples=args.batch, step_strategy=step_strategy)
    cu = core.make_client_update(fns, tx, "dice_ce", 2, hp)
    if strategy == "loop":
      cu_jit = jax.jit(cu)
      agg = jax.jit(aggregators.fedavg)

      def run():
        keys = jax.random.split(key, k)
        outs = [cu_jit(variables, jax.tree.map(lambda a: a[i], data), keys[i]) for i in range(k)]
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[o[0] for o in outs])
        stats = jax.tree.map(lambda *xs: jnp.stack(xs), *[o[1] for o in outs])
        return agg(variables, stacked, stats)[0]
    else:
      rr = jax.jit(core.make_run_round(cu, aggregators.fedavg, strategy))

      def run():
        return rr(state, data, key)[0].variables
    t, c = _time(run, args.reps)
    out[strategy] = t
    out[f"{strategy}_compile_s"] = c
    print(f"  K={k:3d} {strategy:9s} {t * 1e3:9.1f} ms/round  (first call incl. compile {c:6.1f} s)",
          flush=True)
  for s in args.strategies:
    if s != "loop" and "loop" in out:
      out[f"{s}_vs_loop"] = out[s] / out["loop"]
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8, 16])
  p.add_argument("--strategies", nargs="+", default=["loop", "unrolled", "vmap"])
  p.add_argument("--size", type=int, default=64)
  p.add_argument("--base", type=int, default=16)
  p.add_argument("--depth", type=int, default=4)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--samples", type=int, default=16, help="samples per client")
  p.add_argument("--local-steps", type=int, default=1)
  p.add_argument("--step-strategy", default="auto", help="local-step strategy for loop/vmap clients (unrolled clients always unroll steps)")
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--quick", action="store_true")
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
  args = p.parse_args()
  if args.quick:
    args.ks, args.size, args.base, args.depth, args.samples = [1, 2, 4], 32, 8, 3, 8
  machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"backend {jax.default_backend()}, jax {jax.__version__}, load {os.getloadavg()[0]:.1f}")
  print(f"[round_speed] {machine}\n[round_speed] U-Net base {args.base} depth {args.depth}, "
        f"{args.size}×{args.size}, batch {args.batch}, E={args.local_steps}", flush=True)
  rows = [bench(k, args) for k in args.ks]
  head = "| K | " + " | ".join(f"{s} ms" for s in args.strategies) + " | " + " | ".join(
      f"{s}/loop" for s in args.strategies if s != "loop") + " |"
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    lines.append(f"| {r['K']} | " + " | ".join(f"{r[s] * 1e3:.0f}" for s in args.strategies) + " | "
                 + " | ".join(f"{r[s + '_vs_loop']:.2f}×" for s in args.strategies if s != "loop")
                 + " |")
  md = (f"Machine: {machine}. U-Net base {args.base}, depth {args.depth}, {args.size}×{args.size}, "
        f"batch {args.batch}, E={args.local_steps} local steps; median of {args.reps} rounds.\n\n"
        + "\n".join(lines) + "\n")
  print("\n" + md)
  os.makedirs(args.out, exist_ok=True)
  tag = "round_speed_quick" if args.quick else "round_speed"
  with open(os.path.join(args.out, f"{tag}.md"), "w") as f:
    f.write(md)
  with open(os.path.join(args.out, f"{tag}.json"), "w") as f:
    json.dump({"machine": machine, "args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
