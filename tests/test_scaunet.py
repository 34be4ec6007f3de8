"""SCA block and SCAUnet / SCAUnet-A (fedjax_seg/models/scaunet.py)."""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from _np_init import np_init  # noqa: E402
from fedjax_seg import models, steps
from fedjax_seg.models import scaunet


def _x(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


# ------------------------------------------------------------------ SCABlock
@pytest.mark.parametrize("ndim,shape", [(2, (1, 32, 32, 3)), (3, (1, 6, 8, 8, 2))])
def test_sca_block_output_shape(ndim, shape):
  block = scaunet.SCABlock(features=8, scales=3, ndim=ndim)
  x = _x(shape)
  variables = np_init(block.init, jax.random.PRNGKey(1), x)
  y = jax.jit(block.apply)(variables, x)
  assert y.shape == shape[:-1] + (8,)
  assert y.dtype == jnp.float32
  assert float(jnp.min(y)) >= 0.0  # ReLU after the mix
  # Parameters: 1×1 in, N × (depthwise + pointwise), query/key, 1×1 mix.
  p = variables["params"]
  assert set(p) == {"conv_in", "dw0", "pw0", "dw1", "pw1", "dw2", "pw2", "query", "key", "mix"}
  assert p["dw0"]["kernel"].shape == (3,) * ndim + (1, 8)
  # init must not store the sown weights in the model variables.
  assert set(variables) == {"params"}


def test_scale_weights_sum_to_one_and_depend_on_input():
  n_scales = 4
  block = scaunet.SCABlock(features=8, scales=n_scales, ndim=2)
  x = _x((2, 32, 32, 3))
  variables = np_init(block.init, jax.random.PRNGKey(1), x)
  _, state = jax.jit(lambda v, x: block.apply(v, x, mutable=["intermediates"]))(variables, x)
  w = state["intermediates"]["scale_weights"][0]
  a = state["intermediates"]["scale_attention"][0]
  assert w.shape == (2, 32, 32, n_scales)
  assert a.shape == (2, 32, 32, n_scales, n_scales)
  np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(a).sum(-1), 1.0, atol=1e-5)
  assert float(jnp.min(w)) >= 0.0
  # Attention is per pixel: the weights must differ between pixels.
  assert float(jnp.std(w[..., 0])) > 1e-4


def test_single_scale_block_has_weight_one_and_no_attention_params():
  block = scaunet.SCABlock(features=4, scales=1)
  x = _x((1, 8, 8, 2))
  variables = np_init(block.init, jax.random.PRNGKey(0), x)
  assert "query" not in variables["params"]
  _, state = jax.jit(lambda v, x: block.apply(v, x, mutable=["intermediates"]))(variables, x)
  np.testing.assert_allclose(state["intermediates"]["scale_weights"][0], 1.0)


def test_cascade_receptive_field_is_2n_plus_1():
  """N cascaded 3×3 convs with no pooling: output at p depends on x within radius N."""
  n = 2
  block = scaunet.SCABlock(features=4, scales=n, ndim=2)
  x = _x((1, 16, 16, 2))
  variables = np_init(block.init, jax.random.PRNGKey(3), x)
  f = jax.jit(lambda x: block.apply(variables, x))
  base = f(x)
  c = 8
  near = f(x.at[0, c + n, c].add(5.0))
  far = f(x.at[0, c + n + 1, c].add(5.0))
  assert float(jnp.abs(far[0, c, c] - base[0, c, c]).max()) == 0.0
  assert float(jnp.abs(near[0, c, c] - base[0, c, c]).max()) > 0.0


