"""Categorical CE vs sparse categorical CE (seed ce_vs_sparse_ce.md, SPEC §3).

  python benchmarks/loss_study.py            # ~10-15 min on 2 CPU cores
  python benchmarks/loss_study.py --quick    # smaller shapes, 2-epoch training (~3 min)

Writes ``benchmarks/results/loss_study.{md,json}`` (``--quick``:
``loss_study_quick.*``; ``--out PREFIX`` to choose).

Three parts:
  1. Values: CE on one_hot(labels) and sparse CE on labels, loss and gradient
     w.r.t. the logits, for C = 2 and C = 16 classes (float32).
  2. Cost of the loss alone (value_and_grad w.r.t. logits, jitted) for three
     forms: 'sparse_ce' (integer labels), 'ce' (``losses.get_loss('ce')``:
     integer labels, one-hot built inside the jitted function) and 'ce, one-hot
     input' (the one-hot tensor is an argument, as when a data pipeline stores
     one-hot masks, Keras ``categorical_crossentropy`` style). Time = median
     over reps; memory = XLA ``memory_analysis()`` of the compiled function
     (argument bytes = inputs incl. the one-hot, temp bytes = scratch), plus
     ``cost_analysis()`` bytes accessed. Then the same for one full training
     step of the demo U-Net (``steps.make_train_step``, Adam) with 'ce' and
     'sparse_ce'.
  3. Training: the centralised trainer (``train.run``) on the demo phantom LGG
     (configs/demo.py: U-Net base 16, 64×64) with config.loss = 'ce' and
     'sparse_ce', same seed, a few epochs; test Dice / IoU (tumour class,
     background excluded) and pixel accuracy (all classes), as in the seed's
     comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import Dict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from fedjax_seg import losses, models, steps  # noqa: E402
from benchmarks.model_table import np_init_variables, timed  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _timed(fn, args, reps: int) -> Dict[str, float]:
  """Median wall and process-CPU milliseconds over ``reps`` calls (after a warm-up): `model_table.timed`."""
  t = timed(fn, args, reps)
  return {"ms": t["wall_ms"], "cpu_ms": t["cpu_ms"]}


def _analysis(compiled) -> Dict[str, float]:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
  mem = compiled.memory_analysis()
  return {
      "flops": float(cost.get("flops", float("nan"))),
      "bytes_accessed_mb": float(cost.get("bytes accessed", float("nan"))) / 2**20,
      "argument_mb": mem.argument_size_in_bytes / 2**20 if mem else float("nan"),
      "temp_mb": mem.temp_size_in_bytes / 2**20 if mem else float("nan"),
      "output_mb": mem.output_size_in_bytes / 2**20 if mem else float("nan"),
  }


# ----------------------------------------------------------------------------- part 1 + 2
def loss_only(num_classes: int, shape, reps: int) -> Dict:
  rng = np.random.default_rng(num_classes)
  logits = jnp.asarray(rng.normal(size=shape + (num_classes,)) * 3, jnp.float32)
  labels = jnp.asarray(rng.integers(0, num_classes, size=shape), jnp.int32)
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  mask = jnp.ones((shape[0],), jnp.float32)
  ce = losses.get_loss("ce")
  sparse = losses.get_loss("sparse_ce")

  forms = {
      "sparse_ce": (jax.value_and_grad(lambda s, y, m: sparse(s, y, num_classes, m)),
                    (logits, labels, mask)),
      "ce": (jax.value_and_grad(lambda s, y, m: ce(s, y, num_classes, m)),
             (logits, labels, mask)),
      "ce, one-hot input": (jax.value_and_grad(losses.categorical_cross_entropy),
                            (logits, onehot, mask)),
  }
  out = {}
  values = {}
  for name, (fn, args) in forms.items():
    compiled = jax.jit(fn).lower(*args).compile()
    values[name] = jax.device_get(compiled(*args))
    out[name] = {**_timed(compiled, args, reps), **_analysis(compiled)}
  (v_s, g_s), (v_c, g_c) = values["sparse_ce"], values["ce"]
  (v_o, g_o) = values["ce, one-hot input"]
  out["values"] = {
      "sparse_ce": float(v_s), "ce": float(v_c), "ce_onehot_input": float(v_o),
      "abs_diff_value": float(abs(v_s - v_c)),
      "max_abs_diff_grad": float(np.max(np.abs(g_s - g_c))),
      "max_abs_diff_grad_onehot_input": float(np.max(np.abs(g_s - g_o))),
      "max_abs_grad": float(np.max(np.abs(g_s))),
  }
  out["onehot_tensor_mb"] = onehot.size * 4 / 2**20
  out["labels_tensor_mb"] = labels.size * 4 / 2**20
  return out


def train_step_cost(num_classes: int, batch_shape, reps: int) -> Dict:
  """One Adam step of the demo U-Net (base 16, depth 4) with each CE form."""
  fns = models.ModelFns(models.get_model("unet", num_classes=num_classes, base=16, depth=4))
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=batch_shape), jnp.float32)
  y = jnp.asarray(rng.integers(0, num_classes, size=batch_shape[:-1]), jnp.int32)
  mask = jnp.ones((batch_shape[0],), jnp.float32)
  variables = np_init_variables(fns, x[:1])
  tx = optax.adam(1e-3)
  opt_state = tx.init(variables["params"])
  key = jax.random.PRNGKey(1)
  out = {}
  for loss_name in ("sparse_ce", "ce"):
    step = steps.make_train_step(fns, tx, loss_name, num_classes)
    compiled = jax.jit(step).lower(variables, opt_state, x, y, mask, key).compile()
    loss = float(compiled(variables, opt_state, x, y, mask, key)[2])
    out[loss_name] = {**_timed(compiled, (variables, opt_state, x, y, mask, key), reps),
                      "first_loss": loss, **_analysis(compiled)}
  return out


# ----------------------------------------------------------------------------- part 3
def train_comparison(epochs: int, workroot: str) -> Dict:
  from configs import demo
  from fedjax_seg import train
  out = {}
  for loss_name in ("ce", "sparse_ce"):
    config = demo.get_config("geometric")  # the phantom its published numbers used
    config.loss = loss_name
    config.num_epochs = epochs
    workdir = os.path.join(workroot, loss_name)
    shutil.rmtree(workdir, ignore_errors=True)   # fresh run, no resume
    t = time.time()
    res = train.run(config, workdir)
    wall = time.time() - t
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f if line.strip()]
    test = res["metrics"]["test"]
    out[loss_name] = {
        "workdir": workdir, "epochs": epochs, "wall_s": wall,
        "test_dice_tumour": test["dice_mean"], "test_iou_tumour": test["iou_mean"],
        "test_pixel_accuracy": test["pixel_accuracy"], "test_loss": test["loss"],
        "train_loss_curve": [r["train_loss"] for r in rows],
        "val_dice_curve": [r.get("val_dice_mean") for r in rows],
        "epoch_time_s": [b["time_s"] - a["time_s"] for a, b in zip(rows, rows[1:])],
    }
  a, b = out["ce"]["train_loss_curve"], out["sparse_ce"]["train_loss_curve"]
  out["max_abs_diff_train_loss_curve"] = float(np.max(np.abs(np.subtract(a, b))))
  return out


# ----------------------------------------------------------------------------- report
def _md(res: Dict) -> str:
  m = res["meta"]
  L = [f"# CE vs sparse CE ({'quick' if m['quick'] else 'full'})", "",
       f"`{m['command']}` — jax {m['jax']} on {m['backend']} ({m['cpu_count']} cores); "
       f"1-min load average {m['loadavg_1m_before_after'][0]:.1f} before / "
       f"{m['loadavg_1m_before_after'][1]:.1f} after (other jobs share these cores, so "
       f"times are noisy: compare rows of one run, not runs).", "",
       "## 1. Values (float32)", "",
       "| classes | CE | sparse CE | |Δ loss| | max |Δ grad| | max |grad| |",
       "|---|---|---|---|---|---|"]
  for c, r in res["loss_only"].items():
    v = r["values"]
    L.append(f"| {c} | {v['ce']:.7f} | {v['sparse_ce']:.7f} | {v['abs_diff_value']:.1e} | "
             f"{v['max_abs_diff_grad']:.1e} | {v['max_abs_grad']:.1e} |")
  shape = "×".join(map(str, m["loss_shape"]))
  L += ["", f"## 2a. The loss alone: value_and_grad w.r.t. logits [{shape}, C]", "",
        "| classes | form | ms | CPU ms | XLA temp MB | argument MB | bytes accessed MB | MFLOP |",
        "|---|---|---|---|---|---|---|---|"]
  for c, r in res["loss_only"].items():
    for form in ("sparse_ce", "ce", "ce, one-hot input"):
      f = r[form]
      L.append(f"| {c} | {form} | {f['ms']:.2f} | {f['cpu_ms']:.2f} | {f['temp_mb']:.2f} | "
               f"{f['argument_mb']:.2f} | "
               f"{f['bytes_accessed_mb']:.1f} | {f['flops'] / 1e6:.1f} |")
  L += ["", "One-hot label tensor vs integer labels at this shape: " + ", ".join(
      f"C={c}: {r['onehot_tensor_mb']:.1f} MB vs {r['labels_tensor_mb']:.1f} MB"
      for c, r in res["loss_only"].items()) + "."]
  bshape = "×".join(map(str, m["step_shape"]))
  L += ["", f"## 2b. One Adam step of the demo U-Net (base 16, depth 4), batch {bshape}", "",
        "| classes | loss | ms / step | CPU ms / step | XLA temp MB | bytes accessed MB | GFLOP |",
        "|---|---|---|---|---|---|---|"]
  for c, r in res["train_step"].items():
    for form in ("sparse_ce", "ce"):
      f = r[form]
      L.append(f"| {c} | {form} | {f['ms']:.0f} | {f['cpu_ms']:.0f} | {f['temp_mb']:.1f} | "
               f"{f['bytes_accessed_mb']:.0f} | {f['flops'] / 1e9:.2f} |")
  if res.get("training"):
    t = res["training"]
    ep = t["ce"]["epochs"]
    L += ["", f"## 3. Training: configs/demo.py (U-Net base 16, phantom LGG 64×64, Dice+CE "
          f"replaced by the loss below), {ep} epochs, seed 0", "",
          "| loss | test Dice (tumour) | test IoU (tumour) | test pixel acc. (all classes) | "
          "final train loss | wall s |", "|---|---|---|---|---|---|"]
    for name in ("ce", "sparse_ce"):
      r = t[name]
      L.append(f"| {name} | {r['test_dice_tumour']:.4f} | {r['test_iou_tumour']:.4f} | "
               f"{r['test_pixel_accuracy']:.4f} | {r['train_loss_curve'][-1]:.5f} | "
               f"{r['wall_s']:.0f} |")
    L += ["", f"Largest difference between the two per-epoch train-loss curves: "
          f"{t['max_abs_diff_train_loss_curve']:.2e}."]
  L.append("")
  return "\n".join(L)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--epochs", type=int, default=None, help="training epochs per loss")
  ap.add_argument("--no-train", action="store_true", help="skip part 3")
  ap.add_argument("--out", default=None, help="output path prefix")
  args = ap.parse_args(argv)
  quick = args.quick
  out = args.out or os.path.join(RESULTS, "loss_study_quick" if quick else "loss_study")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  loss_shape = (4, 64, 64) if quick else (16, 128, 128)
  step_shape = (4, 64, 64, 3) if quick else (16, 64, 64, 3)
  reps_loss, reps_step = (5, 2) if quick else (20, 3)
  epochs = args.epochs or (2 if quick else 8)
  load_before = os.getloadavg()
  t0 = time.time()
  res = {"loss_only": {}, "train_step": {}}
  for c in (2, 16):
    res["loss_only"][c] = loss_only(c, loss_shape, reps_loss)
    print(f"[loss_study] C={c} loss only: " + ", ".join(
        f"{k} {v['ms']:.2f} ms / temp {v['temp_mb']:.1f} MB"
        for k, v in res["loss_only"][c].items() if isinstance(v, dict) and "ms" in v), flush=True)
    res["train_step"][c] = train_step_cost(c, step_shape, reps_step)
    print(f"[loss_study] C={c} train step: " + ", ".join(
        f"{k} {v['ms']:.0f} ms" for k, v in res["train_step"][c].items()), flush=True)
  if not args.no_train:
    res["training"] = train_comparison(epochs, os.path.join("runs", "loss_study"))
  res["meta"] = {
      "command": "python benchmarks/loss_study.py" + (" --quick" if quick else ""),
      "quick": quick, "jax": jax.__version__, "backend": jax.default_backend(),
      "cpu_count": os.cpu_count(), "loss_shape": list(loss_shape),
      "step_shape": list(step_shape), "reps_loss": reps_loss, "reps_step": reps_step,
      "loadavg_1m_before_after": [load_before[0], os.getloadavg()[0]],
      "wall_s": time.time() - t0,
  }
  with open(out + ".json", "w") as f:
    json.dump(res, f, indent=1, default=float)
  md = _md(res)
  with open(out + ".md", "w") as f:
    f.write(md)
  print(md)
  print(f"[loss_study] wrote {out}.md and {out}.json in {res['meta']['wall_s']:.0f} s", flush=True)


if __name__ == "__main__":
  main()
