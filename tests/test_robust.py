"""Robust aggregation: exploding-norm / NaN / empty clients excluded with a
reason, coordinate-wise median and trimmed mean vs NumPy, and one real
round where bad clients cannot poison the global model."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats as sps

from fedjax_seg.data import federated
from fedjax_seg.fl import aggregators as agg
from fedjax_seg.fl import core, server_opt
from fedjax_seg.models import ModelFns
import _helpers

K = 5


def _setup(seed=0):
  rng = np.random.default_rng(seed)
  glob = {"params": {"w": rng.normal(size=(4, 3)).astype(np.float32),
                     "b": rng.normal(size=(6,)).astype(np.float32)}}
  stacked = jax.tree.map(lambda a: a[None] + 0.1 * rng.normal(size=(K,) + a.shape)
                         .astype(np.float32), glob)
  stats = {"num_samples": np.array([10., 3., 7., 20., 5.], np.float32),
           **{s: rng.uniform(0.2, 1.0, K).astype(np.float32) for s in
              ("cost_pre", "cost_post", "ce_pre", "ce_post", "dice_pre", "dice_post")}}
  return glob, stacked, stats


def test_exploding_nan_empty_and_bad_stat_clients_excluded_with_reasons():
  glob, stacked, stats = _setup()
  stacked = jax.tree.map(np.array, stacked)
  stacked["params"]["w"][1] = glob["params"]["w"] + 100.0      # exploding update
  stacked["params"]["b"][2, 3] = np.inf                        # non-finite model
  stats["num_samples"][3] = 0                                  # no samples
  stats["dice_pre"][4] = np.nan                                # bad statistic (dcew only)
  new, w, failed, extra = agg.robust(agg.dcew, norm_k=5.0)(glob, stacked, stats)
  w = np.asarray(w)
  assert not bool(failed) and w[0] == pytest.approx(1.0)
  assert list(np.flatnonzero(extra["excl_norm"])) == [1]
  assert list(np.flatnonzero(extra["excl_nonfinite"])) == [2]
  assert list(np.flatnonzero(extra["excl_empty"])) == [3]
  assert list(np.flatnonzero(extra["excl_stats"])) == [4]
  chex.assert_trees_all_close(new, jax.tree.map(lambda a: a[0], stacked), rtol=1e-6)
  norms = np.asarray(extra["update_norm"])
  assert np.isnan(norms[2]) and norms[1] > 100


@pytest.mark.parametrize("name", ["fedavg", "fedcostw", "costw_ce", "dcew"])
def test_norm_exclusion_composes_with_every_aggregator(name):
  glob, stacked, stats = _setup(1)
  base = agg.get(name)
  ref, w_ref, _ = base(glob, stacked, stats)
  # k = 0: nothing changes
  new, w, _, extra = agg.robust(base, 0.0)(glob, stacked, stats)
  chex.assert_trees_all_equal(new, ref)
  np.testing.assert_array_equal(w, w_ref)
  assert not np.any(extra["excl_norm"])
  # an exploding client is dropped exactly as if it had no samples
  bad = jax.tree.map(np.array, stacked)
  bad["params"]["b"][3] += 1e4
  new, w, _, extra = agg.robust(base, 10.0)(glob, bad, stats)
  ref, w_ref, _ = base(glob, bad, {**stats, "num_samples": np.where(
      np.arange(K) == 3, 0, stats["num_samples"]).astype(np.float32)})
  np.testing.assert_allclose(w, w_ref, rtol=1e-6)
  chex.assert_trees_all_close(new, ref, rtol=1e-6)
  assert list(np.flatnonzero(extra["excl_norm"])) == [3] and float(w[3]) == 0


def test_exploding_clients_threshold_is_k_times_median():
  norms = jnp.array([1.0, 2.0, 3.0, 9.1, 100.0])
  ok = jnp.array([True, True, True, True, False])
  np.testing.assert_array_equal(agg.exploding_clients(norms, ok, 3.0),
                                [False, False, False, True, False])  # median of ok = 2.5
  assert not np.any(agg.exploding_clients(norms, ok, 0.0))


@pytest.mark.parametrize("nan_client", [None, 2])
def test_coordinate_median_matches_numpy(nan_client):
  glob, stacked, stats = _setup(2)
  stacked = jax.tree.map(np.array, stacked)
  ok = np.ones(K, bool)
  if nan_client is not None:
    stacked["params"]["w"][nan_client, 0, 0] = np.nan
    ok[nan_client] = False
  new, w, failed = jax.jit(agg.get("median"))(glob, stacked, stats)
  ref = jax.tree.map(lambda m: np.median(m[ok], axis=0), stacked)   # even n: mean of middle 2
  chex.assert_trees_all_close(new, ref, rtol=1e-6)
  np.testing.assert_allclose(w, np.where(ok, 1 / ok.sum(), 0))
  assert not bool(failed)


@pytest.mark.parametrize("trim", [0.0, 0.2, 0.4])
@pytest.mark.parametrize("nan_client", [None, 4])
def test_trimmed_mean_matches_scipy(trim, nan_client):
  glob, stacked, stats = _setup(3)
  stacked = jax.tree.map(np.array, stacked)
  ok = np.ones(K, bool)
  if nan_client is not None:
    stacked["params"]["b"][nan_client, 1] = np.inf
    ok[nan_client] = False
  new, w, failed = jax.jit(agg.trimmed_mean, static_argnames="trim")(glob, stacked, stats,
                                                                     trim=trim)
  ref = jax.tree.map(lambda m: sps.trim_mean(m[ok], trim, axis=0), stacked)
  chex.assert_trees_all_close(new, ref, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="config.fl.trim"):
    agg.trimmed_mean(glob, stacked, stats, trim=0.5)


def test_median_resists_a_large_outlier_that_moves_the_mean():
  glob, stacked, stats = _setup(4)
  bad = jax.tree.map(np.array, stacked)
  bad["params"]["w"][0] += 50.0
  med, *_ = agg.coordinate_median(glob, bad, stats)
  tm, *_ = agg.trimmed_mean(glob, bad, stats, trim=0.2)
  avg, *_ = agg.fedavg(glob, bad, stats)
  assert float(jnp.max(jnp.abs(med["params"]["w"] - glob["params"]["w"]))) < 1.0
  assert float(jnp.max(jnp.abs(tm["params"]["w"] - glob["params"]["w"]))) < 1.0
  assert float(jnp.max(jnp.abs(avg["params"]["w"] - glob["params"]["w"]))) > 5.0


def test_all_excluded_keeps_global():
  glob, stacked, stats = _setup()
  stats = {**stats, "num_samples": np.zeros(K, np.float32)}
  for name in ("median", "trimmed_mean"):
    new, w, failed = agg.get(name)(glob, stacked, stats)
    assert bool(failed) and float(jnp.sum(w)) == 0
    chex.assert_trees_all_close(new, glob)


def test_registered_and_configured():
  from configs import lgg_fedavg
  from fedjax_seg import train
  from fedjax_seg.fl import train as fl_train
  assert {"median", "trimmed_mean"} <= set(agg.AGGREGATORS) <= set(train.TRAINERS)
  c = lgg_fedavg.get_config()
  c.algorithm = "trimmed_mean"
  c.fl.trim = 0.25
  assert fl_train.agg_kwargs(c) == {"trim": 0.25}
  c.fl.trim = 0.6
  with pytest.raises(ValueError, match="config.fl.trim"):
    fl_train.check_fl_config(c)
  c.algorithm, c.fl.norm_k = "fedavg", -1.0
  with pytest.raises(ValueError, match="config.fl.norm_k"):
    fl_train.check_fl_config(c)


# --- one real round: NaN, exploding and empty clients; FedAdam on top -------------


class _PixelLinear(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(2)(x)


def test_bad_clients_excluded_in_a_round_and_model_stays_finite():
  """5 clients: 0 and 4 good, 1 NaN inputs, 2 inputs ×10⁴ (SGD → exploding
  update), 3 no samples; robust(median) with norm_k and a FedAdam server step,
  through the trainer's build_aggregator and core.make_run_round."""
  from configs import lgg_fedavg
  from fedjax_seg.fl import train as fl_train
  h = 8
  rng = np.random.default_rng(0)
  clients = []
  for k in range(4):
    x = rng.normal(size=(6, h, h, 3)).astype(np.float32)
    clients.append((x, (x[..., 0] > 0).astype(np.int32)))
  clients.append(clients[0])
  data = federated.stack_clients(clients)
  data = federated.ClientData(
      data.x.at[1].set(jnp.nan).at[2].multiply(1e4), data.y,
      data.valid.at[3].set(0.0))
  fns = ModelFns(_PixelLinear())
  variables = fns.init(jax.random.PRNGKey(0), jnp.zeros((1, h, h, 3)))
  c = lgg_fedavg.get_config()
  c.algorithm, c.fl.norm_k, c.fl.server_opt, c.fl.server_lr = "median", 3.0, "fedadam", 0.01
  fl_train.check_fl_config(c)
  hp = _helpers.client_hp(local_steps=2, batch_size=4, stats_samples=4, step_strategy="scan")
  cu = core.make_client_update(fns, optax.sgd(0.1), "dice_ce", 2, hp)
  tx = server_opt.from_config(c.fl)
  rr = jax.jit(core.make_run_round(cu, fl_train.build_aggregator(c, 5), "vmap",
                                   fl_train.agg_kwargs(c), server_opt.make_server_update(tx)))
  state = core.ServerState(variables, jnp.int32(0), server_opt.init(tx, variables))
  state, info = rr(state, data, jax.random.PRNGKey(1))
  chex.assert_tree_all_finite(state.variables)
  row = fl_train._robust_row(jax.device_get(info), [f"c{k}" for k in range(5)])
  assert row["excluded_reasons"] == {"c1": "nonfinite", "c2": "norm", "c3": "empty"}
  np.testing.assert_allclose(info["weights"], [0.5, 0, 0, 0, 0.5])
  assert not bool(info["failed"]) and int(state.round) == 1
  moved = optax.tree.norm(jax.tree.map(jnp.subtract, state.variables, variables))
  assert 0 < float(moved) < 1.0


