"""FedAdam (Reddi et al., ICLR 2021) over phantom/real Kaggle LGG hospitals:
FedAvg weights, then a server Adam step on the pseudo-gradient x_{t-1} − ω_t.

  python launch.py --config configs/lgg_fedadam.py --workdir runs/lgg_fedadam \
      [--config.fl.server_lr=3e-2] [--config.algorithm=dcew]   # any aggregator composes

Everything else as configs/lgg_fedavg.py; see fedjax_seg/fl/server_opt.py.
"""
from configs import lgg_fedavg


def get_config(arg=None):
  config = lgg_fedavg.get_config()
  config.algorithm = "fedavg"
  config.fl.server_opt = "fedadam"
  config.fl.server_lr = 1e-2
  config.fl.server_b1 = 0.9
  config.fl.server_b2 = 0.99
  config.fl.server_tau = 1e-3
  return config
