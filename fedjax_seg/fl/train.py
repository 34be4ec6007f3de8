"""Federated trainer: partition patients over K hospitals, then rounds of the
one-jit ``run_round`` with per-round evaluation, logging and checkpoints.

Round 0 is logged before any training (the initial global model), so curves
start at the same point for every aggregator.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_seg import models, runlog, steps
from fedjax_seg import train as train_lib
from fedjax_seg.data import federated, partition, pipeline
from fedjax_seg.fl import aggregators, backends, core, dp, secagg, server_opt
from fedjax_seg.fl import scale


def partition_dataset(ds: pipeline.SegDataset, fl_cfg, verbose: bool = True):
  """Splits train and val patients over clients with the configured scheme.

  The same scheme is applied to the train split and to the val split (so by
  site, hospital k validates on its own patients); the test split stays
  pooled. Returns (names, train_ids [K][...], val_ids [K][...]).
  """
  sites = {pid: p.site for pid, p in ds.patients.items()}
  tumour = {pid: float((p.labels > 0).mean()) for pid, p in ds.patients.items()}
  kind = fl_cfg.partition
  k = fl_cfg.num_clients
  if kind == "by_site":
    train_sites = sorted({sites[p] for p in ds.splits["train"]})
    k = k or len(train_sites)
    train_ids = partition.by_site(ds.splits["train"], sites, k)
    # validation patients follow their site's client
    client_of_site = {}
    for i, ids in enumerate(train_ids):
      for p in ids:
        client_of_site[sites[p]] = i
    val_ids = [[] for _ in range(k)]
    for p in ds.splits["val"]:
      if sites[p] in client_of_site:
        val_ids[client_of_site[sites[p]]].append(p)
    names = ["+".join(sorted({sites[p] for p in ids})) for ids in train_ids]
  else:
    if k < 1:
      raise ValueError(f"config.fl.num_clients={k}: partition {kind!r} needs num_clients >= 1")
    train_ids = partition.make_partition(kind, ds.splits["train"], k, fl_cfg.partition_seed,
                                         sites, tumour, fl_cfg.dirichlet_alpha)
    val_ids = _deal(ds.splits["val"], k, fl_cfg.partition_seed)
    names = [f"client{i}" for i in range(k)]
  return names, train_ids, val_ids


def _deal(ids, k, seed):
  order = np.random.default_rng(seed + 1).permutation(len(ids))
  out = [[] for _ in range(k)]
  for r, i in enumerate(order):
    out[r % k].append(sorted(ids)[i])
  return out


def build_client_data(ds, train_ids, host: bool = False):
  return federated.stack_clients([ds.arrays(ids) for ids in train_ids], host=host)


def client_hparams(config) -> core.ClientHParams:
  fl = config.fl
  return core.ClientHParams(local_steps=fl.local_steps, batch_size=fl.client_batch_size,
                            stats_samples=fl.stats_samples, step_strategy=fl.step_strategy,
                            prox_mu=fl.get("prox_mu", 0.0))


def agg_kwargs(config) -> Dict:
  fl = config.fl
  if config.algorithm == "fedcostw":
    return {"alpha": fl.alpha, "cost": fl.cost}
  if config.algorithm == "costw_ce":
    return {"alpha": fl.alpha}
  if config.algorithm == "dcew":
    if abs(fl.alpha + fl.beta + fl.gamma - 1.0) > 1e-6:
      raise ValueError(f"config.fl.alpha+beta+gamma must be 1 for dcew, got "
                       f"{fl.alpha}+{fl.beta}+{fl.gamma}")
    return {"alpha": fl.alpha, "beta": fl.beta, "gamma": fl.gamma}
  if config.algorithm == "trimmed_mean":
    return {"trim": fl.get("trim", 0.1)}
  return {}


def check_fl_config(config) -> None:
  """Issue-10 options: refuses impossible or guarantee-voiding combinations
  (ValueError naming the keys) before any data is built."""
  server_opt.from_config(config.fl)
  dp.check_config(config)
  secagg.check_config(config)
  if config.fl.get("norm_k", 0.0) < 0:
    raise ValueError(f"config.fl.norm_k={config.fl.norm_k} must be >= 0 (0 = off)")
  if config.algorithm == "trimmed_mean" and not 0 <= config.fl.get("trim", 0.1) < 0.5:
    raise ValueError(f"config.fl.trim={config.fl.trim}: expected 0 <= trim < 0.5")


def build_aggregator(config, num_clients: int, noise_multiplier: float = 0.0):
  """config.algorithm's aggregator, or DP-FedAvg when config.fl.dp.enabled,
  optionally through secure aggregation (config.fl.secagg), wrapped by
  ``aggregators.robust`` (exploding-norm exclusion, exclusion reasons)."""
  fl = config.fl
  seeds = (secagg.agree_seeds(num_clients, fl.get("secagg_seed", 0))
           if fl.get("secagg", False) else None)
  bits = fl.get("secagg_bits", 24)
  dpc = fl.get("dp")
  if dpc is not None and dpc.get("enabled", False):
    inner = dp.dp_fedavg(dpc.clip_norm, noise_multiplier, dpc.weighting, dpc.sample_cap,
                         secagg.make_secure_sum(seeds, bits) if seeds is not None else None)
  else:
    inner = aggregators.get(config.algorithm)
    if seeds is not None:
      inner = secagg.secure(inner, seeds, bits)
  return aggregators.robust(inner, fl.get("norm_k", 0.0))


def train_federated(config, workdir: str, stop_after: Optional[int] = None) -> Dict:
  """Federated training with ``config.algorithm`` as the aggregator.

  stop_after: test hook, raise train.Interrupted after that many rounds.
  """
  t_start = time.time()
  check_fl_config(config)
  scale.check_chunked(config)  # issue 9: clients streamed in chunks (data stay on the host)
  chunked = bool(config.fl.get("clients_per_chunk", 0))
  train_lib.save_config(config, workdir)
  ds = pipeline.build_dataset(config.data)
  names, train_ids, val_ids = partition_dataset(ds, config.fl)
  data = build_client_data(ds, train_ids, host=chunked)
  print(f"[fl] {config.algorithm}: {len(names)} clients, partition={config.fl.partition}\n"
        + federated.client_summary(names, train_ids, data, val_ids), flush=True)
  fns = models.build(config.model, ds.num_classes)
  key = jax.random.PRNGKey(config.seed)
  init_key, round_key = jax.random.split(key)
  variables = fns.init(init_key, jnp.zeros((1,) + data.x.shape[2:], jnp.float32))
  tx = steps.make_optimizer(config.optimizer)
  hp = client_hparams(config)
  ckey = train_lib.compile_key(config, ds, ("model", "loss", "optimizer", "augment", "algorithm", "fl"))
  server_tx = server_opt.from_config(config.fl)
  dpc = config.fl.get("dp")
  use_dp = dpc is not None and dpc.get("enabled", False)
  noise_mult = dp.resolve_noise_multiplier(config.fl) if use_dp else 0.0
  if use_dp:
    print(f"[fl] DP-FedAvg: clip C={dpc.clip_norm}, noise multiplier z={noise_mult:.4f} "
          f"(noise std zC/K={noise_mult * dpc.clip_norm / len(names):.4g}), delta={dpc.delta}; "
          f"epsilon after {config.fl.rounds} rounds = "
          f"{dp.epsilon(noise_mult, config.fl.rounds, dpc.delta, 1.0, dpc.accountant):.3f} "
          f"({dpc.accountant}, all {len(names)} clients every round)", flush=True)

  def build_round():
    client_update = core.make_client_update(fns, tx, config.loss, ds.num_classes, hp,
                                            augment=train_lib.build_augment(config))
    return core.make_run_round(client_update, build_aggregator(config, len(names), noise_mult),
                               config.fl.client_strategy, agg_kwargs(config),
                               server_opt.make_server_update(server_tx) if server_tx else None)
  run_round = runlog.cached_jit("round" + ckey, build_round, donate_argnums=(0,))
  if chunked:  # issue 9: C clients at a time, aggregate as running sums (fl/scale.py)
    run_round = scale.make_chunked_round(
        core.make_client_update(fns, tx, config.loss, ds.num_classes, hp,
                                augment=train_lib.build_augment(config)),
        config.algorithm, config.fl.clients_per_chunk, config.fl.client_strategy,
        agg_kwargs(config), server_opt.make_server_update(server_tx) if server_tx else None,
        jit=lambda name, build: runlog.cached_jit(name + ckey, build))
  state = core.ServerState(variables, jnp.int32(0), server_opt.init(server_tx, variables))
  mbytes = core.model_bytes(variables)
  print(f"[fl] model {config.model.name}: {train_lib.num_params(variables):,} parameters, "
        f"{mbytes / 1e6:.2f} MB per transfer; client strategy "
        f"{backends.resolve_strategy(config.fl.client_strategy)}, step strategy "
        f"{backends.resolve_strategy(config.fl.step_strategy, 'step')}", flush=True)

  ckpt = runlog.Checkpointer(workdir)
  _, restored = ckpt.restore_latest(state)
  start = 0
  if restored is not None:
    state, start = restored, int(restored.round)
    print(f"[fl] resumed from checkpoint at round {start}", flush=True)
  if config.fl.client_strategy == "sharded" and not chunked:
    # issue 9: state/key replicated, data sharded over the 'clients' mesh axis
    # (global arrays over every process after launch.py --distributed)
    state, data, round_key = scale.place_round_inputs(state, data, round_key)
  log = runlog.MetricsLog(workdir, resume_from=start if restored is not None else None,
                          key="round")
  eval_batch = runlog.cached_jit("eval" + train_lib.compile_key(config, ds, ("model", "loss")),
                                 lambda: steps.make_eval_batch(
      fns, config.loss, ds.num_classes))
  x_va, y_va = ds.split("val")
  client_val = [ds.arrays(ids) for ids in val_ids]

  def evaluate_row(variables, rnd, info=None):
    row = {"round": rnd}
    if use_dp:
      row.update({"epsilon": dp.epsilon(noise_mult, rnd, dpc.delta, 1.0, dpc.accountant),
                  "dp_delta": dpc.delta, "dp_noise_multiplier": noise_mult})
    if rnd % config.fl.eval_every == 0 or rnd == config.fl.rounds:
      val = steps.evaluate(eval_batch, variables, x_va, y_va, config.eval_batch_size,
                           ds.class_names)
      row.update({f"val_{k}": v for k, v in val.items() if not isinstance(v, (bool, str))})
      if config.fl.eval_clients:
        row["client_val_dice"] = [
            steps.evaluate(eval_batch, variables, x, y, config.eval_batch_size,
                           ds.class_names)["dice_mean"] if len(x) else None
            for x, y in client_val]
    if info is not None:
      info = jax.device_get(info)
      row.update({"train_loss": float(np.nanmean(np.where(info["included"], info["train_loss"],
                                                          np.nan))) if info["included"].any()
                  else float("nan"),
                  "weights": [float(w) for w in info["weights"]],
                  "client_train_loss": [float(v) for v in info["train_loss"]],
                  "failed": bool(info["failed"]),
                  "excluded": [n for n, inc in zip(names, info["included"]) if not inc],
                  "bytes_up_per_client": mbytes, "bytes_down_per_client": mbytes,
                  "bytes_total": 2 * mbytes * len(names)})
      for key_ in ("dice_pre", "dice_post", "ce_pre", "ce_post"):
        row[f"client_{key_}"] = [float(v) for v in info[key_]]
      row.update(_robust_row(info, names))
    row["time_s"] = time.time() - t_start
    return row

  def describe(row):
    status = "FAILED (global model kept)" if row["failed"] else ""
    if row["excluded"]:
      status += " excluded: " + ",".join(
          f"{n}({row.get('excluded_reasons', {}).get(n, '?')})" for n in row["excluded"])
    if use_dp:
      status += f" eps {row['epsilon']:.2f} clip {row['dp_clip_fraction']:.2f}"
    w = " ".join(f"{x:.2f}" for x in row["weights"])
    return (f"train_loss {row['train_loss']:.4f}  val_dice "
            f"{row.get('val_dice_mean', float('nan')):.4f}  w [{w}] {status}")

  state = round_loop(lambda s: run_round(s, data, round_key), state, start, config.fl.rounds,
                     evaluate_row, log, ckpt, describe, stop_after)
  return train_lib.finish(
      config, workdir, fns, state.variables, ds, eval_batch, log.rows, x_key="round",
      extra={"rounds": config.fl.rounds, "clients": names,
             **({"dp": {"noise_multiplier": noise_mult, "clip_norm": dpc.clip_norm,
                        "delta": dpc.delta, "epsilon": dp.epsilon(
                            noise_mult, config.fl.rounds, dpc.delta, 1.0, dpc.accountant)}}
                if use_dp else {}), "num_params":
             train_lib.num_params(state.variables), "bytes_per_round": 2 * mbytes * len(names),
             "wall_time_s": time.time() - t_start})


def round_loop(step: Callable, state, start: int, rounds: int, evaluate_row: Callable,
               log: runlog.MetricsLog, ckpt: runlog.Checkpointer, describe: Callable,
               stop_after: Optional[int] = None):
  """The rounds of every federated trainer: round 0 evaluated on a fresh start, then per
  round ``state, info = step(state)``, ``row = evaluate_row(variables, r, info)`` logged,
  checkpointed and printed (``describe(row)``); ``stop_after`` interrupts (test hook).
  Closes ``ckpt`` and returns the final state."""
  if start == 0:
    log.append(evaluate_row(state.variables, 0))
  prog = runlog.Progress(rounds, start, what="round")
  for rnd in range(start, rounds):
    state, info = step(state)
    row = evaluate_row(state.variables, rnd + 1, info)
    log.append(row)
    ckpt.save(rnd + 1, state)
    print(prog.line(rnd + 1, describe(row)), flush=True)
    if stop_after is not None and rnd + 1 >= stop_after and rnd + 1 < rounds:
      ckpt.close()
      raise train_lib.Interrupted(f"stopped after round {rnd + 1} (test hook)")
  ckpt.close()
  return state


def _robust_row(info, names) -> Dict:
  """Per-round exclusion reasons, update norms and DP / secagg diagnostics."""
  row = {}
  if "excl_nonfinite" in info:
    reasons = {}
    for r in aggregators.EXCLUSION_REASONS:
      for n, flag in zip(names, info[f"excl_{r}"]):
        if flag and n not in reasons:
          reasons[n] = r
    row["excluded_reasons"] = reasons
    row["client_update_norm"] = [float(v) for v in info["update_norm"]]
  if "dp_clip_fraction" in info:
    row.update({"dp_clip_fraction": float(info["dp_clip_fraction"]),
                "dp_noise_std": float(info["dp_noise_std"]),
                "dp_contributors": int(info["dp_contributors"])})
  if "secagg_saturated" in info:
    row["secagg_saturated"] = [n for n, s in zip(names, info["secagg_saturated"]) if s]
  return row


TRAINERS = {name: train_federated for name in aggregators.AGGREGATORS}


# Semi-supervised methods (FedWeP, MT, CPS, PseudoSeg, supervised-only; issue 5).
# Imported last: semi_train imports this module lazily, inside its functions.
from fedjax_seg.fl import semi_train as _semi  # noqa: E402
TRAINERS.update(_semi.TRAINERS)

# FCL pre-training + fine-tuning (fcl, local_cl, fedrotation, random_init; issue 6).
# Imported last: fcl_train imports this module lazily, inside its functions.
from fedjax_seg.fl import fcl_train as _fcl  # noqa: E402
TRAINERS.update(_fcl.TRAINERS)
