"""Federated semi-supervised segmentation: labelled-fraction plumbing (SPEC
§1.6), the baselines of SPEC §4.2 and FedWeP, all combined with FedAvg in ONE
jitted program per round.

Scenarios (``config.semi.scenario``):
  label_at_client   every client holds labelled AND unlabelled patients; the
                    labelled ones are ``label_fraction`` of all train patients,
                    allotted to clients in proportion to their size
                    (:func:`split_label_at_client`).
  label_at_server   the server holds ``label_fraction`` of the train patients
                    (labelled); the remaining patients are partitioned over
                    the clients, unlabelled (:func:`split_label_at_server`).
                    Each round ends with ``server_steps`` supervised steps on
                    the server's data.

Round (all methods):

    ctx          = round_context(state, server data, key)     FedWeP: seed search
    M_k, st_k    = client_update((M, ctx), (L_k, U_k), key_k)  for every k
    M            = aggregators.fedavg(M, stack(M_k), stack(st_k))
    M            = server_update(M, server data)               label_at_server only

Methods (``config.algorithm``), each + FedAvg; M is a dict of communicated models:

  supervised_only  {'model'}          Dice+CE on labelled data only. With
                                      label_fraction = 1 and label_at_client it is
                                      the fully supervised FedAvg upper bound; with
                                      label_at_server the clients are idle (nothing
                                      to learn from) and it is the server alone.
  fedwep[_real|_random] {'model'} + 2 seeds   sup(W) + λ(t)·L_RWP(W̃_1, W̃_2)  (fedwep.py)
  cps              {'a', 'b'}         Cross Pseudo Supervision (Chen et al. 2021): two
                                      differently initialised models (a and b from two
                                      halves of a split key), sup(a)+sup(b) +
                                      λ(t)·[CE(f_a, Ŷ_b) + CE(f_b, Ŷ_a)] on the unlabelled
                                      batch and, as in the paper (``cps_on_labelled``,
                                      default), on the labelled batch too (the logits
                                      of the supervised pass); both communicated.
  mean_teacher     {'student','teacher'}  Mean Teacher (Tarvainen & Valpola 2017):
                                      sup(student) + λ(t)·MSE(softmax f_s(U + noise),
                                      sg(softmax f_t(U))), teacher ← EMA of student
                                      after every step at decay min(1 − 1/(t+1), α)
                                      (``mt_ema_warmup``, default; t = global step
                                      count, :func:`ema_steps_before`), or at α;
                                      both communicated (the seed's Cost column:
                                      MT 100%). Evaluated: teacher (the student is
                                      reported beside it).
  pseudoseg        {'model'}          FixMatch-style pseudo-labelling ("FixMatch-style
                                      PS" in the tables): Ŷ = sg(argmax f(U)) of the
                                      weak view kept where max-softmax ≥ τ, trained on a
                                      strongly (intensity/noise) augmented view. Not
                                      PseudoSeg (Zou et al. 2021): no CAM / decoder
                                      pseudo-label fusion.

λ(t) = unsup_weight · exp(−5 (1 − min(t, T)/T)²), T = rampup_rounds (λ = unsup_weight
when T = 0). Before ``client_start_round`` clients return the received model
unchanged (a warm-up that lets the server's supervised steps produce a
model worth pseudo-labelling with in label_at_server).

Unlabelled client arrays carry all-zero label arrays: the true masks of
unlabelled patients never enter the training program.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_seg import losses
from fedjax_seg.data.federated import ClientData, sample_batch, stack_clients
from fedjax_seg.fl import aggregators, algorithm, core, fedwep, local
from fedjax_seg.models import ModelFns

SCENARIOS = ("label_at_client", "label_at_server")
FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2)
METHODS = ("supervised_only", "fedwep", "fedwep_real", "fedwep_random", "cps",
           "mean_teacher", "pseudoseg")
# communicated models per method; evaluated model
MODELS = {"supervised_only": ("model",), "fedwep": ("model",), "fedwep_real": ("model",),
          "fedwep_random": ("model",), "pseudoseg": ("model",), "cps": ("a", "b"),
          "mean_teacher": ("student", "teacher")}
TRAINABLE = {"cps": ("a", "b"), "mean_teacher": ("student",)}
EVAL_MODEL = {"cps": "a", "mean_teacher": "teacher"}


def is_fedwep(method: str) -> bool:
  return method.startswith("fedwep")


# ---------------------------------------------------------------------------
# Labelled fractions and scenarios (SPEC §1.6), pure functions of (ids, fraction, seed).

def num_labelled(n: int, fraction: float, minimum: int = 1) -> int:
  """round(fraction · n), at least ``minimum`` (and at most n)."""
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"config.semi.label_fraction={fraction}: expected 0 < f <= 1")
  return int(min(n, max(minimum, int(np.floor(fraction * n + 0.5)))))


def split_label_at_client(client_ids: Sequence[Sequence[str]], fraction: float, seed: int,
                          minimum: int = 1) -> Tuple[List[List[str]], List[List[str]]]:
  """Labelled / unlabelled patients per client.

  m = round(fraction · N) patients are labelled in total (N = all clients'
  patients, m >= ``minimum``), allotted to clients in proportion to their
  size by largest remainder, then drawn at random within each client.
  Returns (labelled [K][...], unlabelled [K][...]).
  """
  sizes = np.array([len(c) for c in client_ids], float)
  m = num_labelled(int(sizes.sum()), fraction, minimum)
  quota = m * sizes / max(sizes.sum(), 1.0)
  alloc = np.floor(quota).astype(int)
  for k in np.argsort(-(quota - alloc), kind="stable")[: m - alloc.sum()]:
    alloc[k] += 1
  rng = np.random.default_rng(seed)
  lab, unl = [], []
  for k, ids in enumerate(client_ids):
    ids = sorted(ids)
    order = rng.permutation(len(ids))
    pick = set(order[: alloc[k]].tolist())
    lab.append([p for i, p in enumerate(ids) if i in pick])
    unl.append([p for i, p in enumerate(ids) if i not in pick])
  return lab, unl


def split_label_at_server(train_ids: Sequence[str], fraction: float, seed: int,
                          strata: Optional[Dict[str, str]] = None,
                          minimum: int = 1) -> Tuple[List[str], List[str]]:
  """(server labelled patients, remaining patients for the clients).

  m = round(fraction · N) patients (>= ``minimum``) go to the server, drawn
  round-robin over the strata (sites) in a seeded random order so every
  site contributes (as far as m allows).
  """
  ids = sorted(train_ids)
  m = num_labelled(len(ids), fraction, minimum)
  rng = np.random.default_rng(seed)
  groups: Dict[str, List[str]] = {}
  for p in ids:
    groups.setdefault((strata or {}).get(p, ""), []).append(p)
  queues = {g: [v[i] for i in rng.permutation(len(v))] for g, v in sorted(groups.items())}
  order = [g for g in sorted(queues)]
  order = [order[i] for i in rng.permutation(len(order))]
  server: List[str] = []
  while len(server) < m:
    for g in order:
      if queues[g] and len(server) < m:
        server.append(queues[g].pop(0))
  rest = [p for p in ids if p not in set(server)]
  return sorted(server), rest


# ---------------------------------------------------------------------------
# Arrays.

@flax.struct.dataclass
class ClientPair:
  """One client's (or all clients', leading K) labelled and unlabelled data."""
  lab: ClientData
  unl: ClientData


@flax.struct.dataclass
class SemiData:
  """clients: ClientPair [K, ...]; server: ClientData [1, M, ...] (valid all 0 when
  the server holds no data)."""
  clients: ClientPair
  server: ClientData


def empty_client_data(k: int, sample_shape, label_shape, rows: int = 1) -> ClientData:
  return ClientData(jnp.zeros((k, rows) + tuple(sample_shape), jnp.float32),
                    jnp.zeros((k, rows) + tuple(label_shape), jnp.int32),
                    jnp.zeros((k, rows), jnp.float32))


def stack_or_empty(per_client, sample_shape, label_shape, min_rows: int = 1,
                   host: bool = False) -> ClientData:
  if all(len(x) == 0 for x, _ in per_client):
    empty = empty_client_data(len(per_client), sample_shape, label_shape, max(min_rows, 1))
    return jax.tree.map(np.asarray, empty) if host else empty
  return stack_clients(per_client, min_rows=min_rows, host=host)


def build_semi_data(arrays: Callable, lab_ids, unl_ids, server_ids, sample_shape, label_shape,
                    pad_rows: int = 0, host: bool = False) -> SemiData:
  """arrays(ids) -> (x [n, ...], y [n, ...]) pooled slices of patients.

  Unlabelled labels are replaced by zeros (never seen by training).
  pad_rows: pad every array to at least this many rows (equal shapes across
  label fractions → one compiled round for a whole sweep). host: the clients' arrays as
  host NumPy (streamed to the device in chunks, fl/scale.py).
  """
  lab = [arrays(ids) for ids in lab_ids]
  unl = [(x, np.zeros_like(y)) for x, y in (arrays(ids) for ids in unl_ids)]
  clients = ClientPair(stack_or_empty(lab, sample_shape, label_shape, pad_rows, host),
                       stack_or_empty(unl, sample_shape, label_shape, pad_rows, host))
  server = stack_or_empty([arrays(server_ids)], sample_shape, label_shape, pad_rows)
  return SemiData(clients, server)


# ---------------------------------------------------------------------------
# Hyper-parameters.

@dataclasses.dataclass(frozen=True)
class SemiHParams:
  """Every field from ``config`` (fl/semi_train.hparams); no defaults here: they live in
  configs/lgg_fedwep.py get_semi_config()."""
  method: str
  scenario: str
  loss: str                 # supervised loss
  unsup_weight: float
  rampup_rounds: int
  client_start_round: int
  unlabelled_batch_size: int
  server_steps: int
  server_batch_size: int
  # FedWeP
  p: float
  sigma: float
  num_seeds: int
  search_size: int
  search_inputs: str
  pair_criterion: str
  search_strategy: str      # 'vmap' | 'unrolled': the N perturbed models of the search
  pseudo: str
  # ℓ on hard pseudo-labels (FedWeP, CPS, PseudoSeg): 'ce' (SPEC) | 'dice_ce'
  pseudo_loss: str
  # CPS: the cross pseudo-supervision loss on the labelled batch too (Chen et al. 2021);
  # False = unlabelled batch only (the behaviour before this option)
  cps_on_labelled: bool
  # Mean Teacher
  ema_decay: float
  # decay_t = min(1 − 1/(t+1), ema_decay), t = global step count (Tarvainen & Valpola 2017);
  # False = ema_decay from the first step (the behaviour before this option)
  mt_ema_warmup: bool
  mt_noise: float
  # PseudoSeg
  threshold: float
  strong_noise: float
  strong_intensity: float

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"config.algorithm={self.method!r}: semi-supervised methods are {METHODS}")
    if self.scenario not in SCENARIOS:
      raise ValueError(f"config.semi.scenario={self.scenario!r}: expected one of {SCENARIOS}")
    if self.pseudo_loss not in fedwep.PSEUDO_LOSSES:
      raise ValueError(f"config.semi.pseudo_loss={self.pseudo_loss!r}: expected one of "
                       f"{fedwep.PSEUDO_LOSSES}")
    if is_fedwep(self.method):
      if self.search_inputs not in fedwep.SEARCH_INPUTS:
        raise ValueError(f"config.semi.fedwep.search_inputs={self.search_inputs!r}: expected "
                         f"one of {fedwep.SEARCH_INPUTS} (or 'auto')")
      if self.search_inputs == "real" and self.scenario != "label_at_server":
        raise ValueError("FedWeP-Real needs server images: config.semi.scenario must be "
                         "'label_at_server' (or set config.semi.fedwep.search_inputs='random')")
      if self.pair_criterion not in fedwep.PAIR_CRITERIA:
        raise ValueError(f"config.semi.fedwep.pair_criterion={self.pair_criterion!r}: expected "
                         f"one of {fedwep.PAIR_CRITERIA}")
      if self.num_seeds < 2:
        raise ValueError(f"config.semi.fedwep.num_seeds={self.num_seeds}: need >= 2")
      if not 0.0 <= self.p <= 1.0 or self.sigma < 0:
        raise ValueError(f"config.semi.fedwep: need 0 <= p <= 1 and sigma >= 0, got "
                         f"p={self.p}, sigma={self.sigma}")

  @property
  def models(self) -> Tuple[str, ...]:
    return MODELS[self.method]

  @property
  def trainable(self) -> Tuple[str, ...]:
    return TRAINABLE.get(self.method, ("model",))

  @property
  def eval_model(self) -> str:
    return EVAL_MODEL.get(self.method, "model")

  @property
  def unsupervised(self) -> bool:
    return self.method != "supervised_only"

  @property
  def clients_idle(self) -> bool:
    """label_at_server clients have no labels: a purely supervised method has nothing to do there."""
    return self.scenario == "label_at_server" and not self.unsupervised


def rampup(t, hp: SemiHParams):
  """λ(t) = unsup_weight · exp(−5 (1 − min(t, T)/T)²) (Laine & Aila 2017 ramp)."""
  if hp.rampup_rounds <= 0:
    return jnp.float32(hp.unsup_weight)
  r = jnp.clip(jnp.asarray(t, jnp.float32) / hp.rampup_rounds, 0.0, 1.0)
  return hp.unsup_weight * jnp.exp(-5.0 * (1.0 - r) ** 2)


# ---------------------------------------------------------------------------
# Communication accounting.

def comm_bytes(hp: SemiHParams, model_nbytes: int) -> Dict[str, int]:
  """Bytes per client per round: {'down', 'up', 'total'}.

  FedWeP: down = 1 model + 2 int32 seeds, up = 1 model. CPS / MT: 2 models
  each way. Supervised / PseudoSeg: 1 model each way. label_at_server
  supervised_only: 0 (the clients are idle; it is the server alone).
  """
  if hp.clients_idle:
    return {"down": 0, "up": 0, "total": 0}
  n = len(hp.models)
  down = n * model_nbytes + (2 * fedwep.SEED_BYTES if is_fedwep(hp.method) else 0)
  up = n * model_nbytes
  return {"down": down, "up": up, "total": down + up}


def cost_percent(hp: SemiHParams, model_nbytes: int) -> float:
  """Traffic per client per round relative to exchanging two models both ways (CPS = 100%)."""
  return 100.0 * comm_bytes(hp, model_nbytes)["total"] / (4.0 * model_nbytes)


# ---------------------------------------------------------------------------
# Models and losses.

def init_models(hp: SemiHParams, fns: ModelFns, key: jax.Array, x0: jnp.ndarray) -> Dict[str, Any]:
  """The communicated models: CPS gets two independent initialisations (a and b from
  the two halves of ``jax.random.split(key)``, so neither equals the single model the
  other methods initialise from ``key``); Mean Teacher's teacher starts equal to the
  student."""
  if hp.method == "cps":
    ka, kb = jax.random.split(key)
    return {"a": fns.init(ka, x0), "b": fns.init(kb, x0)}
  if hp.method == "mean_teacher":
    v = fns.init(key, x0)
    # a copy, not the same arrays: the round donates its state, and XLA refuses to
    # donate one buffer twice (JaxRuntimeError 'Attempt to donate the same buffer twice')
    return {"student": v, "teacher": jax.tree.map(jnp.copy, v)}
  return {"model": fns.init(key, x0)}


def ema_steps_before(hp: SemiHParams, rnd, client_steps: int):
  """The global step count of the teacher at the start of round ``rnd``: the EMA updates
  the global teacher went through along one client's path, i.e. E = ``client_steps``
  per round in which the clients were active (rounds >= client_start_round) plus, in
  label_at_server, ``server_steps`` per round. The server state's round counter carries
  it across rounds (and through checkpoints): every client takes the same E steps."""
  rnd = jnp.asarray(rnd, jnp.int32)
  n = jnp.maximum(rnd - hp.client_start_round, 0) * client_steps
  if hp.scenario == "label_at_server":
    n = n + rnd * hp.server_steps
  return n


def ema_decay_at(hp: SemiHParams, t):
  """The decay of the t-th EMA update (t = 1 for the first): min(1 − 1/(t+1), α) with
  ``mt_ema_warmup`` (the teacher is then the plain mean of the initial weights and the
  student iterates until 1 − 1/(t+1) reaches α), else α."""
  if not hp.mt_ema_warmup:
    return jnp.float32(hp.ema_decay)
  t = jnp.asarray(t, jnp.float32)
  return jnp.minimum(1.0 - 1.0 / (t + 1.0), hp.ema_decay)


EMA_T = "_ema_t"   # the step counter riding in Mean Teacher's local-training state


def with_step(hp: SemiHParams, models, t0):
  """Mean Teacher: the models plus the EMA step counter for ``local_train`` (others: as is)."""
  if hp.method != "mean_teacher":
    return models
  return {**models, EMA_T: jnp.asarray(t0, jnp.int32)}


def without_step(models):
  return {k: v for k, v in models.items() if k != EMA_T}


def strong_augment(key, x, intensity: float, noise: float):
  """Label-preserving photometric 'strong' view: per-sample gain/offset + Gaussian noise."""
  kg, ko, kn = jax.random.split(key, 3)
  b = x.shape[0]
  shape = (b,) + (1,) * (x.ndim - 1)
  gain = 1.0 + jax.random.uniform(kg, shape, minval=-intensity, maxval=intensity)
  off = jax.random.uniform(ko, shape, minval=-intensity / 2, maxval=intensity / 2)
  return x * gain + off + noise * jax.random.normal(kn, x.shape)


def _masked_mse(a, b, mask):
  """mean over valid samples of mean_{pixels, classes} (a − b)²; mask [B]."""
  per = jnp.mean((a - b) ** 2, axis=tuple(range(1, a.ndim)))
  w = mask.astype(jnp.float32)
  return jnp.sum(per * w) / jnp.maximum(jnp.sum(w), 1.0)


class Objective:
  """Loss pieces of one method over a dict of models.

  params: {name: params} for the trainable models; models: all communicated
  variables (non-param collections and non-trainable models such as MT's teacher).
  """

  def __init__(self, hp: SemiHParams, fns: ModelFns, num_classes: int):
    self.hp, self.fns, self.num_classes = hp, fns, num_classes
    self.sup_fn = losses.get_loss(hp.loss)

  def _train_apply(self, variables, x, key):
    return self.fns.apply(variables, x, train=True, key=key)

  def supervised(self, params, models, x, y, mask, key, return_logits: bool = False):
    """Σ_{trainable} sup(f(x; W)); returns (loss, new non-param collections)
    [, {name: logits}]."""
    total, new, out = 0.0, {}, {}
    for i, name in enumerate(self.hp.trainable):
      v = {**models[name], "params": params[name]}
      logits, nv = self._train_apply(v, x, jax.random.fold_in(key, i))
      total = total + self.sup_fn(logits, y, self.num_classes, mask)
      new[name], out[name] = nv, logits
    return (total, new, out) if return_logits else (total, new)

  def labelled_unsupervised(self, logits, mask):
    """The unlabelled loss a method also applies to the labelled batch, from the
    supervised pass's logits: CPS with ``cps_on_labelled`` (Chen et al. 2021,
    L = L_s + λ(L_cps^l + L_cps^u)); 0 otherwise."""
    hp = self.hp
    if hp.method == "cps" and hp.cps_on_labelled:
      return fedwep.cross_pseudo_loss(logits["a"], logits["b"], mask, "hard", hp.pseudo_loss)
    return jnp.float32(0.0)

  def unsupervised(self, params, models, x, mask, ctx, key):
    """The method's unlabelled loss (scalar) and a dict of scalar diagnostics."""
    hp = self.hp
    apply_t = lambda v, xx, k: self._train_apply(v, xx, k)[0]
    if is_fedwep(hp.method):
      v = {**models["model"], "params": params["model"]}
      return fedwep.rwp_loss(apply_t, v, x, mask, ctx["seeds"], hp.p, hp.sigma, key,
                             hp.pseudo, hp.pseudo_loss, ctx.get("z")), {}
    if hp.method == "cps":
      ka, kb = jax.random.split(key)
      la = apply_t({**models["a"], "params": params["a"]}, x, ka)
      lb = apply_t({**models["b"], "params": params["b"]}, x, kb)
      return fedwep.cross_pseudo_loss(la, lb, mask, "hard", hp.pseudo_loss), {}
    if hp.method == "mean_teacher":
      kn, kd = jax.random.split(key)
      xs = x + hp.mt_noise * jax.random.normal(kn, x.shape)
      ls = apply_t({**models["student"], "params": params["student"]}, xs, kd)
      lt, _ = self.fns.apply(models["teacher"], x, train=False)
      pt = jax.lax.stop_gradient(jax.nn.softmax(lt, -1))
      return _masked_mse(jax.nn.softmax(ls, -1), pt, mask), {}
    if hp.method == "pseudoseg":
      ka, kd = jax.random.split(key)
      v = {**models["model"], "params": params["model"]}
      lw, _ = self.fns.apply(v, x, train=False)
      pw = jax.lax.stop_gradient(jax.nn.softmax(lw, -1))
      y_hat = jnp.argmax(pw, -1)
      keep = (jnp.max(pw, -1) >= hp.threshold).astype(jnp.float32)
      keep = keep * mask.reshape(mask.shape + (1,) * (keep.ndim - 1))
      xs = strong_augment(ka, x, hp.strong_intensity, hp.strong_noise)
      ls = apply_t(v, xs, kd)
      frac = jnp.sum(keep) / jnp.maximum(jnp.sum(jnp.ones_like(keep) * mask.reshape(
          mask.shape + (1,) * (keep.ndim - 1))), 1.0)
      return fedwep.hard_pseudo_loss(ls, y_hat, keep, hp.pseudo_loss), {"confident_fraction": frac}
    return jnp.float32(0.0), {}

  def after_step(self, models):
    """Mean Teacher: θ_t ← α_t θ_t + (1 − α_t) θ_s after every optimiser step, α_t =
    :func:`ema_decay_at` of the step count ``models[EMA_T]`` + 1 (:func:`with_step`)."""
    if self.hp.method != "mean_teacher":
      return models
    t = models[EMA_T] + 1
    a = ema_decay_at(self.hp, t)
    tp = jax.tree.map(lambda tp, sp: a * tp + (1 - a) * sp, models["teacher"]["params"],
                      models["student"]["params"])
    return {**models, "teacher": {**models["teacher"], "params": tp}, EMA_T: t}


