"""Config validation before a run touches its workdir: one table of rules, then the
checks that involve several keys.

    from fedjax_seg import validate
    validate.check(config)          # ValueError: "config.fl.rounds=0: must be an integer >= 1"

``RULES`` maps a dotted config key to a rule: :class:`Int` / :class:`Number` (a range),
:class:`OneOf` (allowed values; a callable gives the set from the registry that defines
it, read when the rule is checked), :class:`Satisfies` (a predicate). :func:`check`
walks every leaf of the config; a leaf whose key has a rule that fails raises a
:class:`ConfigError` (a ``ValueError``) whose message is exactly
``config.<key>=<value!r>: <why>``, which ``launch.py`` prints as ``error: <message>``
and exits 2. A key without a rule is accepted as it is: a new config key needs no
entry here, and adding one is one line::

    from fedjax_seg.validate import RULES, Int
    RULES["fl.my_new_key"] = Int(lo=1)

``CROSS_CHECKS`` are the checks over several keys (a required key is missing, the
image size does not halve ``model.depth - 1`` times, the split fractions add up to
1 or more, ...); they raise the same message format, naming the key at fault.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import numbers
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union


class ConfigError(ValueError):
  """A config value that no run can use: ``config.<key>=<value>: <why>``."""

  def __init__(self, key: str, value: Any, why: str):
    self.key, self.value, self.why = key, value, why
    super().__init__(f"config.{key}={value!r}: {why}")


# ---------------------------------------------------------------------------
# Rules.
# ---------------------------------------------------------------------------
def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _fmt_num(x) -> str:
  return repr(x) if isinstance(x, float) and not float(x).is_integer() else str(int(x))


@dataclasses.dataclass(frozen=True)
class Number:
  """A finite real number in a range: ``lo <= v`` (``lo < v`` with ``lo_open``),
  ``v <= hi`` (``v < hi`` with ``hi_open``); ``integer``: an int (not a bool);
  ``optional``: None is accepted (an unset key)."""
  lo: Optional[float] = None
  hi: Optional[float] = None
  lo_open: bool = False
  hi_open: bool = False
  integer: bool = False
  optional: bool = False

  def describe(self) -> str:
    what = "an integer" if self.integer else "a finite number"
    if self.lo is not None and self.hi is not None:
      return (f"must be {what} in {'(' if self.lo_open else '['}{_fmt_num(self.lo)}, "
              f"{_fmt_num(self.hi)}{')' if self.hi_open else ']'}")
    if self.lo is not None:
      return f"must be {what} {'>' if self.lo_open else '>='} {_fmt_num(self.lo)}"
    if self.hi is not None:
      return f"must be {what} {'<' if self.hi_open else '<='} {_fmt_num(self.hi)}"
    return f"must be {what}"

  def check(self, v) -> Optional[str]:
    if v is None and self.optional:
      return None
    if not (_is_int(v) if self.integer else _is_number(v)) or not math.isfinite(v):
      return self.describe()
    if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
      return self.describe()
    if self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi):
      return self.describe()
    return None


def Int(lo: Optional[int] = None, hi: Optional[int] = None, optional: bool = False) -> Number:
  """An integer in [lo, hi] (either bound may be None)."""
  return Number(lo, hi, integer=True, optional=optional)


def Positive() -> Number:
  """A finite number > 0."""
  return Number(0, lo_open=True)


def NonNegative() -> Number:
  """A finite number >= 0."""
  return Number(0)


def Fraction(lo_open: bool = False, hi_open: bool = False) -> Number:
  """A finite number in [0, 1] (ends open as asked)."""
  return Number(0, 1, lo_open=lo_open, hi_open=hi_open)


@dataclasses.dataclass(frozen=True)
class OneOf:
  """One of ``values``: a tuple, or a callable returning them (a registry read when
  the rule is checked, so the table names the set where it is defined)."""
  values: Union[Tuple[Any, ...], Callable[[], Iterable[Any]]]

  def allowed(self) -> Tuple[Any, ...]:
    return tuple(self.values() if callable(self.values) else self.values)

  def check(self, v) -> Optional[str]:
    allowed = self.allowed()
    try:
      ok = v in allowed
    except TypeError:  # an unhashable value against a set
      ok = False
    return None if ok else "must be one of " + ", ".join(repr(a) for a in allowed)


@dataclasses.dataclass(frozen=True)
class Satisfies:
  """``predicate(value)`` is true; ``why`` says what is expected."""
  predicate: Callable[[Any], bool]
  why: str

  def check(self, v) -> Optional[str]:
    try:
      ok = bool(self.predicate(v))
    except (TypeError, ValueError):
      ok = False
    return None if ok else self.why


def LowHigh(lo: Optional[float] = None, lo_open: bool = False, unit: str = "") -> Satisfies:
  """A range ``(low, high)``: two finite numbers, low <= high and, with ``lo``, ``lo <= low``
  (``lo < low`` with ``lo_open``); ``unit`` is named in the message."""
  def ok(v) -> bool:
    return (isinstance(v, (tuple, list)) and len(v) == 2 and all(_is_number(e) and math.isfinite(e) for e in v)
            and (lo is None or (lo < v[0] if lo_open else lo <= v[0])) and v[0] <= v[1])
  bound = "" if lo is None else f"{_fmt_num(lo)} {'<' if lo_open else '<='} "
  return Satisfies(ok, f"must be (low, high){unit} with {bound}low <= high")


BOOL = Satisfies(lambda v: isinstance(v, bool), "must be True or False")

Rule = Union[Number, OneOf, Satisfies]


# Registries, read lazily: importing them pulls in JAX and every run kind.
def _registry(module: str, name: str, sort: bool = False) -> Callable[[], Iterable[Any]]:
  """A `OneOf` callable: ``module.name`` (sorted with ``sort``), imported when the rule is checked."""
  def values():
    found = getattr(importlib.import_module(module), name)
    return sorted(found) if sort else found
  return values


_algorithms = _registry("fedjax_seg.train", "TRAINERS", sort=True)
_losses = _registry("fedjax_seg.losses", "LOSS_NAMES")
_client_strategies = _registry("fedjax_seg.fl.backends", "CLIENT_STRATEGIES")
_step_strategies = _registry("fedjax_seg.fl.backends", "STEP_STRATEGIES")
_server_opts = _registry("fedjax_seg.fl.server_opt", "SERVER_OPTS")
_dp_weightings = _registry("fedjax_seg.fl.dp", "WEIGHTINGS")
_dp_accountants = _registry("fedjax_seg.fl.dp", "ACCOUNTANTS")
_samplings = _registry("fedjax_seg.fl.train", "SAMPLINGS")


def _models():
  from fedjax_seg import models
  return models.names()


def _layouts():
  from fedjax_seg.data import pipeline, volumes  # noqa: F401 - volumes registers brats, acdc
  return sorted(pipeline.LOADERS)


def _scales_ok(v) -> bool:
  return v is None or (_is_int(v) and v >= 1) or (
      isinstance(v, (tuple, list)) and len(v) > 0 and all(_is_int(x) and x >= 1 for x in v))


def _split_seed_ok(v) -> bool:
  return v == "seed" or (_is_int(v) and v >= -1)


OPTIMIZERS = ("adam", "adamw", "sgd", "momentum")  # steps.make_optimizer
DTYPES = ("float32", "bfloat16", "float16")        # compute dtypes of the models (params: float32)
NORMALIZE = ("slice_max", "max", "zscore", "none")  # preprocess.normalize / normalize_volume
NORMS = ("none", "batch", "group", "layer")         # models/unet.make_norm

# key -> rule. Checked on every leaf of the config that has the key; keys without a
# rule are accepted. Add a rule for a new key here (one line).
RULES: Dict[str, Rule] = {
    # --- top level ---
    "algorithm": OneOf(_algorithms),
    "seed": Int(lo=0),
    "batch_size": Int(lo=1),
    "eval_batch_size": Int(lo=1),
    "num_epochs": Int(lo=1),
    "loss": OneOf(_losses),
    "xla_opt_level": Int(lo=-1, hi=3),
    # --- model ---
    "model.name": OneOf(_models),
    "model.base": Int(lo=1),
    "model.depth": Int(lo=1),
    "model.dropout": Fraction(hi_open=True),
    "model.dtype": OneOf(DTYPES),
    "model.norm": OneOf(NORMS),
    "model.ndim": OneOf((2, 3)),
    "model.scales": Satisfies(_scales_ok, "must be an integer >= 1 or a tuple of them (one per level)"),
    # --- optimizer ---
    "optimizer.name": OneOf(OPTIMIZERS),
    "optimizer.lr": Positive(),
    "optimizer.b1": Fraction(hi_open=True),
    "optimizer.b2": Fraction(hi_open=True),
    "optimizer.eps": NonNegative(),
    "optimizer.momentum": Fraction(hi_open=True),
    "optimizer.weight_decay": NonNegative(),
    # --- data ---
    "data.layout": OneOf(_layouts),
    "data.image_size": Int(lo=1),
    "data.val_fraction": Fraction(lo_open=True, hi_open=True),
    "data.test_fraction": Fraction(lo_open=True, hi_open=True),
    "data.normalize": OneOf(NORMALIZE),
    "data.ndim": OneOf((2, 3)),
    "data.depth": Int(lo=0),
    "data.min_foreground_fraction": Fraction(),
    "data.split_seed": Satisfies(_split_seed_ok, "must be an integer >= 0, or 'seed' / -1 "
                                 "(follow config.seed)"),
    "data.fold": Int(lo=0, optional=True),
    "data.num_folds": Int(lo=2),
    "data.phantom.seed": Int(lo=0),
    "data.phantom.size": Int(lo=8),
    "data.phantom.patients_per_site": Int(lo=1),
    "data.phantom.patients_per_group": Int(lo=1),
    "data.phantom.slices_per_patient": Int(lo=1),
    "data.phantom.style": OneOf(("geometric", "anatomical")),
    "data.phantom.tumour_preset": OneOf(lambda: sorted(__import__("fedjax_seg.data.phantom", fromlist=["_"]).TUMOUR_PRESETS)),
    "data.phantom.tumour_area": Satisfies(lambda v: tuple(v) == () or (len(v) == 2 and all(_is_number(e) for e in v) and 0 < v[0] <= v[1] <= 0.5), "must be () (the preset's range) or (low, high) fractions of the slice area with 0 < low <= high <= 0.5"),
    "data.phantom.tumour_free_fraction": Satisfies(lambda v: _is_number(v) and (v == -1 or 0 <= v <= 1), "must be -1 (the preset's value) or a fraction in [0, 1]"),
    "data.n4.control_points": Int(lo=1),
    "data.n4.shrink_factor": Int(lo=1),
    "data.n4.otsu_bins": Int(lo=2),
    "data.n4.convergence_threshold": Positive(),
    # --- fl ---
    "fl.partition": OneOf(("by_site", "iid", "dirichlet")),
    "fl.num_clients": Int(lo=0),
    "fl.partition_seed": Int(lo=0),
    "fl.dirichlet_alpha": Positive(),
    "fl.rounds": Int(lo=1),
    "fl.local_steps": Int(lo=1),
    "fl.client_batch_size": Int(lo=1),
    "fl.stats_samples": Int(lo=1),
    "fl.client_strategy": OneOf(_client_strategies),
    "fl.step_strategy": OneOf(_step_strategies),
    "fl.clients_per_chunk": Int(lo=0),
    "fl.clients_per_call": Int(lo=0),
    "fl.host_threads": Int(lo=0),
    "fl.clients_per_round": Int(lo=0),
    "fl.client_sampling": OneOf(_samplings),
    "fl.alpha": Fraction(),
    "fl.beta": Fraction(),
    "fl.gamma": Fraction(),
    "fl.cost": OneOf(("cost", "ce")),
    "fl.cost_ratio": OneOf(("local", "rounds")),
    "fl.local_norm": OneOf(("none", "fedbn", "silobn")),
    "fl.ditto_lambda": NonNegative(),
    "fl.local_work": OneOf(("equal", "proportional", "list")),
    "fl.local_steps_per_client": Satisfies(
        lambda v: isinstance(v, (tuple, list)) and all(_is_int(e) and e >= 1 for e in v),
        "must be a tuple of integers >= 1 (one per client; () with local_work != 'list')"),
    "fl.eval_every": Int(lo=1),
    "fl.prox_mu": NonNegative(),
    "fl.server_opt": OneOf(_server_opts),
    "fl.server_lr": Positive(),
    "fl.server_momentum": Fraction(hi_open=True),
    "fl.server_b1": Fraction(hi_open=True),
    "fl.server_b2": Fraction(hi_open=True),
    "fl.server_tau": Positive(),
    "fl.norm_k": NonNegative(),
    "fl.trim": Number(0, 0.5, hi_open=True),
    "fl.secagg_bits": Int(lo=8, hi=28),
    "fl.labelled_patients": Int(lo=0),
    "fl.dp.clip_norm": Positive(),
    "fl.dp.noise_multiplier": NonNegative(),
    "fl.dp.target_epsilon": NonNegative(),
    "fl.dp.delta": Fraction(lo_open=True, hi_open=True),
    "fl.dp.weighting": OneOf(_dp_weightings),
    "fl.dp.sample_cap": NonNegative(),
    "fl.dp.accountant": OneOf(_dp_accountants),
    # --- semi-supervised ---
    "semi.label_fraction": Fraction(lo_open=True),
    "semi.min_labelled": Int(lo=0),
    "semi.unsup_weight": NonNegative(),
    "semi.rampup_rounds": Int(lo=0),
    "semi.scenario": OneOf(("label_at_client", "label_at_server")),
    "semi.pseudo_loss": OneOf(("ce", "dice_ce")),
    "semi.server_batch_size": Int(lo=1),
    "semi.unlabelled_batch_size": Int(lo=1),
    "semi.server_steps": Int(lo=0),
    "semi.client_lr_scale": Positive(),
    "semi.mt.ema_decay": Fraction(),
    "semi.mt.noise": NonNegative(),
    "semi.ps.threshold": Fraction(),
    "semi.fedwep.num_seeds": Int(lo=1),
    "semi.fedwep.search_size": Int(lo=1),
    "semi.fedwep.p": Fraction(),
    "semi.fedwep.sigma": NonNegative(),
    "semi.fedwep.pair_criterion": OneOf(("max", "min", "median")),
    "semi.fedwep.search_strategy": OneOf(("auto", "vmap", "unrolled")),
    "semi.fedwep.pseudo": OneOf(("hard", "soft")),
    "semi.fedwep.search_inputs": OneOf(("real", "random", "auto")),
    # --- FCL pre-training ---
    "pretrain.rounds": Int(lo=0),
    **{f"pretrain.{k}": Int(lo=1) for k in ("local_steps", "volumes_per_batch", "num_partitions",
                                            "num_positives", "neg_per_partition", "bank_size",
                                            "feature_dim", "hidden_dim")},
    "pretrain.temperature": Positive(),
    "pretrain.momentum": Fraction(),
    "pretrain.optimizer.name": OneOf(OPTIMIZERS),
    "pretrain.optimizer.lr": Positive(),
    # --- augment (fedjax_seg/data/augment.py; formulas in docs/data.md) ---
    "augment.enabled": BOOL,
    "augment.flip": BOOL,
    "augment.rotation_deg": LowHigh(unit=" degrees"),
    "augment.zoom": LowHigh(0, lo_open=True),
    "augment.noise.prob": Fraction(),
    "augment.noise.sigma": LowHigh(0),
    "augment.blur.prob": Fraction(),
    "augment.blur.sigma": LowHigh(0, lo_open=True),
    "augment.brightness.prob": Fraction(),
    "augment.brightness.range": LowHigh(0),
    "augment.contrast.prob": Fraction(),
    "augment.contrast.range": LowHigh(0),
    "augment.gamma.prob": Fraction(),
    "augment.gamma.range": LowHigh(0, lo_open=True),
    "augment.elastic.prob": Fraction(),
    "augment.elastic.alpha": LowHigh(0),
    "augment.elastic.sigma": LowHigh(0, lo_open=True),
}


# ---------------------------------------------------------------------------
# Walking the config.
# ---------------------------------------------------------------------------
def _is_section(v) -> bool:
  import ml_collections
  return isinstance(v, (ml_collections.ConfigDict, dict))


def leaves(config, prefix: str = "") -> Iterator[Tuple[str, Any]]:
  """(dotted key, value) of every leaf of a ConfigDict (or dict), in the config's order;
  a section set to None is a leaf."""
  for k, v in config.items():
    key = f"{prefix}{k}"
    if _is_section(v):
      yield from leaves(v, key + ".")
    else:
      yield key, v


def get(config, key: str, default=None):
  """``config.<key>`` for a dotted key, ``default`` when a section on the way is absent or None."""
  node = config
  for part in key.split("."):
    if not _is_section(node) or part not in node:
      return default
    node = node[part]
  return node


# ---------------------------------------------------------------------------
# Checks over several keys.
# ---------------------------------------------------------------------------
REQUIRED = ("algorithm", "seed", "data", "model", "loss", "optimizer", "batch_size",
            "eval_batch_size")


def _required(config) -> None:
  for k in REQUIRED:
    if k not in config:
      raise ConfigError(k, None, "missing (every run needs it)")


def _image_size_halves(config) -> None:
  size, depth = get(config, "data.image_size"), get(config, "model.depth", 4)
  if size is None or not _is_int(depth):
    return
  if size % (2 ** (depth - 1)):
    raise ConfigError("data.image_size", size, f"must be divisible by 2**(config.model.depth-1) "
                      f"= {2 ** (depth - 1)}")


def _fractions_leave_train(config) -> None:
  val, test = get(config, "data.val_fraction"), get(config, "data.test_fraction")
  if val is not None and test is not None and val + test >= 1:
    raise ConfigError("data.test_fraction", test, f"config.data.val_fraction + "
                      f"config.data.test_fraction = {val + test:g} leaves no train patients "
                      f"(must be < 1)")


def _fold_in_range(config) -> None:
  fold = get(config, "data.fold")
  if fold is not None and fold >= get(config, "data.num_folds", 5):
    raise ConfigError("data.fold", fold, f"must be < config.data.num_folds = "
                      f"{get(config, 'data.num_folds', 5)}")


def _federated_needs_fl(config) -> None:
  if config.algorithm != "centralized" and not _is_section(config.get("fl")):
    raise ConfigError("fl", config.get("fl"), f"algorithm {config.algorithm!r} needs the fl "
                      f"section (configs/lgg_fedavg.py get_fl_config())")


def _clients_for_partition(config) -> None:
  if config.algorithm == "centralized":
    return
  kind, k = get(config, "fl.partition"), get(config, "fl.num_clients", 0)
  if kind in ("iid", "dirichlet") and k is not None and k < 1:
    raise ConfigError("fl.num_clients", k, f"partition {kind!r} needs num_clients >= 1")


def _dcew_weights(config) -> None:
  if config.get("algorithm") != "dcew":
    return
  a, b, g = (get(config, f"fl.{k}") for k in ("alpha", "beta", "gamma"))
  if None not in (a, b, g) and abs(a + b + g - 1.0) > 1e-6:
    raise ConfigError("fl.gamma", g, f"config.fl.alpha + beta + gamma must be 1 for dcew, got "
                      f"{a} + {b} + {g}")


def _anatomy_installed(config) -> None:
  """A phantom with anatomical style needs the ICBM152 template (the [anatomy] extra)."""
  if get(config, "data.root") or get(config, "data.phantom.style") != "anatomical":
    return
  from fedjax_seg.data import anatomy
  try:
    anatomy.template_dir()
  except anatomy.TemplateUnavailable as e:
    raise ConfigError("data.phantom.style", "anatomical", f"{e}; or use "
                      f"--config.data.phantom.style=geometric") from None


# ---------------------------------------------------------------------------
# Keys the chosen algorithm does not read.
# ---------------------------------------------------------------------------
COST_WEIGHTED = ("fedcostw", "costw_ce", "dcew")
FEDWEP = ("fedwep", "fedwep_real", "fedwep_random")
PRETRAINING = ("fcl", "local_cl", "fedrotation")


def _algo(*names) -> Callable[[Any], bool]:
  return lambda c: c.algorithm in names


def _when(key: str, test: Callable[[Any], bool]) -> Callable[[Any], bool]:
  return lambda c: test(get(c, key))


# (key or section prefix, read(config) -> bool, who reads it): a key whose value differs
# from its reference (section defaults, else the config file's own value) on a run that
# does not read it is refused, naming the key and who does read it.
READ_BY: List[Tuple[str, Callable[[Any], bool], str]] = [
    ("num_epochs", _algo("centralized"), "centralised training (federated runs: config.fl.rounds)"),
    ("batch_size", _algo("centralized"), "centralised training (federated runs: config.fl.client_batch_size)"),
    ("fl.", lambda c: c.algorithm != "centralized", "the federated algorithms"),
    ("fl.alpha", _algo(*COST_WEIGHTED), "fedcostw, costw_ce, dcew"),
    ("fl.beta", _algo("dcew"), "dcew"),
    ("fl.gamma", _algo("dcew"), "dcew"),
    ("fl.cost", _algo("fedcostw"), "fedcostw"),
    ("fl.cost_ratio", _algo(*COST_WEIGHTED), "fedcostw, costw_ce, dcew"),
    ("fl.trim", _algo("trimmed_mean"), "trimmed_mean"),
    ("fl.dirichlet_alpha", _when("fl.partition", lambda v: v == "dirichlet"), "fl.partition='dirichlet'"),
    ("fl.local_steps_per_client", _when("fl.local_work", lambda v: v == "list"), "fl.local_work='list'"),
    ("fl.clients_per_call", _when("fl.client_strategy", lambda v: v in ("auto", "loop")),
     "fl.client_strategy 'auto' or 'loop' (the 'loop' round)"),
    ("fl.host_threads", _when("fl.client_strategy", lambda v: v in ("auto", "loop")),
     "fl.client_strategy 'auto' or 'loop' (the 'loop' round)"),
    ("fl.client_sampling", _when("fl.clients_per_round", lambda v: bool(v)), "fl.clients_per_round > 0"),
    ("fl.server_lr", _when("fl.server_opt", lambda v: v != "none"), "a server optimiser (fl.server_opt)"),
    ("fl.server_momentum", _when("fl.server_opt", lambda v: v == "fedavgm"), "fl.server_opt='fedavgm'"),
    ("fl.server_b1", _when("fl.server_opt", lambda v: v in ("fedadam", "fedyogi", "fedadagrad")),
     "fl.server_opt fedadam / fedyogi / fedadagrad"),
    ("fl.server_b2", _when("fl.server_opt", lambda v: v in ("fedadam", "fedyogi")),
     "fl.server_opt fedadam / fedyogi"),
    ("fl.server_tau", _when("fl.server_opt", lambda v: v in ("fedadam", "fedyogi", "fedadagrad")),
     "fl.server_opt fedadam / fedyogi / fedadagrad"),
    ("fl.secagg_bits", _when("fl.secagg", bool), "fl.secagg=True"),
    ("fl.secagg_seed", _when("fl.secagg", bool), "fl.secagg=True"),
    ("fl.dp.", _when("fl.dp.enabled", bool), "fl.dp.enabled=True"),
    ("fl.dp.enabled", lambda c: True, ""),
    ("fl.dp.sample_cap", _when("fl.dp.weighting", lambda v: v == "samples"), "fl.dp.weighting='samples'"),
    ("semi.fedwep.", _algo(*FEDWEP), "fedwep, fedwep_real, fedwep_random"),
    ("semi.mt.", _algo("mean_teacher"), "mean_teacher"),
    ("semi.cps.", _algo("cps"), "cps"),
    ("semi.ps.", _algo("pseudoseg"), "pseudoseg"),
    ("semi.server_steps", _when("semi.scenario", lambda v: v == "label_at_server"), "semi.scenario='label_at_server'"),
    ("semi.server_batch_size", _when("semi.scenario", lambda v: v == "label_at_server"),
     "semi.scenario='label_at_server'"),
    ("pretrain.", _algo(*PRETRAINING), "the FCL pre-training algorithms (fcl, local_cl, fedrotation)"),
    ("augment.", _when("augment.enabled", bool), "augment.enabled=True"),
    ("augment.enabled", lambda c: True, ""),
    ("data.n4.", _when("data.n4.enabled", bool), "data.n4.enabled=True"),
    ("data.n4.enabled", lambda c: True, ""),
    ("data.phantom.", _when("data.root", lambda v: not v), "the phantom (data.root='')"),
    ("data.num_folds", _when("data.fold", lambda v: v is not None), "a k-fold split (data.fold set)"),
    ("data.test_fraction", _when("data.fold", lambda v: v is None), "the fraction split (data.fold unset)"),
]


def _reader(key: str):
  """The most specific READ_BY entry of ``key``: the key itself, else its longest section
  prefix (None when no entry covers it)."""
  covering = [e for e in READ_BY if key == e[0] or (e[0].endswith(".") and key.startswith(e[0]))]
  return max(covering, key=lambda e: len(e[0]), default=None)


def section_defaults() -> Dict[str, Any]:
  """{dotted key: default} of the fl and semi sections (configs/lgg_fedavg.py
  get_fl_config(), configs/lgg_fedwep.py get_semi_config()): every config's reference for
  those keys, whatever its file sets."""
  from configs import lgg_fedavg, lgg_fedwep
  out = {f"fl.{k}": v for k, v in leaves(lgg_fedavg.get_fl_config())}
  out.update({f"semi.{k}": v for k, v in leaves(lgg_fedwep.get_semi_config())})
  return out


def _same(a, b) -> bool:
  if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
  return a == b


def check_unread(config, reference: Optional[Dict[str, Any]] = None) -> None:
  """Raises :class:`ConfigError` for the first key set away from its reference value that
  ``config.algorithm`` (with the other keys) does not read. The reference of an fl / semi
  key is its section default (``section_defaults``); of any other key, ``reference``
  ({dotted key: value}, e.g. the config file's own values before command-line
  overrides; a key it lacks is not checked)."""
  ref = dict(reference or {})
  ref.update(section_defaults())
  for key, value in leaves(config):
    entry = _reader(key)
    if entry is None or key not in ref or _same(value, ref[key]):
      continue
    prefix, read, who = entry
    if not read(config):
      raise ConfigError(key, value, f"not read by config.algorithm={config.algorithm!r} with "
                        f"these settings (read by {who}); leave it at {ref[key]!r}")


CROSS_CHECKS: List[Callable[[Any], None]] = [
    _required, _image_size_halves, _fractions_leave_train, _fold_in_range,
    _federated_needs_fl, _clients_for_partition, _dcew_weights, _anatomy_installed,
]


def check(config, rules: Optional[Dict[str, Rule]] = None) -> None:
  """Raises :class:`ConfigError` (``config.<key>=<value>: <why>``) for the first leaf
  whose rule fails (in the config's order), then for the first failing cross-key check."""
  rules = RULES if rules is None else rules
  for key, value in leaves(config):
    rule = rules.get(key)
    if rule is not None:
      why = rule.check(value)
      if why is not None:
        raise ConfigError(key, value, why)
  for cross in CROSS_CHECKS:
    cross(config)
