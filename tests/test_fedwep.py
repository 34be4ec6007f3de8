"""FedWeP pieces (SPEC §4.2): perturbation statistics and determinism, seed-pair
search against brute-force NumPy, and stop-gradient of the pseudo-labels."""
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_seg.fl import fedwep


def test_perturbation_statistics_on_a_large_tensor():
  p, sigma, n = 0.3, 0.2, 1_000_000
  params = {"w": jnp.ones((1000, 1000)), "b": jnp.full((7,), 2.0)}
  z = np.asarray(fedwep.perturbation(params, 1234, p, sigma)["w"]).ravel()
  changed = z != 1.0
  assert z.size == n
  assert changed.mean() == pytest.approx(p, abs=0.003)            # ≈ p of weights perturbed
  assert z.mean() == pytest.approx(1.0, abs=0.002)                # E[Z] = 1
  assert z[changed].mean() == pytest.approx(1.0, abs=0.002)       # G ~ N(1, σ²)
  assert z[changed].std() == pytest.approx(sigma, rel=0.01)
  assert z.var() == pytest.approx(p * sigma ** 2, rel=0.02)       # Var Z = p σ²
  # W̃ = W ⊙ Z
  wt = fedwep.perturb(params, 1234, p, sigma)
  np.testing.assert_array_equal(np.asarray(wt["w"]).ravel(), z)
  np.testing.assert_allclose(np.asarray(wt["b"]),
                             2.0 * np.asarray(fedwep.perturbation(params, 1234, p, sigma)["b"]))
  # edge cases: p = 0 -> identity, σ = 0 -> identity
  chex.assert_trees_all_equal(fedwep.perturb(params, 5, 0.0, sigma), params)
  chex.assert_trees_all_equal(fedwep.perturb(params, 5, 1.0, 0.0), params)


def test_same_seed_same_z_on_server_and_client():
  params = {"conv": {"kernel": jnp.arange(60.0).reshape(3, 4, 5), "bias": jnp.ones((5,))},
            "head": {"kernel": jnp.ones((5, 2))}}
  server = fedwep.perturbation(params, 42, 0.5, 0.1)
  chex.assert_trees_all_equal(server, fedwep.perturbation(params, 42, 0.5, 0.1))  # bit-identical
  # the "client": a jitted program that receives the seed as a traced int32. The same weights are
  # selected (exactly); the values agree to float32 rounding (XLA may contract 1 + σ·n to an FMA).
  client = jax.jit(lambda prm, s: fedwep.perturbation(prm, s, 0.5, 0.1))(params, jnp.int32(42))
  chex.assert_trees_all_equal(jax.tree.map(lambda a: a != 1.0, server),
                              jax.tree.map(lambda a: a != 1.0, client))
  chex.assert_trees_all_close(server, client, rtol=1e-6, atol=0)
  # Z depends on the seed and the shapes only, never on W's values
  other_w = jax.tree.map(lambda a: a * 3.0 - 1.0, params)
  chex.assert_trees_all_equal(server, fedwep.perturbation(other_w, 42, 0.5, 0.1))
  # a different seed gives a different Z
  z43 = fedwep.perturbation(params, 43, 0.5, 0.1)
  assert not np.array_equal(np.asarray(server["head"]["kernel"]), np.asarray(z43["head"]["kernel"]))
  # vmapped over seeds (the server's search) = one call per seed
  zs = jax.vmap(lambda s: fedwep.perturbation(params, s, 0.5, 0.1))(jnp.array([42, 43]))
  chex.assert_trees_all_close(jax.tree.map(lambda a: a[0], zs), server, rtol=1e-6, atol=0)
  chex.assert_trees_all_close(jax.tree.map(lambda a: a[1], zs), z43, rtol=1e-6, atol=0)


def _np_cosine(out):
  n, b = out.shape[:2]
  u = out.reshape(n, b, -1)
  c = np.zeros((n, n))
  for i, j in itertools.product(range(n), range(n)):
    c[i, j] = np.mean([u[i, x] @ u[j, x] / np.linalg.norm(u[i, x]) / np.linalg.norm(u[j, x])
                       for x in range(b)])
  return c


