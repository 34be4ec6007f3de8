"""dcew aggregation (SPEC §4.1) over phantom/real Kaggle LGG hospitals.

  python launch.py --config configs/lgg_dcew.py --workdir runs/lgg_dcew [--config.fl.rounds=...]

Everything else as configs/lgg_fedavg.py.
"""
from configs import common, lgg_fedavg

get_config = common.derive(lgg_fedavg.get_config, algorithm="dcew")
