"""Trainer for FCL and its baselines: federated self-supervised pre-training of a
U-Net encoder, then federated (FedAvg) fine-tuning of the full U-Net with N
annotated patients per client (SPEC §4.3; Wu et al., MICCAI 2021).

    ACDC volumes (ndim=3 load; the 2D slices are the same arrays reshaped)
      -> patients over K clients (config.fl.partition, ACDC-style 10 clients)
      -> pre-training (config.algorithm):
           fcl           contrastive, memory banks exchanged after each round
           local_cl      the same program with the exchange off
           fedrotation   FedAvg of a rotation (0/90/180/270°) classifier's encoder
           random_init   no pre-training
      -> for each N in config.finetune.labelled_patients: a chained run, an ordinary
         supervised FedAvg run (fl/train.py) with ``config.init_from = pretrain/``
         (U-Net contracting path copied from the encoder, decoder randomly
         initialised) and ``config.fl.labelled_patients = N`` per client

Workdir::

    pretrain/        config.json, metrics.jsonl/csv, checkpoints/ (resumable), encoder.msgpack
    finetune_N<n>/   a complete supervised run (config.json, metrics, checkpoints,
                     results.json with per-patient records, final_model.msgpack): infer
                     and the viewer load it like any run
    results.json     {algorithm, pretrain: {...}, finetune: {N: {test/val metrics}}}

Both stages go through the one experiment loop (fedjax_seg/experiment.py).
"""
from __future__ import annotations

import copy
import json
import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_seg import experiment, models, runlog, steps
from fedjax_seg.data import federated, pipeline
from fedjax_seg.fl import algorithm, core, dp, fcl, scale
from fedjax_seg.fl import train as fl_train

ALGORITHMS = {"fcl": "fcl", "local_cl": "local_cl", "fedrotation": "rotation", "random_init": None}
PRETRAIN_KEYS = {"rounds", "local_steps", "volumes_per_batch", "num_partitions", "temperature",
                 "momentum", "bank_size", "num_positives", "neg_per_partition", "hidden_dim",
                 "feature_dim", "optimizer", "augment"}
FINETUNE_KEYS = {"labelled_patients", "label_seed"}


# ---------------------------------------------------------------------------
# Data.

def load_data(data_cfg, verbose: bool = True) -> Tuple[pipeline.SegDataset, pipeline.SegDataset]:
  """ACDC (or BraTS) loaded once as volumes; returns (volumes, slices) data sets.

  volumes: patients' images [F, D, H, W, C] (one volume per frame, slices in
  anatomical order) for partition sampling; slices: the same arrays as
  [F·D, H, W, C] — exactly what the 2D loader produces (ED slices then ES
  slices) when ``data.min_foreground_fraction`` is 0. Same patients, same splits.
  """
  if int(data_cfg.ndim) != 2:
    raise ValueError("config.data.ndim must be 2 for FCL (2D slices are fine-tuned; "
                     "volumes are loaded internally for partition sampling)")
  if float(data_cfg.min_foreground_fraction) > 0:
    raise ValueError("config.data.min_foreground_fraction must be 0 for FCL: dropping slices "
                     "would break the slice order that partition sampling relies on")
  vcfg = copy.deepcopy(data_cfg)
  vcfg.ndim = 3
  vcfg.depth = 0
  vol = pipeline.build_dataset(vcfg, verbose)
  patients = {}
  for pid, p in vol.patients.items():
    if p.images.ndim != 5:
      raise ValueError(f"layout {data_cfg.layout!r}: expected volumes [F, D, H, W, C], got {p.images.shape}")
    patients[pid] = pipeline.PatientArrays(
        pid, p.site, p.images.reshape((-1,) + p.images.shape[2:]),
        p.labels.reshape((-1,) + p.labels.shape[2:]), p.spacing)
  sl = pipeline.SegDataset(patients, vol.splits, vol.num_classes, vol.class_names, vol.root,
                           vol.layout)
  return vol, sl


