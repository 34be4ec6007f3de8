"""The supervised federated run kind: partition patients over K hospitals, then
rounds of the one-jit round of ``core.supervised_algorithm`` (any aggregator of
fl/aggregators.py, DP-FedAvg, secure aggregation, server optimisers, streamed
chunks) through the one experiment loop (``fedjax_seg/experiment.py``).

Also the pieces the other federated run kinds share: the partition, the client
hyper-parameters, the aggregator built from ``config.fl`` (robust / DP / secure
aggregation wrap any algorithm that uploads one model), the per-round row.

``config.init_from`` (a workdir holding ``encoder.msgpack``, e.g. an FCL
pre-training run) starts the U-Net's contracting path from that encoder;
``config.fl.labelled_patients`` > 0 trains on that many patients per client
(``fl.label_seed`` picks them, nested in N), ``config.fl.pad_rows`` pads every
client to that many rows (one compiled round for every N).
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

import flax

from fedjax_seg import experiment, models, runlog, steps
from fedjax_seg.data import federated, partition, pipeline
from fedjax_seg.fl import aggregators, algorithm, backends, core, dp, secagg, server_opt
from fedjax_seg.fl import ditto, fedbn, scaffold, scale
from fedjax_seg.models import encoder as encoder_lib


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


def build_client_data(ds, train_ids, host: bool = False, min_rows: int = 1):
  return federated.stack_clients([ds.arrays(ids) for ids in train_ids], host=host,
                                 min_rows=min_rows)


def labelled_subset(ids_per_client, n: int, seed: int):
  """The first n patients of a seeded shuffle of each client's patients (nested in n)."""
  out = []
  for k, ids in enumerate(ids_per_client):
    order = np.random.default_rng([seed, k]).permutation(len(ids))
    out.append(sorted(sorted(ids)[i] for i in order[:n]))
  return out


def jit_options(config) -> Dict:
  """jax.jit kwargs: config.xla_opt_level >= 0 sets XLA's backend optimisation level
  (0 compiles ~3× faster on XLA:CPU and runs ~5× slower: right for smoke tests)."""
  level = int(config.xla_opt_level)
  return {"compiler_options": {"xla_backend_optimization_level": level}} if level >= 0 else {}


def init_from(config, variables):
  """``config.init_from``: copy the encoder of that workdir's ``encoder.msgpack``
  into the U-Net's contracting path (the decoder keeps its random init)."""
  src = config.init_from
  if not src:
    return variables
  path = os.path.join(src, "encoder.msgpack")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config.init_from={src!r}: no encoder.msgpack there (run the "
                            f"pre-training first)")
  with open(path, "rb") as f:
    enc = flax.serialization.msgpack_restore(f.read())
  return encoder_lib.encoder_to_unet(enc, variables)


def client_hparams(config) -> core.ClientHParams:
  fl = config.fl
  return core.ClientHParams(local_steps=fl.local_steps, batch_size=fl.client_batch_size,
                            stats_samples=fl.stats_samples, step_strategy=fl.step_strategy,
                            prox_mu=fl.prox_mu)


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
    return {"trim": fl.trim}
  return {}


def check_fl_config(config) -> None:
  """Refuses impossible or guarantee-voiding combinations of the aggregation options
  (ValueError naming the keys) before any data is built."""
  server_opt.from_config(config.fl)
  dp.check_config(config)
  secagg.check_config(config)
  if config.fl.norm_k < 0:
    raise ValueError(f"config.fl.norm_k={config.fl.norm_k} must be >= 0 (0 = off)")
  if config.algorithm == "trimmed_mean" and not 0 <= config.fl.trim < 0.5:
    raise ValueError(f"config.fl.trim={config.fl.trim}: expected 0 <= trim < 0.5")
  check_sampling(config)
  check_method(config)
  check_local_work(config)


def method(config) -> str:
  """The client/server method on top of the aggregator: 'standard' (FedAvg-style: the
  aggregate is the next model), 'fedbn' / 'silobn' (config.fl.local_norm), 'scaffold'
  (config.fl.scaffold), 'ditto' (config.fl.ditto_lambda > 0)."""
  fl = config.fl
  on = [n for n, v in (("local_norm", fl.local_norm != "none"),
                       ("scaffold", bool(fl.scaffold)),
                       ("ditto_lambda", fl.ditto_lambda > 0)) if v]
  if len(on) > 1:
    raise ValueError(f"config.fl.{on[0]} and config.fl.{on[1]} are both set: FedBN/SiloBN, "
                     f"SCAFFOLD and Ditto are one at a time")
  if not on:
    return "standard"
  return {"local_norm": fl.local_norm, "scaffold": "scaffold",
          "ditto_lambda": "ditto"}[on[0]]


