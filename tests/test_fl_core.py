"""Federated core: execution strategies agree, FedAvg maths, one compile per
run, NaN clients cannot poison the global model, resume is exact."""
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_seg import losses, models, steps
from fedjax_seg.data import federated, partition
from fedjax_seg.fl import aggregators, core
import _helpers

K, N, H = 3, 6, 16


@pytest.fixture(scope="module")
def setup():
  fns = models.build({"name": "unet", "base": 4, "depth": 2, "dropout": 0.0}, 2)
  rng = np.random.default_rng(0)
  per_client = []
  for k in range(K):
    n = N - k  # unequal client sizes
    x = rng.normal(size=(n, H, H, 3)).astype(np.float32)
    y = (x[..., 0] > 0.5).astype(np.int32)
    per_client.append((x, y))
  data = federated.stack_clients(per_client)
  variables = fns.init(jax.random.PRNGKey(0), jnp.zeros((1, H, H, 3)))
  return fns, data, variables


_COMPILED = {}


def _round(fns, data, variables, client_strategy, step_strategy, sgd=False, aggregator="fedavg",
           local_steps=2, loss="dice_ce"):
  """One round; identical settings reuse one compiled program across tests."""
  key = (client_strategy, step_strategy, sgd, aggregator, local_steps, loss)
  if key not in _COMPILED:
    tx = optax.sgd(0.1) if sgd else optax.adam(1e-2)
    hp = _helpers.client_hp(local_steps=local_steps, batch_size=4, stats_samples=4,
                            step_strategy=step_strategy)
    cu = core.make_client_update(fns, tx, loss, 2, hp)
    _COMPILED[key] = jax.jit(core.make_run_round(cu, aggregators.get(aggregator),
                                                 client_strategy))
  return _COMPILED[key](core.ServerState(variables, jnp.int32(0)), data, jax.random.PRNGKey(1))


def test_stack_clients_shapes_and_counts(setup):
  _, data, _ = setup
  chex.assert_shape(data.x, (K, N, H, H, 3))
  chex.assert_shape(data.y, (K, N, H, H))
  chex.assert_shape(data.valid, (K, N))
  np.testing.assert_array_equal(np.asarray(data.num_samples), [6, 5, 4])
  assert float(jnp.abs(data.x[2, 4:]).sum()) == 0.0  # padding rows are zeros


def test_sample_batch_never_draws_padding(setup):
  _, data, _ = setup
  c = jax.tree.map(lambda a: a[2], data)  # 4 real rows of 6
  for s in range(20):
    x, y, m = federated.sample_batch(c, jax.random.PRNGKey(s), 8)
    assert float(jnp.min(jnp.abs(x).reshape(8, -1).sum(1))) > 0
    np.testing.assert_array_equal(np.asarray(m), np.ones(8))
  empty = federated.ClientData(c.x, c.y, jnp.zeros_like(c.valid))
  _, _, m = federated.sample_batch(empty, jax.random.PRNGKey(0), 8)
  assert float(m.sum()) == 0.0


@pytest.mark.parametrize("client_strategy,step_strategy",
                         [("unrolled", "unrolled"), ("map", "scan")])
