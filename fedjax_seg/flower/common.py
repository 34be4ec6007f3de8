"""What the Flower server and the hospitals share; no Flower import here.

Everything is built from the same functions as the in-process run
(``fl/train.train_federated``), so a Flower federation computes the same rounds:

* :func:`build`: the model, the client update (``core.make_client_update``), the
  aggregator (``fl_train.build_aggregator`` + ``agg_kwargs``) and the server optimiser
  as one ``core.supervised_algorithm``; ``init_key, round_key = split(PRNGKey(seed))``.
* :func:`client_step` / :func:`server_step`: the in-process round
  (``algorithm.make_round``) cut at the network: hospital k runs
  ``alg.client_update(bcast, (data_k, (), ()), c_keys[k])`` with
  ``(b_key, c_keys, s_key, a_key) = algorithm.round_keys(scheme, fold_in(round_key, round), K)``;
  the server stacks the K uploads in hospital order and runs ``alg.aggregate`` and
  ``alg.server_update`` with ``a_key`` / ``s_key``.
* :func:`load_hospital`: hospital k reads only its own folder and keeps the train
  patients the pooled by-site split gives its site (:func:`hospital_split`).
* The wire: the broadcast and each declared upload entry (``alg.uploads``) as the NumPy
  arrays of their leaves in ``jax.tree.leaves`` order (:func:`to_wire`,
  :func:`upload_to_wire`), checked leaf by leaf against the expected structure on
  receipt (:func:`from_wire`); the client's stats as scalar metrics.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_seg import experiment, models, steps
from fedjax_seg.data import federated, pipeline, preprocess
from fedjax_seg.fl import aggregators, algorithm, core, server_opt
from fedjax_seg.fl import train as fl_train

# Metric keys of the protocol itself (every other metric of a FitRes is a client stat).
HOSPITAL, ROUND, NUM_CLIENTS = "hospital", "round", "num_clients"
# Config keys that may differ between the server and a hospital (where data live).
LOCAL_KEYS = ("data.root", "data.cache_dir", "compile_cache_dir")


class WireError(ValueError):
  """A message whose arrays do not match the structure the receiver expects."""


def check_config(config) -> None:
  """Refuses configurations a Flower federation cannot run as the in-process one would.
  The Flower-specific refusals come first (they say what to set instead), then the
  project's own config validation."""
  algo = config.algorithm
  if algo not in aggregators.AGGREGATORS:
    raise ValueError(
        f"config.algorithm={algo!r}: the Flower federation runs the model-uploading "
        f"supervised family {sorted(aggregators.AGGREGATORS)} (with FedProx, server "
        f"optimisers, DP-FedAvg, robust exclusion); the semi-supervised methods, FedWeP and "
        f"FCL are not supported yet")
  fl = config.fl
  kind = fl_train.method(config)
  if kind != "standard":
    raise ValueError(f"{kind} (config.fl.local_norm / scaffold / ditto_lambda) keeps "
                     f"per-client state or uploads more than the model; the Flower "
                     f"federation runs the standard model-uploading round only")
  if int(fl.clients_per_round):
    raise ValueError(f"config.fl.clients_per_round={fl.clients_per_round}: every hospital takes "
                     f"part in every round of a Flower federation; set it to 0")
  # Options of the in-process trainer the hospitals' client update does not take yet.
  for key, plain in (("local_work", "equal"), ("fednova", False), ("cost_ratio", "local")):
    if fl[key] != plain:
      raise ValueError(f"config.fl.{key}={fl[key]!r}: not supported by the Flower "
                       f"federation yet (set {plain!r})")
  if fl.secagg:
    raise ValueError("config.fl.secagg=True: fl/secagg.py simulates the masks inside the "
                     "server's aggregator, so over Flower the server would still receive every "
                     "model unmasked; not supported (set config.fl.secagg=False)")
  if int(fl.clients_per_chunk):
    raise ValueError("config.fl.clients_per_chunk: streaming clients in chunks is for one-machine "
                     "simulation; set it to 0 for a Flower federation")
  if fl.partition != "by_site":
    raise ValueError(f"config.fl.partition={fl.partition!r}: a Flower hospital holds its own "
                     f"patients (partition 'by_site'); iid / dirichlet split a pooled data set "
                     f"that no hospital has")
  if config.data.fold is not None:
    raise ValueError("config.data.fold: k-fold splits are not supported by the Flower federation "
                     "yet (each hospital splits its own patients); unset data.fold")
  if not config.data.stratify_by_site:
    raise ValueError("config.data.stratify_by_site=False: a hospital can only split its own "
                     "patients; set it to True")
  from fedjax_seg.config_utils import validate
  validate(config)
  fl_train.check_fl_config(config)


