"""SCAFFOLD (Karimireddy et al., ICML 2020), option II control variates, over
phantom/real Kaggle LGG hospitals; local SGD (the paper's setting: the option-II
control estimate assumes plain SGD steps at η_l = optimizer.lr).

  python launch.py --config configs/lgg_scaffold.py --workdir runs/lgg_scaffold

Each round a client uploads its model and its control update Δc_k (2× FedAvg's bytes,
both ways); docs/algorithms.md "SCAFFOLD".
"""
from configs import lgg_fedavg


def get_config(arg=None):
  config = lgg_fedavg.get_config()
  config.algorithm = "fedavg"
  config.fl.scaffold = True
  config.optimizer.name = "sgd"
  config.optimizer.lr = 0.05
  return config
