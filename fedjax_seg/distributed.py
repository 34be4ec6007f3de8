"""Several processes / hosts: ``jax.distributed.initialize`` from
flags or environment. Imports only jax, and must run before any JAX
computation (launch.py calls it right after flag parsing).

    python launch.py --config ... --workdir DIR --distributed \
        --coordinator_address=HOST:PORT --num_processes=N --process_id=I

Unset values come from the environment (JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID); if all three are unset,
``jax.distributed.initialize()`` auto-detects the cluster (SLURM, Open MPI,
Cloud TPU, ...). After it, ``jax.devices()`` lists the devices of every
process and the 'sharded' client strategy spreads clients over all of them.
"""
from __future__ import annotations

import os
from typing import Optional

ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}


def resolve(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
            process_id: Optional[int] = None, environ=None) -> dict:
  """Flags win over the environment; returns the kwargs for initialize()."""
  environ = os.environ if environ is None else environ
  out = {"coordinator_address": coordinator_address or environ.get(ENV["coordinator_address"]) or None}
  for name, val in (("num_processes", num_processes), ("process_id", process_id)):
    if val is None and environ.get(ENV[name], "") != "":
      try:
        val = int(environ[ENV[name]])
      except ValueError:
        raise ValueError(f"{ENV[name]}={environ[ENV[name]]!r}: expected an integer") from None
    out[name] = val
  given = [k for k, v in out.items() if v is not None]
  if given and len(given) < 3 and out["coordinator_address"] is None:
    raise ValueError(f"--distributed: {given} set but no coordinator address "
                     f"(--coordinator_address or {ENV['coordinator_address']})")
  if out["num_processes"] is not None and out["num_processes"] < 1:
    raise ValueError(f"--num_processes={out['num_processes']} must be >= 1")
  if (out["process_id"] is not None and out["num_processes"] is not None
      and not 0 <= out["process_id"] < out["num_processes"]):
    raise ValueError(f"--process_id={out['process_id']} must be in [0, "
                     f"{out['num_processes']})")
  return out


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> dict:
  """Calls ``jax.distributed.initialize``; returns a summary of the process group."""
  import jax
  kw = resolve(coordinator_address, num_processes, process_id)
  jax.distributed.initialize(**kw)
  return {"process_index": jax.process_index(), "process_count": jax.process_count(),
          "local_devices": jax.local_device_count(), "devices": jax.device_count(),
          "backend": jax.default_backend()}


def process_workdir(workdir: str) -> str:
  """Process 0 writes to ``workdir``; process i > 0 to ``workdir/process_i`` (its
  own logs and checkpoint copy: processes on one host must not share files)."""
  import jax
  i = jax.process_index()
  return workdir if i == 0 else os.path.join(workdir, f"process_{i}")