def num_hospitals(config, given: int = 0) -> int:
  """K: ``given`` (> 0), else config.fl.num_clients (> 0), else the phantom's sites."""
  if given > 0:
    k = given
  elif config.fl.num_clients > 0:
    k = int(config.fl.num_clients)
  elif not config.data.root:
    k = len(config.data.phantom.sites)
  else:
    raise ValueError("the number of hospitals is unknown: pass --num_hospitals K "
                     "(or set config.fl.num_clients)")
  if config.fl.num_clients not in (0, k):
    raise ValueError(f"config.fl.num_clients={config.fl.num_clients} differs from the "
                     f"{k} hospitals: merging sites into one client is not supported over Flower")
  return k


def config_digest(config) -> str:
  """Hash of the config less the keys that are local to a machine (``LOCAL_KEYS``):
  the server refuses a hospital whose digest differs from its own."""
  blob = json.loads(config.to_json_best_effort())
  for path in LOCAL_KEYS:
    *head, last = path.split(".")
    node = blob
    for h in head:
      node = node.get(h) if isinstance(node, dict) else None
    if isinstance(node, dict):
      node.pop(last, None)
  return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


@dataclasses.dataclass
class Federation:
  """The algorithm and keys of a run, identical on the server and every hospital."""
  config: Any
  num_clients: int
  num_classes: int
  sample_shape: Tuple[int, ...]
  fns: models.ModelFns
  alg: algorithm.Algorithm
  init_key: jax.Array
  round_key: jax.Array


def _no_aggregation(*_, **__):
  raise RuntimeError("a hospital never aggregates")


def build(config, num_clients: int, num_classes: int, sample_shape: Sequence[int],
          server: bool = True) -> Federation:
  """The run's algorithm exactly as ``fl_train.train_federated`` builds it. A hospital
  (``server=False``) gets the same client update and no aggregator."""
  fns = models.build(config.model, num_classes)
  tx = steps.make_optimizer(config.optimizer)
  hp = fl_train.client_hparams(config)
  client_update = core.make_client_update(fns, tx, config.loss, num_classes, hp,
                                          augment=experiment.build_augment(config))
  aggregator, server_update = _no_aggregation, None
  if server:
    _, noise_mult = fl_train.privacy(config, num_clients)
    aggregator = fl_train.build_aggregator(config, num_clients, noise_mult)
    server_tx = server_opt.from_config(config.fl)
    server_update = server_opt.make_server_update(server_tx) if server_tx else None
  alg = core.supervised_algorithm(client_update, aggregator, fl_train.agg_kwargs(config),
                                  server_update, name=config.algorithm)
  init_key, round_key = jax.random.split(jax.random.PRNGKey(config.seed))
  return Federation(config, int(num_clients), int(num_classes), tuple(int(s) for s in sample_shape),
                    fns, alg, init_key, round_key)


def initial_state(fed: Federation) -> algorithm.ServerState:
  """Round 0's server state (train_federated's: same init key, ``init_from``, server optimiser)."""
  variables = fed.fns.init(fed.init_key, jnp.zeros((1,) + fed.sample_shape, jnp.float32))
  variables = fl_train.init_from(fed.config, variables)
  server_tx = server_opt.from_config(fed.config.fl)
  return algorithm.ServerState(variables, jnp.int32(0), server_opt.init(server_tx, variables))


def variables_like(fed: Federation):
  """Shapes/dtypes of the global model (what the server broadcasts)."""
  x = jax.ShapeDtypeStruct((1,) + fed.sample_shape, jnp.float32)
  return jax.eval_shape(fed.fns.init, fed.init_key, x)


