"""Run by tests/test_distributed.py: ``python distributed_worker.py ADDR N I``
starts process I of N on localhost (one CPU device each), runs ONE sharded
federated round over the devices of all processes (K=3 clients, padded to
4) and prints 'RESULT <json>' with checksums the test compares across processes."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from fedjax_seg import distributed  # noqa: E402  (imports only jax)


def main(addr, n, i):
  info = distributed.initialize(addr, int(n), int(i))
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from fedjax_seg import models
  from fedjax_seg.fl import aggregators, core, scale
  from sharding_worker import make_data, numpy_init
  assert jax.process_count() == int(n) and jax.device_count() == int(n) * jax.local_device_count()
  fns = models.build({"name": "unet", "base": 4, "depth": 2, "dropout": 0.0}, 2)
  variables = numpy_init(fns, (1, 16, 16, 3))  # same NumPy seed in every process
  hp = core.ClientHParams(local_steps=1, batch_size=4, stats_samples=4, step_strategy="scan", prox_mu=0.0)
  cu = core.make_client_update(fns, optax.sgd(0.1), "dice_ce", 2, hp)
  state, data, key = scale.place_round_inputs(core.ServerState(variables, jnp.int32(0)),
                                              make_data(3), jax.random.PRNGKey(1))
  new_state, out = jax.jit(core.make_run_round(cu, aggregators.dcew, "sharded"))(state, data, key)
  leaves = jax.tree.leaves(new_state.variables)
  assert all(a.is_fully_replicated for a in leaves)
  res = {"process": jax.process_index(), "devices": jax.device_count(), **info,
         "round": int(new_state.round), "weights": np.asarray(out["weights"]).tolist(),
         "checksum": float(sum(np.asarray(a, np.float64).sum() for a in leaves)),
         "delta": float(sum(np.abs(np.asarray(a) - np.asarray(b)).sum()
                            for a, b in zip(leaves, jax.tree.leaves(variables))))}
  print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
  main(*sys.argv[1:4])
