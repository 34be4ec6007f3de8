"""Round speed: execution strategies of one federated round, measured in one run.

For each K, the same client update (E local Adam steps of a U-Net on batches
sampled from the client's data + the aggregator statistics) is executed as
  loop      a Python loop over K clients of the *jitted single-client update*
            (what a per-client framework does), then a jitted FedAvg
  vmap      one jitted program: jax.vmap over clients + FedAvg
  unrolled  one jitted program: clients unrolled in Python inside the jit + FedAvg
            (compile time grows with K·E: only for K <= --max-unrolled-k)
  sharded   one jitted program: clients over the mesh axis 'clients' of all
            devices (fl/scale.py; with one device it is 'unrolled' + a shard_map)
  torch     a per-client PyTorch loop of the same U-Net (same layers, Dice+CE,
            Adam, E steps, stats forward passes before/after, FedAvg of the
            state dicts); skipped with a message if torch is not importable
            (pip install -e '.[bench]')
and reported as ms/round (median of --reps after a warm-up/compile call),
rounds/s, client-steps/s (K·E/round time), achieved GFLOP/s (XLA cost
analysis of the compiled programs; the torch loop is credited with the same
FLOPs as the JAX loop) against the machine's measured f32 matmul peak, and
speedups vs `loop` and vs `torch` — all measured in one run, with the load
average (`uptime`) recorded at every row: the machine may be shared.
Markdown + JSON results go to benchmarks/results/round_speed[_quick].{md,json}.

  python benchmarks/round_speed.py                 # K = 1 2 4 8 16 32, 64×64, base 16, depth 4
  python benchmarks/round_speed.py --quick         # K = 1 2 4, 32×32, base 8, depth 3
  python benchmarks/round_speed.py --size 32 --base 8 --depth 3 --ks 1 8 32
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _threads_from_argv() -> int:
  """--threads N (0 = all cores) must reach XLA_FLAGS before jax is imported."""
  for i, a in enumerate(sys.argv):
    if a == "--threads" and i + 1 < len(sys.argv):
      return int(sys.argv[i + 1])
    if a.startswith("--threads="):
      return int(a.split("=", 1)[1])
  return 0


THREADS = _threads_from_argv()
if THREADS == 1:  # one thread for XLA and torch alike (on a shared, oversubscribed
  # machine a 2-thread torch step measured 130x slower than a 1-thread one)
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_cpu_multi_thread_eigen=false").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from fedjax_seg import models  # noqa: E402
from fedjax_seg.data import federated  # noqa: E402
from fedjax_seg.fl import aggregators, core  # noqa: E402


def _block(tree):
  jax.tree.map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, tree)
  return tree


def _time(fn, reps, warm=True):
  compile_s = 0.0
  if warm:
    t0 = time.perf_counter()
    _block(fn())
    compile_s = time.perf_counter() - t0
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    _block(fn())
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts)), compile_s


def _flops(compiled) -> float:
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else {}
  return float((ca or {}).get("flops", 0.0))


def _load() -> float:
  return round(os.getloadavg()[0], 2)


def matmul_peak(n=2048, reps=5) -> float:
  """Measured f32 matmul GFLOP/s (jitted n×n @ n×n): the machine's roof."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  t, _ = _time(lambda: f(a, a), reps)
  return 2 * n ** 3 / t / 1e9


# --- the same U-Net and client update in PyTorch ------------------------------------


