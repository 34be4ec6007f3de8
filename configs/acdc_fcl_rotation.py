"""ACDC FCL baseline 'fedrotation' (SPEC §4.3): configs/acdc_fcl_exchange.py with
config.algorithm = 'fedrotation'; same data, model, budgets and variants (:smoke, :quick).

  python launch.py --config configs/acdc_fcl_rotation.py --workdir runs/acdc_fcl_rotation
"""
from configs import acdc_fcl_exchange


def get_config(arg=None):
  config = acdc_fcl_exchange.get_config(arg)
  config.algorithm = "fedrotation"
  return config
