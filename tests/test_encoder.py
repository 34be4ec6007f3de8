"""U-Net encoder + projection head (models/encoder.py) and its mapping into a U-Net."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _np_init
from fedjax_seg import models
from fedjax_seg.models import encoder as encoder_lib


def np_init(fns, x, seed=0):
  return _np_init.np_init(fns.init, jax.random.PRNGKey(0), x, seed=seed, std=0.3)


def _build(norm="none", base=4, depth=3, feature_dim=8):
  enc = models.ModelFns(models.get_model("unet_encoder", num_classes=4, base=base, depth=depth,
                                         norm=norm, hidden_dim=16, feature_dim=feature_dim))
  unet = models.ModelFns(models.get_model("unet", num_classes=4, base=base, depth=depth, norm=norm,
                                          dropout=0.0))
  x = jnp.zeros((1, 16, 16, 1))
  return enc, np_init(enc, x, 0), unet, np_init(unet, x, 1)


def _leaves(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in path): v
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_registered_and_features_are_unit_norm():
  assert "unet_encoder" in models.names()
  enc, ve, _, _ = _build()
  x = jax.random.normal(jax.random.PRNGKey(2), (5, 16, 16, 1))
  z = jax.jit(lambda v, x: enc.apply(v, x)[0])(ve, x)
  assert z.shape == (5, 8)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(z), axis=1), 1.0, rtol=1e-5)
  logits = models.get_model("unet_encoder", base=4, depth=3, feature_dim=4, normalize=False)
  v = jax.eval_shape(logits.init, jax.random.PRNGKey(0), x[:1])
  assert jax.eval_shape(logits.apply, v, x).shape == (5, 4)


@pytest.mark.parametrize("norm", ["none", "batch"])
def test_mapping_covers_every_encoder_parameter(norm):
  """Every encoder variable except the projection head lands, unchanged, at the
  same path of the U-Net; the U-Net's contracting path is then fully replaced and
  everything else (expanding path, 1×1 head) is untouched."""
  _, ve, _, vu = _build(norm)
  new = encoder_lib.encoder_to_unet(ve, vu)
  enc_leaves = {f"{c}/{k}": v for c in ve for k, v in _leaves(ve[c]).items()}
  unet_old = {f"{c}/{k}": v for c in vu for k, v in _leaves(vu[c]).items()}
  unet_new = {f"{c}/{k}": v for c in new for k, v in _leaves(new[c]).items()}
  mapped = {f"{c}/{'/'.join(p)}" for c, p in encoder_lib.encoder_mapping(ve)}
  head = {k for k in enc_leaves if k.split("/")[1] in encoder_lib.HEAD_NAMES}
  assert head and mapped | head == set(enc_leaves) and not mapped & head
  conv = {k for k in enc_leaves if "/Conv_" in k}
  assert conv and conv <= mapped   # every conv kernel and bias of the contracting path
  for k in mapped:
    np.testing.assert_array_equal(np.asarray(unet_new[k]), np.asarray(enc_leaves[k]))
  depth = 3
  contracting = {k for k in unet_old if k.split("/")[1] in {f"ConvBlock_{l}" for l in range(depth)}}
  assert contracting == mapped     # the whole contracting path, nothing else
  for k in set(unet_old) - mapped:
    np.testing.assert_array_equal(np.asarray(unet_new[k]), np.asarray(unet_old[k]))
  assert set(unet_new) == set(unet_old)


def test_unet_bottleneck_equals_encoder_trunk():
  """After the mapping the U-Net computes the encoder's bottleneck features."""
  enc, ve, unet, vu = _build(depth=2)
  new = encoder_lib.encoder_to_unet(ve, vu)
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 16, 16, 1))
  cap = lambda m: jax.jit(lambda v, x: m.apply(v, x, capture_intermediates=True,
                                               mutable=["intermediates"])[1])
  st_e, st_u = cap(enc.module)(ve, x), cap(unet.module)(new, x)
  a = st_e["intermediates"]["ConvBlock_1"]["__call__"][0]
  b = st_u["intermediates"]["ConvBlock_1"]["__call__"][0]
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_mismatched_architecture_is_an_error():
  shapes = lambda **kw: np_init(models.ModelFns(models.get_model(**kw)), jnp.zeros((1, 16, 16, 1)))
  ve = shapes(name="unet_encoder", base=4, depth=3)
  with pytest.raises(ValueError, match="shape"):
    encoder_lib.encoder_to_unet(ve, shapes(name="unet", num_classes=4, base=8, depth=3))
  with pytest.raises(ValueError):
    encoder_lib.encoder_to_unet(shapes(name="unet_encoder", base=4, depth=3, norm="batch"),
                                shapes(name="unet", num_classes=4, base=4, depth=3))
  with pytest.raises(ValueError, match="deeper"):
    encoder_lib.encoder_mapping(ve, depth=2)