def test_pair_selection_on_a_hand_built_case():
  # 4 "models", 2 samples, outputs in R^3: models 1 and 3 agree, 0 and 2 are opposite-ish.
  out = np.array([
      [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
      [[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]],
      [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]],
      [[1.0, 1.0, 0.1], [0.1, 1.0, 1.0]],
  ], np.float32)
  c = np.asarray(fedwep.pairwise_cosine(jnp.asarray(out)))
  np.testing.assert_allclose(c, _np_cosine(out), atol=1e-6)
  assert tuple(int(v) for v in fedwep.select_pair(jnp.asarray(c), "max")) == (1, 3)
  assert tuple(int(v) for v in fedwep.select_pair(jnp.asarray(c), "min")) == (0, 2)
  iu = np.triu_indices(4, 1)
  vals = c[iu]
  k = int(np.argmin(np.abs(vals - np.median(vals))))
  assert tuple(int(v) for v in fedwep.select_pair(jnp.asarray(c), "median")) == (iu[0][k], iu[1][k])
  with pytest.raises(ValueError, match="pair_criterion"):
    fedwep.select_pair(jnp.asarray(c), "closest")


def test_search_seeds_picks_the_pair_the_criterion_asks_for():
  """A tiny 'model' whose output is softmax(x @ W); brute force over all pairs in NumPy."""
  key = jax.random.PRNGKey(0)
  variables = {"params": {"w": jax.random.normal(key, (3, 4))}}
  x = jax.random.uniform(jax.random.PRNGKey(1), (5, 6, 3))
  apply_fn = lambda v, xx: xx @ v["params"]["w"]
  seeds = jnp.array([11, 22, 33, 44, 55, 66], jnp.int32)
  p, sigma = 0.8, 0.5
  outs = np.stack([np.asarray(jax.nn.softmax(apply_fn(fedwep.perturb_variables(variables, int(s), p,
                                                                                sigma), x), -1))
                   for s in seeds])
  c = _np_cosine(outs)
  pairs = [(i, j) for i in range(6) for j in range(i + 1, 6)]
  for strategy in ("vmap", "unrolled"):
    for crit, pick in (("max", max), ("min", min)):
      i, j = pick(pairs, key=lambda ij: c[ij])
      pair, info = fedwep.search_seeds(apply_fn, variables, x, seeds, p, sigma, crit, strategy)
      assert [int(v) for v in pair] == [int(seeds[i]), int(seeds[j])], (strategy, crit, c)
      assert float(info["c_star"]) == pytest.approx(c[i, j], abs=1e-5)
      np.testing.assert_allclose(np.asarray(info["similarity"]), c, atol=1e-5)
  with pytest.raises(ValueError, match="strategy 'map'"):
    fedwep.perturbed_outputs(apply_fn, variables, x, seeds, p, sigma, "map")


def test_seed_search_strategies_give_the_same_outputs_for_a_conv_net():
  """The U-Net's N perturbed outputs vmapped (one grouped convolution per layer) and
  unrolled (N plain ones): the same values to float tolerance, in the same order."""
  from fedjax_seg import models
  fns = models.build({"name": "unet", "base": 4, "depth": 2, "dropout": 0.0}, 2)
  v = fns.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
  x = jax.random.uniform(jax.random.PRNGKey(1), (3, 16, 16, 3))
  seeds = fedwep.candidate_seeds(jax.random.PRNGKey(2), 4)
  apply_fn = lambda vv, xx: fns.apply(vv, xx, train=False)[0]
  out = {s: np.asarray(jax.jit(lambda vv, xx, ss, s=s: fedwep.perturbed_outputs(
      apply_fn, vv, xx, ss, 0.5, 0.3, s))(v, x, seeds)) for s in ("vmap", "unrolled")}
  assert out["vmap"].shape == (4, 3, 16, 16, 2)
  np.testing.assert_allclose(out["unrolled"], out["vmap"], atol=1e-6)
  one = np.asarray(jax.nn.softmax(apply_fn(fedwep.perturb_variables(v, seeds[2], 0.5, 0.3), x), -1))
  np.testing.assert_allclose(out["unrolled"][2], one, atol=1e-6)
  assert np.abs(out["unrolled"][0] - out["unrolled"][1]).max() > 1e-4  # the seeds differ


