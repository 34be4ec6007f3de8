"""DP-FedAvg: clipping, noise scale (statistically), exclusion with a fixed
denominator, the dp_accounting ε against closed forms, refused combinations,
and ε logged by the trainer."""
import json
import math
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_seg.fl import dp
import _helpers

K = 4


def _setup(norms, d=(3, 50), seed=0):
  """Client updates Δ_k with prescribed L2 norms around a random global model."""
  rng = np.random.default_rng(seed)
  glob = {"params": {"w": rng.normal(size=d).astype(np.float32),
                     "b": rng.normal(size=(7,)).astype(np.float32)}}
  deltas = []
  for n in norms:
    dw, db = rng.normal(size=d), rng.normal(size=(7,))
    s = n / np.sqrt((dw ** 2).sum() + (db ** 2).sum())
    deltas.append((dw * s, db * s))
  stacked = {"params": {"w": np.stack([glob["params"]["w"] + a for a, _ in deltas]).astype(
      np.float32), "b": np.stack([glob["params"]["b"] + b for _, b in deltas]).astype(np.float32)}}
  stats = {"num_samples": np.array([10., 3., 7., 20.][:len(norms)], np.float32)}
  return glob, stacked, stats, deltas


def test_clipping_bounds_norms_and_keeps_directions():
  norms = [0.5, 2.0, 10.0, 1.0]
  glob, stacked, stats, deltas = _setup(norms)
  ok = jnp.ones((K,), bool)
  clipped, got_norms, factor = dp.clip_updates(dp.client_deltas(glob, stacked, ok), 1.0)
  np.testing.assert_allclose(got_norms, norms, rtol=1e-4)
  np.testing.assert_allclose(factor, [1.0, 0.5, 0.1, 1.0], rtol=1e-4)
  for k in range(K):
    ref = np.concatenate([deltas[k][0].ravel(), deltas[k][1].ravel()]) * min(1, 1 / norms[k])
    got = np.concatenate([np.asarray(clipped["params"]["w"][k]).ravel(),
                          np.asarray(clipped["params"]["b"][k]).ravel()])
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)


