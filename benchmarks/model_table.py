"""Parameters, GFLOPs and CPU time of U-Net, SCAUnet and SCAUnet-A (SPEC §2).

  python benchmarks/model_table.py            # reference input 1×256×256×1 + demo sizes
  python benchmarks/model_table.py --quick    # 1×64×64×1 only, 2 reps (about a minute)

Writes ``benchmarks/results/model_table.{md,json}`` (``--quick``:
``model_table_quick.{md,json}``; ``--out PREFIX`` to choose).

What is measured, per model:
  * params: number of trainable parameters (``variables['params']``).
  * GFLOP fwd: ``jax.jit(apply).lower(...).compile().cost_analysis()['flops']``
    of the inference forward pass at the given input, / 1e9. XLA counts a
    multiply-add as 2 FLOPs.
  * GFLOP fwd+bwd: the same for ``value_and_grad`` of the sparse-CE loss
    w.r.t. the parameters (one training step without the optimiser).
  * fwd ms / fwd+bwd ms: median wall time of the compiled functions over
    ``--reps`` calls after one warm-up call, on this machine (CPU).
  * train temp MB: ``memory_analysis().temp_size_in_bytes`` of the compiled
    fwd+bwd (XLA's scratch buffers: activations kept for the backward pass).

The seed (``fedwep_scaunet_summary.md``) reports params and GFLOPS but no input
size, layer widths or counting convention; we assume a grayscale ultrasound
frame of 256×256 (1 channel) and report it as such. Our models output
2 softmax classes (the seed's likely 1-channel sigmoid head differs by a
handful of parameters).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fedjax_seg import losses, models  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# Seed fedwep_scaunet_summary.md, table "Parameters / GFLOPS".
SEED_REFERENCE = {
    "U-Net": (9_421_569, 66.42),
    "SCAUnet": (491_907, 3.90),
    "SCAUnet-A": (164_795, 3.34),
}

# (label, seed row, registry name, kwargs, input shape, depthwise note)
REFERENCE_ROWS = [
    ("U-Net base 64, depth 4", "U-Net", "unet", dict(base=64, depth=4)),
    ("SCAUnet base 32, N=4", "SCAUnet", "scaunet", dict(base=32, depth=4, scales=4)),
    ("SCAUnet-A base 32, N=(4,3,2,1)", "SCAUnet-A", "scaunet_a", dict(base=32, depth=4)),
    ("SCAUnet base 16, N=4", "SCAUnet", "scaunet", dict(base=16, depth=4, scales=4)),
    ("SCAUnet-A base 16, N=(4,3,2,1)", "SCAUnet-A", "scaunet_a", dict(base=16, depth=4)),
    ("SCAUnet base 16, N=4, depthwise='conv'", "SCAUnet", "scaunet",
     dict(base=16, depth=4, scales=4, depthwise="conv")),
]
# The models of the measured phantom-LGG comparison (configs/demo.py and
# configs/lgg_scaunet.py), at the demo's input (64×64, 3 channels).
DEMO_ROWS = [
    ("U-Net base 16 (configs/demo.py)", None, "unet", dict(base=16, depth=4)),
    ("SCAUnet base 8, N=3, resize (configs/lgg_scaunet.py)", None, "scaunet",
     dict(base=8, depth=4, scales=3, upsample="resize")),
    ("SCAUnet-A base 8, N=(4,3,2,1) (configs/lgg_scaunet.py:scaunet_a)", None, "scaunet_a",
     dict(base=8, depth=4)),
    ("SCAUnet base 16, N=4 (demo.py + --config.model.name=scaunet)", None, "scaunet",
     dict(base=16, depth=4, scales=4)),
]


def _cost(compiled) -> Dict[str, float]:
  a = compiled.cost_analysis()
  if isinstance(a, (list, tuple)):
    a = a[0]
  return dict(a or {})


def timed(fn, args, reps: int) -> Dict[str, float]:
  """Median wall and CPU (process, all threads) milliseconds over ``reps`` calls.

  On a shared machine wall time includes waiting for a core; process CPU
  time does not (but counts both XLA threads, so it is up to 2× the wall
  time of an uncontended run on 2 cores).
  """
  jax.block_until_ready(fn(*args))          # warm-up (and any lazy init)
  wall, cpu = [], []
  for _ in range(reps):
    t, c = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    wall.append(time.perf_counter() - t)
    cpu.append(time.process_time() - c)
  return {"wall_ms": float(np.median(wall) * 1e3), "cpu_ms": float(np.median(cpu) * 1e3),
          "wall_ms_all": [w * 1e3 for w in wall]}


def np_init_variables(fns: "models.ModelFns", x) -> Dict:
  """Model variables with NumPy-filled values (kernels ~ N(0, 1/fan_in)).

  Benchmarks need shapes, not trained values; this skips compiling the
  random initialisers (threefry + truncated normal take minutes to compile on
  a loaded XLA:CPU).
  """
  shapes = jax.eval_shape(fns.init, jax.random.PRNGKey(0), x)
  rng = np.random.default_rng(0)

  def fill(path, s):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "kernel":
      return jnp.asarray(rng.normal(0, np.prod(s.shape[:-1]) ** -0.5, s.shape), s.dtype)
    return jnp.ones(s.shape, s.dtype) if name in ("scale", "var") else jnp.zeros(s.shape, s.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def measure(name: str, kwargs: Dict, shape, reps: int, num_classes: int = 2) -> Dict:
  """Params, FLOPs, time and scratch memory of one model at one input shape."""
  fns = models.ModelFns(models.get_model(name, num_classes=num_classes, **kwargs))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  y = jnp.asarray(rng.integers(0, num_classes, size=shape[:-1]), jnp.int32)
  variables = np_init_variables(fns, x)
  n_params = int(sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"])))

  def fwd(v, x):
    return fns.apply(v, x, train=False)[0]

  def loss(params, v, x, y):
    logits, _ = fns.apply({**v, "params": params}, x, train=False)
    return losses.sparse_cross_entropy(logits, y)

  def fwd_bwd(v, x, y):
    return jax.value_and_grad(loss)(v["params"], v, x, y)

  t = time.perf_counter()
  fwd_c = jax.jit(fwd).lower(variables, x).compile()
  bwd_c = jax.jit(fwd_bwd).lower(variables, x, y).compile()
  compile_s = time.perf_counter() - t
  fwd_cost, bwd_cost = _cost(fwd_c), _cost(bwd_c)
  mem = bwd_c.memory_analysis()
  t_fwd = timed(fwd_c, (variables, x), reps)
  t_bwd = timed(bwd_c, (variables, x, y), reps)
  return {
      "model": name, "kwargs": kwargs, "input": list(shape), "params": n_params,
      "gflop_fwd": fwd_cost.get("flops", float("nan")) / 1e9,
      "gflop_fwd_bwd": bwd_cost.get("flops", float("nan")) / 1e9,
      "gb_accessed_fwd": fwd_cost.get("bytes accessed", float("nan")) / 1e9,
      "fwd_ms": t_fwd["wall_ms"], "fwd_cpu_ms": t_fwd["cpu_ms"],
      "fwd_bwd_ms": t_bwd["wall_ms"], "fwd_bwd_cpu_ms": t_bwd["cpu_ms"],
      "fwd_ms_all": t_fwd["wall_ms_all"], "fwd_bwd_ms_all": t_bwd["wall_ms_all"],
      "train_temp_mb": (mem.temp_size_in_bytes / 2**20) if mem is not None else float("nan"),
      "compile_s": compile_s,
  }


def _fmt_table(rows: List[Dict], with_seed: bool) -> str:
  head = ["model", "input", "params", "GFLOP fwd", "GFLOP fwd+bwd", "fwd ms", "fwd+bwd ms",
          "fwd+bwd CPU ms", "train temp MB"]
  if with_seed:
    head += ["seed params", "seed GFLOPS", "params / seed", "GFLOP / seed"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [r["label"], "×".join(map(str, r["input"])), f"{r['params']:,}",
             f"{r['gflop_fwd']:.2f}", f"{r['gflop_fwd_bwd']:.2f}", f"{r['fwd_ms']:.0f}",
             f"{r['fwd_bwd_ms']:.0f}", f"{r['fwd_bwd_cpu_ms']:.0f}", f"{r['train_temp_mb']:.0f}"]
    if with_seed:
      if r.get("seed"):
        sp, sg = SEED_REFERENCE[r["seed"]]
        cells += [f"{sp:,}", f"{sg:.2f}", f"{r['params'] / sp:.2f}", f"{r['gflop_fwd'] / sg:.2f}"]
      else:
        cells += ["–"] * 4
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _ratio_lines(rows: List[Dict], base_label: str) -> List[str]:
  base = next(r for r in rows if r["label"] == base_label)
  out = []
  for r in rows:
    if r is base:
      continue
    out.append(f"- {r['label']}: {base['params'] / r['params']:.1f}× fewer params, "
               f"{base['gflop_fwd'] / r['gflop_fwd']:.1f}× fewer FLOPs, "
               f"fwd+bwd time {r['fwd_bwd_ms'] / base['fwd_bwd_ms']:.2f}× the U-Net's "
               f"(CPU time {r['fwd_bwd_cpu_ms'] / base['fwd_bwd_cpu_ms']:.2f}×)")
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true", help="1×64×64×1 inputs only, 2 reps")
  ap.add_argument("--reps", type=int, default=None, help="timed calls per function (median)")
  ap.add_argument("--out", default=None, help="output path prefix (.md and .json are added)")
  args = ap.parse_args(argv)
  reps = args.reps or (2 if args.quick else 3)
  out = args.out or os.path.join(RESULTS, "model_table_quick" if args.quick else "model_table")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)

  ref_shape = (1, 64, 64, 1) if args.quick else (1, 256, 256, 1)
  demo_shape = (16, 64, 64, 3)
  load_before = os.getloadavg()
  t0 = time.time()
  sections = [("reference", ref_shape, REFERENCE_ROWS)]
  if not args.quick:
    sections.append(("demo", demo_shape, DEMO_ROWS))
  results = {}
  for section, shape, specs in sections:
    rows = []
    for label, seed_row, name, kwargs in specs:
      r = measure(name, kwargs, shape, reps)
      r.update(label=label, seed=seed_row)
      rows.append(r)
      print(f"[model_table] {section}: {label}: {r['params']:,} params, "
            f"{r['gflop_fwd']:.2f} GFLOP fwd, fwd {r['fwd_ms']:.0f} ms, "
            f"fwd+bwd {r['fwd_bwd_ms']:.0f} ms (compile {r['compile_s']:.0f} s)", flush=True)
    results[section] = rows
  load_after = os.getloadavg()
  meta = {
      "command": "python benchmarks/model_table.py" + (" --quick" if args.quick else ""),
      "jax": jax.__version__, "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count(),
      "machine": platform.machine(), "reps": reps,
      "loadavg_1m_before_after": [load_before[0], load_after[0]],
      "wall_s": time.time() - t0,
      "seed_reference": {k: {"params": p, "gflops": g} for k, (p, g) in SEED_REFERENCE.items()},
  }
  with open(out + ".json", "w") as f:
    json.dump({"meta": meta, **results}, f, indent=1)

  md = [f"# Model table ({'quick' if args.quick else 'full'})", "",
        f"`{meta['command']}` — jax {meta['jax']} on {meta['backend']} "
        f"({meta['cpu_count']} cores), median of {reps} calls after a warm-up, batch and input "
        f"as listed; 1-min load average {load_before[0]:.1f} before / {load_after[0]:.1f} after. "
        "Other jobs share these 2 cores, so wall times (ms) are upper bounds and noisy; "
        "'CPU ms' is the process CPU time (both XLA threads), less sensitive to sharing. "
        "GFLOP = XLA cost analysis (a multiply-add counts 2).", "",
        f"## At the reference input {'×'.join(map(str, ref_shape))}"
        + (" (quick: smaller than the assumed 256×256)" if args.quick else
           " (assumed: the seed gives no input size)"), "",
        _fmt_table(results["reference"], with_seed=True), "",
        "Relative to the U-Net row:", ""]
  md += _ratio_lines(results["reference"], REFERENCE_ROWS[0][0])
  md += ["", "Seed (fedwep_scaunet_summary.md): SCAUnet has 19.15× fewer params and 17.03× "
         "fewer GFLOPS than its U-Net; SCAUnet-A 57× / 19.9×."]
  if "demo" in results:
    md += ["", f"## The phantom-LGG comparison models at {'×'.join(map(str, demo_shape))} "
           "(the demo's training batch)", "",
           _fmt_table(results["demo"], with_seed=False), "", "Relative to the U-Net row:", ""]
    md += _ratio_lines(results["demo"], DEMO_ROWS[0][0])
  md.append("")
  with open(out + ".md", "w") as f:
    f.write("\n".join(md))
  print("\n".join(md))
  print(f"[model_table] wrote {out}.md and {out}.json in {meta['wall_s']:.0f} s", flush=True)


if __name__ == "__main__":
  main()
