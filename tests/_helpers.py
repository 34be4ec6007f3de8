"""Small helpers shared by several test files."""
import os
import subprocess
import sys


def read_tree(root):
  """Every file below ``root``: {path relative to ``root``: its bytes}."""
  out = {}
  for dirpath, _, files in os.walk(root):
    for f in files:
      path = os.path.join(dirpath, f)
      with open(path, "rb") as fh:
        out[os.path.relpath(path, root)] = fh.read()
  return out


def run_worker(name, timeout, devices=4):
  """``python tests/workers/<name>`` on ``devices`` forced CPU devices (the count must be set
  before jax is imported, hence a subprocess): the completed process, its output as text."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, os.path.join(root, "tests", "workers", name)],
                        env=env, capture_output=True, text=True, timeout=timeout)
