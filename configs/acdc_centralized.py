"""Centralised 2D U-Net on ACDC short-axis slices, ED + ES frames (SPEC §1.3).

Labels 0 background, 1 RV cavity, 2 myocardium, 3 LV cavity. Slices are
resampled in-plane only (ACDC is ~1.5×1.5×10 mm) to data.target_spacing,
then centre-cropped / padded to data.image_size.

  # real data: the folder holding training/ (or database/training/)
  python launch.py --config configs/acdc_centralized.py --workdir runs/acdc_cl \
      --config.data.root=/data/ACDC --config.data.target_spacing='(0, 1.25, 1.25)' \
      --config.data.image_size=128
  python launch.py --config configs/acdc_centralized.py:smoke --workdir runs/acdc_smoke

With data.root empty a phantom ACDC set (5 pathology groups) is used; the site of
the split's stratification is the pathology group. Shared defaults: configs/common.py.
"""
import ml_collections

from configs import common


def get_data_config():
  return common.data(
      "acdc",
      phantom=ml_collections.ConfigDict(dict(
          seed=0, groups=("DCM", "HCM", "MINF", "NOR", "RV"), patients_per_group=4,
          slices_per_patient=8, size=64)),
      ndim=2,
      frames=("ED", "ES"),
      target_spacing=(0.0, 2.5, 2.5),  # (dz, dy, dx) mm; 0 keeps z (in-plane only)
      image_size=64,                   # crop / pad after resampling (64 × 2.5 mm = 160 mm)
      depth=0,
      normalize="zscore",              # per volume, within the foreground
      n4=common.n4(enabled=False, shrink_factor=2),
      skip_bad_patients=False,
      min_foreground_fraction=0.0)


def get_config(arg=None):
  config = common.experiment(get_data_config(), common.model(base=16, ndim=2),
                             augment_enabled=True, batch_size=16, eval_batch_size=32,
                             num_epochs=30)
  config.fl = None
  if arg == "smoke":
    config.data.phantom.patients_per_group = 3
    config.data.target_spacing = (0.0, 5.0, 5.0)
    common.small(config)
    config.num_epochs = 3
  elif arg not in (None, ""):
    raise common.unknown_variant("configs/acdc_centralized.py", arg, ["smoke"])
  return config
