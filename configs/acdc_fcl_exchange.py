"""FCL on ACDC (SPEC §4.3; Wu et al., MICCAI 2021): federated contrastive
pre-training with exchanged memory banks, then FedAvg fine-tuning of a 2D U-Net
with N ∈ {1, 2, 4, 8} annotated patients per client, 10 clients (IID patients).

  python launch.py --config configs/acdc_fcl_exchange.py --workdir runs/acdc_fcl
  python launch.py --config configs/acdc_fcl_exchange.py:smoke --workdir runs/acdc_fcl_smoke
  # real data (folder holding training/):
  python launch.py --config configs/acdc_fcl_exchange.py --workdir runs/acdc_fcl \
      --config.data.root=/data/ACDC --config.data.target_spacing='(0, 1.25, 1.25)' \
      --config.data.image_size=128

Baselines share this config and change only config.algorithm:
configs/acdc_fcl_local.py (no exchange), acdc_fcl_rotation.py (FedRotation),
acdc_fcl_random.py (random init). Variants: ':smoke' (tests), ':quick'
(benchmarks/fcl_table.py --quick).
"""
import ml_collections

from configs import acdc_centralized, common, lgg_fedavg


def get_config(arg=None):
  config = acdc_centralized.get_config()
  config.algorithm = "fcl"
  # 120 phantom patients (24 per pathology group) -> ~90 train patients, 9 per client,
  # enough for N = 8 labelled patients per client (real ACDC: 100 patients).
  config.data.phantom.patients_per_group = 24
  config.data.val_fraction = 0.1
  config.data.test_fraction = 0.15
  config.model.dropout = 0.0
  config.fl = lgg_fedavg.get_fl_config()
  config.fl.partition = "iid"         # ACDC-style: patients over 10 clients
  config.fl.num_clients = 10
  config.fl.rounds = 20               # fine-tuning rounds
  config.fl.local_steps = 4
  config.fl.client_batch_size = 8
  config.fl.eval_every = 5
  config.fl.eval_clients = False
  config.pretrain = ml_collections.ConfigDict(dict(
      rounds=20,
      local_steps=4,
      volumes_per_batch=4,            # B volumes -> B·S partition slices per step
      num_partitions=4,               # S partitions along the slice axis
      temperature=0.1,                # τ
      momentum=0.9,                   # m (0.99 in MoCo; few local steps here)
      bank_size=64,                   # L rows per client's FIFO bank
      num_positives=4,                # sampled positives per query (local and remote each)
      neg_per_partition=4,            # sampled negatives per other partition (balanced)
      hidden_dim=128,                 # projection MLP
      feature_dim=64,                 # exchanged feature size
      optimizer=common.optimizer(),
      augment=ml_collections.ConfigDict(dict(
          rotation_deg=(-15.0, 15.0), zoom=(1.0, 1.15), flip=False,
          intensity_scale=0.2, intensity_shift=0.2, noise=0.05)),
  ))
  config.finetune = ml_collections.ConfigDict(dict(
      labelled_patients=(1, 2, 4, 8),
      label_seed=0,
  ))
  if arg in ("smoke", "quick"):
    config.data.target_spacing = (0.0, 5.0, 5.0)
    common.small(config)
    config.eval_batch_size = 64
    config.pretrain.hidden_dim = 64
    config.pretrain.feature_dim = 32
  if arg == "smoke":
    config.data.phantom.patients_per_group = 4   # 20 patients, ~15 train
    config.data.val_fraction = 0.2
    config.fl.num_clients = 3
    config.fl.rounds = 2
    config.fl.local_steps = 2
    config.fl.eval_every = 2
    config.fl.client_strategy = "map"   # one copy of the client program: fastest compile
    config.fl.step_strategy = "scan"
    config.xla_opt_level = 0
    config.pretrain.rounds = 2
    config.pretrain.local_steps = 2
    config.pretrain.volumes_per_batch = 2
    config.pretrain.bank_size = 16
    config.finetune.labelled_patients = (1, 2)
  elif arg == "quick":
    # fine-tuning budget measured to learn at N = 1 (20 × 10 steps at lr 3e-3: random init
    # reaches test Dice 0.82 on seed 0; 10 × 4 steps at lr 1e-3 left every method below 0.12)
    config.fl.rounds = 20
    config.fl.local_steps = 10
    config.optimizer.lr = 3e-3
    config.pretrain.rounds = 10
    config.finetune.labelled_patients = (1, 2)
  elif arg not in (None, ""):
    raise common.unknown_variant("configs/acdc_fcl_*.py", arg, ["smoke", "quick"])
  return config
