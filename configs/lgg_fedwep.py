"""Federated semi-supervised segmentation on (phantom) Kaggle LGG: FedWeP and
its baselines (SPEC §1.6, §4.2; seed ``fedwep_scaunet_summary.md``).

One file for every cell of the seed's two tables; the config string picks
``method,scenario,fraction,partition`` (any prefix; defaults in brackets):

  method     [fedwep] | fedwep_real | fedwep_random | cps | mean_teacher
             | pseudoseg (FixMatch-style thresholded pseudo-labels, not PseudoSeg's CAM fusion)
             | supervised_only | fedavg_full (= supervised_only with every patient labelled)
  scenario   [label_at_client] | label_at_server
  fraction   1/16 | 1/8 | [1/4] | 1/2 (or a float)
  partition  [iid] | noniid (= by phantom scanner / TCGA institution)

  python launch.py --config configs/lgg_fedwep.py --workdir runs/fedwep
  python launch.py --config configs/lgg_fedwep.py:fedwep_real,label_at_server,1/8,noniid \
      --workdir runs/fedwep_real_server_8
  python launch.py --config configs/lgg_fedwep.py:cps,label_at_client,1/2,iid --workdir runs/cps \
      --config.model.name=scaunet      # any registered model works

The whole table: ``python -m benchmarks.fedwep_table`` (``--quick`` for a CI-sized run).
"""
import ml_collections

from configs import lgg_centralized, lgg_fedavg

METHODS = ("fedwep", "fedwep_real", "fedwep_random", "cps", "mean_teacher", "pseudoseg",
           "supervised_only", "fedavg_full")
PARTITIONS = {"iid": "iid", "noniid": "by_site", "by_site": "by_site", "dirichlet": "dirichlet"}


def _fraction(s: str) -> float:
  if "/" in s:
    a, b = s.split("/")
    return float(a) / float(b)
  return float(s)


def get_semi_config():
  semi = ml_collections.ConfigDict()
  semi.scenario = "label_at_client"   # label_at_client | label_at_server
  semi.label_fraction = 0.25          # of train patients: 1/16, 1/8, 1/4, 1/2
  semi.label_seed = 0                 # which patients are labelled
  semi.min_labelled = 1
  semi.unsup_weight = 1.0             # λ of the unlabelled loss
  semi.rampup_rounds = 5              # sigmoid ramp-up of λ over rounds (0 = constant)
  semi.client_start_round = 0         # clients idle before this round; -1 = fl.rounds // 2
  semi.pseudo_loss = "ce"             # ℓ on hard pseudo-labels (FedWeP, CPS, PS): ce | dice_ce
  semi.unlabelled_batch_size = 8
  semi.server_steps = 8               # label_at_server: supervised steps per round at the server
  semi.server_batch_size = 8
  semi.client_lr_scale = 1.0          # clients step at optimizer.lr × this (server: optimizer.lr)
  semi.pad_rows = 0                   # -1: pad client arrays to all train slices (one compile per sweep)
  semi.fedwep = ml_collections.ConfigDict(dict(
      p=0.5,                  # probability a weight is perturbed
      sigma=0.1,              # Z_i ~ N(1, σ²)
      num_seeds=8,            # N candidate seeds searched by the server each round
      search_size=8,          # |X| images for the seed search
      search_inputs="auto",   # real | random | auto (real when the server holds images)
      pair_criterion="max",   # max (most similar pair; default) | min | median
      search_strategy="auto", # the N perturbed models: vmap | unrolled | auto (unrolled on CPU)
      pseudo="hard"))         # hard (argmax, SPEC) | soft
  semi.mt = ml_collections.ConfigDict(dict(
      ema_decay=0.99,         # α of the EMA teacher
      ema_warmup=True,        # decay min(1 − 1/(t+1), α), t = global step (Tarvainen & Valpola); False: α
      noise=0.1))             # std of the Gaussian input noise on the student's view
  semi.cps = ml_collections.ConfigDict(dict(
      on_labelled=True))      # CPS loss on labelled batches too (Chen et al. 2021); False: unlabelled only
  semi.ps = ml_collections.ConfigDict(dict(threshold=0.9, strong_noise=0.1, strong_intensity=0.2))
  return semi


def get_config(arg=None):
  parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
  method = parts[0] if len(parts) > 0 else "fedwep"
  scenario = parts[1] if len(parts) > 1 else "label_at_client"
  fraction = _fraction(parts[2]) if len(parts) > 2 else 0.25
  partition = parts[3] if len(parts) > 3 else "iid"
  if method not in METHODS:
    raise ValueError(f"configs/lgg_fedwep.py:{arg}: method {method!r} not in {METHODS}")
  if partition not in PARTITIONS:
    raise ValueError(f"configs/lgg_fedwep.py:{arg}: partition {partition!r} not in "
                     f"{sorted(PARTITIONS)}")
  config = lgg_centralized.get_config()
  config.fl = lgg_fedavg.get_fl_config()
  config.fl.partition = PARTITIONS[partition]
  config.fl.num_clients = 3 if partition == "iid" else 0   # by_site: one client per site
  config.semi = get_semi_config()
  config.semi.scenario = scenario
  config.semi.label_fraction = fraction
  if method == "fedavg_full":
    method, config.semi.scenario, config.semi.label_fraction = "supervised_only", "label_at_client", 1.0
  if config.semi.scenario == "label_at_server":
    # Measured (benchmarks/label_at_server_study.py, README "Label-at-server: why every
    # method first collapsed"): clients whose only loss is self-training must take smaller
    # steps than the server's supervised ones. At the same step size every method collapsed
    # to an all-background model (Dice 0.000), with or without a warm-up; at a tenth,
    # FedWeP matched the server alone. The half-schedule warm-up is a conservative extra.
    config.semi.client_start_round = -1     # half of fl.rounds
    config.semi.client_lr_scale = 0.1
  config.algorithm = method
  return config