def _set_params(models, params, new_state):
  out = dict(models)
  for name, p in params.items():
    out[name] = {**new_state.get(name, models[name]), "params": p}
  return out


# ---------------------------------------------------------------------------
# Client update, server update, round.

def make_client_update(hp: SemiHParams, fns: ModelFns, tx: optax.GradientTransformation,
                       num_classes: int, chp: core.ClientHParams) -> Callable:
  """``client_update((models, ctx), ClientPair, key) -> (models', stats)``.

  E = chp.local_steps steps, each on a labelled batch (chp.batch_size, from L_k)
  and an unlabelled batch (hp.unlabelled_batch_size, from U_k):
      loss = sup(L_k batch) + λ(t) · unsup(U_k batch)
  (sup is skipped statically in label_at_server, where clients hold no labels).
  (CPS with cps_on_labelled adds its cross pseudo-supervision loss on the labelled
  batch to unsup.) Mean Teacher's EMA decay follows the global step count
  (:func:`ema_steps_before` of the broadcast round).
  stats: num_samples (the FedAvg s_k: |L_k| + |U_k|, or |L_k| for supervised_only),
  train_loss, sup_loss, unsup_loss.
  """
  obj = Objective(hp, fns, num_classes)
  has_labels = hp.scenario == "label_at_client"
  trainable = _trainable(hp)

  def client_update(bcast, data: ClientPair, key):
    models, ctx = bcast
    # FedAvg's s_k: the samples the client learns from (labelled only for supervised_only)
    n_samples = jnp.sum(data.lab.valid) + (jnp.sum(data.unl.valid) if hp.unsupervised else 0.0)
    if hp.clients_idle:
      z = jnp.float32(0.0)
      return models, {"num_samples": n_samples, "train_loss": z, "sup_loss": z, "unsup_loss": z}
    lam = rampup(ctx["round"] + 1, hp)
    active = ctx["round"] >= hp.client_start_round
    if is_fedwep(hp.method) and hp.unsupervised:
      # the round's two perturbations, drawn once here rather than at every local step
      # (Z depends on the seed pair and the shapes only): the same losses and gradients
      ctx = {**ctx, "z": fedwep.perturbations(models["model"]["params"], ctx["seeds"],
                                              hp.p, hp.sigma)}

    def loss_fn(params, models, k):
      kl, ku, kd = jax.random.split(k, 3)
      xl, yl, ml = sample_batch(data.lab, kl, chp.batch_size)
      xu, _, mu = sample_batch(data.unl, ku, hp.unlabelled_batch_size)
      ks, kun = jax.random.split(kd)
      sup, new_state, logits_l = (obj.supervised(params, models, xl, yl, ml, ks, True)
                                  if has_labels else (jnp.float32(0.0), {}, {}))
      uns = jnp.float32(0.0)
      if hp.unsupervised:
        uns, _ = obj.unsupervised(params, models, xu, mu, ctx, kun)
      if has_labels:
        uns = uns + obj.labelled_unsupervised(logits_l, ml)
      return sup + lam * uns, (new_state, (sup, uns))

    start = with_step(hp, models, ema_steps_before(hp, ctx["round"], chp.local_steps))
    new_models, _, (values, (sups, unss)) = local.local_train(
        loss_fn, tx, start, jax.random.split(key, chp.local_steps),
        strategy=chp.step_strategy, after_step=obj.after_step, **trainable)
    new_models = jax.tree.map(lambda new, old: jnp.where(active, new, old),
                              without_step(new_models), models)
    return new_models, {"num_samples": n_samples, "train_loss": jnp.mean(values),
                        "sup_loss": jnp.mean(sups), "unsup_loss": jnp.mean(unss)}
  return client_update


