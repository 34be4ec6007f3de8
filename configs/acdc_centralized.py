"""Centralised 2D U-Net on ACDC short-axis slices, ED + ES frames (SPEC §1.3).

Labels 0 background, 1 RV cavity, 2 myocardium, 3 LV cavity. Slices are
resampled in-plane only (ACDC is ~1.5×1.5×10 mm) to data.target_spacing,
then centre-cropped / padded to data.image_size.

  # real data: the folder holding training/ (or database/training/)
  python launch.py --config configs/acdc_centralized.py --workdir runs/acdc_cl \
      --config.data.root=/data/ACDC --config.data.target_spacing='(0, 1.25, 1.25)' \
      --config.data.image_size=128
  python launch.py --config configs/acdc_centralized.py:smoke --workdir runs/acdc_smoke

With data.root empty a phantom ACDC set (5 pathology groups) is used.
"""
import ml_collections


def get_data_config():
  data = ml_collections.ConfigDict()
  data.layout = "acdc"
  data.root = ""
  data.cache_dir = "runs/_data"
  data.phantom = ml_collections.ConfigDict(dict(
      seed=0, groups=("DCM", "HCM", "MINF", "NOR", "RV"), patients_per_group=4,
      slices_per_patient=8, size=64))
  data.ndim = 2
  data.frames = ("ED", "ES")
  data.target_spacing = (0.0, 2.5, 2.5)  # (dz, dy, dx) mm; 0 keeps z (in-plane only)
  data.image_size = 64                    # crop / pad after resampling (64 × 2.5 mm = 160 mm)
  data.depth = 0
  data.normalize = "zscore"              # per volume, within the foreground
  data.n4 = ml_collections.ConfigDict(dict(
      enabled=False, shrink_factor=2, iterations=(50, 50, 30), convergence_threshold=1e-3,
      otsu_bins=200, control_points=4, cache_dir=""))
  data.skip_bad_patients = False
  data.min_foreground_fraction = 0.0
  data.split_seed = 0
  data.stratify_by_site = True  # site = pathology group
  data.val_fraction = 0.2
  data.test_fraction = 0.15
  return data


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.algorithm = "centralized"
  config.seed = 0
  config.data = get_data_config()
  config.model = ml_collections.ConfigDict(dict(
      name="unet", base=16, depth=4, dropout=0.5, norm="none", ndim=2,
      dtype="float32"))  # compute dtype; "bfloat16": mixed precision (f32 params, f32 aggregation)
  config.loss = "dice_ce"
  config.optimizer = ml_collections.ConfigDict(dict(
      name="adam", lr=1e-3, b1=0.9, b2=0.999, eps=1e-7))
  config.augment = ml_collections.ConfigDict(dict(
      enabled=True, rotation_deg=(0.0, 90.0), zoom=(1.0, 1.1), flip=False,
      # nnU-Net's intensity set and elastic deformation (data/augment.py, docs/data.md);
      # prob 0 = off; the ranges are nnU-Net's
      noise=dict(prob=0.0, sigma=(0.0, 0.1)),
      blur=dict(prob=0.0, sigma=(0.5, 1.0)),
      brightness=dict(prob=0.0, range=(0.75, 1.25)),
      contrast=dict(prob=0.0, range=(0.75, 1.25)),
      gamma=dict(prob=0.0, range=(0.7, 1.5)),
      elastic=dict(prob=0.0, alpha=(0.0, 900.0), sigma=(9.0, 13.0))))
  config.batch_size = 16
  config.eval_batch_size = 32
  config.num_epochs = 30
  config.fl = None
  if arg == "smoke":
    config.data.phantom.patients_per_group = 3
    config.data.phantom.size = 32
    config.data.target_spacing = (0.0, 5.0, 5.0)
    config.data.image_size = 32
    config.model.base = 8
    config.model.depth = 3
    config.num_epochs = 3
  elif arg not in (None, ""):
    raise ValueError(f"configs/acdc_centralized.py: unknown variant {arg!r} (use ':smoke' or nothing)")
  return config
