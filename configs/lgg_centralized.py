"""Centralised (CL) U-Net on Kaggle LGG (SPEC §1.2, §4.1 "CL" row).

  python launch.py --config configs/lgg_centralized.py --workdir runs/lgg_cl \
      --config.data.root=/path/to/lgg-mri-segmentation   # folder holding kaggle_3m/

With data.root empty a phantom LGG federation is written and used instead.
Hyper-parameters follow seed 001: Adam(1e-3, 0.9, 0.999, 1e-7), Dice+CE 1:1,
128×128 inputs, per-slice max normalisation. Shared defaults: configs/common.py.
"""
import ml_collections

from configs import common


def get_data_config():
  return common.data(
      "lgg",
      phantom=ml_collections.ConfigDict(dict(
          seed=0, sites=("CS", "DU", "HT"), patients_per_site=6, slices_per_patient=16, size=128,
          style="geometric",  # 'geometric' (ellipse heads, no extra dependency) | 'anatomical' (ICBM152 brain anatomy, fedjax_seg/data/anatomy.py; needs `pip install -e '.[anatomy]'`)
          **common.tumour())),
      image_size=128,
      normalize="slice_max")   # slice_max | zscore | none


def get_config(arg=None):
  # norm none | batch | group | layer (small tumours: docs/results/small_tumours.md)
  return common.experiment(get_data_config(), common.model(), augment_enabled=False,
                           batch_size=16, eval_batch_size=32, num_epochs=30)