LOCAL_WORK = ("equal", "proportional", "list")


def check_local_work(config) -> None:
  fl = config.fl
  work = fl.local_work
  if work not in LOCAL_WORK:
    raise ValueError(f"config.fl.local_work={work!r}: expected one of {LOCAL_WORK}")
  lst = tuple(fl.local_steps_per_client)
  if work == "list" and (not lst or any(int(e) < 1 or int(e) > fl.local_steps for e in lst)):
    raise ValueError(f"config.fl.local_steps_per_client={lst}: with local_work='list' give one "
                     f"value per client, each in 1..config.fl.local_steps={fl.local_steps}")
  if fl.fednova:
    if config.algorithm not in aggregators.LINEAR_AGGREGATORS:
      raise ValueError(f"config.fl.fednova=True with config.algorithm={config.algorithm!r}: "
                       f"FedNova normalises a weighted average {aggregators.LINEAR_AGGREGATORS}")
    if fl.secagg or fl.dp.enabled or fl.clients_per_chunk:
      raise ValueError("config.fl.fednova=True needs every client's model at the server "
                       "(not with secure aggregation, DP-FedAvg or streamed chunks)")


def local_steps_per_client(config, data) -> Optional[np.ndarray]:
  """int32 [K] local steps τ_k (config.fl.local_work), None when every client runs
  config.fl.local_steps. 'proportional': τ_k = max(1, round(E · s_k / max_j s_j)) (the
  largest client runs E); 'list': config.fl.local_steps_per_client in client order."""
  fl = config.fl
  work = fl.local_work
  k = int(np.shape(data.valid)[0])
  if work == "equal":
    return None
  if work == "list":
    lst = [int(e) for e in fl.local_steps_per_client]
    if len(lst) != k:
      raise ValueError(f"config.fl.local_steps_per_client has {len(lst)} values for {k} clients")
    return np.asarray(lst, np.int32)
  n = np.asarray(jax.device_get(data.valid)).sum(axis=1)
  return np.maximum(1, np.round(fl.local_steps * n / max(n.max(), 1))).astype(np.int32)


def cost_ratio(config) -> str:
  """config.fl.cost_ratio ('local' | 'rounds', core.supervised_algorithm)."""
  return config.fl.cost_ratio


def check_method(config) -> None:
  fl = config.fl
  if cost_ratio(config) not in core.COST_RATIOS:
    raise ValueError(f"config.fl.cost_ratio={cost_ratio(config)!r}: expected one of "
                     f"{core.COST_RATIOS}")
  if cost_ratio(config) == "rounds":
    if fl.clients_per_chunk:
      raise ValueError("config.fl.cost_ratio='rounds' keeps per-client state; streamed chunks "
                       "(config.fl.clients_per_chunk) run cost_ratio='local' only")
    if method(config) != "standard":
      raise ValueError(f"config.fl.cost_ratio='rounds' with {method(config)}: one per-client "
                       f"state at a time (use cost_ratio='local')")
  ln = fl.local_norm
  if ln not in ("none",) + fedbn.MODES:
    raise ValueError(f"config.fl.local_norm={ln!r}: expected one of {('none',) + fedbn.MODES}")
  if fl.ditto_lambda < 0:
    raise ValueError(f"config.fl.ditto_lambda={fl.ditto_lambda} must be >= 0 (0 = off)")
  kind = method(config)
  if kind == "standard":
    return
  if fl.clients_per_chunk:
    raise ValueError(f"config.fl.clients_per_chunk={fl.clients_per_chunk}: streamed chunks run "
                     f"the standard method only ({kind} keeps per-client state)")
  if kind in fedbn.MODES and fl.server_opt != "none":
    raise ValueError(f"config.fl.server_opt={fl.server_opt!r} with config.fl.local_norm={kind!r}: "
                     f"a server optimiser over the shared part only is not implemented")
  if kind == "scaffold" and (fl.secagg or fl.dp.enabled):
    raise ValueError("config.fl.scaffold=True with secure aggregation / DP-FedAvg: those protect "
                     "one uploaded model, SCAFFOLD also uploads its control variate")