def test_noiseless_dp_fedavg_is_uniform_mean_of_clipped_updates_and_clip_fraction():
  norms = [0.5, 2.0, 10.0, 1.0]
  glob, stacked, stats, deltas = _setup(norms)
  new, w, failed, extra = dp.dp_fedavg(1.0, 0.0)(glob, stacked, stats, rng=jax.random.PRNGKey(0))
  ref = glob["params"]["w"] + sum(a * min(1, 1 / n) for (a, _), n in zip(deltas, norms)) / K
  np.testing.assert_allclose(new["params"]["w"], ref, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(w, [1 / K] * K)
  assert not bool(failed)
  assert float(extra["dp_clip_fraction"]) == pytest.approx(0.5)   # 2.0 and 10.0 > C
  np.testing.assert_array_equal(extra["dp_clipped"], [False, True, True, False])


def test_noise_is_gaussian_with_std_z_c_over_k():
  """Zero updates: x_t − x_{t−1} is pure noise; over 2·10⁵ coordinates its mean
  is 0 and its std is zC/K to < 1% (standard error of the std ≈ 0.16%)."""
  z, c = 1.3, 0.7
  glob = {"params": {"w": np.zeros((400, 500), np.float32)}}
  stacked = {"params": {"w": np.zeros((K, 400, 500), np.float32)}}
  stats = {"num_samples": np.ones((K,), np.float32)}
  agg = jax.jit(dp.dp_fedavg(c, z))
  new, _, _, extra = agg(glob, stacked, stats, rng=jax.random.PRNGKey(0))
  noise = np.asarray(new["params"]["w"]).ravel()
  std = z * c / K
  assert float(extra["dp_noise_std"]) == pytest.approx(std)
  assert abs(noise.mean()) < 5 * std / math.sqrt(noise.size)
  assert noise.std() == pytest.approx(std, rel=0.01)
  kurt = ((noise / noise.std()) ** 4).mean()
  assert kurt == pytest.approx(3.0, abs=0.05)     # Gaussian fourth moment
  # a different round key gives independent noise; the same key the same noise
  new2, *_ = agg(glob, stacked, stats, rng=jax.random.PRNGKey(1))
  assert abs(np.corrcoef(noise, np.asarray(new2["params"]["w"]).ravel())[0, 1]) < 0.01
  new3, *_ = agg(glob, stacked, stats, rng=jax.random.PRNGKey(0))
  np.testing.assert_array_equal(new3["params"]["w"], new["params"]["w"])


def test_noisy_aggregate_is_unbiased_around_clipped_mean():
  """Over 400 independent rounds the noisy aggregate averages to the clipped
  uniform mean (std of that average: zC/K/√400)."""
  norms = [0.5, 2.0, 10.0, 1.0]
  glob, stacked, stats, deltas = _setup(norms)
  z, c = 2.0, 1.0
  agg = dp.dp_fedavg(c, z)
  run = jax.jit(jax.vmap(lambda key: agg(glob, stacked, stats, rng=key)[0]["params"]["w"]))
  draws = np.asarray(run(jax.random.split(jax.random.PRNGKey(3), 400)))
  ref = glob["params"]["w"] + sum(a * min(1, c / n) for (a, _), n in zip(deltas, norms)) / K
  err = (draws.mean(0) - ref) / (z * c / K / math.sqrt(400))
  assert abs(err.mean()) < 0.2 and err.std() == pytest.approx(1.0, rel=0.15)


def test_nan_and_empty_clients_contribute_zero_with_fixed_denominator():
  norms = [0.5, 0.5, 0.5, 0.5]
  glob, stacked, stats, deltas = _setup(norms)
  stacked["params"]["w"][1, 0, 0] = np.nan
  stats["num_samples"][3] = 0
  new, w, failed, extra = dp.dp_fedavg(1.0, 0.0)(glob, stacked, stats, rng=jax.random.PRNGKey(0))
  chex.assert_tree_all_finite(new)
  ref = glob["params"]["w"] + (deltas[0][0] + deltas[2][0]) / K   # denominator stays K
  np.testing.assert_allclose(new["params"]["w"], ref, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(w, [0.25, 0, 0.25, 0])
  assert int(extra["dp_contributors"]) == 2


def test_bounded_sample_weighting():
  glob, stacked, stats, _ = _setup([0.5] * 4)
  w = dp.dp_weights(stats, jnp.ones((K,), bool), K, "samples", sample_cap=8.0)
  np.testing.assert_allclose(w, np.minimum(stats["num_samples"] / 8.0, 1.0) / K)
  assert float(jnp.max(w)) <= 1 / K
  with pytest.raises(ValueError, match="config.fl.dp.sample_cap"):
    dp.dp_weights(stats, jnp.ones((K,), bool), K, "samples", sample_cap=0.0)


# --- accountant -----------------------------------------------------------------


def test_epsilon_matches_dp_accounting_and_closed_forms():
  import dp_accounting
  from dp_accounting import rdp
  z, t, delta = 1.1, 30, 1e-5
  acc = rdp.RdpAccountant()
  acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), t))
  assert dp.epsilon(z, t, delta) == pytest.approx(acc.get_epsilon(delta), rel=1e-12)
  # T Gaussian mechanisms = one with μ = √T/z; its tight ε (Balle & Wang 2018)
  exact = dp.gaussian_epsilon_exact(z, t, delta)
  # the classic RDP conversion, closed form: min_α Tα/(2z²) + log(1/δ)/(α−1)
  a = 1 + math.sqrt(2 * z ** 2 * math.log(1 / delta) / t)
  classic = t * a / (2 * z ** 2) + math.log(1 / delta) / (a - 1)
  eps_rdp = dp.epsilon(z, t, delta, accountant="rdp")
  assert exact < eps_rdp <= classic               # RDP: valid, tighter than classic
  assert eps_rdp < 1.25 * exact
  assert dp.epsilon(z, t, delta, accountant="pld") == pytest.approx(exact, rel=0.02)
  # the closed form itself, by hand at z = 1, T = 1: δ(ε) = Φ(1/2 − ε) − e^ε Φ(−1/2 − ε)
  phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))
  e1 = dp.gaussian_epsilon_exact(1.0, 1, 1e-5)
  assert phi(0.5 - e1) - math.exp(e1) * phi(-0.5 - e1) == pytest.approx(1e-5, rel=1e-6)
  assert e1 == pytest.approx(4.377, abs=0.002)
  assert dp.epsilon(z, 0, delta) == 0.0 and dp.epsilon(0.0, 5, delta) == math.inf
  assert dp.epsilon(z, 10, delta) < dp.epsilon(z, 20, delta)


def test_noise_calibration_round_trip():
  z = dp.noise_multiplier_for(8.0, 1e-5, 15)
  assert dp.epsilon(z, 15, 1e-5) == pytest.approx(8.0, rel=1e-3)
  assert dp.noise_multiplier_for(2.0, 1e-5, 15) > z


# --- config ---------------------------------------------------------------------


def _config(algorithm="fedavg", **dp_kw):
  from configs import lgg_dp_fedavg
  c = lgg_dp_fedavg.get_config()
  c.algorithm = algorithm
  for k, v in dp_kw.items():
    c.fl.dp[k] = v
  return c


@pytest.mark.parametrize("algorithm", ["fedcostw", "costw_ce", "dcew", "median", "trimmed_mean"])
def test_dp_refuses_aggregators_without_bounded_weights(algorithm):
  with pytest.raises(ValueError, match=rf"config.fl.dp.enabled=True with "
                     rf"config.algorithm='{algorithm}'"):
    dp.check_config(_config(algorithm))


