"""fl/backends.py (for_each_client) and fl/local.py (the one local-training loop):
every backend computes the same function for any pytree of client data and
per-client state; the semi-supervised and FCL rounds give the same numbers under
every backend as the recorded pre-rebuild fingerprints (tests/test_port_golden.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import test_port_golden as golden
from fedjax_seg.fl import backends, local


def _fn(b, client, key):
  """A per-client function with a dict of data and a tuple of state."""
  x, (s, c) = client["x"], client["state"]
  noise = jax.random.normal(key, x.shape)
  return {"y": x * b["w"] + noise, "state": (s + jnp.sum(x), c * 2)}


def _inputs(k=3):
  rng = np.random.default_rng(0)
  pc = {"x": jnp.asarray(rng.random((k, 4), np.float32)),
        "state": (jnp.zeros((k,)), jnp.arange(k, dtype=jnp.int32))}
  return {"w": jnp.float32(2.0)}, pc, jax.random.split(jax.random.PRNGKey(0), k)


@pytest.mark.parametrize("backend", ["unrolled", "map", "sharded", "debug", "auto"])
def test_every_backend_equals_vmap_on_any_pytree(backend):
  b, pc, keys = _inputs()
  ref = jax.jit(backends.for_each_client(_fn, "vmap"))(b, pc, keys)
  run = backends.for_each_client(_fn, backend)
  out = run(b, pc, keys) if backend == "debug" else jax.jit(run)(b, pc, keys)
  jax.tree.map(lambda a, r: np.testing.assert_allclose(a, r, rtol=1e-6), out, ref)


def test_pad_clients_pads_any_pytree_and_keeps_numpy():
  _, pc, _ = _inputs()
  host = jax.tree.map(np.asarray, pc)
  p = backends.pad_clients(host, 4)
  assert isinstance(p["x"], np.ndarray) and p["x"].shape == (4, 4)
  assert p["state"][1].tolist() == [0, 1, 2, 0] and p["x"][3].sum() == 0
  assert backends.pad_clients(host, 3) is host
  with pytest.raises(ValueError, match="k_pad"):
    backends.pad_clients(host, 2)
  with pytest.raises(ValueError, match="disagree on K"):
    backends.num_clients({"a": np.zeros((2,)), "b": np.zeros((3,))})


def test_debug_backend_names_the_client_and_the_stage():
  b, pc, keys = _inputs()

  def bad(b, client, key):
    return {"y": jnp.log(client["x"] - 0.5 + 0.0 * key[0])}   # log of negatives: NaN
  with pytest.raises(backends.ClientError, match=r"client \d: local training: non-finite"):
    backends.for_each_client(bad, "debug", stage="local training")(b, pc, keys)

  def raises(b, client, key):
    raise KeyError("boom")
  with pytest.raises(backends.ClientError, match="client 0: client update: KeyError"):
    backends.for_each_client(raises, "debug")(b, pc, keys)


def test_unknown_backend_is_refused_naming_the_key():
  with pytest.raises(ValueError, match="config.fl.client_strategy='gpu'"):
    backends.for_each_client(_fn, "gpu")
  with pytest.raises(ValueError, match="config.fl.step_strategy='loop'"):
    local.run_steps(lambda c, k: (c, k), 0, jnp.zeros((2, 2), jnp.uint32), "loop")


def test_local_train_matches_hand_written_sgd_with_after_step():
  """E = 3 SGD steps on ½‖w − t‖² with an EMA after_step, against NumPy."""
  t = np.array([1.0, -2.0], np.float32)
  lr, a = 0.1, 0.5

  def loss_fn(p, s, key):
    return 0.5 * jnp.sum((p - t) ** 2), (s, jnp.sum(p))

  state = {"params": jnp.zeros(2), "ema": jnp.zeros(2)}
  ema = lambda s: {**s, "ema": a * s["ema"] + (1 - a) * s["params"]}
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  for strategy in ("scan", "unrolled"):
    out, _, (losses, aux) = jax.jit(lambda s: local.local_train(
        loss_fn, optax.sgd(lr), s, keys, strategy=strategy,
        merge=lambda s, new, p: {**new, "params": p}, after_step=ema))(state)
    w, e, ls = np.zeros(2), np.zeros(2), []
    for _ in range(3):
      ls.append(0.5 * np.sum((w - t) ** 2))
      w = w - lr * (w - t)
      e = a * e + (1 - a) * w
    np.testing.assert_allclose(out["params"], w, rtol=1e-6)
    np.testing.assert_allclose(out["ema"], e, rtol=1e-6)
    np.testing.assert_allclose(losses, ls, rtol=1e-6)
    assert aux.shape == (3,)


@pytest.mark.parametrize("name,backend", [
    ("semi_fedwep_random", "vmap"), ("semi_fedwep_random", "sharded"),
    ("semi_cps", "map"), ("semi_mean_teacher", "vmap"),
    ("fcl_fcl", "vmap"), ("fcl_fcl", "unrolled"), ("core", "map"),
    # streamed one client at a time (fl/scale.make_chunked_algorithm_round)
    ("semi_fedwep_random", "chunked"), ("semi_cps", "chunked"), ("semi_mean_teacher", "chunked"),
    ("semi_server_fedwep_real", "chunked"), ("fcl_fcl", "chunked"),
    # one client program called per client (algorithm.LoopedRound)
    ("core", "loop"), ("core", "loop2"), ("semi_fedwep_random", "loop"), ("semi_cps", "loop"),
    ("semi_mean_teacher", "loop"), ("semi_server_fedwep_real", "loop"), ("fcl_fcl", "loop"),
    # every local step its own program call (fl/host_steps.py)
    ("core", "host"), ("core", "host2"), ("semi_fedwep_random", "host"), ("semi_cps", "host2"),
    ("semi_mean_teacher", "host"), ("semi_server_fedwep_real", "host2"), ("fcl_fcl", "host2")])
def test_rounds_reproduce_the_recorded_numbers_under_every_backend(name, backend):
  if name.startswith("semi_server_"):
    out = golden.case_semi(name[len("semi_server_"):], "label_at_server", client_strategy=backend)
  elif name.startswith("semi_"):
    out = golden.case_semi(name[len("semi_"):], client_strategy=backend)
  elif name.startswith("fcl_"):
    out = golden.case_fcl(name[len("fcl_"):], client_strategy=backend)
  else:
    out = golden.case_core(client_strategy=backend)
  golden._close(out, golden.GOLDEN[name])
