"""Trainer for the federated semi-supervised methods (``fedjax_seg.fl.semi``).

    dataset -> labelled/unlabelled split per scenario (SPEC §1.6) -> SemiData
      -> cached jitted semi round -> per-round eval / log (incl. bytes) / checkpoint / resume
      -> experiment.finish

``fedjax_seg.train.train_and_evaluate`` dispatches here for every name in
:data:`semi.METHODS`. Clients upload one model dict, so the aggregation options of
the supervised family apply: ``fl.norm_k`` (robust exclusion), ``fl.dp`` (DP-FedAvg),
``fl.secagg`` and ``fl.server_opt`` (refused when clients upload nothing).

Config (``configs/lgg_fedwep.py``): ``config.fl`` as for FedAvg (partition,
num_clients, rounds, local_steps, client_batch_size, strategies, eval) plus
``config.semi`` (scenario, label_fraction, label_seed, weights, server steps,
and per-method sub-dicts ``fedwep``, ``mt``, ``cps``, ``ps``).

results.json evaluates ``SemiHParams.eval_model`` (MT: the teacher; CPS: model a) and
reports every other communicated model beside it: ``other_models`` ({name: {split:
metrics}}) and ``<name>_test_dice`` / ``<name>_val_dice`` (MT: ``student_test_dice``).
"""
from __future__ import annotations

import copy
import json
import time
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_seg import experiment, models, runlog, steps
from fedjax_seg.data import pipeline
from fedjax_seg.fl import algorithm, backends, core, scale, semi, server_opt
from fedjax_seg.fl import train as fl_train

SEMI_KEYS = {"scenario", "label_fraction", "label_seed", "min_labelled", "unsup_weight",
             "rampup_rounds", "client_start_round", "unlabelled_batch_size", "server_steps",
             "server_batch_size", "pad_rows", "pseudo_loss", "client_lr_scale", "fedwep", "mt", "ps",
             "cps"}
SUB_KEYS = {"fedwep": {"p", "sigma", "num_seeds", "search_size", "search_inputs",
                       "pair_criterion", "search_strategy", "pseudo"},
            "mt": {"ema_decay", "ema_warmup", "noise"}, "cps": {"on_labelled"},
            "ps": {"threshold", "strong_noise", "strong_intensity"}}


def hparams(config) -> semi.SemiHParams:
  """SemiHParams from ``config.semi``; an unknown or a missing key is an error that names
  it (every key and its default: configs/lgg_fedwep.py get_semi_config())."""
  s = config.semi
  unknown = set(s.keys()) - SEMI_KEYS
  if unknown:
    raise ValueError(f"unknown config.semi keys {sorted(unknown)}; known: {sorted(SEMI_KEYS)}")
  missing = SEMI_KEYS - set(s.keys())
  if missing:
    raise ValueError(f"config.semi.{sorted(missing)[0]} is missing (configs/lgg_fedwep.py "
                     f"get_semi_config() holds every key and its default)")
  for sub, keys in SUB_KEYS.items():
    bad, lack = set(s[sub].keys()) - keys, keys - set(s[sub].keys())
    if bad:
      raise ValueError(f"unknown config.semi.{sub} keys {sorted(bad)}; known: {sorted(keys)}")
    if lack:
      raise ValueError(f"config.semi.{sub}.{sorted(lack)[0]} is missing (configs/lgg_fedwep.py "
                       f"get_semi_config() holds every key and its default)")
  method = config.algorithm
  fw, mt, ps, cps = s.fedwep, s.mt, s.ps, s.cps
  search = fw.search_inputs
  if method == "fedwep_real":
    search = "real"
  elif method == "fedwep_random":
    search = "random"
  elif search == "auto":
    search = "real" if s.scenario == "label_at_server" else "random"
  return semi.SemiHParams(
      method=method, scenario=s.scenario, loss=config.loss,
      unsup_weight=s.unsup_weight, rampup_rounds=s.rampup_rounds,
      client_start_round=start_round(config),
      unlabelled_batch_size=s.unlabelled_batch_size,
      server_steps=s.server_steps, server_batch_size=s.server_batch_size,
      p=fw.p, sigma=fw.sigma, num_seeds=fw.num_seeds,
      search_size=fw.search_size, search_inputs=search,
      pair_criterion=fw.pair_criterion, pseudo=fw.pseudo,
      search_strategy=backends.resolve_strategy(fw.search_strategy, "models"),
      pseudo_loss=s.pseudo_loss,
      ema_decay=mt.ema_decay, mt_noise=mt.noise, mt_ema_warmup=bool(mt.ema_warmup),
      cps_on_labelled=bool(cps.on_labelled),
      threshold=ps.threshold, strong_noise=ps.strong_noise,
      strong_intensity=ps.strong_intensity)


