"""Model registry round-trip and U-Net shapes / norm variants (fedjax_seg/models).

Shape checks trace with ``jax.eval_shape`` (nothing compiled); only the tests
that need numbers compile, on tiny models.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from _np_init import np_init  # noqa: E402
from fedjax_seg import models
from fedjax_seg.models.unet import UNet


def _x(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _spec(shape):
  return jax.ShapeDtypeStruct(shape, jnp.float32)


# Registered models whose output is not per-pixel logits (the FCL encoder).
NOT_SEGMENTATION = {"unet_encoder"}


def test_expected_models_registered():
  assert {"unet", "scaunet", "scaunet_a"} <= set(models.names())


@pytest.mark.parametrize("name", models.names())
def test_registry_round_trip(name):
  """Every registered name builds from a config and inits/applies (eval and train)."""
  cfg = ml_collections.ConfigDict(dict(name=name, base=4, depth=2))
  fns = models.build(cfg, num_classes=3)
  assert isinstance(fns, models.ModelFns)
  # The same name and kwargs through get_model give an equal module.
  assert models.get_model(name, num_classes=3, base=4, depth=2) == fns.module
  x = _spec((2, 8, 8, 1))
  variables = jax.eval_shape(fns.init, jax.random.PRNGKey(0), x)
  assert "params" in variables and jax.tree.leaves(variables["params"])
  logits, _ = jax.eval_shape(lambda v, x: fns.apply(v, x, train=False), variables, x)
  logits_t, new_vars = jax.eval_shape(
      lambda v, x: fns.apply(v, x, train=True, key=jax.random.PRNGKey(1)), variables, x)
  assert logits.dtype == jnp.float32 and logits_t.shape == logits.shape
  if name in NOT_SEGMENTATION:
    assert logits.shape[0] == 2 and logits.ndim == 2   # [B, features]
  else:
    assert logits.shape == (2, 8, 8, 3)                 # [B, H, W, num_classes]
  assert set(new_vars) == set(variables)
  assert jax.tree.structure(new_vars) == jax.tree.structure(variables)


def test_unknown_model_name_message():
  with pytest.raises(ValueError) as err:
    models.get_model("unnet", num_classes=2)
  msg = str(err.value)
  assert "config.model.name='unnet'" in msg
  assert "unet" in msg and "scaunet" in msg  # lists what is available


@pytest.mark.parametrize("name", models.names())
def test_unknown_model_kwarg_message(name):
  with pytest.raises(ValueError, match="unknown config.model keys"):
    models.get_model(name, num_classes=2, no_such_key=1)


def test_register_twice_is_an_error():
  with pytest.raises(ValueError, match="registered twice"):
    models.register("unet")(lambda num_classes: None)


def test_apply_train_needs_key():
  fns = models.build(ml_collections.ConfigDict(dict(name="unet", base=4, depth=2)), 2)
  v = jax.eval_shape(fns.init, jax.random.PRNGKey(0), _spec((1, 8, 8, 1)))
  with pytest.raises(ValueError, match="PRNG key"):
    fns.apply(v, jnp.zeros((1, 8, 8, 1)), train=True)



def test_apply_is_traced_once_per_signature_and_equals_the_module():
  """ModelFns.apply is one jitted call: two applications with the same shapes inside one
  trace share one traced module (the same jaxpr object), a new shape traces again, and
  its values are those of ``module.apply`` (eval; train with dropout and batch stats)."""
  fns = models.build(ml_collections.ConfigDict(dict(name="unet", base=4, depth=2, norm="batch",
                                                    dropout=0.5)), 2)
  x = _x((2, 8, 8, 1))
  v = np_init(fns.init, jax.random.PRNGKey(0), x)
  key = jax.random.PRNGKey(3)

  def three(v, x):
    return (fns.apply(v, x)[0], fns.apply(v, 2.0 * x)[0],
            fns.apply(v, x[:1])[0], fns.apply(v, x, train=True, key=key)[0])
  calls = [e for e in jax.make_jaxpr(three)(v, x).eqns if "jaxpr" in e.params]
  assert len(calls) == 4
  same_shape, other_shape, train = calls[1:]
  assert calls[0].params["jaxpr"] is same_shape.params["jaxpr"]      # traced once
  assert calls[0].params["jaxpr"] is not other_shape.params["jaxpr"]
  assert calls[0].params["jaxpr"] is not train.params["jaxpr"]

  logits, _ = fns.apply(v, x)
  np.testing.assert_array_equal(logits, fns.module.apply(v, x, train=False))
  logits_t, new_v = fns.apply(v, x, train=True, key=key)
  ref_t, upd = fns.module.apply(v, x, train=True, rngs={"dropout": key}, mutable=["batch_stats"])
  np.testing.assert_allclose(logits_t, ref_t, rtol=1e-6, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
               new_v["batch_stats"], upd["batch_stats"])

# ------------------------------------------------------------------ U-Net
@pytest.mark.parametrize("ndim,shape", [(2, (2, 16, 16, 3)), (3, (1, 8, 8, 8, 4))])
def test_unet_shapes(ndim, shape):
  m = UNet(num_classes=4, base=4, depth=3, ndim=ndim)
  v = jax.eval_shape(m.init, {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)},
                     _spec(shape))
  y = jax.eval_shape(m.apply, v, _spec(shape))
  assert y.shape == shape[:-1] + (4,)
  assert y.dtype == jnp.float32
  # Level l has base * 2**l filters: the bottleneck's conv has 4 * 2**2 = 16,
  # and 3D kernels are 3×3×3.
  kernel = v["params"]["ConvBlock_2"]["Conv_0"]["kernel"]
  assert kernel.shape == (3,) * ndim + (8, 16)


@pytest.mark.parametrize("norm,param_name", [("none", None), ("group", "GroupNorm"),
                                             ("layer", "LayerNorm"), ("batch", "BatchNorm")])
def test_unet_norm_variants_structure(norm, param_name):
  fns = models.build(ml_collections.ConfigDict(dict(name="unet", base=8, depth=2, norm=norm)), 2)
  v = jax.eval_shape(fns.init, jax.random.PRNGKey(0), _spec((2, 8, 8, 1)))
  assert ("batch_stats" in v) == (norm == "batch")
  names = str(jax.tree_util.tree_structure(v["params"]))
  for other in ("GroupNorm", "LayerNorm", "BatchNorm"):
    assert (other in names) == (other == param_name), (norm, other)


def test_unet_batch_norm_updates_stats_in_train_only():
  fns = models.build(ml_collections.ConfigDict(dict(name="unet", base=4, depth=2, norm="batch",
                                                    dropout=0.0)), 2)
  x = _x((2, 8, 8, 1)) + 3.0
  v = np_init(fns.init, jax.random.PRNGKey(0), x)
  train = jax.jit(lambda v, x: fns.apply(v, x, train=True, key=jax.random.PRNGKey(1)))
  logits, new_v = train(v, x)
  assert bool(jnp.all(jnp.isfinite(logits)))
  before, after = jax.tree.leaves(v["batch_stats"]), jax.tree.leaves(new_v["batch_stats"])
  assert any(not np.allclose(a, b) for a, b in zip(before, after))
  _, same = fns.apply(v, x, train=False)
  assert same is v


def test_unet_bad_norm_and_shapes():
  init = lambda m, s: jax.eval_shape(m.init, jax.random.PRNGKey(0), _spec(s))  # noqa: E731
  with pytest.raises(ValueError, match="model.norm='bogus'"):
    init(UNet(norm="bogus"), (1, 16, 16, 1))
  with pytest.raises(ValueError, match="expects input of rank 4"):
    init(UNet(depth=2), (16, 16, 1))
  with pytest.raises(ValueError, match="divisible"):
    init(UNet(depth=3), (1, 10, 10, 1))


@pytest.mark.parametrize("ndim", [2, 3])
def test_up_conv_equals_flax_conv_transpose(ndim):
  """The U-Net's up-conv (a matrix product + depth-to-space) gives the values and the
  gradients of ``nn.ConvTranspose`` with kernel = stride, and the same parameters."""
  import flax.linen as nn
  from fedjax_seg.models.unet import ConvTranspose
  x = _x((2,) + (4, 2, 6)[-ndim:] + (3,))
  w = (2,) * ndim
  ref, ours = nn.ConvTranspose(5, w, strides=w), ConvTranspose(5, w, strides=w)
  v = ref.init(jax.random.PRNGKey(1), x)
  v_ours = ours.init(jax.random.PRNGKey(1), x)
  assert jax.tree.map(np.shape, v) == jax.tree.map(np.shape, v_ours)
  np.testing.assert_array_equal(v["params"]["kernel"], v_ours["params"]["kernel"])
  v = jax.tree.map(lambda a: a + _x(a.shape, 3), v)  # a non-zero bias, an asymmetric kernel
  np.testing.assert_allclose(ours.apply(v, x), ref.apply(v, x), rtol=1e-5, atol=1e-5)
  loss = lambda m: (lambda p: jnp.sum(jnp.sin(m.apply(p, x))))
  g_ref, g_ours = jax.grad(loss(ref))(v), jax.grad(loss(ours))(v)
  for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_ours)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
  # Against NumPy: y[s·i + a] = x[i] · kernel[s-1-a] (2D; the window reversed).
  if ndim == 2:
    k, b = np.asarray(v["params"]["kernel"]), np.asarray(v["params"]["bias"])
    xn, y = np.asarray(x), np.asarray(ours.apply(v, x))
    for a in range(2):
      for c in range(2):
        np.testing.assert_allclose(y[:, a::2, c::2], xn @ k[1 - a, 1 - c] + b, rtol=1e-5, atol=1e-5)


def test_up_conv_other_strides_fall_back_to_flax():
  import flax.linen as nn
  from fedjax_seg.models.unet import ConvTranspose
  x = _x((1, 4, 4, 2))
  ref, ours = nn.ConvTranspose(3, (3, 3), strides=(2, 2)), ConvTranspose(3, (3, 3), strides=(2, 2))
  v = ref.init(jax.random.PRNGKey(0), x)
  np.testing.assert_allclose(ours.apply(v, x), ref.apply(v, x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("ndim", [2, 3])
def test_max_pool_2_equals_flax_max_pool(ndim):
  """Same values as nn.max_pool; after a ReLU the same gradients too (tied windows
  are zeros, whose gradient the ReLU removes either way)."""
  import flax.linen as nn
  from fedjax_seg.models.unet import max_pool_2
  x = _x((2,) + (4, 6, 8)[-ndim:] + (3,))
  w = (2,) * ndim
  np.testing.assert_array_equal(max_pool_2(x, ndim), nn.max_pool(x, w, strides=w))
  f_ref = lambda z: jnp.sum(jnp.sin(nn.max_pool(jax.nn.relu(z), w, strides=w)))
  f_ours = lambda z: jnp.sum(jnp.sin(max_pool_2(jax.nn.relu(z), ndim)))
  np.testing.assert_allclose(jax.grad(f_ours)(x), jax.grad(f_ref)(x), rtol=1e-6, atol=1e-7)
  # NumPy reference of the values (2D)
  if ndim == 2:
    xn = np.asarray(x)
    ref = np.maximum(np.maximum(xn[:, 0::2, 0::2], xn[:, 0::2, 1::2]),
                     np.maximum(xn[:, 1::2, 0::2], xn[:, 1::2, 1::2]))
    np.testing.assert_array_equal(max_pool_2(x, 2), ref)
