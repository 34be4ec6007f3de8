"""Server optimisers (FedAvgM, FedAdam, FedYogi, FedAdagrad) against hand-computed
steps of their equations, composition with every aggregator, and FedProx."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_seg import losses
from fedjax_seg.data import federated
from fedjax_seg.fl import aggregators, core, server_opt
from fedjax_seg.models import ModelFns
import _helpers


def _tree(rng, scale=1.0):
  return {"params": {"w": (scale * rng.normal(size=(3, 2))).astype(np.float32),
                     "b": (scale * rng.normal(size=(5,))).astype(np.float32)}}


def _run(tx, x0, aggregates, failed=None):
  upd = server_opt.make_server_update(tx)
  state = core.ServerState(x0, jnp.int32(0), server_opt.init(tx, x0))
  out = []
  for t, agg in enumerate(aggregates):
    f = jnp.asarray(False if failed is None else failed[t])
    v, o = upd(state, agg, f)
    state = core.ServerState(v, state.round + 1, o)
    out.append(v)
  return out, state


def _np_reddi(mode, x0, aggs, lr, b1, b2, tau):
  """Reddi et al. 2021 Alg. 2 in NumPy, on g = x − ω."""
  x = {k: v.astype(np.float64) for k, v in x0["params"].items()}
  m = {k: np.zeros_like(v) for k, v in x.items()}
  v_ = {k: np.full_like(v, tau ** 2) for k, v in x.items()}
  out = []
  for agg in aggs:
    for k in x:
      g = x[k] - agg["params"][k]
      m[k] = b1 * m[k] + (1 - b1) * g
      if mode == "adam":
        v_[k] = b2 * v_[k] + (1 - b2) * g ** 2
      elif mode == "yogi":
        v_[k] = v_[k] - (1 - b2) * g ** 2 * np.sign(v_[k] - g ** 2)
      else:
        v_[k] = v_[k] + g ** 2
      x[k] = x[k] - lr * m[k] / (np.sqrt(v_[k]) + tau)
    out.append({"params": {k: a.copy() for k, a in x.items()}})
  return out


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_adaptive_server_optimizers_match_hand_computed_steps(name):
  rng = np.random.default_rng(0)
  x0 = _tree(rng)
  aggs = [jax.tree.map(lambda a: a + 0.1 * rng.normal(size=a.shape).astype(np.float32), x0)
          for _ in range(3)]
  lr, b1, b2, tau = 0.05, 0.9, 0.99, 1e-2
  tx = server_opt.make_server_optimizer(name, lr, b1=b1, b2=b2, tau=tau)
  got, _ = _run(tx, x0, aggs)
  ref = _np_reddi(name[3:], x0, aggs, lr, b1, b2, tau)
  for g, r in zip(got, ref):
    chex.assert_trees_all_close(g, r, rtol=1e-5, atol=1e-6)
  # first step by hand, written out: m = (1−β1)g, v = β2τ² + (1−β2)g² (adam)
  if name == "fedadam":
    g1 = x0["params"]["b"] - aggs[0]["params"]["b"]
    m1, v1 = (1 - b1) * g1, b2 * tau ** 2 + (1 - b2) * g1 ** 2
    np.testing.assert_allclose(got[0]["params"]["b"],
                               x0["params"]["b"] - lr * m1 / (np.sqrt(v1) + tau), rtol=1e-5)


def test_fedavgm_matches_hand_computed_momentum_and_reduces_to_fedavg():
  rng = np.random.default_rng(1)
  x0 = _tree(rng)
  aggs = [jax.tree.map(lambda a: a + rng.normal(size=a.shape).astype(np.float32), x0)
          for _ in range(2)]
  lr, beta = 0.5, 0.9
  got, _ = _run(server_opt.make_server_optimizer("fedavgm", lr, momentum=beta), x0, aggs)
  w0 = x0["params"]["w"]
  g1 = w0 - aggs[0]["params"]["w"]
  w1 = w0 - lr * g1                                  # v1 = g1
  g2 = w1 - aggs[1]["params"]["w"]
  w2 = w1 - lr * (beta * g1 + g2)                    # v2 = β v1 + g2
  np.testing.assert_allclose(got[0]["params"]["w"], w1, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got[1]["params"]["w"], w2, rtol=1e-5, atol=1e-6)
  # η = 1, β = 0: the next model is the aggregate (plain FedAvg)
  got, _ = _run(server_opt.make_server_optimizer("fedavgm", 1.0, momentum=0.0), x0, aggs)
  chex.assert_trees_all_close(got[1], aggs[1], rtol=1e-6, atol=1e-6)


def test_failed_round_keeps_model_and_state_and_other_collections_follow_aggregate():
  rng = np.random.default_rng(2)
  x0 = {**_tree(rng), "batch_stats": {"mean": np.zeros((4,), np.float32)}}
  agg = jax.tree.map(lambda a: a + 1.0, x0)
  tx = server_opt.make_server_optimizer("fedadam", 0.1)
  got, state = _run(tx, x0, [agg, agg], failed=[False, True])
  chex.assert_trees_all_close(got[1], got[0])
  np.testing.assert_allclose(got[0]["batch_stats"]["mean"], 1.0)
  _, state1 = _run(tx, x0, [agg])
  chex.assert_trees_all_close(state.server_opt_state, state1.server_opt_state)


@pytest.mark.parametrize("name", sorted(aggregators.AGGREGATORS))
def test_server_optimizer_composes_with_every_aggregator(name):
  """Weights from the aggregator, step from the server optimiser:
  x_1 = x_0 − η m/(√v + τ) with g = x_0 − ω(aggregator)."""
  rng = np.random.default_rng(3)
  k = 4
  glob = _tree(rng)
  stacked = jax.tree.map(lambda a: a[None] + 0.1 * rng.normal(size=(k,) + a.shape)
                         .astype(np.float32), glob)
  stats = {"num_samples": np.array([10., 3., 7., 20.], np.float32),
           **{s: rng.uniform(0.2, 1.0, k).astype(np.float32) for s in
              ("cost_pre", "cost_post", "ce_pre", "ce_post", "dice_pre", "dice_post")}}
  omega, w, failed = aggregators.get(name)(glob, stacked, stats)
  assert not bool(failed)
  tx = server_opt.make_server_optimizer("fedadam", 0.01, b1=0.9, b2=0.99, tau=1e-3)
  got, _ = _run(tx, glob, [omega])
  ref = _np_reddi("adam", glob, [jax.tree.map(np.asarray, omega)], 0.01, 0.9, 0.99, 1e-3)
  chex.assert_trees_all_close(got[0], ref[0], rtol=1e-5, atol=1e-6)


def test_unknown_server_optimizer_names_key():
  with pytest.raises(ValueError, match="config.fl.server_opt='adamw'"):
    server_opt.make_server_optimizer("adamw")
  with pytest.raises(ValueError, match="config.fl.server_lr"):
    server_opt.make_server_optimizer("fedadam", 0.0)
  assert server_opt.make_server_optimizer("none") is None


# --- FedProx (client side; core.make_client_update) --------------------------------


class _PixelLinear(nn.Module):
  """Per-pixel linear classifier: the smallest segmentation model."""

  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(2)(x)


K, N, H = 3, 6, 8


@pytest.fixture(scope="module")
def prox_setup():
  fns = ModelFns(_PixelLinear())
  rng = np.random.default_rng(0)
  per_client = []
  for k in range(K):
    x = rng.normal(size=(N - k, H, H, 3)).astype(np.float32)
    per_client.append((x, (x[..., 0] > 0.3 * k).astype(np.int32)))
  data = federated.stack_clients(per_client)
  variables = fns.init(jax.random.PRNGKey(0), jnp.zeros((1, H, H, 3)))
  return fns, data, variables


@pytest.mark.parametrize("mu", [0.0, 1e-12, 0.7])
def test_fedprox_client_step_matches_hand_computed_gradient(prox_setup, mu):
  """E = 2 SGD steps: w1 = w0 − η∇L(w0); w2 = w1 − η(∇L(w1) + μ(w1 − w0)).

  μ = 0 is the FedAvg local objective (plain SGD), and μ = 1e-12 (proximal
  path active) matches it: this guards the gradient of ‖w − w_g‖² at w = w_g,
  which is NaN when written as global_norm(w − w_g)²."""
  fns, data, variables = prox_setup
  lr = 0.5
  hp = _helpers.client_hp(local_steps=2, batch_size=4, stats_samples=4,
                          step_strategy="unrolled", prox_mu=mu)
  cu = core.make_client_update(fns, optax.sgd(lr), "sparse_ce", 2, hp)
  client = jax.tree.map(lambda a: a[0], data)
  key = jax.random.PRNGKey(5)
  got, _ = jax.jit(cu)(variables, client, key)
  chex.assert_tree_all_finite(got)
  # the batches the client draws (core's key schedule)
  _, tkey = jax.random.split(key)
  batches = [federated.sample_batch(client, jax.random.split(k)[0], 4)
             for k in jax.random.split(tkey, 2)]

  def loss(p, b):
    logits, _ = fns.apply({"params": p}, b[0], train=False)
    return losses.sparse_cross_entropy(logits, b[1], b[2])
  w0 = variables["params"]
  w1 = jax.tree.map(lambda w, g: w - lr * g, w0, jax.grad(loss)(w0, batches[0]))
  g1 = jax.grad(loss)(w1, batches[1])
  w2 = jax.tree.map(lambda w, g, a: w - lr * (g + mu * (w - a)), w1, g1, w0)
  chex.assert_trees_all_close(got["params"], w2, rtol=1e-5, atol=1e-6)
  if mu == 0.7:  # the proximal term pulls the client towards the global model
    plain = jax.tree.map(lambda w, g: w - lr * g, w1, g1)
    dist = lambda p: float(optax.tree.norm(jax.tree.map(jnp.subtract, p, w0)))
    assert dist(got["params"]) < dist(plain)
