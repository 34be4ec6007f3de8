"""DP-FedAvg (McMahan et al., ICLR 2018) over phantom/real Kaggle LGG hospitals:
client-level (ε, δ)-DP of the released global models, every client every round.

  python launch.py --config configs/lgg_dp_fedavg.py --workdir runs/lgg_dp \
      [--config.fl.dp.target_epsilon=10] [--config.fl.dp.clip_norm=0.5]

Per-client updates are clipped to L2 norm C and N(0, (zC/K)²) is added to the
uniform average; z is calibrated so that ε(δ) after config.fl.rounds rounds
equals target_epsilon (dp_accounting RDP). ε, the clip fraction and the noise
std are logged every round. With K = 3 hospitals the noise per coordinate is
z·C/3: client-level DP needs many clients to be useful (see
docs/privacy.md). Only algorithm='fedavg' is accepted
(fedjax_seg/fl/dp.py says why).
"""
from configs import lgg_fedavg


def get_config(arg=None):
  config = lgg_fedavg.get_config()
  config.algorithm = "fedavg"
  config.fl.dp.enabled = True
  config.fl.dp.clip_norm = 1.0
  config.fl.dp.target_epsilon = 10.0
  config.fl.dp.delta = 1e-5
  return config
