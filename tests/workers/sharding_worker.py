"""Run by tests/test_sharding.py in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=4 (must be set before jax is
imported). Compares the sharded round with the single-device round; exits 0
and prints 'OK ...' lines when they agree."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import chex  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
from _np_init import numpy_init  # noqa: E402
from fedjax_seg import models  # noqa: E402
from fedjax_seg.data import federated  # noqa: E402
from fedjax_seg.fl import aggregators, backends, core, scale  # noqa: E402

H = 16


def make_data(k, seed=0):
  rng = np.random.default_rng(seed)
  per = []
  for i in range(k):
    n = 5 - (i % 3)
    x = rng.normal(size=(n, H, H, 3)).astype(np.float32)
    per.append((x, (x[..., 0] > 0.5).astype(np.int32)))
  return federated.stack_clients(per)


def main():
  assert jax.device_count() == 4, jax.devices()
  fns = models.build({"name": "unet", "base": 4, "depth": 2, "dropout": 0.0}, 2)
  variables = numpy_init(fns, (1, H, H, 3))
  # sharded: 1 client per device; reference: lax.map over clients. Both compile one
  # client body (compile time, not K, dominates this test on a 2-core CPU).
  hp = core.ClientHParams(local_steps=2, batch_size=4, stats_samples=4, step_strategy="scan", prox_mu=0.0)
  cu = core.make_client_update(fns, optax.sgd(0.1), "dice_ce", 2, hp)
  key = jax.random.PRNGKey(1)
  k = 3  # not a multiple of D = 4: padded with one zero-sample client
  data = make_data(k)
  state = core.ServerState(variables, jnp.int32(0))
  ref_state, ref_info = jax.jit(core.make_run_round(cu, aggregators.dcew, "map"))(state, data, key)
  rr = jax.jit(core.make_run_round(cu, aggregators.dcew, "sharded"))
  p_state, p_data, p_key = scale.place_round_inputs(state, data, key)
  lowered = rr.lower(p_state, p_data, p_key)
  text = lowered.as_text()
  assert 'mhlo.num_partitions = 4' in text and '"clients"=4' in text, text[:2000]
  s_state, s_info = lowered.compile()(p_state, p_data, p_key)
  chex.assert_trees_all_close(s_state.variables, ref_state.variables, rtol=2e-4, atol=2e-5)
  for name in ("weights", "num_samples", "cost_post", "dice_pre", "dice_post", "train_loss"):
    np.testing.assert_allclose(s_info[name], ref_info[name], rtol=2e-4, atol=2e-5)
  assert s_info["weights"].shape == (k,) and float(s_info["weights"].sum()) > 0.999
  d = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(s_state.variables), jax.tree.leaves(ref_state.variables)))
  print(f"OK sharded == unsharded, K={k} dcew on 4 devices (padded to 4): max |diff| {d:.2e}",
        flush=True)
  # a padding client (no samples) gets weight 0 from the aggregators themselves
  pdata = backends.pad_clients(data, 4)
  ones = {s: jnp.ones(4) for s in ("ce_pre", "ce_post", "dice_pre", "dice_post", "cost_pre",
                                   "cost_post")}
  stacked = jax.tree.map(lambda a: jnp.stack([a] * 4), variables)
  for agg in ("fedavg", "dcew", "median"):
    _, w, _ = aggregators.get(agg)(variables, stacked, {"num_samples": pdata.num_samples, **ones})
    assert float(w[3]) == 0.0 and abs(float(w.sum()) - 1) < 1e-6, (agg, w)
  print("OK padding client weight 0")


if __name__ == "__main__":
  main()