def build_algorithm(config, kind: str, fns, tx, num_classes: int, hp, augment, aggregator,
                    server_update, num_clients: int):
  """The ``algorithm.Algorithm`` of a non-standard method (``method``)."""
  kw = agg_kwargs(config)
  if kind in fedbn.MODES:
    cu = core.make_client_update(fns, tx, config.loss, num_classes, hp, augment=augment)
    return fedbn.make_algorithm(cu, aggregator, kind, kw)
  if kind == "scaffold":
    cu = core.make_client_update(fns, tx, config.loss, num_classes, hp, augment=augment,
                                 penalty=scaffold.correction_penalty)
    return scaffold.make_algorithm(cu, aggregator, float(config.optimizer.lr), hp.local_steps,
                                   num_clients, kw, server_update)
  if kind == "ditto":
    cu = core.make_client_update(fns, tx, config.loss, num_classes, hp, augment=augment)
    pu = core.make_client_update(
        fns, tx, config.loss, num_classes,
        dataclasses.replace(hp, prox_mu=float(config.fl.ditto_lambda)), augment=augment)
    return ditto.make_algorithm(cu, pu, aggregator, kw, server_update)
  raise ValueError(f"unknown method {kind!r}")


def init_method_state(kind: str, variables, num_clients: int):
  """(per-client state, algorithm server state) of a method at round 0."""
  if kind in fedbn.MODES:
    return fedbn.init_clients(variables, num_clients, kind), ()
  if kind == "scaffold":
    return scaffold.init_clients(variables, num_clients), scaffold.zeros_like_params(variables)
  if kind == "ditto":
    return ditto.init_clients(variables, num_clients), ()
  return (), ()


def personal_eval(kind: str, state, ds, names, train_ids) -> Optional[Dict]:
  """experiment.finish's ``personal`` of FedBN/SiloBN/Ditto (None otherwise).

  A validation/test patient is segmented by the model of the client that holds the most
  training patients of its site (by_site: its own hospital; ties: the lower index); a
  patient of a site no client trained on, by the global model."""
  if kind not in fedbn.MODES + ("ditto",):
    return None
  stacked = (fedbn.personal_models(state, kind) if kind in fedbn.MODES
             else ditto.personal_models(state))
  stacked = jax.device_get(stacked)
  models_k = [jax.tree.map(lambda a: a[i], stacked) for i in range(len(names))]
  count: Dict[str, Dict[int, int]] = {}
  for k, ids in enumerate(train_ids):
    for pid in ids:
      site = ds.patients[pid].site
      count.setdefault(site, {}).setdefault(k, 0)
      count[site][k] += 1
  client_of_site = {s: max(sorted(c), key=lambda k: c[k]) for s, c in count.items()}
  model_of_patient = {pid: client_of_site[p.site] for pid, p in ds.patients.items()
                      if p.site in client_of_site}
  rule = ("each patient by the model of its site's client (that client's own normalisation); "
          "sites that never trained by the global model, whose normalisation is the uniform "
          "average of the clients'" if kind in fedbn.MODES else
          "each patient by the personalised model v_k of its site's client; sites that never "
          "trained by the global model")
  return {"models": models_k, "model_of_patient": model_of_patient, "rule": rule,
          "primary": kind in fedbn.MODES}


SAMPLINGS = ("uniform", "size")

# Options only the supervised federated trainer (train_federated) implements, with the
# value that means "off".
SUPERVISED_ONLY = (("clients_per_round", 0), ("client_sampling", "uniform"),
                   ("local_norm", "none"), ("scaffold", False), ("ditto_lambda", 0.0),
                   ("local_work", "equal"), ("fednova", False), ("cost_ratio", "local"))


# Read by the supervised rounds (and FCL's supervised fine-tuning) but not by the
# semi-supervised rounds: their clients have their own objectives.
NOT_SEMI = (("prox_mu", 0.0),)


def refuse_supervised_only(config, who: str, extra=()) -> None:
  """ValueError naming the first config.fl key of SUPERVISED_ONLY (+ ``extra``) set away
  from off: ``who`` (the semi-supervised rounds, FCL pre-training) would silently ignore it."""
  for key, off in SUPERVISED_ONLY + tuple(extra):
    value = config.fl[key]
    if value != off:
      raise ValueError(f"config.fl.{key}={value!r}: not implemented for {who}; it applies to "
                       f"the supervised federated algorithms only (leave it at {off!r})")