def client_volumes(vol: pipeline.SegDataset, ids_per_client) -> fcl.VolumeData:
  return fcl.stack_volumes([[v for pid in ids for v in vol.patients[pid].images]
                            for ids in ids_per_client])


labelled_subset = fl_train.labelled_subset


# ---------------------------------------------------------------------------
# Config.

def pretrain_hparams(config) -> fcl.PretrainHParams:
  method = ALGORITHMS[config.algorithm]
  p = config.pretrain
  unknown = set(p.keys()) - PRETRAIN_KEYS
  if unknown:
    raise ValueError(f"unknown config.pretrain keys {sorted(unknown)}; known: {sorted(PRETRAIN_KEYS)}")
  return fcl.PretrainHParams(
      method=method or "fcl", local_steps=p.local_steps, volumes_per_batch=p.volumes_per_batch,
      num_partitions=p.num_partitions, temperature=p.temperature, momentum=p.momentum,
      bank_size=p.bank_size, num_positives=p.num_positives, neg_per_partition=p.neg_per_partition,
      step_strategy=config.fl.step_strategy, norm_k=config.fl.norm_k)


def encoder_config(config, hp: fcl.PretrainHParams):
  """config.model (a U-Net) -> the matching encoder's model config."""
  m = config.model
  if m.name != "unet":
    raise ValueError(f"config.model.name={m.name!r}: FCL fine-tunes a 'unet'")
  rotation = hp.method == "rotation"
  return dict(name="unet_encoder", base=m.base, depth=m.depth, norm=m.norm,
              ndim=m.ndim, hidden_dim=config.pretrain.hidden_dim,
              feature_dim=4 if rotation else config.pretrain.feature_dim, normalize=not rotation)


def validate(config) -> None:
  if config.algorithm not in ALGORITHMS:
    raise ValueError(f"config.algorithm={config.algorithm!r}: expected one of {sorted(ALGORITHMS)}")
  bad = set(config.finetune.keys()) - FINETUNE_KEYS
  if bad:
    raise ValueError(f"unknown config.finetune keys {sorted(bad)}; known: {sorted(FINETUNE_KEYS)}")
  ns = tuple(int(n) for n in config.finetune.labelled_patients)
  if not ns or min(ns) < 1:
    raise ValueError(f"config.finetune.labelled_patients={ns}: need N >= 1")
  pretrain_hparams(config)
  fl_train.refuse_supervised_only(config, f"config.algorithm={config.algorithm!r} (FCL "
                                          f"pre-training)")
  fl = config.fl
  for key, on in (("fl.dp.enabled", bool(fl.dp.enabled)), ("fl.secagg", bool(fl.secagg))):
    if on:
      raise ValueError(f"config.{key} with config.algorithm={config.algorithm!r}: pre-training "
                       f"clients upload {list(_uploads(config))} (features besides the model); "
                       f"DP-FedAvg / secure aggregation protect one uploaded model only")
  scale.check_chunked(config, "fedavg")  # streamed clients: the encoders' FedAvg


def _uploads(config):
  method = ALGORITHMS[config.algorithm]
  return ("model", "bank") if method in ("fcl", "local_cl") else ("model",)


_xla_opts = fl_train.jit_options


# ---------------------------------------------------------------------------
# Pre-training.

