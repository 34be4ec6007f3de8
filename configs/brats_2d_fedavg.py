"""FedAvg of a 2D U-Net on BraTS axial slices, one client per contributing site (SPEC §1.1, §1.6, §4.1).

  python launch.py --config configs/brats_2d_fedavg.py --workdir runs/brats2d_fedavg \
      --config.data.root=/data/BraTS2020_TrainingData
  python launch.py --config configs/brats_2d_fedavg.py:smoke --workdir runs/brats2d_smoke

Clients: ``fl.partition = 'by_site'`` groups patients by their contributing
site (``name_mapping.csv`` TCIA institution; the phantom writes one per
scanner site), or 'iid' / 'dirichlet' with ``fl.num_clients``. Switch the
aggregator with ``--config.algorithm=fedcostw|costw_ce|dcew``. The final
table adds WT / TC / ET Dice and HD95 (mm; a patient's slices stacked back
into a volume).
"""
from configs import brats_3d_centralized, common, lgg_fedavg


def get_config(arg=None):
  config = brats_3d_centralized.get_config()
  config.algorithm = "fedavg"
  d = config.data
  d.ndim = 2
  d.phantom.patients_per_site = 6
  d.phantom.slices_per_patient = 32
  d.phantom.size = 64
  d.image_size = 64
  d.depth = 0
  d.normalize = "slice_max"
  d.min_foreground_fraction = 0.05  # drop axial slices that are (nearly) all background
  d.n4.enabled = False              # enable for real data (cached after the first run)
  config.model.ndim = 2
  config.model.base = 16
  config.model.depth = 4
  config.augment.enabled = False
  config.batch_size = 16
  config.eval_batch_size = 32
  config.fl = lgg_fedavg.get_fl_config()
  config.fl.partition = "by_site"
  config.fl.rounds = 20
  config.fl.local_steps = 8
  config.fl.client_batch_size = 8
  if arg == "smoke":
    d.phantom.patients_per_site = 4
    d.phantom.slices_per_patient = 16
    common.small(config)
    config.fl.rounds = 3
    config.fl.local_steps = 2
  elif arg not in (None, ""):
    raise common.unknown_variant("configs/brats_2d_fedavg.py", arg, ["smoke"])
  return config
