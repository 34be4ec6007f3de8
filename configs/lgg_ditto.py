"""Ditto (Li et al., ICML 2021) over phantom/real Kaggle LGG hospitals: FedAvg's global
model plus one personalised model per hospital, trained with (λ/2)‖v − w‖² towards the
received global model; both are evaluated (results.json metrics / personalised).

  python launch.py --config configs/lgg_ditto.py --workdir runs/lgg_ditto [--config.fl.ditto_lambda=0.1]

docs/algorithms.md "Ditto".
"""
from configs import lgg_fedavg


def get_config(arg=None):
  config = lgg_fedavg.get_config()
  config.algorithm = "fedavg"
  config.fl.ditto_lambda = 0.1
  return config
