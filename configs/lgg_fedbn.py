"""FedBN (Li et al., ICLR 2021) over phantom/real Kaggle LGG hospitals: a U-Net with batch
norm whose normalisation layers (running statistics and affine γ, β) stay at each
hospital; everything else is averaged by config.algorithm (FedAvg).

  python launch.py --config configs/lgg_fedbn.py --workdir runs/lgg_fedbn
  python launch.py --config configs/lgg_fedbn.py:silobn --workdir runs/lgg_silobn   # SiloBN

SiloBN (Andreux et al. 2020): statistics local, γ and β shared. Evaluation: each
hospital's patients with its own normalisation; a site that never trained with the
uniform average of the clients' (docs/algorithms.md "FedBN and SiloBN").
"""
from configs import lgg_fedavg


def get_config(arg=None):
  mode = arg or "fedbn"
  if mode not in ("fedbn", "silobn"):
    raise ValueError(f"configs/lgg_fedbn.py:{mode}: expected fedbn or silobn")
  config = lgg_fedavg.get_config()
  config.algorithm = "fedavg"
  config.model.norm = "batch"
  config.fl.local_norm = mode
  return config