def test_search_set_kinds():
  key = jax.random.PRNGKey(0)
  x = fedwep.search_set("random", key, 4, (8, 8, 3))
  assert x.shape == (4, 8, 8, 3) and float(x.min()) >= 0 and float(x.max()) < 1
  server_x = jnp.arange(5.0)[:, None] * jnp.ones((5, 2))
  valid = jnp.array([1.0, 1.0, 0.0, 0.0, 0.0])
  real = fedwep.search_set("real", key, 50, (2,), server_x, valid)
  assert set(np.asarray(real)[:, 0].tolist()) <= {0.0, 1.0}       # only valid server images
  with pytest.raises(ValueError, match="server images"):
    fedwep.search_set("real", key, 4, (2,))


def test_cross_pseudo_loss_blocks_gradients_through_pseudo_labels():
  k1, k2 = jax.random.split(jax.random.PRNGKey(3))
  l1 = jax.random.normal(k1, (2, 4, 4, 3))
  l2 = jax.random.normal(k2, (2, 4, 4, 3))
  mask = jnp.array([1.0, 1.0])
  # soft targets: gradient w.r.t. logits_1 must equal that of CE(logits_1, const softmax(l2))
  # + CE(const l2, softmax(logits_1)) with the second term's target held constant, i.e. only the
  # first term's dependence on logits_1.
  t2 = jax.nn.softmax(l2, -1)
  g = jax.grad(lambda a: fedwep.cross_pseudo_loss(a, l2, mask, "soft"))(l1)
  from fedjax_seg import losses
  g_ref = jax.grad(lambda a: losses.categorical_cross_entropy(a, t2, mask))(l1)
  np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=1e-6)
  # control: without stop_gradient the gradient would differ (the check has teeth)
  leaky = lambda a: (losses.categorical_cross_entropy(a, t2, mask)
                     + losses.categorical_cross_entropy(l2, jax.nn.softmax(a, -1), mask))
  assert np.abs(np.asarray(jax.grad(leaky)(l1)) - np.asarray(g)).max() > 1e-3
  # hard (argmax) pseudo-labels: gradient = CE against the constant argmax of the other view
  y2 = jnp.argmax(l2, -1)
  gh = jax.grad(lambda a: fedwep.cross_pseudo_loss(a, l2, mask, "hard"))(l1)
  gh_ref = jax.grad(lambda a: losses.sparse_cross_entropy(a, y2, mask))(l1)
  np.testing.assert_allclose(np.asarray(gh), np.asarray(gh_ref), atol=1e-6)


def test_rwp_loss_gradient_equals_constant_pseudo_label_gradient():
  """∂L_RWP/∂W with pseudo-labels recomputed inside = with them frozen as constants;
  the gradient reaches W through W̃ = W ⊙ Z."""
  key = jax.random.PRNGKey(0)
  variables = {"params": {"w": jax.random.normal(key, (3, 2)), "b": jnp.zeros((2,))}}
  x = jax.random.uniform(jax.random.PRNGKey(1), (4, 5, 5, 3))
  apply_t = lambda v, xx, k: xx @ v["params"]["w"] + v["params"]["b"]
  seeds, p, sigma = jnp.array([7, 9], jnp.int32), 0.9, 0.5
  mask = jnp.ones((4,))

  def loss(prm):
    return fedwep.rwp_loss(apply_t, {"params": prm}, x, mask, seeds, p, sigma, key)
  w1 = fedwep.perturb(variables["params"], 7, p, sigma)
  w2 = fedwep.perturb(variables["params"], 9, p, sigma)
  y1 = jnp.argmax(apply_t({"params": w1}, x, None), -1)
  y2 = jnp.argmax(apply_t({"params": w2}, x, None), -1)
  from fedjax_seg import losses

  def frozen(prm):
    a = apply_t({"params": fedwep.perturb(prm, 7, p, sigma)}, x, None)
    b = apply_t({"params": fedwep.perturb(prm, 9, p, sigma)}, x, None)
    return losses.sparse_cross_entropy(a, y2, mask) + losses.sparse_cross_entropy(b, y1, mask)
  assert float(loss(variables["params"])) == pytest.approx(float(frozen(variables["params"])), rel=1e-6)
  chex.assert_trees_all_close(jax.grad(loss)(variables["params"]),
                              jax.grad(frozen)(variables["params"]), atol=1e-6)
  # chain rule through the perturbation: dL/dW = dL/dW̃ ⊙ Z for the first view alone
  z1 = fedwep.perturbation(variables["params"], 7, p, sigma)
  g_w = jax.grad(lambda prm: losses.sparse_cross_entropy(
      apply_t({"params": fedwep.perturb(prm, 7, p, sigma)}, x, None), y2, mask))(variables["params"])
  g_wt = jax.grad(lambda wt: losses.sparse_cross_entropy(apply_t({"params": wt}, x, None), y2,
                                                         mask))(w1)
  chex.assert_trees_all_close(g_w, jax.tree.map(jnp.multiply, g_wt, z1), atol=1e-6)