def check_sampling(config) -> None:
  """config.fl.clients_per_round / client_sampling: refuses what sampling cannot do."""
  fl = config.fl
  m = int(fl.clients_per_round)
  if m < 0:
    raise ValueError(f"config.fl.clients_per_round={m} must be >= 0 (0 = every client)")
  if fl.client_sampling not in SAMPLINGS:
    raise ValueError(f"config.fl.client_sampling={fl.client_sampling!r}: expected one of "
                     f"{SAMPLINGS}")
  if not m:
    return
  if fl.secagg:
    raise ValueError(f"config.fl.clients_per_round={m} with config.fl.secagg=True: the pairwise "
                     f"masks cancel only when every client uploads (dropout-resilient secure "
                     f"aggregation is not implemented)")
  if fl.clients_per_chunk:
    raise ValueError(f"config.fl.clients_per_round={m} cannot be combined with "
                     f"config.fl.clients_per_chunk={fl.clients_per_chunk}")


def clients_per_round(config, num_clients: int) -> int:
  """m of config.fl.clients_per_round (0 or ≥ K: every client → K)."""
  m = int(config.fl.clients_per_round)
  return m if 0 < m < num_clients else num_clients


def sample_probs(config, data) -> Optional[np.ndarray]:
  """[K] sampling probabilities (config.fl.client_sampling='size': ∝ training samples),
  None for uniform sampling."""
  if config.fl.client_sampling != "size":
    return None
  n = np.asarray(jax.device_get(data.valid)).sum(axis=1).astype(np.float64)
  return n / n.sum()


def build_aggregator(config, num_clients: int, noise_multiplier: float = 0.0,
                     base: Optional[str] = None):
  """``base`` (default config.algorithm)'s aggregator, or DP-FedAvg when
  config.fl.dp.enabled, optionally through secure aggregation (config.fl.secagg),
  wrapped by ``aggregators.robust`` (exploding-norm exclusion, exclusion reasons).
  Any algorithm that uploads one model (upload['model']) can use it."""
  fl = config.fl
  seeds = secagg.agree_seeds(num_clients, fl.secagg_seed) if fl.secagg else None
  bits = fl.secagg_bits
  dpc = fl.dp
  if dpc.enabled:
    inner = dp.dp_fedavg(dpc.clip_norm, noise_multiplier, dpc.weighting, dpc.sample_cap,
                         secagg.make_secure_sum(seeds, bits) if seeds is not None else None)
  else:
    inner = aggregators.get(base or config.algorithm)
    if fl.fednova:
      inner = aggregators.nova(inner)
    if seeds is not None:
      inner = secagg.secure(inner, seeds, bits)
  return aggregators.robust(inner, fl.norm_k)


def privacy(config, num_clients: int):
  """(dp config or None, noise multiplier z); prints the DP budget when DP is on.

  With client sampling (m = config.fl.clients_per_round of K) the accountant uses the
  sampling rate q = m/K (Poisson-sampled Gaussian mechanism; the round draws exactly m
  clients, the usual approximation of Poisson sampling by fixed-size sampling, as in
  McMahan et al. 2018) and the noise std is zC/m."""
  dpc = config.fl.dp
  if not dpc.enabled:
    return None, 0.0
  m = clients_per_round(config, num_clients)
  q = m / num_clients
  z = dp.resolve_noise_multiplier(config.fl, q)
  who = (f"all {num_clients} clients every round" if m == num_clients else
         f"{m} of {num_clients} clients per round, sampling rate q={q:.3f}")
  print(f"[fl] DP-FedAvg: clip C={dpc.clip_norm}, noise multiplier z={z:.4f} "
        f"(noise std zC/m={z * dpc.clip_norm / m:.4g}), delta={dpc.delta}; "
        f"epsilon after {config.fl.rounds} rounds = "
        f"{dp.epsilon(z, config.fl.rounds, dpc.delta, q, dpc.accountant):.3f} "
        f"({dpc.accountant}, {who})", flush=True)
  return dpc, z


def sampling_rate(config, num_clients: int) -> float:
  """q = m/K of client sampling (1.0 when every client runs every round)."""
  return clients_per_round(config, num_clients) / num_clients