def torch_round_fn(k, args, data_np, variables):
  """Returns (run() -> None, num_params) or None (torch missing: message printed)."""
  try:
    import torch
    import torch.nn as tnn
    import torch.nn.functional as F
  except ImportError:
    print("  [torch] not importable: torch rows skipped (pip install -e '.[bench]')", flush=True)
    return None
  torch.set_num_threads(THREADS or os.cpu_count() or 1)

  class Block(tnn.Module):
    def __init__(s, i, o):
      super().__init__()
      s.c = tnn.Sequential(tnn.Conv2d(i, o, 3, padding=1), tnn.ReLU(),
                           tnn.Conv2d(o, o, 3, padding=1), tnn.ReLU())

    def forward(s, x):
      return s.c(x)

  class UNet(tnn.Module):  # fedjax_seg.models.unet.UNet(norm='none', dropout=0), NCHW
    def __init__(s, base, depth, cin=3, classes=2):
      super().__init__()
      s.down, c = tnn.ModuleList(), cin
      for lvl in range(depth - 1):
        s.down.append(Block(c, base * 2 ** lvl))
        c = base * 2 ** lvl
      s.mid = Block(c, base * 2 ** (depth - 1))
      c = base * 2 ** (depth - 1)
      s.up, s.ub = tnn.ModuleList(), tnn.ModuleList()
      for lvl in reversed(range(depth - 1)):
        s.up.append(tnn.ConvTranspose2d(c, base * 2 ** lvl, 2, 2))
        s.ub.append(Block(2 * base * 2 ** lvl, base * 2 ** lvl))
        c = base * 2 ** lvl
      s.head = tnn.Conv2d(c, classes, 1)

    def forward(s, x):
      skips = []
      for b in s.down:
        x = b(x)
        skips.append(x)
        x = F.max_pool2d(x, 2)
      x = s.mid(x)
      for u, b in zip(s.up, s.ub):
        x = b(torch.cat([u(x), skips.pop()], 1))
      return s.head(x)

  def dice_ce(logits, y):
    p = torch.softmax(logits, 1)
    g = F.one_hot(y, logits.shape[1]).permute(0, 3, 1, 2).float()
    inter = (p * g).sum((0, 2, 3))
    dice = (2 * inter + 1) / (p.sum((0, 2, 3)) + g.sum((0, 2, 3)) + 1)
    return (1 - dice.mean()) + F.cross_entropy(logits, y)

  model = UNet(args.base, args.depth)
  n_params = sum(p.numel() for p in model.parameters())
  global_state = {n: v.clone() for n, v in model.state_dict().items()}
  xs = [torch.from_numpy(np.ascontiguousarray(data_np.x[i].transpose(0, 3, 1, 2))) for i in range(k)]
  ys = [torch.from_numpy(data_np.y[i].astype(np.int64)) for i in range(k)]
  ns = [int(data_np.valid[i].sum()) for i in range(k)]
  rng = np.random.default_rng(0)

  def run():
    states, weights = [], []
    for i in range(k):
      model.load_state_dict(global_state)
      opt = torch.optim.Adam(model.parameters(), 1e-3)
      sidx = rng.integers(0, ns[i], args.batch)
      with torch.no_grad():
        dice_ce(model(xs[i][sidx]), ys[i][sidx])                 # cost/dice of M_{t-1}
      for _ in range(args.local_steps):
        idx = rng.integers(0, ns[i], args.batch)
        opt.zero_grad()
        dice_ce(model(xs[i][idx]), ys[i][idx]).backward()
        opt.step()
      with torch.no_grad():
        dice_ce(model(xs[i][sidx]), ys[i][sidx])                 # cost/dice of M_t
      states.append({n: v.detach().clone() for n, v in model.state_dict().items()})
      weights.append(ns[i])
    tot = float(sum(weights))
    with torch.no_grad():
      for n in global_state:
        global_state[n] = sum(w / tot * s[n] for w, s in zip(weights, states))
  return run, n_params


_VARS = {}


