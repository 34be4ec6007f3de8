"""Aggregators vs NumPy implementations of the SPEC §4.1 formulas."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_seg.fl import aggregators as agg

K = 4


def _setup(nan_client=None, seed=0):
  rng = np.random.default_rng(seed)
  stacked = {"params": {"w": rng.normal(size=(K, 3, 2)).astype(np.float32),
                        "b": rng.normal(size=(K, 5)).astype(np.float32)}}
  glob = {"params": {"w": np.zeros((3, 2), np.float32), "b": np.ones((5,), np.float32)}}
  stats = {
      "num_samples": np.array([10., 3., 7., 20.], np.float32),
      "cost_pre": rng.uniform(0.5, 1.5, K).astype(np.float32),
      "cost_post": rng.uniform(0.2, 1.0, K).astype(np.float32),
      "ce_pre": rng.uniform(0.3, 2.0, K).astype(np.float32),
      "ce_post": rng.uniform(0.1, 1.0, K).astype(np.float32),
      "dice_pre": rng.uniform(0.05, 0.5, K).astype(np.float32),
      "dice_post": rng.uniform(0.2, 0.9, K).astype(np.float32),
  }
  if nan_client is not None:
    stacked["params"]["w"][nan_client, 0, 0] = np.nan
  return glob, stacked, stats


def _sig(x):
  return 1 / (1 + np.exp(-x))


def _np_weights(name, stats, ok, alpha=0.5, beta=0.25, gamma=0.25):
  s = np.where(ok, stats["num_samples"], 0.0)
  S = s.sum()
  if name == "fedavg":
    return s / S
  if name == "fedcostw":
    c = np.where(ok, stats["cost_pre"] / stats["cost_post"], 0)
    return alpha * s / S + (1 - alpha) * c / c.sum()
  c = np.where(ok, _sig(stats["ce_pre"]) / _sig(stats["ce_post"]), 0)
  if name == "costw_ce":
    return alpha * s / S + (1 - alpha) * c / c.sum()
  d = np.where(ok, stats["dice_post"] / stats["dice_pre"], 0)
  return alpha * s / S + beta * c / c.sum() + gamma * d / d.sum()


@pytest.mark.parametrize("name", ["fedavg", "fedcostw", "costw_ce", "dcew"])
@pytest.mark.parametrize("nan_client", [None, 1])
def test_aggregator_matches_numpy(name, nan_client):
  glob, stacked, stats = _setup(nan_client)
  ok = np.ones(K, bool) if nan_client is None else np.arange(K) != nan_client
  w_ref = _np_weights(name, stats, ok)
  new, w, failed = jax.jit(agg.get(name))(glob, stacked, stats)
  np.testing.assert_allclose(np.asarray(w), w_ref, rtol=1e-5, atol=1e-7)
  assert float(jnp.sum(w)) == pytest.approx(1.0, abs=1e-6)
  assert not bool(failed)
  ref = jax.tree.map(lambda m: np.tensordot(w_ref, np.where(
      ok.reshape((-1,) + (1,) * (m.ndim - 1)), m, 0), axes=1), stacked)
  chex.assert_trees_all_close(new, ref, rtol=1e-5, atol=1e-6)
  chex.assert_tree_all_finite(new)
  chex.assert_trees_all_equal_shapes(new, glob)


def test_fedavg_is_sample_weighted_mean_by_hand():
  stacked = {"params": {"w": np.array([[1.0], [4.0]], np.float32)}}
  glob = {"params": {"w": np.array([0.0], np.float32)}}
  stats = {"num_samples": np.array([1.0, 3.0], np.float32)}
  new, w, _ = agg.fedavg(glob, stacked, stats)
  np.testing.assert_allclose(new["params"]["w"], [(1 * 1 + 3 * 4) / 4])


def test_nonfinite_stat_excludes_client_and_empty_client_excluded():
  glob, stacked, stats = _setup()
  stats["dice_pre"][2] = np.inf
  stats["num_samples"][3] = 0.0
  _, w, failed = agg.dcew(glob, stacked, stats)
  w = np.asarray(w)
  assert w[2] == 0 and w[3] == 0 and not bool(failed)
  assert w.sum() == pytest.approx(1.0, abs=1e-6)
  # fedavg does not read dice, so the inf dice client stays in
  _, w, _ = agg.fedavg(glob, stacked, stats)
  assert np.asarray(w)[2] > 0


@pytest.mark.parametrize("name", ["fedavg", "dcew"])
def test_all_clients_nonfinite_keeps_global(name):
  glob, stacked, stats = _setup()
  stacked["params"]["b"][:] = np.nan
  new, w, failed = agg.get(name)(glob, stacked, stats)
  assert bool(failed)
  chex.assert_trees_all_close(new, glob)
  assert float(jnp.sum(w)) == 0.0


def test_unknown_aggregator_names_key():
  with pytest.raises(ValueError, match="config.fl.aggregator='median2'"):
    agg.get("median2")


# --- the flat view: coordinate-wise aggregators on one vector per client ---------------


def _flat_cases():
  return [("fedavg", agg.fedavg), ("fedcostw", agg.fedcostw), ("costw_ce", agg.costw_ce),
          ("dcew", agg.dcew), ("median", agg.coordinate_median),
          ("trimmed_mean", agg.trimmed_mean), ("robust_fedavg", agg.robust(agg.fedavg, 2.0)),
          ("nova_dcew", agg.nova(agg.dcew))]


@pytest.mark.parametrize("name,fn", _flat_cases())
@pytest.mark.parametrize("nan_client", [None, 1])
def test_aggregator_on_the_flat_view_matches_the_pytree(name, fn, nan_client):
  """model_aggregate runs every coordinate-wise aggregator on one vector per client: the
  same model, weights, failure flag and extras as on the pytrees (a non-finite client,
  and for robust an exploding one, included)."""
  from fedjax_seg.fl import core
  glob, stacked, stats = _setup(nan_client)
  stats = {**stats, "local_steps": np.array([1., 2., 3., 4.], np.float32)}
  if name.startswith("robust"):
    stacked["params"]["b"][3] *= 50.0  # an exploding update: excluded by the norm guard
  assert getattr(fn, "coordinatewise", False)
  state = core.ServerState(glob, jnp.int32(0))

  def run(s, u, st):
    with agg.flat_aggregation():
      return core.model_aggregate(fn)(s, u, st, jax.random.PRNGKey(0))
  flat = jax.jit(run)(state, {"model": stacked}, stats)
  # each of the 2 vectors is a concatenation of the clients' rows; outside
  # flat_aggregation (vmap, sharded, one-program rounds) the pytrees stay
  plain = jax.jit(lambda s, u, st: core.model_aggregate(fn)(s, u, st, jax.random.PRNGKey(0)))
  n_concat = [f.lower(state, {"model": stacked}, stats).as_text().count("stablehlo.concatenate")
              for f in (jax.jit(run), plain)]
  assert n_concat[0] >= n_concat[1] + 2, n_concat
  ref = jax.jit(fn)(glob, stacked, stats)
  chex.assert_trees_all_close(flat[0], ref[0], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(flat[1]), np.asarray(ref[1]), rtol=1e-6)
  assert bool(flat[2]) == bool(ref[2])
  extra = ref[3] if len(ref) > 3 else {}
  chex.assert_trees_all_close(flat[3], extra, rtol=1e-5)
  if name.startswith("robust"):
    assert bool(flat[3]["excl_norm"][3]) and float(flat[1][3]) == 0.0


def test_flat_view_round_trip_and_fallback():
  glob, stacked, _ = _setup()
  g, m, unflatten = agg.flat_view(glob, stacked, groups=1)
  assert len(g) == 1 and g[0].shape == (11,) and m[0].shape == (K, 11)
  # leaves in jax.tree.leaves order: b (5) then w (3x2); client rows in order
  np.testing.assert_array_equal(np.asarray(m[0][2, :5]), stacked["params"]["b"][2])
  np.testing.assert_array_equal(np.asarray(m[0][2, 5:]), stacked["params"]["w"][2].ravel())
  chex.assert_trees_all_equal(unflatten(g), glob)
  # two groups: one run of leaves each, of about equal size
  g, m, unflatten = agg.flat_view(glob, stacked, groups=2)
  assert [v.shape for v in m] == [(K, 5), (K, 6)]
  chex.assert_trees_all_equal(unflatten(g), glob)
  assert agg._groups([1, 1, 1, 1, 4], 2) == [[0, 1, 2, 3], [4]]
  assert agg._groups([5, 1, 1, 1], 4) == [[0], [1], [2, 3]]
  assert agg._groups([3, 3], 8) == [[0], [1]]
  # mixed dtypes or an integer model stay pytrees (the aggregator gets the leaves)
  mixed = {"a": np.zeros((2,), np.float32), "n": np.zeros((3,), np.int32)}
  assert agg.flat_view(mixed, jax.tree.map(lambda a: np.stack([a] * K), mixed)) is None
  # aggregators that draw noise or masks per leaf are not flattened
  from fedjax_seg.fl import dp, secagg
  assert not getattr(dp.dp_fedavg(1.0, 1.0, "uniform", 0), "coordinatewise", False)
  seeds = secagg.agree_seeds(K, 0)
  assert not getattr(agg.robust(secagg.secure(agg.fedavg, seeds, 16)), "coordinatewise", False)