@pytest.mark.parametrize("ndim,shape", [(2, (2, 9, 7, 5)), (3, (1, 5, 6, 4, 3))])
def test_depthwise_shift_equals_grouped_conv(ndim, shape):
  x = _x(shape)
  conv = scaunet.DepthwiseConv(3, ndim, impl="conv")
  shift = scaunet.DepthwiseConv(3, ndim, impl="shift")
  variables = np_init(conv.init, jax.random.PRNGKey(2), x)
  variables = jax.tree.map(lambda v: v + 0.1, variables)  # non-zero bias too
  r = _x(shape, seed=5)

  @jax.jit
  def outputs_and_grads(variables, x):
    out = {}
    for name, m in (("shift", shift), ("conv", conv)):
      y, vjp = jax.vjp(m.apply, variables, x)
      out[name] = (y, vjp(r))   # value, (d/dvariables, d/dx) of <y, r>
    return out
  out = outputs_and_grads(variables, x)
  # Same values, and the hand-written VJP of 'shift' matches autodiff of the
  # grouped convolution.
  chex.assert_trees_all_close(out["shift"], out["conv"], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ SCAUnet
@pytest.mark.parametrize("name,scales,ndim,shape", [
    ("scaunet", 2, 2, (2, 32, 32, 3)),
    ("scaunet_a", (3, 2, 1), 2, (1, 32, 32, 3)),
    ("scaunet", 2, 3, (1, 8, 8, 8, 2)),
])
def test_scaunet_shapes(name, scales, ndim, shape):
  # Shapes only: traced with eval_shape, nothing is compiled.
  fns = models.build(ml_collections.ConfigDict(dict(
      name=name, base=4, depth=3, scales=scales, ndim=ndim)), num_classes=3)
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  variables = jax.eval_shape(fns.init, jax.random.PRNGKey(0), x)
  logits, _ = jax.eval_shape(lambda v, x: fns.apply(v, x), variables, x)
  assert logits.shape == shape[:-1] + (3,)
  assert logits.dtype == jnp.float32
  per_level = (scales,) * 3 if isinstance(scales, int) else scales
  for level, n in enumerate(per_level):
    block = "bottleneck" if level == 2 else f"down{level}"
    pw = [k for k in variables["params"][block] if k.startswith("pw")]
    assert len(pw) == n, (block, pw)
    assert variables["params"][block]["mix"]["kernel"].shape[-1] == 4 * 2 ** level


def test_scaunet_a_default_scales_and_fewer_params():
  assert scaunet.default_adaptive_scales(4) == (4, 3, 2, 1)
  x = jnp.zeros((1, 16, 16, 1))

  def n_params(name):
    m = models.get_model(name, num_classes=2, base=8, depth=4)
    v = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), x))
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(v["params"]))
  assert n_params("scaunet_a") < n_params("scaunet") < n_params("unet")


def test_scaunet_bad_config_messages():
  with pytest.raises(ValueError, match="one N per resolution level"):
    m = models.get_model("scaunet", num_classes=2, depth=4, scales=(3, 2))
    jax.eval_shape(m.init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 1)))
  with pytest.raises(ValueError, match="unknown config.model keys for 'scaunet_a'"):
    models.get_model("scaunet_a", num_classes=2, widht=3)
  with pytest.raises(ValueError, match="divisible"):
    m = models.get_model("scaunet", num_classes=2, depth=4)
    jax.eval_shape(m.init, jax.random.PRNGKey(0), jnp.zeros((1, 12, 12, 1)))


def test_scaunet_bfloat16_returns_float32_logits():
  # depth=1: a single SCA block + head keeps the compile short.
  m = models.get_model("scaunet", num_classes=2, base=4, depth=1, scales=2, dtype="bfloat16")
  x = _x((1, 8, 8, 1))
  v = np_init(m.init, jax.random.PRNGKey(0), x)
  y = jax.jit(m.apply)(v, x)
  assert y.dtype == jnp.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(v["params"]))
  assert bool(jnp.all(jnp.isfinite(y)))


def test_scaunet_train_steps_decrease_loss():
  fns = models.build(ml_collections.ConfigDict(dict(
      name="scaunet", base=4, depth=2, scales=2, dropout=0.0)), num_classes=2)
  x = _x((2, 16, 16, 3))
  y = (x[..., 0] > 0.5).astype(jnp.int32)          # learnable from the input
  mask = jnp.ones((2,), jnp.float32)
  variables = np_init(fns.init, jax.random.PRNGKey(0), x)
  tx = optax.sgd(0.5)
  step = jax.jit(steps.make_train_step(fns, tx, "sparse_ce", 2))
  opt_state = tx.init(variables["params"])
  query0 = variables["params"]["down0"]["query"]["kernel"]
  losses = []
  for i in range(6):
    variables, opt_state, loss = step(variables, opt_state, x, y, mask, jax.random.PRNGKey(i))
    losses.append(float(loss))
  assert np.all(np.isfinite(losses))
  assert losses[-1] < losses[0] - 0.02, losses
  # The scale attention is trained too (gradients reach W_q).
  assert not np.allclose(variables["params"]["down0"]["query"]["kernel"], query0)
