"""The algorithm interface (fl/algorithm.py): the shared round, per-client state,
declared uploads and byte counters, against hand-computed NumPy rounds."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_seg import models
from fedjax_seg.data import federated
from fedjax_seg.fl import aggregators, algorithm, core, fcl
import _helpers


def _mean_estimation(lr=0.5, steps=3):
  """A toy method: clients pull a scalar model towards their data mean by E gradient
  steps on ½(w − x̄_k)²; each client counts the rounds it took part in and keeps its
  last local model (per-client state); the server averages by sample count."""
  def client(bcast, inp, key):
    data, cstate, _ = inp
    n = jnp.sum(data["valid"])
    mean = jnp.sum(data["x"] * data["valid"]) / n
    w = bcast["w"]
    for _ in range(steps):
      w = w - lr * (w - mean)
    new_state = {"rounds": cstate["rounds"] + 1, "last": w}
    return {"model": {"w": w}}, new_state, {"num_samples": n}

  def aggregate(state, upload, stats, key):
    agg, weights, failed = aggregators.fedavg(state.variables, upload["model"], stats)
    return agg, weights, failed, {}
  return algorithm.Algorithm("mean_estimation", ("model",), client, aggregate)


def _toy_data():
  x = np.array([[1.0, 2.0, 3.0, 0.0], [10.0, 0.0, 0.0, 0.0], [4.0, 6.0, 0.0, 0.0]], np.float32)
  valid = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]], np.float32)
  return {"x": jnp.asarray(x), "valid": jnp.asarray(valid)}, x, valid


def _numpy_rounds(x, valid, w0, rounds, lr=0.5, steps=3):
  w = w0
  last = np.zeros(len(x))
  for _ in range(rounds):
    locals_ = []
    for k in range(len(x)):
      mean = (x[k] * valid[k]).sum() / valid[k].sum()
      v = w
      for _ in range(steps):
        v = v - lr * (v - mean)
      locals_.append(v)
    last = np.array(locals_)
    n = valid.sum(1)
    w = float((n * last).sum() / n.sum())
  return w, last


@pytest.mark.parametrize("backend", ["vmap", "unrolled", "map", "debug", "sharded", "loop",
                                     "loop2", "loop3", "host2", "loop1t2", "host2t2"])
def test_round_matches_numpy_and_keeps_per_client_state(backend):
  """loop2: K = 3 clients as a call of 2 and a call of 1; loop3: one call of all 3; host2:
  loop2 with host-called steps (this client update has no step loop: one stage program);
  t2: rounds 2 and 3 issue their calls from 2 host threads."""
  alg = _mean_estimation()
  data, x, valid = _toy_data()
  k = x.shape[0]
  state = algorithm.ServerState({"w": jnp.float32(0.0)}, jnp.int32(0),
                                clients={"rounds": jnp.zeros((k,), jnp.int32),
                                         "last": jnp.zeros((k,), jnp.float32)})
  run = _helpers.make_round(alg, backend)
  run = _helpers.jit_round(run, backend)
  for _ in range(3):
    state, info = run(state, data, jax.random.PRNGKey(0))
  w_ref, last_ref = _numpy_rounds(x, valid, 0.0, 3)
  np.testing.assert_allclose(float(state.variables["w"]), w_ref, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(state.clients["last"]), last_ref, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(state.clients["rounds"]), [3, 3, 3])
  np.testing.assert_allclose(np.asarray(info["weights"]), valid.sum(1) / valid.sum(), rtol=1e-6)
  assert int(state.round) == 3 and bool(info["included"].all()) and not bool(info["failed"])


@pytest.mark.parametrize("backend,flat", [("loop", True), ("host2", True), ("loop1t2", True),
                                          ("vmap", False), ("unrolled", False),
                                          ("sharded", False)])
def test_only_the_loop_round_aggregates_on_flat_vectors(backend, flat):
  """The loop round traces its aggregation under aggregators.flat_aggregation (so
  coordinate-wise aggregators get a few vectors per client); the vmapped, sharded and
  one-program rounds keep the pytrees."""
  seen = []
  base = _mean_estimation()

  def aggregate(state, upload, stats, key):
    seen.append(aggregators.flat_enabled())
    return base.aggregate(state, upload, stats, key)
  alg = algorithm.Algorithm(base.name, base.uploads, base.client_update, aggregate)
  data, x, _ = _toy_data()
  k = x.shape[0]
  state = algorithm.ServerState({"w": jnp.float32(0.0)}, jnp.int32(0),
                                clients={"rounds": jnp.zeros((k,), jnp.int32),
                                         "last": jnp.zeros((k,), jnp.float32)})
  run = _helpers.jit_round(_helpers.make_round(alg, backend), backend)
  run(state, data, jax.random.PRNGKey(0))
  assert seen and all(s == flat for s in seen), seen
  assert not aggregators.flat_enabled()


def test_undeclared_upload_is_refused():
  alg = _mean_estimation()
  bad = algorithm.Algorithm("bad", ("model", "bank"), alg.client_update, alg.aggregate)
  data, x, _ = _toy_data()
  state = algorithm.ServerState({"w": jnp.float32(0.0)}, jnp.int32(0),
                                clients={"rounds": jnp.zeros((3,), jnp.int32),
                                         "last": jnp.zeros((3,), jnp.float32)})
  with pytest.raises(ValueError, match="declared uploads"):
    algorithm.make_round(bad, "unrolled")(state, data, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="declare what clients upload"):
    algorithm.Algorithm("none", (), alg.client_update, alg.aggregate)
  with pytest.raises(ValueError, match="key_scheme"):
    algorithm.Algorithm("k", ("model",), alg.client_update, alg.aggregate, key_scheme="x")
  with pytest.raises(ValueError, match="uploads \\['model', 'bank'\\]"):
    algorithm.model_only("fcl", ("model", "bank"), "DP-FedAvg")


def test_round_keys_schemes():
  r = jax.random.fold_in(jax.random.PRNGKey(3), 5)
  b, c, s, a = algorithm.round_keys("flat", r, 4)
  np.testing.assert_array_equal(c, jax.random.split(r, 4))
  kb, kc, ks = jax.random.split(r, 3)
  b3, c3, s3, a3 = algorithm.round_keys("split3", r, 4)
  np.testing.assert_array_equal(c3, jax.random.split(kc, 4))
  np.testing.assert_array_equal(b3, kb)
  np.testing.assert_array_equal(s3, ks)
  np.testing.assert_array_equal(a, a3)
  np.testing.assert_array_equal(a, jax.random.fold_in(r, algorithm.AGG_KEY_SALT))


def test_comm_bytes_read_from_the_declared_uploads():
  fns = models.build({"name": "unet", "base": 2, "depth": 2, "dropout": 0.0, "norm": "none"}, 2)
  v = fns.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))
  rng = np.random.default_rng(0)
  data = federated.stack_clients([(rng.random((3, 8, 8, 1), np.float32),
                                   np.zeros((3, 8, 8), np.int32)) for _ in range(2)])
  hp = _helpers.client_hp(local_steps=1, batch_size=2, stats_samples=2, step_strategy="scan")
  cu = core.make_client_update(fns, optax.sgd(0.1), "dice_ce", 2, hp)
  alg = core.supervised_algorithm(cu, aggregators.fedavg)
  got = algorithm.comm_bytes(alg, core.ServerState(v, jnp.int32(0)), data)
  assert got["up"] == got["down"] == core.model_bytes(v) and got["clients"] == 2


def test_fcl_comm_bytes_equal_the_hand_count():
  enc = models.ModelFns(models.get_model(name="unet_encoder", base=2, depth=2, norm="none",
                                         ndim=2, hidden_dim=8, feature_dim=4, normalize=True))
  v = enc.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 1)))
  hp = fcl.PretrainHParams(method="fcl", local_steps=1, volumes_per_batch=1, num_partitions=2,
                           bank_size=6, num_positives=1, neg_per_partition=2,
                           step_strategy="scan")
  k = 3
  vols = fcl.stack_volumes([[np.zeros((4, 16, 16, 1), np.float32)] for _ in range(k)])
  alg = fcl.make_algorithm(hp, fcl.make_client_update(hp, enc, optax.sgd(0.1),
                                                      lambda key, x: x))
  got = algorithm.comm_bytes(alg, fcl.init_state(hp, v, k, 4), vols)
  want = fcl.comm_bytes(hp, core.model_bytes(v), k, 4)
  assert (got["up"], got["down"]) == (want["up"], want["down"])
  assert got["up_by_entry"]["model"] == core.model_bytes(v)
