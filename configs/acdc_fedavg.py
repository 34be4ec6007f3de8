"""FedAvg on ACDC with one client per pathology group (NOR, MINF, DCM, HCM, RV): SPEC §1.3, §1.6.

The by-pathology split is the most non-IID one ACDC offers: each hospital
sees one disease's hearts (dilated, thick-walled, infarcted, ...).

  python launch.py --config configs/acdc_fedavg.py --workdir runs/acdc_fedavg \
      --config.data.root=/data/ACDC --config.data.target_spacing='(0, 1.25, 1.25)' \
      --config.data.image_size=128
  python launch.py --config configs/acdc_fedavg.py:smoke --workdir runs/acdc_fedavg_smoke
"""
from configs import acdc_centralized, lgg_fedavg


def get_config(arg=None):
  config = acdc_centralized.get_config(arg)
  config.algorithm = "fedavg"
  config.fl = lgg_fedavg.get_fl_config()
  config.fl.partition = "by_site"   # site = Info.cfg Group -> by pathology
  config.fl.rounds = 3 if arg == "smoke" else 30
  config.fl.local_steps = 2 if arg == "smoke" else 8
  config.fl.client_batch_size = 8
  return config