def start_round(config) -> int:
  """``config.semi.client_start_round``; -1 means half of ``config.fl.rounds`` (resolved
  here, so a command-line override of the rounds moves it too)."""
  r = config.semi.client_start_round
  return config.fl.rounds // 2 if r < 0 else r


def optimizers(config):
  """(clients' tx, server's tx): the server's supervised steps (label_at_server) use
  ``optimizer.lr``; the clients' steps ``optimizer.lr × semi.client_lr_scale``."""
  scale = config.semi.client_lr_scale
  if not scale > 0:
    raise ValueError(f"config.semi.client_lr_scale={scale} must be > 0")
  server_tx = steps.make_optimizer(config.optimizer)
  if scale == 1.0:
    return server_tx, server_tx
  return steps.make_optimizer(config.optimizer, config.optimizer.lr * scale), server_tx


def split_semi(ds: pipeline.SegDataset, config, verbose: bool = True):
  """Patients per role. Returns dict(names, lab [K], unl [K], server, val [K]).

  label_at_client: partition all train patients over clients with
  ``config.fl`` (fl.train.partition_dataset), then label a fraction inside clients.
  label_at_server: the server takes a site-stratified fraction first; the rest
  is partitioned over the clients, unlabelled.
  """
  s = config.semi
  frac, seed, minimum = float(s.label_fraction), int(s.label_seed), int(s.min_labelled)
  sites = {pid: p.site for pid, p in ds.patients.items()}
  if s.scenario == "label_at_client":
    names, train_ids, val_ids = fl_train.partition_dataset(ds, config.fl, verbose)
    lab, unl = semi.split_label_at_client(train_ids, frac, seed, minimum)
    server = []
  elif s.scenario == "label_at_server":
    server, rest = semi.split_label_at_server(ds.splits["train"], frac, seed, sites, minimum)
    view = copy.copy(ds)
    view.splits = {**ds.splits, "train": rest}
    names, unl, val_ids = fl_train.partition_dataset(view, config.fl, verbose)
    lab = [[] for _ in unl]
  else:
    raise ValueError(f"config.semi.scenario={s.scenario!r}: expected one of {semi.SCENARIOS}")
  return {"names": names, "lab": lab, "unl": unl, "server": server, "val": val_ids}


def summary(split, ds) -> str:
  n = lambda ids: sum(len(ds.patients[i].labels) for i in ids)
  lines = ["| client | labelled patients (slices) | unlabelled patients (slices) |", "|---|---|---|"]
  for k, name in enumerate(split["names"]):
    lines.append(f"| {name} | {len(split['lab'][k])} ({n(split['lab'][k])}) | "
                 f"{len(split['unl'][k])} ({n(split['unl'][k])}) |")
  if split["server"]:
    lines.append(f"| server | {len(split['server'])} ({n(split['server'])}) | 0 |")
  return "\n".join(lines)


def label_stats(split) -> Dict:
  n_lab = sum(len(x) for x in split["lab"]) + len(split["server"])
  n_all = n_lab + sum(len(x) for x in split["unl"])
  return {"labelled_patients": n_lab, "train_patients": n_all,
          "labelled_fraction_realised": n_lab / max(n_all, 1)}


def _pad_rows(config, ds) -> int:
  pad = int(config.semi.pad_rows)
  if pad < 0:  # one shape for every fraction and partition of this data set
    return sum(len(ds.patients[i].labels) for i in ds.splits["train"])
  return pad


def check_aggregation(config, hp: semi.SemiHParams) -> None:
  """The aggregation options (fl.dp, fl.secagg, fl.server_opt, fl.norm_k) act on the
  clients' uploaded models: refused, naming the key, when clients upload nothing."""
  fl = config.fl
  fl_train.refuse_supervised_only(config, f"config.algorithm={hp.method!r} (semi-supervised)",
                                  extra=fl_train.NOT_SEMI)
  on = {"fl.dp.enabled": bool(fl.dp.enabled), "fl.secagg": bool(fl.secagg),
        "fl.server_opt": fl.server_opt != "none", "fl.clients_per_chunk": bool(fl.clients_per_chunk)}
  for key, enabled in on.items():
    if enabled and hp.clients_idle:
      raise ValueError(f"config.{key} with config.algorithm={hp.method!r} "
                       f"({hp.scenario}): clients upload no model to protect or aggregate")
  shadow = copy.deepcopy(config)
  shadow.algorithm = "fedavg"  # semi-supervised clients are averaged by FedAvg
  fl_train.check_fl_config(shadow)
  scale.check_chunked(config, "fedavg")  # streamed clients: FedAvg without DP / secure aggregation


