"""The defaults every experiment config shares, in one place.

Each ``configs/<exp>.py`` builds its ConfigDict from these pieces and changes
only what makes it that experiment; library code reads every value from the
config it is given (docs/config_reference.md lists every key with its default).

  data_split()      patient split: seed, stratification, val/test fractions
  n4(...)           N4 bias-field correction settings (BraTS, ACDC)
  tumour()          the phantom's tumour keys at the 'classic' preset
  model(**over)     the U-Net
  optimizer()       Adam(1e-3, 0.9, 0.999, 1e-7) (seed 001)
  augment(enabled)  spatial + intensity augmentation (data/augment.py), intensity ops off
  experiment(...)   a centralised run around a data config
  small(config)     the 32×32, base-8, depth-3 shapes of the ':smoke' / ':quick' variants
  derive(...)       a config that is another one with a few keys set
  unknown_variant   the one-line error of a config file given a variant it lacks
"""
from typing import Callable, Iterable, Optional

import ml_collections

def tumour() -> dict:
  """The phantom's tumour keys (data/phantom.py), at the 'classic' preset."""
  return dict(
      tumour_preset="classic",   # 'classic' (large tumours; 30 % of LGG, 40 % of BraTS slices empty) | 'realistic' (LGG 0.5-3 % of the slice, 65 % empty; BraTS 0.5-6 %, 55 %); docs/results/small_tumours.md
      tumour_area=(),            # () = the preset's; (low, high): widest tumour cross-section, fraction of the slice area (geometric style only)
      tumour_free_fraction=-1.0)  # -1 = the preset's; else ≈ fraction of slices without tumour, in [0, 1]


def data_split(**over) -> dict:
  """Patient-level split keys (data/splits.py): every site gets val and test patients."""
  keys = dict(
      split_seed=0,
      stratify_by_site=True,    # every site (ACDC: pathology group) gets val and test patients
      val_fraction=0.2,         # fraction of the patients held out for validation
      test_fraction=0.15,       # fraction of the patients held out for the test
      fold=ml_collections.config_dict.placeholder(int),  # None: split by fractions; f in [0, num_folds): k-fold by patient, fold f is the test set
      num_folds=5)              # k of the k-fold split (data.fold set)
  keys.update(over)
  return keys


def data(layout: str, **keys) -> ml_collections.ConfigDict:
  """A data config: ``layout``, an empty root ('' -> a phantom written under
  cache_dir), the cache folder, ``keys`` and the split keys (overridable in ``keys``)."""
  d = ml_collections.ConfigDict()
  d.layout = layout
  d.root = ""                # '' -> phantom written under cache_dir
  d.cache_dir = ""          # phantoms, N4 fields; '' -> $FEDJAX_SEG_DATA_CACHE or ~/.cache/fedjax_seg/data (fedjax_seg/caches.py)
  d.skip_bad_patients = False  # True: skip a bad patient with a printed warning (else one error naming the file)
  split = data_split()
  for k, v in keys.items():
    if k in split:
      split[k] = v
    else:
      d[k] = v
  for k, v in split.items():
    d[k] = v
  return d


def n4(enabled: bool, shrink_factor: int) -> ml_collections.ConfigDict:
  """N4 settings (data/volumes.py); cache_dir '' -> <data.cache_dir>/n4."""
  return ml_collections.ConfigDict(dict(
      enabled=enabled, shrink_factor=shrink_factor, iterations=(50, 50, 30),
      convergence_threshold=1e-3, otsu_bins=200, control_points=4,
      cache_dir=""))  # '' -> <data.cache_dir>/n4


def model(**over) -> ml_collections.ConfigDict:
  """The U-Net (models/unet.py). norm: none | batch | group | layer; dtype is the
  compute dtype ("bfloat16": mixed precision with f32 params and f32 aggregation)."""
  m = dict(
      name="unet", base=32, depth=4, dropout=0.5,
      ndim=2,           # 2: slices | 3: volumes
      norm="none",      # none | batch | group | layer (models/unet.make_norm); small tumours: docs/results/small_tumours.md
      dtype="float32")  # compute dtype; "bfloat16": mixed precision (f32 params, f32 aggregation)
  m.update(over)
  return ml_collections.ConfigDict(m)


