"""SCAUnet / SCAUnet-A on the demo-sized phantom LGG (SPEC §2).

Same data, loss, optimiser and epochs as ``configs/demo.py`` (the U-Net
baseline, 482,050 parameters); only ``config.model`` changes, sized so the
SCAUnet has at most 1/10 of the U-Net's parameters:

  python launch.py --config configs/demo.py --workdir runs/demo_unet
  python launch.py --config configs/lgg_scaunet.py --workdir runs/demo_scaunet
  python launch.py --config configs/lgg_scaunet.py:scaunet_a --workdir runs/demo_scaunet_a

Both use BatchNorm after each SCA block: without it (``--config.model.norm=none``,
as the U-Net baseline) the small SCAUnets trained far slower in the measured
20 epochs (benchmarks/results/README_model_zoo.md).

Variants (the ``:arg`` after the file name):
  scaunet    base 8, N = 3 scales at every level, nearest-neighbour upsampling
             (43,866 parameters with BatchNorm, 1/11.0 of the U-Net)
  scaunet_a  base 8, N = (4, 3, 2, 1) from full to lowest resolution,
             transposed-conv upsampling (39,234 parameters, 1/12.3)
Any key can still be overridden, e.g. ``--config.model.base=16``.
"""
import ml_collections

from configs import demo

VARIANTS = {
    "scaunet": dict(name="scaunet", base=8, depth=4, scales=3, upsample="resize"),
    "scaunet_a": dict(name="scaunet_a", base=8, depth=4, scales=(4, 3, 2, 1),
                      upsample="transpose"),
}


def get_config(arg=None):
  variant = arg or "scaunet"
  if variant not in VARIANTS:
    raise ValueError(f"configs/lgg_scaunet.py:{variant}: expected one of {sorted(VARIANTS)}")
  config = demo.get_config("geometric")  # the phantom its README numbers were measured on
  config.model = ml_collections.ConfigDict(dict(
      **VARIANTS[variant], dropout=0.5, norm="batch", depthwise="shift", ndim=2,
      dtype="float32"))
  return config