def pretrain(config, workdir: str, vol: pipeline.SegDataset, train_ids, names,
             verbose: bool = True) -> Tuple[Dict, Dict]:
  """Federated self-supervised pre-training; returns (encoder variables, summary).

  Resumes from ``workdir/checkpoints``; logs per round to ``workdir/metrics.jsonl``.
  """
  t0 = time.time()
  experiment.save_config(config, workdir)
  hp = pretrain_hparams(config)
  ecfg = encoder_config(config, hp)
  fns = models.ModelFns(models.get_model(**{k: v for k, v in ecfg.items()}))
  data = client_volumes(vol, train_ids)
  k = data.x.shape[0]
  min_depth = int(np.min(np.asarray(data.depth)[np.asarray(data.valid) > 0]))
  if min_depth < hp.num_partitions:
    raise ValueError(f"config.pretrain.num_partitions={hp.num_partitions} > the thinnest volume "
                     f"({min_depth} slices)")
  key = jax.random.PRNGKey(config.seed)
  init_key, round_key = jax.random.split(jax.random.fold_in(key, 0xFC1))
  variables = fns.init(init_key, jnp.zeros((1,) + data.x.shape[3:], jnp.float32))
  tx = steps.make_optimizer(config.pretrain.optimizer)
  view = fcl.make_view_augment(config.pretrain.augment)
  ckey = json.dumps({"hp": hp.program_key(), "enc": ecfg, "xla": _xla_opts(config),
                     "fl": config.fl.client_strategy,
                     "opt": json.loads(config.pretrain.optimizer.to_json()),
                     "aug": json.loads(config.pretrain.augment.to_json())}, sort_keys=True)
  if config.fl.clients_per_chunk:  # C clients at a time (fl/scale.py); banks gathered
    chunked = scale.make_chunked_algorithm_round(
        fcl.make_algorithm(hp, fcl.make_client_update(hp, fns, tx, view)),
        config.fl.clients_per_chunk, config.fl.client_strategy,
        jit=lambda name, fn: runlog.cached_jit(f"fcl_pretrain_{name}" + ckey, fn,
                                               **_xla_opts(config)))
    run_round = lambda s_, d, k_, on: chunked(s_, d, k_, exchange_on=on)
  else:
    strategy = fl_train.round_strategy(config, k, hp.local_steps)
    run_round = algorithm.jit_round(
        "fcl_pretrain" + ckey,
        lambda: fcl.make_run_round(hp, fcl.make_client_update(hp, fns, tx, view), strategy),
        strategy, **fl_train.loop_options(config, strategy, k, hp.local_steps),
        **_xla_opts(config))
  exchange_on = jnp.bool_(hp.exchange)
  state = fcl.init_state(hp, variables, k, ecfg["feature_dim"])
  mbytes = core.model_bytes(variables)
  comm = fcl.comm_bytes(hp, mbytes, k, ecfg["feature_dim"])
  if verbose:
    print(f"[fcl] pre-training {config.algorithm} ({hp.method}, exchange={hp.exchange}): {k} clients, "
          f"{int(np.sum(np.asarray(data.valid)))} volumes, encoder {experiment.num_params(variables):,} "
          f"params; per client per round up {comm['up']:,} B, down {comm['down']:,} B", flush=True)
  rounds = int(config.pretrain.rounds)

  def row(state, rnd, info):
    info = jax.device_get(info)
    inc = np.asarray(info["included"])
    mean = lambda a: float(np.mean(np.asarray(a)[inc])) if inc.any() else float("nan")
    r = {"round": rnd, "loss": mean(info["loss"]), "weights": [float(w) for w in info["weights"]],
         "failed": bool(info["failed"]), "bytes_up_per_client": comm["up"],
         "bytes_down_per_client": comm["down"], "bytes_total": (comm["up"] + comm["down"]) * k,
         "time_s": time.time() - t0, "excluded": [n for n, i in zip(names, inc) if not i],
         **fl_train._robust_row(info, names)}
    for key_ in ("local_loss", "remote_loss", "local_pos", "remote_pos", "negatives",
                 "rotation_acc"):
      if key_ in info:
        r[key_] = mean(info[key_])
    return r

  def describe(r):
    extra = (f" (local {r['local_loss']:.3f}, remote {r['remote_loss']:.3f}, "
             f"remote positives {r['remote_pos']:.1f})" if hp.contrastive
             else f" (rotation acc {r['rotation_acc']:.2f})")
    return f"pretrain loss {r['loss']:.4f}{extra} {fl_train.status(r)}".rstrip()

  run = experiment.Run("[fcl]", state, lambda s_, t: run_round(s_, data, round_key, exchange_on),
                       rounds, lambda s_: int(s_.round), row, describe, log_initial=False)
  state, rows = experiment.run_loop(workdir, run, verbose=verbose)
  enc = jax.device_get(state.variables)
  with open(os.path.join(workdir, "encoder.msgpack"), "wb") as f:
    f.write(flax.serialization.to_bytes(enc))
  summary = {"method": hp.method, "exchange": hp.exchange, "rounds": rounds,
             "bytes_per_client_round": comm, "final": rows[-1] if rows else {},
             "wall_time_s": time.time() - t0}
  return enc, summary