def bench(k, args, peak):
  fns = models.build({"name": "unet", "base": args.base, "depth": args.depth, "dropout": 0.0,
                      "dtype": args.dtype}, 2)
  rng = np.random.default_rng(0)
  n = args.samples
  per = []
  for _ in range(k):
    x = rng.normal(size=(n, args.size, args.size, 3)).astype(np.float32)
    per.append((x, (x[..., 0] > 0.8).astype(np.int32)))
  data_np = federated.stack_clients(per, host=True)
  data = jax.tree.map(jnp.asarray, data_np)
  vkey = (args.base, args.depth, args.size, args.dtype)
  if vkey not in _VARS:  # the same initial model for every K (init compiles slowly on CPU)
    _VARS[vkey] = fns.init(jax.random.PRNGKey(0), jnp.zeros((1, args.size, args.size, 3)))
  variables = _VARS[vkey]
  n_params = sum(int(a.size) for a in jax.tree.leaves(variables))
  tx = optax.adam(1e-3)
  out = {"K": k, "params": n_params, "load": {}}
  key = jax.random.PRNGKey(1)
  state = core.ServerState(variables, jnp.int32(0))
  steps_per_round = k * args.local_steps
  for strategy in args.strategies:
    if strategy == "unrolled" and k > args.max_unrolled_k:
      print(f"  K={k:3d} {strategy:9s} skipped (K > --max-unrolled-k={args.max_unrolled_k})",
            flush=True)
      continue
    out["load"][strategy] = _load()
    if strategy == "torch":
      tr = torch_round_fn(k, args, data_np, variables)
      if tr is None:
        continue
      run, tparams = tr
      if tparams != n_params:
        raise RuntimeError(f"torch U-Net has {tparams} params, JAX {n_params}: not the same model")
      t, c = _time(run, args.reps)
      fl = out.get("loop_flops", 0.0)
    else:
      step_strategy = "unrolled" if strategy in ("unrolled", "sharded") else args.step_strategy
      hp = core.ClientHParams(local_steps=args.local_steps, batch_size=args.batch,
                              stats_samples=args.batch, step_strategy=step_strategy)
      cu = core.make_client_update(fns, tx, "dice_ce", 2, hp)
      t0 = time.perf_counter()
      if strategy == "loop":
        clients = [jax.tree.map(lambda a: a[i], data) for i in range(k)]
        keys = list(jax.random.split(key, k))
        cu_c = jax.jit(cu).lower(variables, clients[0], keys[0]).compile()
        outs = [cu_c(variables, clients[0], keys[0])]
        agg_c = jax.jit(aggregators.fedavg).lower(
            variables, *jax.tree.map(lambda *xs: jnp.stack(xs), *(outs * k))).compile()
        fl = _flops(cu_c) * k + _flops(agg_c)

        def run():
          o = [cu_c(variables, clients[i], keys[i]) for i in range(k)]
          stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[a[0] for a in o])
          stats = jax.tree.map(lambda *xs: jnp.stack(xs), *[a[1] for a in o])
          return agg_c(variables, stacked, stats)[0]
      else:
        rr = jax.jit(core.make_run_round(cu, aggregators.fedavg, strategy)).lower(
            state, data, key).compile()
        fl = _flops(rr)

        def run():
          return rr(state, data, key)[0].variables
      c = time.perf_counter() - t0
      t, c1 = _time(run, args.reps)
      c += c1
    out[strategy] = t
    out[f"{strategy}_compile_s"] = c
    out[f"{strategy}_flops"] = fl
    out[f"{strategy}_rounds_per_s"] = 1.0 / t
    out[f"{strategy}_client_steps_per_s"] = steps_per_round / t
    out[f"{strategy}_gflops_per_s"] = fl / t / 1e9
    out[f"{strategy}_pct_peak"] = 100.0 * fl / t / 1e9 / peak
    print(f"  K={k:3d} {strategy:9s} {t * 1e3:9.1f} ms/round  {1 / t:7.2f} rounds/s  "
          f"{steps_per_round / t:8.1f} client-steps/s  {fl / t / 1e9:6.1f} GFLOP/s "
          f"({100 * fl / t / 1e9 / peak:4.1f}% of peak)  compile+first {c:6.1f} s  "
          f"load {out['load'][strategy]}", flush=True)
  for s in args.strategies:
    if s in out:
      if s != "loop" and "loop" in out:
        out[f"{s}_vs_loop"] = out[s] / out["loop"]          # time ratio (< 1: faster than loop)
      if s != "torch" and "torch" in out:
        out[f"{s}_vs_torch"] = out[s] / out["torch"]
  return out


def _fmt(x, spec):
  return "–" if x is None else format(x, spec)


