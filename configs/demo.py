"""The 'make demo' run: a small centralised U-Net on a phantom LGG data set.

Sized to finish in a few minutes on a 2-core CPU (64×64 slices, base 16).
  python launch.py --config configs/demo.py --workdir runs/demo                   # ICBM152 anatomy
  python launch.py --config configs/demo.py:geometric --workdir runs/demo_geom    # ellipse phantom

The default renders the phantom hospitals on real brain anatomy (ICBM152
template, fedjax_seg/data/anatomy.py; `make venv` installs the template with
`pip install --no-deps nilearn`, see BUILD.md) when the template is installed,
and the geometric phantom otherwise (a plain `pip install .`); config.json
records which. ':anatomical' / ':geometric' pin the style. ':geometric' is the
ellipse phantom the model-zoo and loss-study numbers were measured on.
"""
from configs import common, lgg_centralized
from fedjax_seg.data import anatomy


def get_config(arg=None):
  config = lgg_centralized.get_config()
  config.data.phantom.size = 64
  config.data.image_size = 64
  config.model.base = 16
  config.num_epochs = 20
  config.data.phantom.style = "anatomical" if anatomy.available() else "geometric"
  if arg in ("geometric", "anatomical"):
    config.data.phantom.style = arg
  elif arg not in (None, ""):
    raise common.unknown_variant("configs/demo.py", arg, ["anatomical", "geometric"])
  return config
