"""Shared tiny configs: small phantoms, tiny models, so the suite stays fast."""
import os
import sys

import pytest
from absl import logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO

# One persistent compilation cache for every test session, and for the launch.py
# subprocesses tests start (they read the variable): a re-run of the suite reads
# the programs the last one compiled. Its own folder, next to the runs' one;
# FEDJAX_SEG_COMPILE_CACHE= (empty) runs the tests without a cache.
from fedjax_seg import compile_cache  # noqa: E402

os.environ.setdefault(compile_cache.ENV_VAR, compile_cache.default_dir() + "-tests")
compile_cache.enable()


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
  """One phantom cache folder shared by the whole session (written once)."""
  return str(tmp_path_factory.mktemp("phantom_cache"))


def tiny_config(cache_dir, algorithm="centralized"):
  from configs import lgg_centralized
  c = lgg_centralized.get_config()
  c.algorithm = algorithm
  c.data.cache_dir = cache_dir
  c.data.phantom.size = 32
  c.data.phantom.patients_per_site = 4
  c.data.phantom.slices_per_patient = 8
  c.data.image_size = 32
  c.model.base = 8
  c.model.depth = 3
  c.model.dropout = 0.0
  c.batch_size = 8
  c.eval_batch_size = 16
  c.num_epochs = 2
  return c


@pytest.fixture
def tiny(data_cache):
  return lambda algorithm="centralized": tiny_config(data_cache, algorithm)


def tiny_federated(tiny, algorithm="fedavg", **fl):
  """``tiny(algorithm)`` with the FedAvg ``fl`` section made small: 2 rounds of 1 local step,
  client batch 4, 4 stats samples, vmap + scan (one compiled step body), no per-client
  evaluation; ``fl`` sets these or other ``fl`` keys."""
  from configs import lgg_fedavg
  c = tiny(algorithm)
  c.fl = lgg_fedavg.get_fl_config()
  c.fl.update({"rounds": 2, "local_steps": 1, "client_batch_size": 4, "stats_samples": 4,
               "client_strategy": "vmap", "step_strategy": "scan", "eval_clients": False, **fl})
  return c