def train_semi(config, workdir: str, stop_after: Optional[int] = None) -> Dict:
  """Federated semi-supervised training with ``config.algorithm`` in semi.METHODS."""
  t_start = time.time()
  hp = hparams(config)
  check_aggregation(config, hp)
  experiment.save_config(config, workdir)
  ds = pipeline.build_dataset(config.data, seed=config.seed)
  split = split_semi(ds, config)
  sample = ds.patients[ds.splits["train"][0]]
  chunked = bool(config.fl.clients_per_chunk)  # clients streamed C at a time from the host
  data = semi.build_semi_data(ds.arrays, split["lab"], split["unl"], split["server"],
                              sample.images.shape[1:], sample.labels.shape[1:],
                              _pad_rows(config, ds), host=chunked)
  names = split["names"]
  lstats = label_stats(split)
  print(f"[semi] {hp.method} ({hp.scenario}, label_fraction={config.semi.label_fraction}, "
        f"realised {lstats['labelled_fraction_realised']:.3f} = {lstats['labelled_patients']}/"
        f"{lstats['train_patients']} patients): {len(names)} clients, partition="
        f"{config.fl.partition}\n" + summary(split, ds), flush=True)

  fns = models.build(config.model, ds.num_classes)
  key = jax.random.PRNGKey(config.seed)
  init_key, round_key = jax.random.split(key)
  x0 = jnp.zeros((1,) + tuple(sample.images.shape[1:]), jnp.float32)
  variables = semi.init_models(hp, fns, init_key, x0)
  tx, server_tx = optimizers(config)
  chp = fl_train.client_hparams(config)
  blob = json.loads(config.to_json_best_effort())
  shape_free = {k: v for k, v in blob["semi"].items()
                if k not in ("label_fraction", "label_seed", "min_labelled", "pad_rows")}
  ckey = json.dumps({"semi": shape_free, "hp": str(hp)}, sort_keys=True) + experiment.compile_key(
      config, ds, ("model", "loss", "optimizer", "algorithm", "fl"),
      exclude=experiment.NOT_COMPILED_FL_KEYS)
  dpc, noise_mult = fl_train.privacy(config, len(names))
  stx = server_opt.from_config(config.fl)
  build = dict(aggregator=fl_train.build_aggregator(config, len(names), noise_mult, base="fedavg"),
               server_opt_update=server_opt.make_server_update(stx) if stx else None)
  strategy = fl_train.round_strategy(config, len(names), chp.local_steps)
  if chunked:
    run_round = scale.make_chunked_algorithm_round(
        semi.make_algorithm(hp, fns, tx, ds.num_classes, chp, server_tx, **build),
        config.fl.clients_per_chunk, config.fl.client_strategy,
        jit=lambda name, fn: runlog.cached_jit(f"semi_{name}" + ckey, fn,
                                               **fl_train.jit_options(config)))
  else:
    run_round = algorithm.jit_round(
        "semi_round" + ckey,
        lambda: semi.make_run_round(hp, fns, tx, ds.num_classes, chp, strategy, server_tx, **build),
        strategy, **fl_train.loop_options(config, strategy, len(names), chp.local_steps),
        **fl_train.jit_options(config))
  state = core.ServerState(variables, jnp.int32(0),
                           server_opt.init(stx, semi.params_view(variables)))
  mbytes = core.model_bytes(variables[hp.models[0]])
  comm = semi.comm_bytes(hp, mbytes)
  cost = semi.cost_percent(hp, mbytes)
  print(f"[semi] model {config.model.name}: {experiment.num_params(variables[hp.models[0]]):,} "
        f"parameters, {mbytes / 1e6:.3f} MB; per client per round: down {comm['down']:,} B, "
        f"up {comm['up']:,} B ({cost:.2f}% of two models both ways); client strategy "
        f"{fl_train.describe_strategy(config, strategy, len(names), chp.local_steps, chunked)}"
        + (f"; seed search: {hp.num_seeds} perturbed models, {hp.search_strategy}"
           f"{' (auto)' if config.semi.fedwep.search_strategy == 'auto' else ''}"
           if semi.is_fedwep(hp.method) else ""),
        flush=True)

  eval_batch = runlog.cached_jit("eval" + experiment.compile_key(config, ds, ("model", "loss")),
                                 lambda: steps.make_eval_batch(fns, config.loss, ds.num_classes))
  ev = lambda vs: vs[hp.eval_model]
  val = fl_train.evaluator(config, ds, eval_batch, [ds.arrays(ids) for ids in split["val"]])

  def evaluate_row(state, rnd, info=None):
    row = {"round": rnd, **fl_train.privacy_row(dpc, noise_mult, rnd), **val(ev(state.variables), rnd)}
    if info is not None:
      info = jax.device_get(info)
      active = bool(info["active"]) and not hp.clients_idle
      inc = np.asarray(info["included"])
      mean_inc = lambda a: float(np.nanmean(np.where(inc, a, np.nan))) if inc.any() else float("nan")
      row.update(fl_train.info_row(info, names))  # loss, weights, failure, exclusions, DP / secagg
      row.update({"sup_loss": mean_inc(info["sup_loss"]), "unsup_loss": mean_inc(info["unsup_loss"]),
                  "server_loss": float(info["server_loss"]), "clients_active": active,
                  "bytes_down_per_client": comm["down"] if active else 0,
                  "bytes_up_per_client": comm["up"] if active else 0,
                  "bytes_total": comm["total"] * len(names) if active else 0})
      if not active:  # idle clients (label-at-server warm-up) are not excluded ones
        row["excluded"] = []
      if "seeds" in info:
        row.update({"seeds": [int(s) for s in info["seeds"]], "seed_c_star": float(info["c_star"]),
                    "seed_c_mean": float(info["c_mean"])})
    row["time_s"] = time.time() - t_start
    return row

  def describe(row):
    extra = f"  c* {row['seed_c_star']:.4f}" if "seed_c_star" in row else ""
    return (f"loss {row['train_loss']:.4f} (sup {row['sup_loss']:.4f}, unsup "
            f"{row['unsup_loss']:.4f}, server {row['server_loss']:.4f})  val_dice "
            f"{row.get('val_dice_mean', float('nan')):.4f}{extra} {fl_train.status(row)}")

  run = experiment.Run("[semi]", state, lambda s, t: run_round(s, data, round_key),
                       config.fl.rounds, lambda s: int(s.round), evaluate_row, describe)
  state, rows = experiment.run_loop(workdir, run, stop_after)
  others = evaluate_others(config, hp, ds, eval_batch, state.variables)
  result = experiment.finish(
      config, workdir, fns, ev(state.variables), ds, eval_batch, rows, x_key="round",
      extra={"rounds": config.fl.rounds, "clients": names, "scenario": hp.scenario,
             "label_fraction": float(config.semi.label_fraction), **lstats,
             "num_params": experiment.num_params(ev(state.variables)),
             "model_bytes": mbytes, "bytes_per_client_round": comm,
             "cost_percent": cost, "bytes_per_round": comm["total"] * len(names),
             **fl_train.privacy_results(dpc, noise_mult, config.fl.rounds),
             "evaluated_model": hp.eval_model, **others, "wall_time_s": time.time() - t_start})
  if others:
    print(f"\n[semi] {hp.method}: test Dice of {hp.eval_model} (evaluated) "
          f"{result['metrics']['test']['dice_mean']:.4f}; "
          + ", ".join(f"{n} {m['test']['dice_mean']:.4f}"
                      for n, m in others["other_models"].items() if "test" in m), flush=True)
  return result


def evaluate_others(config, hp: semi.SemiHParams, ds, eval_batch, variables) -> Dict:
  """Val / test metrics of the communicated models other than ``hp.eval_model`` (MT's
  student, CPS's model b): {'other_models': {name: {split: metrics}}, '<name>_<split>_dice'}."""
  out, flat = {}, {}
  for name in hp.models:
    if name == hp.eval_model:
      continue
    out[name] = {}
    for split in ("val", "test"):
      x, y = ds.split(split)
      if len(x):
        m = steps.evaluate(eval_batch, variables[name], x, y, config.eval_batch_size,
                           ds.class_names)
        out[name][split] = m
        flat[f"{name}_{split}_dice"] = m["dice_mean"]
  return {"other_models": out, **flat} if out else {}