def test_rwp_loss_with_the_round_perturbations_drawn_once_is_the_same():
  """A client draws Z(seeds[0]), Z(seeds[1]) once per round (fedwep.perturbations) and
  passes them as zs: the loss and its gradient are those of drawing them inside, and the
  Z are the module's eq. (2) draws (W ⊙ Z = perturb(W, seed))."""
  key = jax.random.PRNGKey(0)
  params = {"w": jax.random.normal(key, (3, 2)), "b": jnp.ones((2,))}
  x = jax.random.uniform(jax.random.PRNGKey(1), (4, 5, 5, 3))
  apply_t = lambda v, xx, k: xx @ v["params"]["w"] + v["params"]["b"]
  seeds, p, sigma, mask = jnp.array([7, 9], jnp.int32), 0.9, 0.5, jnp.ones((4,))
  zs = fedwep.perturbations(params, seeds, p, sigma)
  for z, seed in zip(zs, (7, 9)):
    chex.assert_trees_all_equal(jax.tree.map(jnp.multiply, params, z),
                                fedwep.perturb(params, seed, p, sigma))
  inside = lambda prm: fedwep.rwp_loss(apply_t, {"params": prm}, x, mask, seeds, p, sigma, key)
  once = lambda prm: fedwep.rwp_loss(apply_t, {"params": prm}, x, mask, seeds, p, sigma, key,
                                     zs=zs)
  assert float(once(params)) == float(inside(params))
  chex.assert_trees_all_equal(jax.grad(once)(params), jax.grad(inside)(params))


def test_dice_ce_pseudo_loss_against_numpy():
  """pseudo_loss='dice_ce': ℓ(a, argmax b) + ℓ(b, argmax a) with ℓ = soft Dice (batch, ε=1)
  + CE, against a hand-written NumPy reference; unknown names are errors."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(5))
  l1 = np.asarray(jax.random.normal(k1, (2, 3, 3, 2))) * 2
  l2 = np.asarray(jax.random.normal(k2, (2, 3, 3, 2))) * 2
  mask = np.array([1.0, 0.0])      # second sample padded out

  def ref(a, y, m):
    p = np.exp(a - a.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    w = np.broadcast_to(m[:, None, None], y.shape)
    g = np.eye(2)[y]
    inter = (p * g * w[..., None]).sum((0, 1, 2))
    den = (p * w[..., None]).sum((0, 1, 2)) + (g * w[..., None]).sum((0, 1, 2)) + 1.0
    dice = 1.0 - np.mean((2 * inter + 1.0) / den)
    ce = -(np.log(np.take_along_axis(p, y[..., None], -1))[..., 0] * w).sum() / w.sum()
    return dice + ce
  want = ref(l1, l2.argmax(-1), mask) + ref(l2, l1.argmax(-1), mask)
  got = fedwep.cross_pseudo_loss(jnp.asarray(l1), jnp.asarray(l2), jnp.asarray(mask), "hard",
                                 "dice_ce")
  assert float(got) == pytest.approx(want, rel=1e-5)
  ce_only = fedwep.cross_pseudo_loss(jnp.asarray(l1), jnp.asarray(l2), jnp.asarray(mask), "hard")
  assert abs(float(ce_only) - want) > 1e-2      # the Dice term is really there
  with pytest.raises(ValueError, match="pseudo_loss"):
    fedwep.cross_pseudo_loss(jnp.asarray(l1), jnp.asarray(l2), None, "hard", "focal")
