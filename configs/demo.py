"""The 'make demo' run: a small centralised U-Net on a phantom LGG data set.

Sized to finish in a few minutes on a 2-core CPU (64×64 slices, base 16).
  python launch.py --config configs/demo.py --workdir runs/demo
"""
from configs import lgg_centralized


def get_config(arg=None):
  config = lgg_centralized.get_config()
  config.data.phantom.size = 64
  config.data.image_size = 64
  config.model.base = 16
  config.num_epochs = 20
  return config