def test_dp_config_errors_name_keys():
  dp.check_config(_config())
  c = _config()
  c.fl.norm_k = 3.0   # accepted: DP-FedAvg's clipping replaces the norm exclusion
  dp.check_config(c)
  with pytest.raises(ValueError, match="noise_multiplier and config.fl.dp.target_epsilon"):
    dp.check_config(_config(noise_multiplier=1.0))
  with pytest.raises(ValueError, match="config.fl.dp.weighting"):
    dp.check_config(_config(weighting="dice"))
  with pytest.raises(ValueError, match="config.fl.dp.clip_norm"):
    dp.check_config(_config(clip_norm=0.0))
  c = _config(target_epsilon=0.0, noise_multiplier=0.0)
  assert dp.resolve_noise_multiplier(c.fl) == 0.0
  c = _config(target_epsilon=10.0)
  assert dp.epsilon(dp.resolve_noise_multiplier(c.fl), c.fl.rounds, 1e-5) == pytest.approx(
      10.0, rel=1e-3)


def _round_wiring(dp_on, secagg_on):
  """One round through the trainer's build_aggregator with a per-pixel linear model."""
  import flax.linen as nn
  import optax
  from configs import lgg_fedavg
  from fedjax_seg.data import federated
  from fedjax_seg.fl import core, server_opt
  from fedjax_seg.fl import train as fl_train
  from fedjax_seg.models import ModelFns

  class Lin(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return nn.Dense(2)(x)
  rng = np.random.default_rng(0)
  xs = [rng.normal(size=(4, 8, 8, 3)).astype(np.float32) for _ in range(3)]
  data = federated.stack_clients([(x, (x[..., 0] > 0).astype(np.int32)) for x in xs])
  fns = ModelFns(Lin())
  v0 = fns.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
  c = lgg_fedavg.get_config()
  c.fl.dp = _config().fl.dp
  c.fl.dp.enabled, c.fl.dp.target_epsilon, c.fl.dp.noise_multiplier = dp_on, 0.0, 0.5
  c.fl.secagg, c.fl.secagg_bits = secagg_on, 24
  c.fl.server_opt = "fedavgm"
  fl_train.check_fl_config(c)
  hp = _helpers.client_hp(local_steps=2, batch_size=4, stats_samples=4, step_strategy="scan")
  cu = core.make_client_update(fns, optax.sgd(0.5), "sparse_ce", 2, hp)
  tx = server_opt.from_config(c.fl)
  rr = jax.jit(core.make_run_round(cu, fl_train.build_aggregator(c, 3, 0.5), "vmap", {},
                                   server_opt.make_server_update(tx)))
  state, info = rr(core.ServerState(v0, jnp.int32(0), server_opt.init(tx, v0)), data,
                   jax.random.PRNGKey(1))
  return state, jax.device_get(info)


def test_dp_round_through_trainer_wiring_with_and_without_secagg():
  plain, info = _round_wiring(True, False)
  sec, info_s = _round_wiring(True, True)
  chex.assert_tree_all_finite(plain.variables)
  # same noise key, same clipped updates: secure aggregation changes only rounding
  chex.assert_trees_all_close(sec.variables, plain.variables, atol=1e-5, rtol=0)
  assert float(info["dp_noise_std"]) == pytest.approx(0.5 * 1.0 / 3)
  assert 0 <= float(info["dp_clip_fraction"]) <= 1 and "excl_norm" in info
  assert "secagg_saturated" in info_s


@pytest.mark.slow
def test_trainer_logs_epsilon_of_the_accountant_and_resumes_exactly(tiny, tmp_path):
  """DP-FedAvg + secure aggregation + FedAdam through train.run: ε per round is
  the accountant's; an interrupted run resumes (server optimiser state and
  DP noise included) to the uninterrupted result."""
  from conftest import tiny_federated
  from fedjax_seg import runlog, train
  c = tiny_federated(tiny)
  c.fl.dp = _config().fl.dp
  c.fl.dp.target_epsilon = 0.0
  c.fl.dp.noise_multiplier = 1.1
  c.fl.dp.clip_norm = 0.5
  c.fl.secagg = True
  c.fl.server_opt, c.fl.server_lr = "fedadam", 1e-3
  full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
  res = train.run(c, full)
  with open(os.path.join(full, "metrics.jsonl")) as f:
    rows = [json.loads(l) for l in f]
  assert [r["round"] for r in rows] == [0, 1, 2]
  for r in rows:
    assert r["epsilon"] == pytest.approx(dp.epsilon(1.1, r["round"], 1e-5), rel=1e-9)
  for r in rows[1:]:
    assert 0.0 <= r["dp_clip_fraction"] <= 1.0
    assert r["dp_noise_std"] == pytest.approx(1.1 * 0.5 / 3, rel=1e-6)
    assert r["excluded_reasons"] == {} and len(r["client_update_norm"]) == 3
    assert r["secagg_saturated"] == []
  assert res["dp"]["epsilon"] == pytest.approx(dp.epsilon(1.1, 2, 1e-5))
  with pytest.raises(train.Interrupted):
    train.run(c, cut, stop_after=1)
  train.run(c, cut)
  a, b = runlog.Checkpointer(full), runlog.Checkpointer(cut)
  sa, sb = a.manager.restore(2), b.manager.restore(2)
  a.close(); b.close()
  chex.assert_trees_all_close(sa, sb, rtol=1e-6)