def optimizer(lr: float = 1e-3) -> ml_collections.ConfigDict:
  """steps.make_optimizer: Adam(lr, 0.9, 0.999, 1e-7) (seed 001); every optimiser's keys."""
  return ml_collections.ConfigDict(dict(
      name="adam",          # adam | adamw | sgd | momentum
      lr=lr, b1=0.9, b2=0.999, eps=1e-7,   # adam / adamw
      weight_decay=1e-4,    # adamw
      momentum=0.9))        # momentum (heavy-ball SGD)


def augment(enabled: bool) -> ml_collections.ConfigDict:
  """Seed 001's rotation U(0°, 90°) and zoom U(1.0, 1.1), no flips; nnU-Net's intensity
  set and elastic deformation (data/augment.py, docs/data.md) with prob 0 = off and
  nnU-Net's ranges."""
  return ml_collections.ConfigDict(dict(
      enabled=enabled, rotation_deg=(0.0, 90.0), zoom=(1.0, 1.1), flip=False,
      noise=dict(prob=0.0, sigma=(0.0, 0.1)),
      blur=dict(prob=0.0, sigma=(0.5, 1.0)),
      brightness=dict(prob=0.0, range=(0.75, 1.25)),
      contrast=dict(prob=0.0, range=(0.75, 1.25)),
      gamma=dict(prob=0.0, range=(0.7, 1.5)),
      elastic=dict(prob=0.0, alpha=(0.0, 900.0), sigma=(9.0, 13.0))))


def experiment(data_config: ml_collections.ConfigDict, model_config: ml_collections.ConfigDict, *,
               augment_enabled: bool, batch_size: int, eval_batch_size: int,
               num_epochs: int) -> ml_collections.ConfigDict:
  """A centralised run: seed 0, Dice+CE 1:1, ``optimizer()``, ``augment(augment_enabled)``."""
  config = ml_collections.ConfigDict()
  config.algorithm = "centralized"
  config.seed = 0
  config.data = data_config
  config.model = model_config
  config.loss = "dice_ce"
  config.optimizer = optimizer()
  config.augment = augment(augment_enabled)
  config.batch_size = batch_size
  config.eval_batch_size = eval_batch_size
  config.num_epochs = num_epochs
  config.xla_opt_level = -1   # >= 0: XLA backend optimisation level (0: ~3x faster compile, slower run)
  config.init_from = ""       # a pre-training workdir: its encoder.msgpack initialises the U-Net's contracting path
  return config


def small(config: ml_collections.ConfigDict, size: int = 32) -> ml_collections.ConfigDict:
  """The test/benchmark shapes: ``size``² phantom slices and inputs, U-Net base 8, depth 3."""
  config.data.phantom.size = size
  config.data.image_size = size
  config.model.base = 8
  config.model.depth = 3
  return config


def unknown_variant(path: str, arg, allowed: Iterable[str]) -> ValueError:
  """The error of ``path`` given a ``:arg`` variant it does not have."""
  names = "".join(f"':{a}', " for a in allowed)
  return ValueError(f"{path}: unknown variant {arg!r} (use {names[:-2]} or nothing)"
                    if names else f"{path}: unknown variant {arg!r} (it has none)")


def derive(base: Callable[..., ml_collections.ConfigDict], pass_arg: bool = False,
           **top) -> Callable[[Optional[str]], ml_collections.ConfigDict]:
  """``get_config`` of a config that is ``base()`` (``base(arg)`` when ``pass_arg``) with the
  top-level keys ``top`` set, e.g. ``get_config = derive(lgg_fedavg.get_config,
  algorithm='dcew')``."""
  def get_config(arg=None):
    config = base(arg) if pass_arg else base()
    for k, v in top.items():
      config[k] = v
    return config
  return get_config
