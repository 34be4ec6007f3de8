"""FedProx (Li et al., MLSys 2020) over phantom/real Kaggle LGG hospitals: FedAvg
aggregation, local objective + (μ/2)‖w − w_global‖².

  python launch.py --config configs/lgg_fedprox.py --workdir runs/lgg_fedprox [--config.fl.prox_mu=0.1]

Everything else as configs/lgg_fedavg.py; prox_mu=0 is FedAvg exactly.
"""
from configs import lgg_fedavg


def get_config(arg=None):
  config = lgg_fedavg.get_config()
  config.algorithm = "fedavg"
  config.fl.prox_mu = 0.01
  return config
