"""Client sampling (algorithm.make_round clients_per_round=m): m distinct clients per
round drawn from the round key, equal frequency, unsampled clients' state untouched,
the round equal to a NumPy round over the sampled clients only; DP accounting at q=m/K."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _helpers

from fedjax_seg.fl import aggregators, algorithm, dp


def _toy(k=6, n=4, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(k, n)).astype(np.float32) + np.arange(k, dtype=np.float32)[:, None]
  valid = np.ones((k, n), np.float32)
  valid[1, 2:] = 0
  return {"x": jnp.asarray(x), "valid": jnp.asarray(valid)}, x, valid


def _alg(lr=0.5, steps=2):
  """test_algorithm's toy method: E steps towards each client's data mean, FedAvg."""
  from test_algorithm import _mean_estimation
  return _mean_estimation(lr, steps)


def _state(k):
  return algorithm.ServerState({"w": jnp.float32(0.0)}, jnp.int32(0),
                               clients={"rounds": jnp.zeros((k,), jnp.int32),
                                        "last": jnp.full((k,), -7.0, jnp.float32)})


@pytest.mark.parametrize("backend", ["vmap", "unrolled", "sharded", "loop", "loop2", "loop4",
                                     "host2", "loop1t2"])
def test_sampled_round_matches_numpy_over_the_sampled_clients(backend):
  """loop2: the m = 3 sampled clients as calls of 2 and 1; loop4: one call of 3; host2: loop2
  with host-called steps."""
  k, m = 6, 3
  data, x, valid = _toy(k)
  run = _helpers.make_round(_alg(), backend, clients_per_round=m)
  run = _helpers.jit_round(run, backend)
  state, key = _state(k), jax.random.PRNGKey(4)
  w, rounds, last = 0.0, np.zeros(k, int), np.full(k, -7.0)
  for t in range(4):
    before = jax.tree.map(np.asarray, state.clients)
    state, info = run(state, data, key)
    s = np.asarray(info["sampled"])
    r_key = jax.random.fold_in(key, t)
    idx = np.asarray(algorithm.sample_clients(
        jax.random.fold_in(r_key, algorithm.SAMPLE_KEY_SALT), k, m))
    assert s.sum() == m and np.flatnonzero(s).tolist() == idx.tolist()
    # NumPy round over the sampled clients only
    n = valid.sum(1)
    loc = {}
    for j in idx:
      mean = (x[j] * valid[j]).sum() / n[j]
      v = w
      for _ in range(2):
        v = v - 0.5 * (v - mean)
      loc[j] = v
    w = sum(n[j] * loc[j] for j in idx) / sum(n[j] for j in idx)
    for j in idx:
      rounds[j] += 1
      last[j] = loc[j]
    np.testing.assert_allclose(float(state.variables["w"]), w, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(state.clients["rounds"]), rounds)
    np.testing.assert_allclose(np.asarray(state.clients["last"]), last, rtol=1e-5)
    # unsampled clients: state row bit-identical, weight 0, NaN statistics
    un = ~s
    np.testing.assert_array_equal(np.asarray(state.clients["last"])[un], before["last"][un])
    assert (np.asarray(info["weights"])[un] == 0).all()
    assert np.isnan(np.asarray(info["num_samples"])[un]).all()
    np.testing.assert_allclose(np.asarray(info["weights"])[s], n[idx] / n[idx].sum(), rtol=1e-6)


def test_sampling_draws_m_distinct_clients_with_equal_frequency():
  k, m, rounds = 8, 3, 4000
  key = jax.random.PRNGKey(0)
  draw = jax.jit(jax.vmap(lambda t: algorithm.sample_clients(
      jax.random.fold_in(jax.random.fold_in(key, t), algorithm.SAMPLE_KEY_SALT), k, m)))
  idx = np.asarray(draw(jnp.arange(rounds)))
  assert idx.shape == (rounds, m)
  assert all(len(set(r)) == m for r in idx.tolist())          # without replacement
  counts = np.bincount(idx.reshape(-1), minlength=k)
  expected = rounds * m / k                                     # 1500 each
  # binomial sd = sqrt(R p (1-p)) ≈ 30.6; 5 sd bound
  assert np.all(np.abs(counts - expected) < 5 * np.sqrt(rounds * (m / k) * (1 - m / k))), counts


def test_size_weighted_sampling_follows_the_probabilities():
  k, m, rounds = 4, 1, 4000
  p = np.array([0.1, 0.2, 0.3, 0.4])
  key = jax.random.PRNGKey(1)
  idx = np.asarray(jax.jit(jax.vmap(lambda t: algorithm.sample_clients(
      jax.random.fold_in(key, t), k, m, p)))(jnp.arange(rounds)))
  freq = np.bincount(idx.reshape(-1), minlength=k) / rounds
  np.testing.assert_allclose(freq, p, atol=0.03)


def test_m_of_k_equals_all_clients_when_m_is_k():
  k = 4
  data, _, _ = _toy(k)
  a = jax.jit(algorithm.make_round(_alg(), "vmap"))(_state(k), data, jax.random.PRNGKey(0))
  b = jax.jit(algorithm.make_round(_alg(), "vmap", clients_per_round=k))(
      _state(k), data, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(np.asarray(a[0].variables["w"]), np.asarray(b[0].variables["w"]))


def test_dp_accountant_uses_the_sampling_rate():
  from configs import lgg_fedavg
  from fedjax_seg.fl import train as fl_train
  c = lgg_fedavg.get_config()
  c.fl.dp.enabled = True
  c.fl.dp.noise_multiplier = 1.0
  c.fl.rounds = 10
  c.fl.clients_per_round = 2
  assert fl_train.sampling_rate(c, 8) == 0.25
  dpc, z = fl_train.privacy(c, 8)
  row = fl_train.privacy_row(dpc, z, 10, fl_train.sampling_rate(c, 8))
  assert row["dp_sampling_rate"] == 0.25
  assert row["epsilon"] == pytest.approx(dp.epsilon(1.0, 10, c.fl.dp.delta, 0.25))
  assert row["epsilon"] < dp.epsilon(1.0, 10, c.fl.dp.delta, 1.0)   # amplification
  c.fl.dp.noise_multiplier, c.fl.dp.target_epsilon = 0.0, 2.0
  z_q = dp.resolve_noise_multiplier(c.fl, 0.25)
  assert dp.epsilon(z_q, 10, c.fl.dp.delta, 0.25) == pytest.approx(2.0, rel=1e-2)
  assert z_q < dp.resolve_noise_multiplier(c.fl, 1.0)


@pytest.mark.parametrize("key,value,match", [
    ("clients_per_round", -1, "clients_per_round=-1"),
    ("client_sampling", "round_robin", "client_sampling='round_robin'")])
def test_bad_sampling_config_is_refused(key, value, match):
  from configs import lgg_fedavg
  from fedjax_seg.fl import train as fl_train
  c = lgg_fedavg.get_config()
  c.fl[key] = value
  with pytest.raises(ValueError, match=match):
    fl_train.check_fl_config(c)
  c = lgg_fedavg.get_config()
  c.fl.clients_per_round, c.fl.secagg = 2, True
  with pytest.raises(ValueError, match="secagg"):
    fl_train.check_fl_config(c)


# --- fl.cost_ratio: the two readings of c_k = c(M_{t-1}) / c(M_t) -----------------------


def test_cost_ratio_rounds_uses_the_clients_consecutive_rounds():
  from fedjax_seg.fl import core
  k = 3
  scale = np.array([1.0, 2.0, 4.0], np.float32)

  def client_update(variables, data, key):
    w = variables["w"]
    s = data["s"]
    # cost of the received model and of the trained one (depends on the round via w)
    stats = {"num_samples": jnp.float32(1.0), "cost_pre": s * (w + 3.0),
             "cost_post": s * (w + 1.0) + 1.0 / (w + 2.0), "ce_pre": w + 1.0,
             "ce_post": w + 0.5, "dice_pre": 0.5 + 0.0 * w, "dice_post": 0.6 + 0.0 * w,
             "train_loss": w}
    return {"w": w + 1.0}, stats

  agg = aggregators.get("fedcostw")
  data = {"s": jnp.asarray(scale)}
  results = {}
  for reading in ("local", "rounds"):
    alg = core.supervised_algorithm(client_update, agg, {"alpha": 0.5, "cost": "cost"},
                                    cost_ratio=reading)
    clients = core.init_prev_stats(k) if reading == "rounds" else ()
    state = algorithm.ServerState({"w": jnp.float32(0.0)}, jnp.int32(0), clients=clients)
    run = jax.jit(algorithm.make_round(alg, "vmap"))
    ws = []
    for _ in range(3):
      state, info = run(state, data, jax.random.PRNGKey(0))
      ws.append(np.asarray(info["weights"]))
    results[reading] = ws
  # NumPy: every client trains every round; w_t = t (the average of w+1)
  def weights(c):
    return 0.5 * np.full(k, 1 / k) + 0.5 * c / c.sum()
  post = lambda w: scale * (w + 1.0) + 1.0 / (w + 2.0)
  for t in range(3):
    local_c = scale * (t + 3.0) / post(t)
    np.testing.assert_allclose(results["local"][t], weights(local_c), rtol=1e-5)
    rounds_c = local_c if t == 0 else post(t - 1) / post(t)
    np.testing.assert_allclose(results["rounds"][t], weights(rounds_c), rtol=1e-5)
  assert not np.allclose(results["local"][2], results["rounds"][2])


def test_cost_ratio_bad_value_is_refused():
  from configs import lgg_fedavg
  from fedjax_seg.fl import train as fl_train
  c = lgg_fedavg.get_config()
  c.fl.cost_ratio = "global"
  with pytest.raises(ValueError, match="cost_ratio='global'"):
    fl_train.check_fl_config(c)


# --- unequal local work: masked steps, FedNova ------------------------------------------


def test_masked_local_steps_stop_after_num_steps():
  import optax
  from fedjax_seg.fl import local

  def loss_fn(p, s, k):
    return 0.5 * jnp.sum(jnp.square(p["w"] - 3.0)), ({"params": p}, ())
  keys = jax.random.split(jax.random.PRNGKey(0), 5)
  for strategy in ("scan", "unrolled"):
    out = jax.jit(lambda n: local.local_train(loss_fn, optax.sgd(0.5), {"params": {"w": 0.0}},
                                              keys, strategy=strategy, num_steps=n))
    for tau in (1, 3, 5):
      v, _, (losses, _) = out(jnp.int32(tau))
      np.testing.assert_allclose(float(v["params"]["w"]), 3.0 * (1 - 0.5 ** tau), rtol=1e-6)
      assert np.isnan(np.asarray(losses)[tau:]).all() and np.isfinite(np.asarray(losses)[:tau]).all()


def test_fednova_matches_numpy_and_equals_fedavg_at_equal_work():
  rng = np.random.default_rng(0)
  g = {"w": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
  y = rng.normal(size=(4, 3)).astype(np.float32)
  n = np.array([2.0, 5.0, 1.0, 4.0], np.float32)
  tau = np.array([1.0, 4.0, 2.0, 8.0], np.float32)
  stats = {"num_samples": jnp.asarray(n), "local_steps": jnp.asarray(tau)}
  new, w, failed = aggregators.nova(aggregators.fedavg)(g, {"w": jnp.asarray(y)}, stats)
  p = n / n.sum()
  x = np.asarray(g["w"])
  ref = x - (p * tau).sum() * sum(p[k] * (x - y[k]) / tau[k] for k in range(4))
  np.testing.assert_allclose(np.asarray(new["w"]), ref, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(w), p, rtol=1e-6)
  eq = {"num_samples": jnp.asarray(n), "local_steps": jnp.full((4,), 3.0)}
  a = aggregators.nova(aggregators.fedavg)(g, {"w": jnp.asarray(y)}, eq)[0]
  b = aggregators.fedavg(g, {"w": jnp.asarray(y)}, eq)[0]
  np.testing.assert_allclose(np.asarray(a["w"]), np.asarray(b["w"]), rtol=1e-5)


def test_proportional_local_steps_from_sizes():
  from configs import lgg_fedavg
  from fedjax_seg.data import federated
  from fedjax_seg.fl import train as fl_train
  c = lgg_fedavg.get_config()
  c.fl.local_steps = 8
  c.fl.local_work = "proportional"
  valid = np.zeros((3, 10), np.float32)
  valid[0, :10], valid[1, :5], valid[2, :1] = 1, 1, 1
  data = federated.ClientData(np.zeros((3, 10, 1)), np.zeros((3, 10), np.int32), valid)
  np.testing.assert_array_equal(fl_train.local_steps_per_client(c, data), [8, 4, 1])
  c.fl.local_work = "list"
  c.fl.local_steps_per_client = (2, 9, 1)
  with pytest.raises(ValueError, match="each in 1..config.fl.local_steps=8"):
    fl_train.check_fl_config(c)
  c.fl.local_steps_per_client = (2, 3, 1)
  np.testing.assert_array_equal(fl_train.local_steps_per_client(c, data), [2, 3, 1])


@pytest.mark.parametrize("key,value,fcl_refuses", [
    ("clients_per_round", 2, True), ("local_norm", "fedbn", True), ("scaffold", True, True),
    ("fednova", True, True),
    # FedProx's term acts on the supervised client update only; FCL keeps it (its
    # fine-tuning is supervised FedAvg)
    ("prox_mu", 0.01, False)])
def test_semi_and_fcl_refuse_the_options_they_do_not_read(key, value, fcl_refuses):
  from configs import acdc_fcl_exchange, lgg_fedwep
  from fedjax_seg.fl import fcl_train, semi_train
  c = lgg_fedwep.get_config("fedwep,label_at_client,1/4,iid")
  c.fl[key] = value
  with pytest.raises(ValueError, match=f"config.fl.{key}=.*semi-supervised"):
    semi_train.check_aggregation(c, semi_train.hparams(c))
  c = acdc_fcl_exchange.get_config()
  c.fl[key] = value
  if not fcl_refuses:
    fcl_train.validate(c)
    return
  with pytest.raises(ValueError, match=f"config.fl.{key}=.*FCL pre-training"):
    fcl_train.validate(c)


def test_semi_and_fcl_take_streamed_chunks():
  """fl.clients_per_chunk streams the semi-supervised and FCL pre-training clients too
  (fl/scale.make_chunked_algorithm_round); with DP it is refused naming both keys."""
  from configs import acdc_fcl_exchange, lgg_fedwep
  from fedjax_seg.fl import fcl_train, semi_train
  c = lgg_fedwep.get_config("fedwep,label_at_client,1/4,iid")
  c.fl.clients_per_chunk = 2
  semi_train.check_aggregation(c, semi_train.hparams(c))
  c.fl.dp.enabled = True
  with pytest.raises(ValueError, match="clients_per_chunk=2 cannot be combined with config.fl.dp"):
    semi_train.check_aggregation(c, semi_train.hparams(c))
  c = acdc_fcl_exchange.get_config()
  c.fl.clients_per_chunk = 2
  fcl_train.validate(c)