def _trainable(hp: SemiHParams) -> Dict[str, Callable]:
  """local_train's params/merge for a dict of named models, of which hp.trainable step."""
  return {"params": lambda models: {n: models[n]["params"] for n in hp.trainable},
          "merge": lambda models, new_state, params: _set_params(models, params, new_state)}


def make_server_update(hp: SemiHParams, fns: ModelFns, tx: optax.GradientTransformation,
                       num_classes: int, step_strategy: str = "auto",
                       client_steps: int = 0) -> Callable:
  """``server_update(models, server ClientData [1, M, ...], key, rnd=0) -> (models', loss)``:
  hp.server_steps supervised steps (fresh optimiser state) on the server's
  labelled patients, for every trainable model (MT: teacher EMA follows, its step count
  continuing after the round's ``client_steps`` client steps)."""
  obj = Objective(hp, fns, num_classes)

  def server_update(models, server: ClientData, key, rnd=0):
    data = jax.tree.map(lambda a: a[0], server)
    rnd = jnp.asarray(rnd, jnp.int32)
    t0 = ema_steps_before(hp, rnd, client_steps) + jnp.where(
        rnd >= hp.client_start_round, client_steps, 0)

    def loss_fn(params, models, k):
      kb, kd = jax.random.split(k)
      x, y, m = sample_batch(data, kb, hp.server_batch_size)
      value, new_state = obj.supervised(params, models, x, y, m, kd)
      return value, (new_state, ())

    models, _, (vals, _) = local.local_train(
        loss_fn, tx, with_step(hp, models, t0), jax.random.split(key, hp.server_steps),
        strategy=step_strategy, after_step=obj.after_step, **_trainable(hp))
    return without_step(models), jnp.mean(vals)
  return server_update


