"""Secure aggregation: masks cancel exactly in fixed point, dropped clients'
masks are recovered, a masked update is uncorrelated with the true one, and
masked aggregation reproduces every aggregator (and DP-FedAvg)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_seg.fl import aggregators, dp, secagg

K, BITS = 4, 20


def _contribs(seed=0, d=(50, 40)):
  rng = np.random.default_rng(seed)
  return {"w": rng.normal(size=(K,) + d).astype(np.float32) * 0.1,
          "b": rng.normal(size=(K, 7)).astype(np.float32)}


def test_pair_seeds_are_symmetric_distinct_and_deterministic():
  s = secagg.agree_seeds(K, 7)
  assert s.shape == (K, K, 2) and s.dtype == np.uint32
  np.testing.assert_array_equal(s, s.transpose(1, 0, 2))
  pairs = {tuple(s[i, j]) for i in range(K) for j in range(i + 1, K)}
  assert len(pairs) == K * (K - 1) // 2
  np.testing.assert_array_equal(s, secagg.agree_seeds(K, 7))
  assert not np.array_equal(s, secagg.agree_seeds(K, 8))
  with pytest.raises(ValueError, match=">= 2 clients"):
    secagg.agree_seeds(1)


def test_masked_sum_equals_plain_sum_exactly():
  x = _contribs()
  seeds = jnp.asarray(secagg.agree_seeds(K, 0))
  q = secagg.encode(x, BITS, secagg.max_abs(K, BITS))
  y = secagg.mask(q, seeds, 3)
  alive = jnp.ones((K,), bool)
  total = secagg.unmask_sum(y, alive, seeds, 3)
  plain = jax.tree.map(lambda a: jnp.sum(a, axis=0, dtype=jnp.uint32), q)
  chex.assert_trees_all_equal(total, plain)              # bit-exact integers
  # masks really are there: every client's y differs from q almost everywhere
  for leaf_q, leaf_y in zip(jax.tree.leaves(q), jax.tree.leaves(y)):
    assert float(jnp.mean(leaf_q == leaf_y)) < 1e-3
  # decoded sum: the fixed-point sum, within K rounding errors of the float sum
  s, sat = secagg.secure_sum(x, alive, seeds, 3, BITS)
  chex.assert_trees_all_equal(s, secagg.decode(plain, BITS))
  chex.assert_trees_all_close(s, jax.tree.map(lambda a: a.sum(0), x),
                              atol=K * 2.0 ** -(BITS + 1) + 1e-6, rtol=0)
  assert not bool(jnp.any(sat))


@pytest.mark.parametrize("alive", [[True, False, True, True], [False, True, True, False],
                                   [True, False, False, False]])
def test_dropped_clients_masks_are_recovered_exactly(alive):
  x = _contribs(1)
  seeds = jnp.asarray(secagg.agree_seeds(K, 0))
  q = secagg.encode(x, BITS, secagg.max_abs(K, BITS))
  y = secagg.mask(q, seeds, 0)
  a = jnp.asarray(alive)
  total = secagg.unmask_sum(y, a, seeds, 0)
  plain = jax.tree.map(lambda l: jnp.sum(jnp.where(a.reshape((-1,) + (1,) * (l.ndim - 1)), l, 0),
                                         axis=0, dtype=jnp.uint32), q)
  chex.assert_trees_all_equal(total, plain)


def test_individual_masked_update_is_uncorrelated_with_the_true_one():
  d = (200, 100)
  x = _contribs(2, d)
  seeds = jnp.asarray(secagg.agree_seeds(K, 0))
  q = secagg.encode(x, BITS, secagg.max_abs(K, BITS))
  y = secagg.mask(q, seeds, 5)
  for k in range(K):
    seen = np.asarray(secagg.decode(y, BITS)["w"][k]).ravel()
    true = np.asarray(x["w"][k]).ravel()
    assert abs(np.corrcoef(seen, true)[0, 1]) < 4 / np.sqrt(seen.size)
    # as uint32 the masked words are uniform: mean ≈ 2^31, no structure left
    u = np.asarray(y["w"][k], np.float64).ravel() / 2 ** 32
    assert u.mean() == pytest.approx(0.5, abs=0.01) and u.std() == pytest.approx(
        np.sqrt(1 / 12), abs=0.01)
  # masks are fresh every round
  y2 = secagg.mask(q, seeds, 6)
  assert float(jnp.mean(y2["w"] == y["w"])) < 1e-3


def test_saturation_is_reported():
  x = _contribs()
  x["b"] = x["b"].copy()
  x["b"][2, 0] = 1e6
  seeds = jnp.asarray(secagg.agree_seeds(K, 0))
  _, sat = secagg.secure_sum(x, jnp.ones((K,), bool), seeds, 0, BITS)
  np.testing.assert_array_equal(sat, [False, False, True, False])


def _agg_setup(nan_client=None):
  rng = np.random.default_rng(3)
  glob = {"params": {"w": rng.normal(size=(6, 5)).astype(np.float32),
                     "b": rng.normal(size=(5,)).astype(np.float32)}}
  stacked = jax.tree.map(lambda a: a[None] + 0.05 * rng.normal(size=(K,) + a.shape)
                         .astype(np.float32), glob)
  stats = {"num_samples": np.array([10., 3., 7., 20.], np.float32),
           **{s: rng.uniform(0.2, 1.0, K).astype(np.float32) for s in
              ("cost_pre", "cost_post", "ce_pre", "ce_post", "dice_pre", "dice_post")}}
  if nan_client is not None:
    stacked["params"]["w"][nan_client, 0, 0] = np.nan
  return glob, stacked, stats


@pytest.mark.parametrize("name", ["fedavg", "fedcostw", "costw_ce", "dcew"])
@pytest.mark.parametrize("nan_client", [None, 2])
def test_secure_aggregator_matches_plain_aggregator(name, nan_client):
  glob, stacked, stats = _agg_setup(nan_client)
  seeds = secagg.agree_seeds(K, 0)
  ref, w_ref, f_ref = aggregators.get(name)(glob, stacked, stats)
  new, w, failed, extra = secagg.secure(aggregators.get(name), seeds, 24)(
      glob, stacked, stats, round=jnp.int32(4))
  np.testing.assert_array_equal(w, w_ref)
  assert bool(failed) == bool(f_ref)
  chex.assert_tree_all_finite(new)
  chex.assert_trees_all_close(new, ref, atol=K * 2.0 ** -24 + 1e-6, rtol=0)
  assert not bool(jnp.any(extra["secagg_saturated"]))


def test_secure_dp_fedavg_matches_plain_dp_fedavg():
  glob, stacked, stats = _agg_setup()
  seeds = secagg.agree_seeds(K, 0)
  key = jax.random.PRNGKey(0)
  plain = dp.dp_fedavg(0.1, 1.0)(glob, stacked, stats, rng=key, round=jnp.int32(2))[0]
  sec = dp.dp_fedavg(0.1, 1.0, sum_fn=secagg.make_secure_sum(seeds, 24))(
      glob, stacked, stats, rng=key, round=jnp.int32(2))[0]
  chex.assert_trees_all_close(sec, plain, atol=K * 2.0 ** -24 + 1e-6, rtol=0)


def test_secagg_refuses_median():
  from configs import lgg_fedavg
  c = lgg_fedavg.get_config()
  c.fl.secagg = True
  secagg.check_config(c)
  c.algorithm = "median"
  with pytest.raises(ValueError, match="config.fl.secagg=True with config.algorithm='median'"):
    secagg.check_config(c)
  c.algorithm = "fedavg"
  c.fl.secagg_bits = 31
  with pytest.raises(ValueError, match="config.fl.secagg_bits"):
    secagg.check_config(c)