# --- the default divergence guard (config fl.norm_k) under every aggregator ----------


def _exploding_round(k, factor, seed=3):
  """K clients with update norms ≈ 0.1·√P, client 1's update × factor (finite)."""
  glob, stacked, stats = _setup(seed)
  stacked = jax.tree.map(lambda a: np.array(a[:k]), stacked)
  stats = {n: np.array(v[:k]) for n, v in stats.items()}
  for leaf, g in zip(jax.tree.leaves(stacked), jax.tree.leaves(glob)):
    leaf[1] = g + factor * (leaf[1] - g)
  return glob, stacked, stats


@pytest.mark.parametrize("setting", [
    ("fedavg", False), ("fedcostw", False), ("costw_ce", False), ("dcew", False),
    ("median", False), ("trimmed_mean", False), ("fedavg", True), ("dcew", True)])
@pytest.mark.parametrize("k", [2, 5])
def test_default_guard_drops_a_finite_exploding_client(setting, k):
  """With the shipped default (configs: fl.norm_k = 10), an update 1000× the others'
  gets weight 0 and the aggregate equals the one without that client, under every
  aggregator, with and without secure aggregation, from K = 2 on."""
  from configs import lgg_fedavg
  from fedjax_seg.fl import train as fl_train
  name, secure = setting
  c = lgg_fedavg.get_config()
  assert c.fl.norm_k == 10.0
  c.algorithm, c.fl.secagg = name, secure
  if secure and name == "dcew":
    c.fl.alpha, c.fl.beta, c.fl.gamma = 0.4, 0.3, 0.3
  fl_train.check_fl_config(c)
  aggregate = fl_train.build_aggregator(c, k)
  kw = fl_train.agg_kwargs(c)
  if getattr(aggregate, "wants_round_key", False):
    kw.update(rng=jax.random.PRNGKey(0), round=jnp.int32(0))
  glob, stacked, stats = _exploding_round(k, 1000.0)
  new, w, failed, extra = aggregate(glob, stacked, stats, **kw)
  assert list(np.flatnonzero(extra["excl_norm"])) == [1] and float(w[1]) == 0
  assert not bool(failed)
  # ... and equals the round in which client 1 reported no samples
  dropped = {**stats, "num_samples": np.where(np.arange(k) == 1, 0, stats["num_samples"])
             .astype(np.float32)}
  ref = aggregate(glob, stacked, dropped, **kw)[0]
  chex.assert_trees_all_close(new, ref, rtol=1e-5, atol=1e-5)
  # what it cannot catch: an update within the factor of the others passes
  glob, stacked, stats = _exploding_round(k, 5.0)
  _, w, _, extra = aggregate(glob, stacked, stats, **kw)
  assert not np.any(extra["excl_norm"]) and float(w[1]) > 0