# ---------------------------------------------------------------------------
# Fine-tuning.

def finetune_config(config, n: int, pretrain_dir: Optional[str], pad_rows: int):
  """The chained fine-tuning run's config: supervised FedAvg of config.model from
  ``pretrain_dir``'s encoder (None: random init), N labelled patients per client."""
  c = copy.deepcopy(config)
  with c.unlocked():
    for section in ("pretrain", "finetune"):
      if section in c:
        del c[section]
    c.algorithm = "fedavg"
    c.init_from = pretrain_dir or ""
    c.fl.labelled_patients = int(n)
    c.fl.label_seed = int(config.finetune.label_seed)
    c.fl.pad_rows = int(pad_rows)
  return c


def finetune(config, workdir: str, n: int, pretrain_dir: Optional[str], pad_rows: int = 1) -> Dict:
  """Runs (or resumes) the chained fine-tuning run for N = n in ``workdir``."""
  return fl_train.train_federated(finetune_config(config, n, pretrain_dir, pad_rows), workdir)


# ---------------------------------------------------------------------------
# The experiment.

def train_fcl(config, workdir: str, stop_after: Optional[int] = None) -> Dict:
  """Pre-train (per config.algorithm), then fine-tune for every N; returns results."""
  del stop_after  # every stage resumes from its own checkpoints
  t0 = time.time()
  validate(config)
  experiment.save_config(config, workdir)
  vol, ds = load_data(config.data)
  names, train_ids, _ = fl_train.partition_dataset(ds, config.fl)
  data_summary = federated.client_summary(names, train_ids, federated.stack_clients(
      [ds.arrays(ids) for ids in train_ids]))
  print(f"[fcl] {config.algorithm}: {len(names)} clients, partition={config.fl.partition}\n"
        + data_summary, flush=True)
  results = {"algorithm": config.algorithm, "clients": names, "finetune": {}}
  pre_dir = None
  if ALGORITHMS[config.algorithm] is not None:
    pre_dir = os.path.join(workdir, "pretrain")
    _, results["pretrain"] = pretrain(config, pre_dir, vol, train_ids, names)
  ns = sorted(int(n) for n in config.finetune.labelled_patients)
  per_patient = max(len(p.labels) for p in ds.patients.values())
  pad = max(ns) * per_patient  # one row count for every N: one compiled round
  for n in ns:
    lab = labelled_subset(train_ids, n, int(config.finetune.label_seed))
    r = finetune(config, os.path.join(workdir, f"finetune_N{n}"), n, pre_dir, pad_rows=pad)
    results["finetune"][str(n)] = {
        "test_dice_mean": r["metrics"].get("test", {}).get("dice_mean"),
        "val_dice_mean": r["metrics"].get("val", {}).get("dice_mean"),
        "test_dice_per_class": {k.split("/", 1)[1]: v for k, v in r["metrics"].get("test", {}).items()
                                if k.startswith("dice/")},
        "labelled_patients_per_client": [len(ids) for ids in lab]}
  results["wall_time_s"] = time.time() - t0
  runlog.write_json(os.path.join(workdir, "results.json"), results)
  lines = ["| N (labelled patients / client) | test Dice (fg mean) |", "|---|---|"]
  lines += [f"| {n} | {v['test_dice_mean']:.4f} |" for n, v in results["finetune"].items()]
  print(f"\n[fcl] {config.algorithm}\n" + "\n".join(lines), flush=True)
  return results