def markdown(rows, args, machine, peak, torch_version):
  e = args.local_steps
  head = ("Machine: " + machine + f". f32 matmul peak (jitted 2048², measured): {peak:.1f} GFLOP/s."
          f"\nU-Net base {args.base}, depth {args.depth}, {args.size}×{args.size}×3, 2 classes, "
          f"compute dtype {args.dtype}, batch {args.batch}, E={e} local Adam steps + 2 stats "
          f"forward passes per client, FedAvg; median of {args.reps} rounds after a warm-up; "
          f"torch {torch_version or 'not installed'}. Load = 1-min load average when the row "
          f"started (the machine is shared; ratios come from one run).\n")
  t1 = ["| K | strategy | ms/round | rounds/s | client-steps/s | GFLOP/round | GFLOP/s | % of "
        "matmul peak | compile+first s | load |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    for s in args.strategies:
      if s in r:
        t1.append(f"| {r['K']} | {s} | {r[s] * 1e3:.0f} | {r[s + '_rounds_per_s']:.2f} | "
                  f"{r[s + '_client_steps_per_s']:.1f} | {r[s + '_flops'] / 1e9:.2f} | "
                  f"{r[s + '_gflops_per_s']:.1f} | {r[s + '_pct_peak']:.1f}% | "
                  f"{r[s + '_compile_s']:.1f} | {r['load'][s]} |")
  others = [s for s in args.strategies if s not in ("loop", "torch")]
  t2 = ["| K | " + " | ".join(f"{s} vs loop" for s in others)
        + " | JAX loop vs torch loop | best JAX vs torch loop |",
        "|---|" + "---|" * (len(others) + 2)]
  for r in rows:
    cells = [f"{r['loop'] / r[s]:.2f}×" if s in r and "loop" in r else "–" for s in others]
    best = min((r[s], s) for s in args.strategies if s in r and s != "torch")
    cells.append(f"{r['torch'] / r['loop']:.2f}×" if "torch" in r and "loop" in r else "–")
    cells.append(f"{r['torch'] / best[0]:.2f}× ({best[1]})" if "torch" in r else "–")
    t2.append(f"| {r['K']} | " + " | ".join(cells) + " |")
  return (head + "\n" + "\n".join(t1) + "\n\nSpeedups (time of the reference / time of the "
          "strategy; > 1 = faster than the reference):\n\n" + "\n".join(t2) + "\n")


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
  p.add_argument("--strategies", nargs="+", default=["loop", "unrolled", "vmap", "torch"],
                 help="of loop unrolled vmap sharded torch")
  p.add_argument("--size", type=int, default=64)
  p.add_argument("--base", type=int, default=16)
  p.add_argument("--depth", type=int, default=4)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--samples", type=int, default=16, help="samples per client")
  p.add_argument("--local-steps", type=int, default=1)
  p.add_argument("--dtype", default="float32", help="U-Net compute dtype (bfloat16: mixed precision)")
  p.add_argument("--step-strategy", default="auto", help="local-step strategy for loop/vmap clients (unrolled clients always unroll steps)")
  p.add_argument("--max-unrolled-k", type=int, default=8,
                 help="skip 'unrolled' above this K (its compile time grows with K·E)")
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--threads", type=int, default=0,
                 help="0: all cores (default); 1: one thread for XLA and torch (a shared, "
                 "loaded machine); other values set torch's threads only")
  p.add_argument("--quick", action="store_true")
  p.add_argument("--tag", default=None, help="output file stem (default round_speed[_quick])")
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
  args = p.parse_args()
  if args.quick:
    args.ks, args.size, args.base, args.depth, args.samples = [1, 2, 4], 32, 8, 3, 8
  try:
    import torch
    torch_version = torch.__version__
  except ImportError:
    torch_version = None
    if "torch" in args.strategies:
      print("[round_speed] torch is not importable: the PyTorch per-client loop is skipped "
            "(pip install -e '.[bench]' or pip install torch)", flush=True)
  machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"{jax.device_count()} {jax.default_backend()} device(s) "
             f"({jax.devices()[0].device_kind}), jax {jax.__version__}, "
             f"threads {THREADS or 'all'}, "
             f"load at start {_load()}")
  peak = matmul_peak()
  print(f"[round_speed] {machine}\n[round_speed] f32 matmul peak {peak:.1f} GFLOP/s\n"
        f"[round_speed] U-Net base {args.base} depth {args.depth}, {args.size}×{args.size}, "
        f"batch {args.batch}, E={args.local_steps}, dtype {args.dtype}", flush=True)
  rows = [bench(k, args, peak) for k in args.ks]
  md = markdown(rows, args, machine + f", load at end {_load()}", peak, torch_version)
  print("\n" + md)
  os.makedirs(args.out, exist_ok=True)
  tag = args.tag or ("round_speed_quick" if args.quick else "round_speed")
  with open(os.path.join(args.out, f"{tag}.md"), "w") as f:
    f.write(md)
  with open(os.path.join(args.out, f"{tag}.json"), "w") as f:
    json.dump({"machine": machine, "matmul_peak_gflops": peak, "torch": torch_version,
               "args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