def upload_like(fed: Federation):
  """(upload, stats) shapes of one hospital's client update: what it may send."""
  x = jax.ShapeDtypeStruct((1,) + fed.sample_shape, jnp.float32)
  y = jax.ShapeDtypeStruct((1,) + fed.sample_shape[:-1], jnp.int32)
  data = federated.ClientData(x, y, jax.ShapeDtypeStruct((1,), jnp.float32))
  upload, _, stats = jax.eval_shape(
      lambda b, d, k: fed.alg.client_update(b, (d, (), ()), k),
      variables_like(fed), data, fed.init_key)
  return upload, stats


def keys_of_round(fed: Federation, rnd):
  """(b_key, client keys [K], s_key, a_key) of round ``rnd`` (as ``algorithm.make_round``)."""
  r_key = jax.random.fold_in(fed.round_key, rnd)
  return algorithm.round_keys(fed.alg.key_scheme, r_key, fed.num_clients)


def client_step(fed: Federation):
  """Jitted ``(bcast, data_k, round, k) -> (upload_k, stats_k)``: hospital k's part of the round."""
  def step(bcast, data, rnd, k):
    _, c_keys, _, _ = keys_of_round(fed, rnd)
    upload, _, stats = fed.alg.client_update(bcast, (data, (), ()), c_keys[k])
    return upload, stats
  return jax.jit(step)


def broadcast_step(fed: Federation):
  """Jitted ``state -> bcast``: what the server sends every hospital."""
  def step(state):
    b_key, _, _, _ = keys_of_round(fed, state.round)
    bcast, _ = fed.alg.broadcast(state, (), b_key)
    return bcast
  return jax.jit(step)


def server_step(fed: Federation):
  """Jitted ``(state, upload [K], stats [K]) -> (state', info)``: the server's part of
  ``algorithm.make_round`` (aggregate + server update), info as make_round's."""
  alg = fed.alg

  def step(state, upload, stats):
    _, _, s_key, a_key = keys_of_round(fed, state.round)
    agg, weights, failed, info_a = alg.aggregate(state, upload, stats, a_key)
    new_state, info_s = alg.server_update(state, agg, failed, upload, state.clients, weights,
                                          (), s_key)
    info = {**stats, **info_a, **info_s, "weights": weights, "failed": failed,
            "included": weights > 0}
    return new_state, info
  return jax.jit(step)


# ---------------------------------------------------------------------------
# The wire.

def to_wire(tree) -> List[np.ndarray]:
  """A pytree's leaves as NumPy arrays in ``jax.tree.leaves`` order."""
  return [np.asarray(x) for x in jax.device_get(jax.tree.leaves(tree))]


def from_wire(arrays: Sequence[np.ndarray], like, what: str = "message"):
  """``arrays`` as a pytree shaped like ``like``; WireError on any count, shape or dtype
  mismatch."""
  leaves, treedef = jax.tree.flatten(like)
  if len(arrays) != len(leaves):
    raise WireError(f"{what}: {len(arrays)} arrays, expected {len(leaves)}")
  for i, (a, l) in enumerate(zip(arrays, leaves)):
    if tuple(a.shape) != tuple(l.shape) or np.dtype(a.dtype) != np.dtype(l.dtype):
      raise WireError(f"{what}: array {i} is {a.dtype}{list(a.shape)}, expected "
                      f"{np.dtype(l.dtype)}{list(l.shape)}")
  return jax.tree.unflatten(treedef, [np.asarray(a) for a in arrays])


def upload_to_wire(alg: algorithm.Algorithm, upload: Dict[str, Any]) -> List[np.ndarray]:
  """The declared upload entries (``alg.uploads`` order), each as its leaves."""
  if set(upload) != set(alg.uploads):
    raise WireError(f"{alg.name}: upload keys {sorted(upload)} differ from the declared "
                    f"uploads {list(alg.uploads)}")
  return [a for name in alg.uploads for a in to_wire(upload[name])]


def upload_from_wire(alg: algorithm.Algorithm, arrays: Sequence[np.ndarray], like,
                     what: str = "upload") -> Dict[str, Any]:
  out, i = {}, 0
  for name in alg.uploads:
    n = len(jax.tree.leaves(like[name]))
    out[name] = from_wire(arrays[i:i + n], like[name], f"{what} {name!r}")
    i += n
  if i != len(arrays):
    raise WireError(f"{what}: {len(arrays)} arrays, expected {i} (declared uploads "
                    f"{list(alg.uploads)})")
  return out


