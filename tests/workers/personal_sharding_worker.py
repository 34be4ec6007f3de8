"""FedBN, SCAFFOLD, Ditto and client sampling under the 'sharded' backend on 4 forced CPU
devices (K = 3 clients padded to 4) equal the vmap round. Run by
tests/test_fedbn_scaffold_ditto.py with XLA_FLAGS=--xla_force_host_platform_device_count=4."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import test_fedbn_scaffold_ditto as t  # noqa: E402
from fedjax_seg.fl import aggregators, algorithm, ditto, fedbn  # noqa: E402

assert jax.device_count() == 4, jax.devices()


def run(alg, state, data, backend, m=0, rounds=3):
  r = jax.jit(algorithm.make_round(alg, backend, clients_per_round=m))
  for _ in range(rounds):
    state, _ = r(state, data, jax.random.PRNGKey(1))
  return jax.tree.map(np.asarray, (state.variables, state.clients, state.server))


data, _ = t._data(t._targets())
v_bn = t._bn_variables()
v_q = {"params": {"w": jnp.zeros((2,))}}
cases = {
    "fedbn": (fedbn.make_algorithm(t._bn_client, aggregators.fedavg, "fedbn"),
              lambda: algorithm.ServerState(v_bn, jnp.int32(0),
                                            clients=fedbn.init_clients(v_bn, t.K, "fedbn"))),
    "scaffold": (t._scaffold()[0], lambda: t._scaffold()[1]),
    "ditto": (ditto.make_algorithm(t._quad_client(), t._quad_client(prox=0.5), aggregators.fedavg),
              lambda: algorithm.ServerState(v_q, jnp.int32(0), clients=ditto.init_clients(v_q, t.K))),
}
for name, (alg, init) in cases.items():
  for m in (0, 2):
    a = run(alg, init(), data, "vmap", m)
    b = run(alg, init(), data, "sharded", m)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    print(f"OK {name} m={m} sharded == vmap")