def test_strategies_compute_the_same_round(setup, client_strategy, step_strategy):
  fns, data, variables = setup
  ref_state, ref_info = _round(fns, data, variables, "vmap", "scan")
  state, info = _round(fns, data, variables, client_strategy, step_strategy)
  chex.assert_trees_all_close(state.variables, ref_state.variables, rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(info["weights"], ref_info["weights"], rtol=1e-5)
  np.testing.assert_allclose(info["train_loss"], ref_info["train_loss"], rtol=1e-4)
  assert int(state.round) == 1


def test_fedavg_one_sgd_step_equals_centralised_step(setup):
  """E=1 SGD step, equal client batch sizes, a per-pixel-mean loss (CE):
  Σ_k (s_k/S)(w − η g_k) with equal s_k = w − η·mean_k g_k = one SGD step
  on the pooled batch of the same samples."""
  fns, _, variables = setup
  rng = np.random.default_rng(3)
  per_client = [(rng.normal(size=(4, H, H, 3)).astype(np.float32),
                 rng.integers(0, 2, size=(4, H, H)).astype(np.int32)) for _ in range(K)]
  data = federated.stack_clients(per_client)
  lr = 0.1
  state, _ = _round(fns, data, variables, "vmap", "scan", sgd=True,
                    local_steps=1, loss="sparse_ce")
  # Re-derive the batches each client sampled (same key schedule as core).
  keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(1), 0), K)
  xs, ys = [], []
  for k in range(K):
    _, tkey = jax.random.split(keys[k])
    bkey, _ = jax.random.split(jax.random.split(tkey, 1)[0])
    x, y, _ = federated.sample_batch(jax.tree.map(lambda a: a[k], data), bkey, 4)
    xs.append(x); ys.append(y)
  x, y = jnp.concatenate(xs), jnp.concatenate(ys)
  step = steps.make_train_step(fns, optax.sgd(lr), "sparse_ce", 2)
  central, _, _ = step(variables, optax.sgd(lr).init(variables["params"]), x, y,
                       jnp.ones((len(x),)), jax.random.PRNGKey(0))
  chex.assert_trees_all_close(state.variables["params"], central["params"], rtol=1e-4, atol=1e-6)


def test_run_round_compiles_once(setup):
  fns, data, variables = setup
  traces = []
  hp = _helpers.client_hp(local_steps=1, batch_size=2, stats_samples=2, step_strategy="scan")
  cu = core.make_client_update(fns, optax.adam(1e-3), "dice_ce", 2, hp)
  inner = core.make_run_round(cu, aggregators.fedavg, "vmap")

  def counted(state, data, key):
    traces.append(1)
    return inner(state, data, key)
  rr = jax.jit(counted)
  state = core.ServerState(variables, jnp.int32(0))
  for _ in range(3):
    state, _ = rr(state, data, jax.random.PRNGKey(0))
  assert len(traces) == 1
  assert int(state.round) == 3


def test_nan_client_is_excluded_and_model_stays_finite(setup):
  fns, data, variables = setup
  bad = federated.ClientData(data.x.at[1].set(jnp.nan), data.y, data.valid)
  for name in ("fedavg", "dcew"):
    state, info = _round(fns, bad, variables, "vmap", "scan", aggregator=name)
    chex.assert_tree_all_finite(state.variables)
    w = np.asarray(info["weights"])
    assert w[1] == 0 and w.sum() == pytest.approx(1.0, abs=1e-5)
    assert not bool(info["failed"])
  allbad = federated.ClientData(data.x * jnp.nan, data.y, data.valid)
  state, info = _round(fns, allbad, variables, "vmap", "scan")
  assert bool(info["failed"])
  chex.assert_trees_all_close(state.variables, variables)


def test_partitions_deterministic_and_disjoint():
  ids = [f"p{i:02d}" for i in range(20)]
  sites = {p: "ABCD"[i % 4] for i, p in enumerate(ids)}
  tf = {p: i / 20 for i, p in enumerate(ids)}
  for kind in ("iid", "by_site", "dirichlet"):
    a = partition.make_partition(kind, ids, 4, 0, sites, tf, alpha=0.3)
    b = partition.make_partition(kind, ids, 4, 0, sites, tf, alpha=0.3)
    assert a == b
    flat = sum(a, [])
    assert sorted(flat) == ids and len(a) == 4 and all(a)
  by = partition.by_site(ids, sites, 4)
  assert all(len({sites[p] for p in c}) == 1 for c in by)
  assert partition.iid(ids, 4, 1) != partition.iid(ids, 4, 2)
  with pytest.raises(ValueError, match="only 4 sites"):
    partition.by_site(ids, sites, 5)
