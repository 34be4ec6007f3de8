"""ACDC FCL baseline 'local_cl' (SPEC §4.3): configs/acdc_fcl_exchange.py with
config.algorithm = 'local_cl'; same data, model, budgets and variants (:smoke, :quick).

  python launch.py --config configs/acdc_fcl_local.py --workdir runs/acdc_fcl_local
"""
from configs import acdc_fcl_exchange, common

get_config = common.derive(acdc_fcl_exchange.get_config, pass_arg=True, algorithm="local_cl")
