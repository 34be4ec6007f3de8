"""Centralised (CL) U-Net on Kaggle LGG (SPEC §1.2, §4.1 "CL" row).

  python launch.py --config configs/lgg_centralized.py --workdir runs/lgg_cl \
      --config.data.root=/path/to/lgg-mri-segmentation   # folder holding kaggle_3m/

With data.root empty a phantom LGG federation is written and used instead.
Hyper-parameters follow seed 001: Adam(1e-3, 0.9, 0.999, 1e-7), Dice+CE 1:1,
128×128 inputs, per-slice max normalisation.
"""
import ml_collections


def get_data_config():
  data = ml_collections.ConfigDict()
  data.layout = "lgg"
  data.root = ""                 # '' -> phantom written under cache_dir
  data.cache_dir = "runs/_data"
  # style: 'geometric' (ellipse heads, no extra dependency) | 'anatomical' (ICBM152 brain
  # anatomy, fedjax_seg/data/anatomy.py; needs `pip install -e '.[anatomy]'`).
  data.phantom = ml_collections.ConfigDict(dict(
      seed=0, sites=("CS", "DU", "HT"), patients_per_site=6, slices_per_patient=16, size=128,
      style="geometric",
      tumour_preset="classic",   # 'classic' (large tumours; 30 % of LGG, 40 % of BraTS slices empty) | 'realistic' (LGG 0.5-3 % of the slice, 65 % empty; BraTS 0.5-6 %, 55 %); docs/results/small_tumours.md
      tumour_area=(),            # () = the preset's; (low, high): widest tumour cross-section, fraction of the slice area (geometric style only)
      tumour_free_fraction=-1.0))  # -1 = the preset's; else ≈ fraction of slices without tumour, in [0, 1]
  data.image_size = 128
  data.normalize = "slice_max"   # slice_max | zscore | none
  data.split_seed = 0
  data.stratify_by_site = True  # every site gets val and test patients
  data.val_fraction = 0.2
  data.test_fraction = 0.15
  return data


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.algorithm = "centralized"
  config.seed = 0
  config.data = get_data_config()
  config.model = ml_collections.ConfigDict(dict(
      name="unet", base=32, depth=4, dropout=0.5,
      norm="none",  # none | batch | group | layer (models/unet.make_norm); small tumours: docs/results/small_tumours.md
      dtype="float32"))  # compute dtype; "bfloat16": mixed precision (f32 params, f32 aggregation)
  config.loss = "dice_ce"
  config.optimizer = ml_collections.ConfigDict(dict(
      name="adam", lr=1e-3, b1=0.9, b2=0.999, eps=1e-7))
  config.augment = ml_collections.ConfigDict(dict(
      enabled=False, rotation_deg=(0.0, 90.0), zoom=(1.0, 1.1), flip=False,
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
  return config