def make_round_context(hp: SemiHParams, fns: ModelFns) -> Callable:
  """``ctx(models, round, server ClientData, key) -> dict`` broadcast to every client.

  FedWeP: candidate seeds from the key, search set X (real server images or
  random inputs), the chosen seed pair and its similarity statistics.
  """
  def context(models, rnd, server: ClientData, key):
    ctx = {"round": rnd}
    if not is_fedwep(hp.method):
      return ctx, {}
    kc, kx = jax.random.split(key)
    seeds = fedwep.candidate_seeds(kc, hp.num_seeds)
    x = fedwep.search_set(hp.search_inputs, kx, hp.search_size, server.x.shape[2:],
                          server.x[0], server.valid[0])
    apply_eval = lambda v, xx: fns.apply(v, xx, train=False)[0]
    pair, info = fedwep.search_seeds(apply_eval, models["model"], x, seeds, hp.p, hp.sigma,
                                     hp.pair_criterion, hp.search_strategy)
    ctx["seeds"] = pair
    return ctx, {"seeds": pair, "c_star": info["c_star"], "c_mean": info["c_mean"]}
  return context


def make_algorithm(hp: SemiHParams, fns: ModelFns, tx: optax.GradientTransformation,
                   num_classes: int, chp: core.ClientHParams,
                   server_tx: Optional[optax.GradientTransformation] = None,
                   aggregator: Optional[Callable] = None,
                   agg_kwargs: Optional[Dict[str, Any]] = None,
                   server_opt_update: Optional[Callable] = None) -> algorithm.Algorithm:
  """The semi-supervised method ``hp.method`` as an ``Algorithm`` (fl/algorithm.py).

  broadcast: the models and the round context (FedWeP's seed pair); clients upload
  their dict of models; ``aggregator`` (default FedAvg; robust / DP / secure
  aggregation wrap it like any single-model uploader) averages them; in
  label_at_server the server then runs its supervised steps (``server_tx``,
  default ``tx``). ``server_opt_update`` (fl/server_opt.py) turns the average into
  the next models by a server optimiser over every model's params
  (:func:`params_view`). Round data: :class:`SemiData`. With the FedAvg aggregator
  (robust or not) it declares ``fedavg_model`` (clients can be streamed in chunks,
  fl/scale.make_chunked_algorithm_round) unless its clients are idle.
  """
  client_update = make_client_update(hp, fns, tx, num_classes, chp)
  server_steps = (make_server_update(hp, fns, server_tx or tx, num_classes, chp.step_strategy,
                                     chp.local_steps) if hp.scenario == "label_at_server" else None)
  context = make_round_context(hp, fns)
  averaged = core.model_aggregate(aggregator or aggregators.fedavg, agg_kwargs)

  def broadcast(state, server, key):
    ctx, ctx_info = context(state.variables, state.round, server, key)
    return (state.variables, ctx), ctx_info

  def client(bcast, inp, key):
    data, client_state, _ = inp
    models, stats = client_update(bcast, data, key)
    return {"model": models}, client_state, stats

  def aggregate(state, upload, stats, a_key):
    if hp.clients_idle:  # clients hold nothing to learn from: the server's model stays
      return state.variables, jnp.zeros_like(stats["num_samples"]), jnp.bool_(False), {}
    return averaged(state, upload, stats, a_key)

  def server_update(state, agg, failed, upload, clients, weights, server, key, **_):
    server_loss = jnp.float32(jnp.nan)
    opt_state = state.server_opt_state
    if server_opt_update is not None:
      new_p, opt_state = server_opt_update(
          state.replace(variables=params_view(state.variables)), params_view(agg), failed)
      agg = {n: {**agg[n], "params": new_p["params"][n]} for n in agg}
    if server_steps is not None:
      agg, server_loss = server_steps(agg, server, key, state.round)
    new = state.replace(variables=agg, round=state.round + 1, clients=clients,
                        server_opt_state=opt_state)
    return new, {"server_loss": server_loss, "active": state.round >= hp.client_start_round}

  return algorithm.Algorithm(hp.method, ("model",), client, aggregate, broadcast=broadcast,
                             server_update=server_update,
                             split_data=lambda d: (d.clients, d.server), key_scheme="split3",
                             fedavg_model=not hp.clients_idle)


def params_view(models) -> Dict[str, Any]:
  """{'params': {name: models[name]['params']}}: a dict of models as one model's
  variables, for the server optimisers of fl/server_opt.py."""
  return {"params": {n: m["params"] for n, m in models.items()}}


def make_run_round(hp: SemiHParams, fns: ModelFns, tx: optax.GradientTransformation,
                   num_classes: int, chp: core.ClientHParams,
                   client_strategy: str = "auto",
                   server_tx: Optional[optax.GradientTransformation] = None,
                   aggregator: Optional[Callable] = None,
                   agg_kwargs: Optional[Dict[str, Any]] = None,
                   server_opt_update: Optional[Callable] = None) -> Callable:
  """``run_round(state, SemiData, key) -> (state', info)`` of :func:`make_algorithm`
  through any ``backends.for_each_client`` backend — jit it once."""
  return algorithm.make_round(make_algorithm(hp, fns, tx, num_classes, chp, server_tx,
                                             aggregator, agg_kwargs, server_opt_update),
                              client_strategy)
