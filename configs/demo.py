"""The 'make demo' run: a small centralised U-Net on a phantom LGG data set.

Sized to finish in a few minutes on a 2-core CPU (64×64 slices, base 16).
  python launch.py --config configs/demo.py --workdir runs/demo
  python launch.py --config configs/demo.py:anatomical --workdir runs/demo_anat   # ICBM152 anatomy

The ':anatomical' variant (= --config.data.phantom.style=anatomical) renders
the same hospitals on real brain anatomy (fedjax_seg/data/anatomy.py; needs
the 'anatomy' extra, docs/BUILD_anatomy.md); measured in docs/README_anatomy.md.
"""
from configs import lgg_centralized


def get_config(arg=None):
  config = lgg_centralized.get_config()
  config.data.phantom.size = 64
  config.data.image_size = 64
  config.model.base = 16
  config.num_epochs = 20
  if arg in ("geometric", "anatomical"):
    config.data.phantom.style = arg
  elif arg not in (None, ""):
    raise ValueError(f"configs/demo.py: unknown variant {arg!r} (use ':anatomical', ':geometric' or nothing)")
  return config
