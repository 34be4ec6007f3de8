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
  fl.client_strategy = "auto"   # auto | vmap | unrolled | map | sharded | loop (docs/scale.md#execution-strategies)
  fl.clients_per_chunk = 0      # > 0: stream clients to the device C at a time (fl/scale.py)
  fl.clients_per_call = 0       # 'loop' rounds: clients unrolled per program call (0 = auto: 1 with host threads; one thread: max(1, 8 // local_steps), host steps: from the step's size)
  fl.step_strategy = "auto"     # auto | scan | unrolled | host (loop round: each step a program call)
  fl.host_threads = 0           # 'loop' rounds: host threads issuing client calls side by side (0 = auto: 2 on a CPU, 1 on an accelerator)
  fl.local_work = "equal"       # equal | proportional (τ_k ∝ samples, largest = local_steps) | list
  fl.local_steps_per_client = ()  # local_work='list': one τ_k ≤ local_steps per client
  fl.fednova = False            # FedNova normalised averaging of unequal local work (aggregators.nova)
  fl.alpha = 0.5                # FedCostW / DCEW sample-size weight
  fl.beta = 0.25                # DCEW cost weight
  fl.gamma = 0.25               # DCEW dice weight
  fl.cost = "cost"              # FedCostW cost c(M): 'cost' (training loss) | 'ce'
  fl.cost_ratio = "local"       # c_k = c(M_{t-1})/c(M_t): local (received vs trained, same round) | rounds (own trained models, consecutive rounds)
  fl.clients_per_round = 0      # m > 0: m of the K clients per round, without replacement (0 = all)
  fl.client_sampling = "uniform"  # uniform | size (probability ∝ training samples)
  fl.eval_every = 1
  fl.labelled_patients = 0      # > 0: train on that many patients per client (FCL fine-tuning; nested in N)
  fl.label_seed = 0             # which patients those are
  fl.pad_rows = 1               # pad every client's arrays to at least this many rows (one compile over N)
  fl.eval_clients = True        # per-client validation Dice each round
  # --- beyond FedAvg (README.md "Beyond FedAvg"); defaults = plain FedAvg ---
  fl.prox_mu = 0.0              # FedProx μ: local loss + (μ/2)‖w − w_global‖²
  fl.server_opt = "none"        # none | fedavgm | fedadam | fedyogi | fedadagrad (fl/server_opt.py)
  fl.server_lr = 1.0            # η on the pseudo-gradient x_{t-1} − ω_t
  fl.server_momentum = 0.9      # FedAvgM β
  fl.server_b1 = 0.9            # FedAdam/Yogi/Adagrad β1
  fl.server_b2 = 0.99           # FedAdam/Yogi β2
  fl.server_tau = 1e-3          # adaptivity τ (Reddi et al. 2021)
  fl.local_norm = "none"        # none | fedbn (norm statistics + affine local) | silobn (statistics local) (fl/fedbn.py)
  fl.scaffold = False           # SCAFFOLD option-II control variates (fl/scaffold.py; use optimizer.name='sgd')
  fl.ditto_lambda = 0.0         # > 0: Ditto personal models with proximal weight λ (fl/ditto.py)
  fl.norm_k = 10.0              # divergence guard: drop client k if ‖Δ_k‖ > norm_k × median of the others' ‖Δ‖ (0 = off)
  fl.trim = 0.1                 # trimmed_mean: fraction dropped at each end per coordinate
  fl.secagg = False             # pairwise-masked fixed-point sums (fl/secagg.py)
  fl.secagg_bits = 24           # fractional bits of the int32 fixed point
  fl.secagg_seed = 0            # DH key-agreement session seed
  fl.dp = ml_collections.ConfigDict(dict(   # DP-FedAvg (fl/dp.py); algorithm must be fedavg
      enabled=False,
      clip_norm=1.0,            # C: per-client update L2 clip
      noise_multiplier=0.0,     # z: noise std z·C/K; 0 with target_epsilon=0 -> clipping only (ε=∞)
      target_epsilon=0.0,       # > 0: calibrate z so that ε(δ) after fl.rounds rounds = target
      delta=1e-5,
      weighting="uniform",      # uniform (w_k = 1/K) | samples (w_k = min(s_k/sample_cap, 1)/K)
      sample_cap=0.0,
      accountant="rdp",         # rdp | pld (dp_accounting)
  ))
  return fl


def get_config(arg=None):
  config = lgg_centralized.get_config()
  config.algorithm = "fedavg"
  config.fl = get_fl_config()
  return config
