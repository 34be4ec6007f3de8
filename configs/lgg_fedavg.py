"""FedAvg (SPEC §4.1) of a U-Net over Kaggle LGG hospitals, by institution.

  python launch.py --config configs/lgg_fedavg.py --workdir runs/lgg_fedavg
  # any key overrides from the command line, e.g.
  python launch.py --config configs/lgg_fedavg.py --workdir runs/x \
      --config.fl.rounds=50 --config.fl.local_steps=8 --config.fl.partition=iid \
      --config.fl.num_clients=5

With data.root empty, a phantom LGG federation is used (one hospital per
phantom scanner site); set data.root to a folder holding kaggle_3m/ for the
real data (clients = TCGA institutions CS, DU, HT, FG, EZ, ...).
"""
import ml_collections

from configs import lgg_centralized


def get_fl_config():
  fl = ml_collections.ConfigDict()
  fl.partition = "by_site"      # by_site | iid | dirichlet
  fl.num_clients = 0            # 0 with by_site: one client per site
  fl.partition_seed = 0
  fl.dirichlet_alpha = 0.5
  fl.rounds = 30
  fl.local_steps = 8            # E optimiser steps per client per round
  fl.client_batch_size = 8
  fl.stats_samples = 16         # local samples on which c(M) and dice(M) are measured
  fl.client_strategy = "auto"   # auto | vmap | unrolled | map (see benchmarks/round_speed.py)
  fl.step_strategy = "auto"     # auto | scan | unrolled
  fl.alpha = 0.5                # FedCostW / DCEW sample-size weight
  fl.beta = 0.25                # DCEW cost weight
  fl.gamma = 0.25               # DCEW dice weight
  fl.cost = "cost"              # FedCostW cost c(M): 'cost' (training loss) | 'ce'
  fl.eval_every = 1
  fl.eval_clients = True        # per-client validation Dice each round
  return fl


def get_config(arg=None):
  config = lgg_centralized.get_config()
  config.algorithm = "fedavg"
  config.fl = get_fl_config()
  return config