def test_dp_fedavg_bounds_an_exploding_client_by_clipping_not_exclusion():
  """Under DP-FedAvg the norm exclusion is not applied (it would couple clients); the
  clip bounds the exploding client's move of the global model by C/K."""
  from configs import lgg_fedavg
  from fedjax_seg.fl import dp
  from fedjax_seg.fl import train as fl_train
  c = lgg_fedavg.get_config()
  c.fl.dp.enabled, c.fl.dp.clip_norm = True, 0.05
  fl_train.check_fl_config(c)
  aggregate = fl_train.build_aggregator(c, K)
  glob, stacked, stats = _exploding_round(K, 1000.0)
  new, w, _, extra = aggregate(glob, stacked, stats, rng=jax.random.PRNGKey(0),
                               round=jnp.int32(0))
  assert not np.any(extra["excl_norm"]) and float(w[1]) > 0
  deltas = dp.client_deltas(glob, stacked, np.ones(K, bool))
  moved_by_1 = optax.tree.norm(jax.tree.map(lambda d: d[1], deltas))
  assert float(moved_by_1) > 100 * c.fl.dp.clip_norm          # the raw update explodes
  step = optax.tree.norm(jax.tree.map(jnp.subtract, new, glob))
  assert float(step) <= c.fl.dp.clip_norm + 1e-6               # Σ_k (1/K)·clip(Δ_k) ≤ C
