"""Aggregation speed: the jitted aggregators on K stacked copies of the U-Net's
parameters, as GB/s of parameter bytes read (K × model bytes / time), against
two roofs measured on the same stacked bytes in the same run:
  copy      a plain jitted jnp copy of the K models (reads and writes K × bytes;
            the issue's roof)
  sum       a plain jitted jnp.sum over the client axis (reads K × bytes, writes
            one model: the roof of any linear aggregator)
Aggregators: fedavg, fedcostw, costw_ce, dcew (weighted sums), robust(fedavg)
(+ update norms), median, trimmed_mean (sorts: compute-bound, not a memory
stream). Median of --reps calls after a warm-up/compile call; the 1-min load
average is recorded with every row (the machine may be shared).

  python benchmarks/aggregate_speed.py                    # K = 2 8 32, U-Net base 32 depth 4 (SPEC)
  python benchmarks/aggregate_speed.py --quick            # K = 2 8, base 8
Markdown + JSON in benchmarks/results/aggregate_speed[_quick].{md,json}.

--flat-ab compares instead the two ways the round aggregates (aggregators.flat_view): the
aggregation program as the trainers' loop round builds it (K one-client rows, leaves
[1, ...], concatenated per leaf, then core.model_aggregate) with the coordinate-wise
aggregator on one vector per client ('flat', what the trainers run) and on the pytrees
('pytree'), each compiled cold (persistent cache off) and then timed, --repeats times
in alternating order; paired ratios pytree / flat with 95 % t intervals and p:

  python benchmarks/aggregate_speed.py --flat-ab --ks 8 32 --base 16 --repeats 5 \
      --aggregators fedavg robust_fedavg dcew median --tag aggregate_flat_ab
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import _runs  # noqa: E402
from fedjax_seg import models  # noqa: E402
from fedjax_seg.fl import aggregators, core  # noqa: E402

AGGS = ("fedavg", "fedcostw", "costw_ce", "dcew", "robust_fedavg", "median", "trimmed_mean")


def _time(fn, reps):
  jax.block_until_ready(fn())
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts))


def _agg(name):
  if name == "robust_fedavg":
    return aggregators.robust(aggregators.fedavg, 3.0)
  return aggregators.get(name)


def bench(k, variables, args):
  nbytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(variables))
  scale = jnp.linspace(0.9, 1.1, k, dtype=jnp.float32)
  stacked = jax.jit(lambda v: jax.tree.map(
      lambda g: g[None] * scale.reshape((-1,) + (1,) * g.ndim), v))(variables)
  jax.block_until_ready(stacked)
  stats = _stats(k)
  read = k * nbytes
  row = {"K": k, "model_bytes": nbytes, "read_bytes": read, "load": round(os.getloadavg()[0], 2)}
  copy = jax.jit(lambda s: jax.tree.map(lambda a: a.copy(), s))
  row["copy"] = _time(lambda: copy(stacked), args.reps)
  ssum = jax.jit(lambda s: jax.tree.map(lambda a: jnp.sum(a, 0), s))
  row["sum"] = _time(lambda: ssum(stacked), args.reps)
  for name in args.aggregators:
    f = jax.jit(_agg(name))
    row[name] = _time(lambda: f(variables, stacked, stats)[0], args.reps)
  for name in ("copy", "sum", *args.aggregators):
    row[f"{name}_gbps"] = read / row[name] / 1e9
  print(f"  K={k:3d} ({read / 1e6:.0f} MB read) " + "  ".join(
      f"{n} {row[n + '_gbps']:.2f}" for n in ("copy", "sum", *args.aggregators))
        + f" GB/s  load {row['load']}", flush=True)
  return row


def _stats(k):
  rng = np.random.default_rng(0)
  stats = {s: jnp.asarray(rng.uniform(0.5, 2.0, k), jnp.float32)
           for s in ("num_samples", "cost_pre", "cost_post", "ce_pre", "ce_post", "dice_pre",
                     "dice_post", "train_loss")}
  return {**stats, "local_steps": jnp.ones((k,), jnp.float32)}


def round_post(fn, flat: bool):
  """The loop round's aggregation of K one-client rows: rows concatenated per leaf, then
  ``core.model_aggregate(fn)`` on the flat view (``flat``) or on the pytrees."""
  if not flat:
    inner = fn
    fn = lambda *a, **kw: inner(*a, **kw)  # noqa: E731 - no 'coordinatewise': pytrees
    fn.wants_round_key = getattr(inner, "wants_round_key", False)
  aggregate = core.model_aggregate(fn)

  def post(glob, rows, stats):
    stacked = jax.tree.map(lambda *xs: jnp.concatenate(xs), *rows)
    with aggregators.flat_aggregation():  # as the loop round traces its aggregation
      out = aggregate(core.ServerState(glob, jnp.int32(0)), {"model": stacked}, stats,
                      jax.random.PRNGKey(0))
    return out[0], out[1]
  return post


def flat_ab(k, variables, args):
  """Rows of --flat-ab for one K: per aggregator, compile s and ms per call of both arms in
  every repeat (arms alternate which runs first), and the paired ratios."""
  from benchmarks.round_speed import paired_ratio
  rows_in = [jax.tree.map(lambda g, i=i: g[None] * (1.0 + 0.01 * i), variables) for i in range(k)]
  stats = _stats(k)
  out = []
  for name in args.aggregators:
    fn = _agg(name)
    if not getattr(fn, "coordinatewise", False):
      print(f"  {name}: not coordinate-wise (always on the pytrees): skipped", flush=True)
      continue
    res = {"pytree": {"compile_s": [], "ms": []}, "flat": {"compile_s": [], "ms": []}}
    outs = {}
    for rep in range(args.repeats):
      for arm in (("pytree", "flat") if rep % 2 == 0 else ("flat", "pytree")):
        t0 = time.perf_counter()
        exe = jax.jit(round_post(fn, arm == "flat")).lower(variables, rows_in, stats).compile()
        res[arm]["compile_s"].append(time.perf_counter() - t0)
        res[arm]["ms"].append(1e3 * _time(lambda: exe(variables, rows_in, stats), args.reps))
        outs[arm] = exe(variables, rows_in, stats)
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
               zip(jax.tree.leaves(outs["pytree"]), jax.tree.leaves(outs["flat"])))
    row = {"K": k, "aggregator": name, "max_abs_diff": diff, "load": round(os.getloadavg()[0], 2),
           **{f"{arm}_{m}": v for arm in res for m, v in res[arm].items()}}
    for m in ("compile_s", "ms"):
      g, ci, pv = paired_ratio(res["pytree"][m], res["flat"][m])
      row[f"{m}_ratio"], row[f"{m}_ci"], row[f"{m}_p"] = g, ci, pv
    print(f"  K={k:3d} {name}: compile {np.median(res['pytree']['compile_s']):.2f} -> "
          f"{np.median(res['flat']['compile_s']):.2f} s ({row['compile_s_ratio']:.2f}x), "
          f"run {np.median(res['pytree']['ms']):.1f} -> {np.median(res['flat']['ms']):.1f} ms "
          f"({row['ms_ratio']:.2f}x), outputs {diff:.1e} apart, load {row['load']}", flush=True)
    out.append(row)
  return out


def _ci(row, m):
  ci, pv = row[f"{m}_ci"], row[f"{m}_p"]
  return (f"{row[f'{m}_ratio']:.2f}× [{ci[0]:.2f}, {ci[1]:.2f}], p = {pv:.2g}" if ci
          else f"{row[f'{m}_ratio']:.2f}×")


def flat_ab_markdown(rows, args, machine, n_params):
  lines = [f"Command: `python benchmarks/aggregate_speed.py {' '.join(sys.argv[1:])}`", "",
           f"Machine: {machine}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
           f"U-Net base {args.base}, depth {args.depth}: {n_params:,} f32 parameters. The loop "
           f"round's aggregation program (K one-client rows concatenated, then "
           f"core.model_aggregate) with the aggregator on one vector per client (flat) or on "
           f"the pytrees; compile = trace + lower + XLA compile, persistent cache off; run = "
           f"median of {args.reps} calls; {args.repeats} repeats in alternating order; ratio = "
           f"pytree / flat (> 1: flat is faster), geometric mean with its 95 % t interval and "
           f"paired-t p.", "",
           "| K | aggregator | compile s pytree | compile s flat | compile ratio | ms pytree | "
           "ms flat | run ratio | max abs diff | load |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['K']} | {r['aggregator']} | {np.median(r['pytree_compile_s']):.2f} | "
                 f"{np.median(r['flat_compile_s']):.2f} | {_ci(r, 'compile_s')} | "
                 f"{np.median(r['pytree_ms']):.1f} | {np.median(r['flat_ms']):.1f} | "
                 f"{_ci(r, 'ms')} | {r['max_abs_diff']:.1e} | {r['load']} |")
  return "\n".join(lines) + "\n"


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--ks", type=int, nargs="+", default=[2, 8, 32])
  p.add_argument("--base", type=int, default=32)
  p.add_argument("--depth", type=int, default=4)
  p.add_argument("--aggregators", nargs="+", default=list(AGGS))
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--quick", action="store_true")
  p.add_argument("--flat-ab", action="store_true",
                 help="compare the flat-view and pytree aggregation programs (module docstring)")
  p.add_argument("--repeats", type=int, default=3, help="--flat-ab: paired repeats")
  p.add_argument("--tag", default=None, help="output file stem")
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
  args = p.parse_args()
  if args.quick:
    args.ks, args.base = [2, 8], 8
  fns = models.build({"name": "unet", "base": args.base, "depth": args.depth, "dropout": 0.0}, 2)
  shapes = jax.eval_shape(fns.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  rng = np.random.default_rng(0)  # values do not matter for speed; avoids a slow init compile
  variables = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype), shapes)
  n_params = sum(a.size for a in jax.tree.leaves(variables))
  machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"{jax.device_count()} {jax.default_backend()} device(s), jax {jax.__version__}, "
             f"load at start {os.getloadavg()[0]:.1f}")
  print(f"[aggregate_speed] {machine}\n[aggregate_speed] U-Net base {args.base} depth "
        f"{args.depth}: {n_params:,} parameters", flush=True)
  if args.flat_ab:
    jax.config.update("jax_enable_compilation_cache", False)  # every compile cold
    rows = [r for k in args.ks for r in flat_ab(k, variables, args)]
    md = flat_ab_markdown(rows, args, machine, n_params)
    print("\n" + md)
    _runs.write_results(args.out, args.tag or "aggregate_flat_ab", md,
                        {"machine": machine, "args": vars(args), "num_params": n_params,
                         "rows": rows})
    return
  rows = [bench(k, variables, args) for k in args.ks]
  names = ("copy", "sum", *args.aggregators)
  lines = ["| K | MB read | " + " | ".join(f"{n} GB/s" for n in names) + " | load |",
           "|---|---|" + "---|" * (len(names) + 1)]
  for r in rows:
    lines.append(f"| {r['K']} | {r['read_bytes'] / 1e6:.0f} | "
                 + " | ".join(f"{r[n + '_gbps']:.2f}" for n in names) + f" | {r['load']} |")
  frac = ["| K | " + " | ".join(f"{n} / copy" for n in args.aggregators) + " |",
          "|---|" + "---|" * len(args.aggregators)]
  for r in rows:
    frac.append(f"| {r['K']} | " + " | ".join(f"{r[n + '_gbps'] / r['copy_gbps']:.2f}"
                                              for n in args.aggregators) + " |")
  md = (f"Machine: {machine}, load at end {os.getloadavg()[0]:.1f}. U-Net base {args.base}, "
        f"depth {args.depth}: {n_params:,} f32 parameters ({rows[0]['model_bytes'] / 1e6:.1f} MB "
        f"per model); GB/s = K × model bytes / time (median of {args.reps}).\n\n"
        + "\n".join(lines) + "\n\nFraction of the copy roof:\n\n" + "\n".join(frac) + "\n")
  print("\n" + md)
  _runs.write_results(args.out, args.tag or ("aggregate_speed_quick" if args.quick
                                             else "aggregate_speed"), md,
                      {"machine": machine, "args": vars(args), "num_params": n_params, "rows": rows})


if __name__ == "__main__":
  main()