def privacy_row(dpc, z, rnd: int, q: float = 1.0) -> Dict:
  if dpc is None:
    return {}
  return {"epsilon": dp.epsilon(z, rnd, dpc.delta, q, dpc.accountant),
          "dp_delta": dpc.delta, "dp_noise_multiplier": z, "dp_sampling_rate": q}


def privacy_results(dpc, z, rounds: int, q: float = 1.0) -> Dict:
  if dpc is None:
    return {}
  return {"dp": {"noise_multiplier": z, "clip_norm": dpc.clip_norm, "delta": dpc.delta,
                 "sampling_rate": q, "epsilon": dp.epsilon(z, rounds, dpc.delta, q,
                                                           dpc.accountant)}}


def status(row) -> str:
  """The progress line's status: failed round, excluded clients, DP budget."""
  out = "FAILED (global model kept)" if row.get("failed") else ""
  if row.get("sampled"):
    out += " sampled: " + ",".join(row["sampled"])
  if row.get("excluded"):
    out += " excluded: " + ",".join(
        f"{n}({row.get('excluded_reasons', {}).get(n, '?')})" for n in row["excluded"])
  if "epsilon" in row and "dp_clip_fraction" in row:
    out += f" eps {row['epsilon']:.2f} clip {row['dp_clip_fraction']:.2f}"
  return out


def evaluator(config, ds, eval_batch, client_val):
  """``val(variables, rnd) -> row entries``: val metrics every ``fl.eval_every`` rounds
  and at the last; per-client val Dice when ``fl.eval_clients``."""
  x_va, y_va = ds.split("val")

  def val(variables, rnd):
    if not (rnd % config.fl.eval_every == 0 or rnd == config.fl.rounds):
      return {}
    m = steps.evaluate(eval_batch, variables, x_va, y_va, config.eval_batch_size, ds.class_names)
    row = {f"val_{k}": v for k, v in m.items() if not isinstance(v, (bool, str))}
    if config.fl.eval_clients:
      row["client_val_dice"] = [
          steps.evaluate(eval_batch, variables, x, y, config.eval_batch_size,
                         ds.class_names)["dice_mean"] if len(x) else None
          for x, y in client_val]
    return row
  return val


