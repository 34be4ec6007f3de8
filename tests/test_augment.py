"""Tests for fedjax_seg.data.augment: identity, integer masks, image/mask agreement, jit, 3D."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fedjax_seg.data import augment


def _cfg(**kw):
  base = dict(enabled=True, rotation_deg=(0.0, 90.0), zoom=(1.0, 1.1), flip=False)
  base.update(kw)
  return ml_collections.ConfigDict(base)


def _batch(shape=(3, 12, 12), channels=2, seed=0):
  rng = np.random.default_rng(seed)
  y = np.zeros(shape, np.int32)
  y[..., 3:8, 4:10] = 1
  y[..., 5:7, 5:7] = 3
  x = rng.normal(size=shape + (channels,)).astype(np.float32)
  x[..., 0] = y  # channel 0 carries the labels, so image and mask can be compared
  return jnp.asarray(x), jnp.asarray(y)


@pytest.mark.parametrize("shape", [(3, 12, 12), (2, 4, 12, 12)])
def test_rotation_zero_zoom_one_is_identity(shape):
  x, y = _batch(shape)
  aug = jax.jit(augment.make_augment(_cfg(rotation_deg=(0.0, 0.0), zoom=(1.0, 1.0))))
  xa, ya = aug(jax.random.PRNGKey(3), x, y)
  np.testing.assert_array_equal(np.asarray(xa), np.asarray(x))
  np.testing.assert_array_equal(np.asarray(ya), np.asarray(y))
  assert ya.dtype == y.dtype and xa.dtype == x.dtype


def test_mask_stays_integer_with_no_new_labels():
  x, y = _batch()
  aug = jax.jit(augment.make_augment(_cfg(flip=True)))
  for i in range(5):
    xa, ya = aug(jax.random.PRNGKey(i), x, y)
    assert ya.dtype == jnp.int32 and ya.shape == y.shape and xa.shape == x.shape
    assert set(np.unique(np.asarray(ya))) <= {0, 1, 3}


def test_image_and_mask_get_the_same_transform():
  x, y = _batch()
  xa, ya = jax.jit(augment.make_augment(_cfg()))(jax.random.PRNGKey(7), x, y)
  ch0, ya = np.asarray(xa[..., 0]), np.asarray(ya)
  # Channel 0 is the label map sampled bilinearly: where it is (nearly) integral
  # (away from label edges) it must equal the nearest-neighbour mask.
  inner = np.abs(ch0 - np.round(ch0)) < 1e-3
  assert inner.mean() > 0.5
  np.testing.assert_array_equal(np.round(ch0[inner]).astype(np.int32), ya[inner])
  assert (ya > 0).sum() > 0


def test_rotation_by_90_matches_rot90():
  x, y = _batch()
  xa, ya = jax.jit(augment.make_augment(_cfg(rotation_deg=(90.0, 90.0), zoom=(1.0, 1.0))))(
      jax.random.PRNGKey(0), x, y)
  # A quarter turn of the in-plane axes (either direction: the sign convention is internal).
  ref_y = np.rot90(np.asarray(y), k=1, axes=(1, 2))
  if not np.array_equal(np.asarray(ya), ref_y):
    ref_y = np.rot90(np.asarray(y), k=-1, axes=(1, 2))
    k = -1
  else:
    k = 1
  np.testing.assert_array_equal(np.asarray(ya), ref_y)
  np.testing.assert_allclose(np.asarray(xa), np.rot90(np.asarray(x), k=k, axes=(1, 2)), atol=1e-4)


def test_zoom_magnifies_about_the_centre():
  y = np.zeros((1, 21, 21), np.int32)
  y[0, 8:13, 8:13] = 1  # 5x5 square at the centre
  x = y[..., None].astype(np.float32)
  _, ya = jax.jit(augment.make_augment(_cfg(rotation_deg=(0.0, 0.0), zoom=(2.0, 2.0))))(
      jax.random.PRNGKey(0), x, y)
  assert int(np.asarray(ya).sum()) in range(81, 122)  # ≈ (2·5)² pixels, still centred
  assert np.asarray(ya)[0, 10, 10] == 1 and np.asarray(ya)[0, 0, 0] == 0


def test_keyed_determinism_and_parameter_ranges():
  x, y = _batch()
  aug = jax.jit(augment.make_augment(_cfg()))
  a1, b1 = aug(jax.random.PRNGKey(1), x, y)
  a2, b2 = aug(jax.random.PRNGKey(1), x, y)
  a3, _ = aug(jax.random.PRNGKey(2), x, y)
  np.testing.assert_array_equal(np.asarray(a1), np.asarray(a2))
  np.testing.assert_array_equal(np.asarray(b1), np.asarray(b2))
  assert not np.array_equal(np.asarray(a1), np.asarray(a3))
  keys = jax.random.split(jax.random.PRNGKey(0), 256)
  theta, z, fy, fx = jax.jit(jax.vmap(lambda k: augment.draw_params(k, (0.0, 90.0), (1.0, 1.1), True)))(keys)
  theta, z = np.degrees(np.asarray(theta)), np.asarray(z)
  assert theta.min() >= 0.0 and theta.max() <= 90.0 and theta.max() - theta.min() > 60
  assert z.min() >= 1.0 and z.max() <= 1.1
  assert set(np.unique(np.asarray(fy))) == {-1.0, 1.0} and set(np.unique(np.asarray(fx))) == {-1.0, 1.0}


def test_3d_volume_gets_one_in_plane_transform_for_all_slices():
  x2, y2 = _batch((1, 12, 12))
  x = jnp.repeat(x2[:, None], 4, axis=1)  # [1, 4, 12, 12, C], identical slices
  y = jnp.repeat(y2[:, None], 4, axis=1)
  xa, ya = jax.jit(augment.make_augment(_cfg(flip=True)))(jax.random.PRNGKey(5), x, y)
  assert xa.shape == x.shape and ya.shape == y.shape
  for d in range(1, 4):
    np.testing.assert_array_equal(np.asarray(ya[:, d]), np.asarray(ya[:, 0]))
    np.testing.assert_allclose(np.asarray(xa[:, d]), np.asarray(xa[:, 0]))
  assert not np.array_equal(np.asarray(ya), np.asarray(y))


def test_config_validation_and_trainer_hook():
  with pytest.raises(ValueError, match="rotation_deg"):
    augment.make_augment(_cfg(rotation_deg=(10.0, 0.0)))
  with pytest.raises(ValueError, match="zoom"):
    augment.make_augment(_cfg(zoom=(0.0, 1.1)))
  with pytest.raises(ValueError, match="unknown config.augment keys"):
    augment.make_augment(_cfg(shear=3.0))
  from fedjax_seg import train
  config = ml_collections.ConfigDict({"augment": _cfg()})
  assert callable(train.build_augment(config))
  config.augment.enabled = False
  assert train.build_augment(config) is None
