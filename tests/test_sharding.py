"""Clients sharded over devices (fl/backends.py 'sharded', fl/backends.py placement): the sharded round equals
the single-device round on 4 forced CPU devices, K=3 padded to 4.

XLA_FLAGS=--xla_force_host_platform_device_count=4 must be set before jax is
imported, so the comparison runs in a subprocess (tests/workers/sharding_worker.py).
"""
import os
import subprocess
import sys

import jax
import pytest

from fedjax_seg.fl import backends

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sharded_round_equals_unsharded_on_4_cpu_devices():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAX_PLATFORMS": "cpu"}
  p = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "workers", "sharding_worker.py")],
                     env=env, capture_output=True, text=True, timeout=900)
  assert p.returncode == 0, p.stdout + p.stderr[-5000:]
  assert "OK sharded == unsharded" in p.stdout and "OK padding client weight 0" in p.stdout


@pytest.mark.slow
def test_semi_fcl_and_core_rounds_sharded_over_4_cpu_devices_equal_the_recorded_numbers():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAX_PLATFORMS": "cpu"}
  p = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "workers",
                                                   "sharding_semi_fcl_worker.py")],
                     env=env, capture_output=True, text=True, timeout=1800)
  assert p.returncode == 0, p.stdout + p.stderr[-5000:]
  for name in ("semi_fedwep_random", "semi_cps", "semi_mean_teacher", "fcl_fcl", "core"):
    assert f"OK {name} sharded over 4 devices" in p.stdout, p.stdout


def test_sharded_is_a_client_strategy():
  assert "sharded" in backends.CLIENT_STRATEGIES
  assert backends.resolve_strategy("sharded") == "sharded"
  for inner in ("sharded", "debug"):
    with pytest.raises(ValueError, match="per-device backend"):
      backends.for_each_client(lambda *a: a, "sharded", inner=inner)


def test_padding_arithmetic_and_pad_clients():
  import numpy as np
  from fedjax_seg.data import federated
  assert [backends.padded_num_clients(k, 4) for k in (1, 3, 4, 5, 8)] == [4, 4, 4, 8, 8]
  data = federated.ClientData(np.ones((3, 2, 4), np.float32), np.ones((3, 2), np.int32),
                              np.ones((3, 2), np.float32))
  p = backends.pad_clients(data, 4)
  assert isinstance(p.x, np.ndarray) and p.x.shape == (4, 2, 4)
  assert p.valid[3].sum() == 0 and p.x[3].sum() == 0 and p.valid[:3].sum() == 6
  assert backends.pad_clients(data, 3) is data
  with pytest.raises(ValueError):
    backends.pad_clients(data, 2)


def test_client_mesh_single_device():
  mesh = backends.client_mesh()
  assert mesh.axis_names == ("clients",) and mesh.size == jax.device_count()