def train_federated(config, workdir: str, stop_after: Optional[int] = None) -> Dict:
  """Federated training with ``config.algorithm`` as the aggregator.

  stop_after: test hook, raise experiment.Interrupted after that many rounds.
  """
  t_start = time.time()
  check_fl_config(config)
  scale.check_chunked(config)  # clients streamed in chunks (data stay on the host)
  chunked = bool(config.fl.clients_per_chunk)
  experiment.save_config(config, workdir)
  ds = pipeline.build_dataset(config.data, seed=config.seed)
  names, train_ids, val_ids = partition_dataset(ds, config.fl)
  extra_results = {}
  n_lab = int(config.fl.labelled_patients)
  if n_lab > 0:
    train_ids = labelled_subset(train_ids, n_lab, int(config.fl.label_seed))
    extra_results["labelled_patients"] = [list(ids) for ids in train_ids]
  data = build_client_data(ds, train_ids, host=chunked,
                           min_rows=int(config.fl.pad_rows))
  taus = local_steps_per_client(config, data)
  if taus is not None:  # unequal local work: masked steps inside the one program
    data = data.replace(steps=taus if chunked else jnp.asarray(taus))
    print(f"[fl] local steps per client ({config.fl.local_work}): "
          + ", ".join(f"{n} {t}" for n, t in zip(names, taus))
          + (" (FedNova normalised averaging)" if config.fl.fednova else ""),
          flush=True)
  print(f"[fl] {config.algorithm}: {len(names)} clients, partition={config.fl.partition}\n"
        + federated.client_summary(names, train_ids, data, val_ids), flush=True)
  fns = models.build(config.model, ds.num_classes)
  init_key, round_key = jax.random.split(jax.random.PRNGKey(config.seed))
  variables = fns.init(init_key, jnp.zeros((1,) + data.x.shape[2:], jnp.float32))
  variables = init_from(config, variables)
  tx = steps.make_optimizer(config.optimizer)
  hp = client_hparams(config)
  ckey = experiment.compile_key(config, ds, ("model", "loss", "optimizer", "augment", "algorithm",
                                             "fl", "xla_opt_level"),
                                exclude=("fl.labelled_patients", "fl.label_seed", "fl.rounds",
                                         *experiment.NOT_COMPILED_FL_KEYS))
  server_tx = server_opt.from_config(config.fl)
  dpc, noise_mult = privacy(config, len(names))
  server_update = server_opt.make_server_update(server_tx) if server_tx else None

  def client_update():
    return core.make_client_update(fns, tx, config.loss, ds.num_classes, hp,
                                   augment=experiment.build_augment(config))

  m = clients_per_round(config, len(names))
  probs = sample_probs(config, data) if m < len(names) else None
  q = m / len(names)
  if probs is not None:  # the program closes over the probabilities
    ckey += ",p=" + ",".join(f"{p:.6g}" for p in probs)

  kind = method(config)

  def make_alg():
    return build_algorithm(config, kind, fns, tx, ds.num_classes, hp,
                           experiment.build_augment(config),
                           build_aggregator(config, len(names), noise_mult), server_update,
                           len(names))

  strategy = round_strategy(config, m, hp.local_steps)

  def build_round():
    if kind != "standard":
      return algorithm.make_round(make_alg(), strategy,
                                  clients_per_round=m if m < len(names) else 0,
                                  sample_probs=probs)
    return core.make_run_round(client_update(), build_aggregator(config, len(names), noise_mult),
                               strategy, agg_kwargs(config), server_update,
                               clients_per_round=m if m < len(names) else 0, sample_probs=probs,
                               cost_ratio=cost_ratio(config))
  if chunked:  # C clients at a time, aggregate as running sums (fl/scale.py)
    run_round = scale.make_chunked_round(
        client_update(), config.algorithm, config.fl.clients_per_chunk,
        config.fl.client_strategy, agg_kwargs(config), server_update,
        jit=lambda name, build: runlog.cached_jit(name + ckey, build, **jit_options(config)))
  else:
    run_round = algorithm.jit_round(
        "round" + ckey, build_round, strategy,
        **loop_options(config, strategy, m, hp.local_steps), **jit_options(config))
  if kind in fedbn.MODES:
    fedbn.check_model(variables, kind, config.model.norm)
  clients0, server0 = init_method_state(kind, variables, len(names))
  if kind == "standard" and cost_ratio(config) == "rounds":
    clients0 = core.init_prev_stats(len(names))
  state = core.ServerState(variables, jnp.int32(0), server_opt.init(server_tx, variables),
                           clients=clients0, server=server0)
  mbytes = core.model_bytes(variables)
  up_bytes = down_bytes = mbytes
  if kind != "standard":  # read from what the method declares it sends
    cb = algorithm.comm_bytes(make_alg(), state, data)
    up_bytes, down_bytes = cb["up"], cb["down"]
  print(f"[fl] model {config.model.name}: {experiment.num_params(variables):,} parameters, "
        f"{mbytes / 1e6:.2f} MB per transfer; client strategy "
        f"{describe_strategy(config, strategy, m, hp.local_steps, chunked)}, step strategy "
        f"{step_label(config, strategy, hp.local_steps)}", flush=True)
  eval_batch = runlog.cached_jit("eval" + experiment.compile_key(config, ds, ("model", "loss")),
                                 lambda: steps.make_eval_batch(fns, config.loss, ds.num_classes))
  val = evaluator(config, ds, eval_batch, [ds.arrays(ids) for ids in val_ids])

  def row(state, rnd, info):
    r = {"round": rnd, **privacy_row(dpc, noise_mult, rnd, q), **val(state.variables, rnd)}
    if info is not None:
      r.update(info_row(info, names))
      r.update({"bytes_up_per_client": up_bytes, "bytes_down_per_client": down_bytes,
                "bytes_total": (up_bytes + down_bytes) * m})
    r["time_s"] = time.time() - t_start
    return r

  def describe(r):
    w = " ".join(f"{x:.2f}" for x in r["weights"])
    return (f"train_loss {r['train_loss']:.4f}  val_dice "
            f"{r.get('val_dice_mean', float('nan')):.4f}  w [{w}] {status(r)}")

  place = None
  if config.fl.client_strategy == "sharded" and not chunked:
    # state/key replicated, data sharded over the 'clients' mesh axis
    # (global arrays over every process after launch.py --distributed)
    def place(s):
      nonlocal data, round_key
      s, data, round_key = scale.place_round_inputs(s, data, round_key)
      return s
  run = experiment.Run("[fl]", state, lambda s, t: run_round(s, data, round_key),
                       config.fl.rounds, lambda s: int(s.round), row, describe, place=place,
                       clients=names)
  state, rows = experiment.run_loop(workdir, run, stop_after)
  personal = personal_eval(kind, state, ds, names, train_ids)
  return experiment.finish(
      config, workdir, fns, state.variables, ds, eval_batch, rows, x_key="round",
      extra={"rounds": config.fl.rounds, "clients": names, **extra_results,
             **privacy_results(dpc, noise_mult, config.fl.rounds, q),
             "clients_per_round": m,
             "num_params": experiment.num_params(state.variables),
             "pretrained_from": config.init_from or None,
             "method": kind, "bytes_per_client_round": {"up": up_bytes, "down": down_bytes},
             "bytes_per_round": (up_bytes + down_bytes) * m, "wall_time_s": time.time() - t_start},
      personal=personal)


