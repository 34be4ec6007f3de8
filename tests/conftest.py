"""Shared tiny configs: small phantoms, tiny models, so the suite stays fast."""
import os
import sys

import pytest
from absl import logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO


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