def stats_to_metrics(stats) -> Dict[str, float]:
  return {name: float(v) for name, v in jax.device_get(stats).items()}


def stats_from_metrics(metrics: Sequence[Dict[str, Any]], like) -> Dict[str, np.ndarray]:
  """The K hospitals' stat metrics (hospital order) as float32 [K] arrays named as ``like``."""
  for k, m in enumerate(metrics):
    if set(m) != set(like):
      raise WireError(f"hospital {k}: stats {sorted(m)}, expected {sorted(like)}")
  return {name: np.asarray([m[name] for m in metrics], np.dtype(like[name].dtype))
          for name in like}


# ---------------------------------------------------------------------------
# A hospital's own data.

@dataclasses.dataclass
class HospitalData:
  """One hospital's training data. data: x [N, ...], y [N, ...], valid [N] (no K axis)."""
  hospital: int
  site: str
  root: str
  train_patients: List[str]
  data: federated.ClientData
  num_classes: int
  sample_shape: Tuple[int, ...]


def hospital_split(patient_ids: Sequence[str], data_cfg, hospital: int,
                   seed: Optional[int] = None) -> Dict[str, List[str]]:
  """This hospital's train/val/test patients: the ones the pooled split
  (``preprocess.split_patients`` stratified by site) gives its site, the site being the
  ``hospital``-th in sorted order (``partition.by_site``'s client order). A site with
  fewer than 3 patients trains on all of them, as in the pooled split."""
  ids = sorted(patient_ids)
  if len(ids) < 3:
    return {"train": ids, "val": [], "test": []}
  split_seed = pipeline.resolve_split_seed(data_cfg, seed)
  return preprocess.split_patients(ids, split_seed + 7919 * (hospital + 1),
                                   data_cfg.val_fraction, data_cfg.test_fraction)


def load_hospital(config, hospital: int, root: Optional[str] = None,
                  verbose: bool = True) -> HospitalData:
  """Hospital ``hospital``'s train data, read from its own folder only (``root``, else
  config.data.root); the folder must hold the patients of one site."""
  data_cfg = config.data.copy_and_resolve_references()
  with data_cfg.unlocked():
    if root:
      data_cfg.root = root
  if not data_cfg.root:
    raise ValueError("a hospital reads its own data folder: pass --data_root (or set "
                     "config.data.root); the phantom of data.root='' holds every site "
                     "(python -m fedjax_seg.flower.localhost split writes one folder per site)")
  ds = pipeline.build_dataset(data_cfg, verbose=verbose, seed=config.seed)
  sites = sorted({p.site for p in ds.patients.values()})
  if len(sites) != 1:
    raise ValueError(f"{ds.root}: a hospital's folder holds one site's patients, found sites "
                     f"{sites}")
  train_ids = hospital_split(list(ds.patients), data_cfg, hospital, config.seed)["train"]
  n_lab = int(config.fl.labelled_patients)
  if n_lab > 0:  # the same nested subset as the pooled run (seeded by (label_seed, k))
    train_ids = fl_train.labelled_subset([[]] * hospital + [train_ids], n_lab,
                                         int(config.fl.label_seed))[hospital]
  stacked = federated.stack_clients([ds.arrays(train_ids)],
                                    min_rows=int(config.fl.pad_rows))
  data = jax.tree.map(lambda a: a[0], stacked)
  return HospitalData(hospital, sites[0], ds.root, list(train_ids), data, ds.num_classes,
                      tuple(int(s) for s in data.x.shape[1:]))


def start_cli(args) -> None:
  """The first step of the server and hospital commands inside ``app.run``: no positional
  arguments; absl logging at WARNING unless ``--verbosity`` was given."""
  from absl import app, flags, logging
  if len(args) > 1:
    raise app.UsageError(f"unexpected arguments: {args[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def quiet_flower_logs() -> None:
  """Flower's INFO lines once (its own handler), not again through absl's root handler."""
  import logging
  logging.getLogger("flwr").propagate = False


def exit_now(code: int = 0) -> None:
  """Ends a server or hospital process once its work is on disk: flushes the logs and
  exits without the interpreter's teardown (the XLA and gRPC destructors take seconds on
  a small machine, and every result file is already written and closed)."""
  import logging
  import os
  import sys
  logging.shutdown()
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):
      pass
  os._exit(code)