def round_strategy(config, clients: int, local_steps: int) -> str:
  """The round's client strategy for ``clients`` training clients of ``local_steps`` steps
  (config fl.client_strategy, fl.host_threads; ``backends.round_strategy``)."""
  return backends.round_strategy(config.fl.client_strategy, clients, local_steps,
                                 host_threads_setting=config.fl.host_threads)


def loop_options(config, strategy: str, clients: int, local_steps: int) -> Dict:
  """The 'loop' round's clients per call, host steps and host threads for
  ``algorithm.jit_round`` (config fl.clients_per_call, fl.step_strategy, fl.host_threads)."""
  return backends.loop_options(config.fl.clients_per_call, config.fl.step_strategy, strategy,
                               clients, local_steps, host_threads_setting=config.fl.host_threads)


def step_label(config, strategy: str, local_steps: int) -> str:
  """The step strategy the round's client steps run under, for the progress line."""
  if backends.host_steps(config.fl.step_strategy, strategy, local_steps):
    return "host" if config.fl.step_strategy == "host" else "host (auto: loop round, E > 1)"
  return backends.resolve_strategy(config.fl.step_strategy, "step")


def describe_strategy(config, strategy: str, clients: int, local_steps: int,
                      chunked: bool) -> str:
  """The client strategy a round runs, for the progress line."""
  if strategy == "loop" and not chunked:
    opts = loop_options(config, strategy, clients, local_steps)
    why = ""
    if config.fl.client_strategy == "auto":
      why = (f", auto: {clients} clients x {local_steps} steps > {backends.AUTO_UNROLL_MAX}"
             if clients * local_steps > backends.AUTO_UNROLL_MAX else
             f", auto: {clients} clients, {opts['host_threads']} host threads")
    c = opts["clients_per_call"]
    calls = -(-clients // max(c, 1))
    per = "one client program called per client" if c == 1 else \
        f"a program of {c} clients called {calls} times"
    if opts["host_steps"] and c == 0:
      per = "clients per call chosen from the local step's size, each local step a program call"
    elif opts["host_steps"]:
      per = (f"{c} client{'s' if c > 1 else ''} per call, {calls} call"
             f"{'s' if calls > 1 else ''}, each local step a program call")
    t = opts["host_threads"]
    if t > 1:
      per += f", calls issued from {t} host threads"
    return f"loop ({per}{why})"
  return backends.resolve_strategy(config.fl.client_strategy)


def info_row(info, names) -> Dict:
  """Per-round entries every model-uploading algorithm logs: train loss over the
  included clients, weights, failure, exclusions (with reasons), per-client stats."""
  info = jax.device_get(info)
  inc = np.asarray(info["included"])
  sampled = np.asarray(info.get("sampled", np.ones_like(inc)))
  row = {"train_loss": float(np.nanmean(np.where(inc, info["train_loss"], np.nan)))
         if inc.any() else float("nan"),
         "weights": [float(w) for w in info["weights"]],
         "client_train_loss": [float(v) for v in info["train_loss"]],
         "failed": bool(info["failed"]),
         "excluded": [n for n, i, s in zip(names, inc, sampled) if s and not i]}
  if not sampled.all():
    row["sampled"] = [n for n, s in zip(names, sampled) if s]
  for key_ in ("dice_pre", "dice_post", "ce_pre", "ce_post", "local_steps"):
    if key_ in info:
      row[f"client_{key_}"] = [float(v) for v in info[key_]]
  row.update(_robust_row(info, names))
  return row


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
