"""Tests for fedjax_seg.data.augment: identity, integer masks, image/mask agreement, jit, 3D,
the map_coordinates sampling against the hand-written sampler it replaced, the intensity
ops and elastic deformation against NumPy references, and their config validation."""
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


def _keyed_outputs(aug, x, y):
  """``aug`` at keys 1, 1, 2: the same key gives the same (images, labels), another key other
  images. Returns the outputs of keys 1 and 2."""
  a1, b1 = aug(jax.random.PRNGKey(1), x, y)
  a2, b2 = aug(jax.random.PRNGKey(1), x, y)
  a3, b3 = aug(jax.random.PRNGKey(2), x, y)
  np.testing.assert_array_equal(np.asarray(a1), np.asarray(a2))
  np.testing.assert_array_equal(np.asarray(b1), np.asarray(b2))
  assert not np.array_equal(np.asarray(a1), np.asarray(a3))
  return (a1, b1), (a3, b3)


def test_keyed_determinism_and_parameter_ranges():
  x, y = _batch()
  _keyed_outputs(jax.jit(augment.make_augment(_cfg())), x, y)
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


# ---------------------------------------------------------------------------
# map_coordinates sampling vs the hand-written sampler it replaced (copied verbatim).

def _old_inside(iy, ix, h, w):
  return (iy >= 0) & (iy <= h - 1) & (ix >= 0) & (ix <= w - 1)


def _old_bilinear(img, sy, sx):
  h, w = img.shape[0], img.shape[1]
  y0, x0 = jnp.floor(sy), jnp.floor(sx)
  wy, wx = sy - y0, sx - x0
  out = 0.0
  for dy, fy in ((0, 1.0 - wy), (1, wy)):
    for dx, fx in ((0, 1.0 - wx), (1, wx)):
      iy, ix = y0 + dy, x0 + dx
      ok = _old_inside(iy, ix, h, w)
      v = img[jnp.clip(iy, 0, h - 1).astype(jnp.int32), jnp.clip(ix, 0, w - 1).astype(jnp.int32)]
      weight = jnp.where(ok, fy * fx, 0.0)
      out = out + v * weight.reshape(weight.shape + (1,) * (img.ndim - 2)).astype(img.dtype)
  return out.astype(img.dtype)


def _old_nearest(img, sy, sx, rnd=jnp.round):
  h, w = img.shape[0], img.shape[1]
  iy, ix = rnd(sy), rnd(sx)
  ok = _old_inside(iy, ix, h, w)
  v = img[jnp.clip(iy, 0, h - 1).astype(jnp.int32), jnp.clip(ix, 0, w - 1).astype(jnp.int32)]
  return jnp.where(ok.reshape(ok.shape + (1,) * (img.ndim - 2)), v, jnp.zeros((), img.dtype))


def _half_away(a):
  return jnp.sign(a) * jnp.floor(jnp.abs(a) + 0.5)


def _is_tie(a):
  a = np.asarray(a)
  return np.abs(a - np.floor(a)) == 0.5


@pytest.mark.parametrize("seed", range(4))
def test_map_coordinates_matches_the_old_sampler(seed):
  rng = np.random.default_rng(seed)
  h, w = 13, 11
  img = jnp.asarray(rng.normal(size=(h, w, 3)).astype(np.float32))
  lab = jnp.asarray(rng.integers(0, 4, size=(h, w, 2)).astype(np.int32))
  theta = float(rng.uniform(-np.pi, np.pi))
  zoom = float(rng.uniform(0.7, 1.5))
  fy, fx = (float(rng.choice([-1.0, 1.0])) for _ in range(2))
  sy, sx = augment.source_coords(h, w, theta, zoom, fy, fx)
  sy = sy + jnp.asarray(rng.normal(scale=0.7, size=(h, w)).astype(np.float32))  # an elastic-like field
  sx = sx + jnp.asarray(rng.normal(scale=0.7, size=(h, w)).astype(np.float32))
  new_x = jax.jit(augment.sample_bilinear)(img, sy, sx)
  np.testing.assert_allclose(np.asarray(new_x), np.asarray(_old_bilinear(img, sy, sx)), atol=1e-5, rtol=1e-5)
  new_y = np.asarray(jax.jit(augment.sample_nearest)(lab, sy, sx))
  old_y = np.asarray(_old_nearest(lab, sy, sx))
  assert new_y.dtype == np.int32
  # Identical except where a source coordinate is exactly a half-integer ...
  tie = _is_tie(sy) | _is_tie(sx)
  np.testing.assert_array_equal(new_y[~tie], old_y[~tie])
  # ... and everywhere identical to the old sampler with rounding half away from zero.
  np.testing.assert_array_equal(new_y, np.asarray(_old_nearest(lab, sy, sx, rnd=_half_away)))


def test_nearest_rounds_half_away_from_zero_where_the_old_sampler_rounded_half_to_even():
  h = w = 21
  lab = jnp.asarray(np.arange(h * w, dtype=np.int32).reshape(h, w))  # every pixel its own label
  sy, sx = augment.source_coords(h, w, 0.0, 2.0, 1.0, 1.0)  # 10 + (p - 10) / 2: half-integers
  assert _is_tie(sy).any()
  new = np.asarray(augment.sample_nearest(lab, sy, sx))
  old = np.asarray(_old_nearest(lab, sy, sx))
  tie = _is_tie(sy) | _is_tie(sx)
  np.testing.assert_array_equal(new[~tie], old[~tie])
  assert (new[tie] != old[tie]).any()
  # 10.5 -> 11 (new), 10 (old: half to even); 11.5 -> 12 in both.
  assert new[11, 10] == lab[11, 10] and old[11, 10] == lab[10, 10]
  assert new[13, 10] == old[13, 10] == lab[12, 10]
  np.testing.assert_array_equal(new, np.asarray(_old_nearest(lab, sy, sx, rnd=_half_away)))


def test_whole_augment_matches_the_old_sampler_off_ties():
  x, y = _batch((4, 12, 12))
  aug = jax.jit(augment.make_augment(_cfg(flip=True, rotation_deg=(-40.0, 40.0), zoom=(0.8, 1.3))))
  key = jax.random.PRNGKey(11)
  xa, ya = aug(key, x, y)
  for i, k in enumerate(jax.random.split(key, 4)):
    theta, z, fy, fx = augment.draw_params(k, (-40.0, 40.0), (0.8, 1.3), True)
    sy, sx = augment.source_coords(12, 12, theta, z, fy, fx)
    np.testing.assert_allclose(np.asarray(xa[i]), np.asarray(_old_bilinear(x[i], sy, sx)), atol=1e-5)
    tie = _is_tie(sy) | _is_tie(sx)
    np.testing.assert_array_equal(np.asarray(ya[i])[~tie], np.asarray(_old_nearest(y[i], sy, sx))[~tie])


# ---------------------------------------------------------------------------
# Intensity ops and elastic deformation.

OFF = dict(noise=dict(prob=0.0, sigma=(0.0, 0.1)), blur=dict(prob=0.0, sigma=(0.5, 1.0)),
           brightness=dict(prob=0.0, range=(0.75, 1.25)), contrast=dict(prob=0.0, range=(0.75, 1.25)),
           gamma=dict(prob=0.0, range=(0.7, 1.5)),
           elastic=dict(prob=0.0, alpha=(0.0, 900.0), sigma=(9.0, 13.0)))
ALL_ON = dict(noise=dict(prob=1.0, sigma=(0.05, 0.1)), blur=dict(prob=1.0, sigma=(0.5, 1.0)),
              brightness=dict(prob=1.0, range=(0.75, 1.25)), contrast=dict(prob=1.0, range=(0.75, 1.25)),
              gamma=dict(prob=1.0, range=(0.7, 1.5)),
              elastic=dict(prob=1.0, alpha=(100.0, 200.0), sigma=(3.0, 4.0)))
STILL = dict(rotation_deg=(0.0, 0.0), zoom=(1.0, 1.0))  # the identity spatial transform


def _ops_cfg(ops, **kw):
  base = dict(enabled=True, rotation_deg=(0.0, 90.0), zoom=(1.0, 1.1), flip=False)
  base.update(kw)
  base.update({k: dict(v) for k, v in ops.items()})
  return ml_collections.ConfigDict(base)


def _only(op, **params):
  ops = {k: dict(v) for k, v in OFF.items()}
  ops[op] = dict(ops[op], **{"prob": 1.0, **params})
  return ops


def _apply_only(x, y, op, **params):
  """(x, y) augmented by ``op`` alone (``params`` set, prob 1 unless given), no spatial transform, key 0."""
  return jax.jit(augment.make_augment(_ops_cfg(_only(op, **params), **STILL)))(jax.random.PRNGKey(0), x, y)


def _positive_batch(shape=(3, 12, 12), channels=2, seed=0):
  x, y = _batch(shape, channels, seed)
  x = np.asarray(x).copy()
  x[..., 1:] = np.abs(x[..., 1:]) + 0.5  # intensities > 0 (gamma, brightness references)
  return jnp.asarray(x), y


def _np_blur(img, sigma, radius):
  """Separable Gaussian over the two in-plane axes (-3, -2) of [..., H, W, C], zero padded."""
  t = np.arange(-radius, radius + 1, dtype=np.float64)
  k = np.exp(-t ** 2 / (2 * sigma ** 2))
  k /= k.sum()
  out = np.asarray(img, np.float64)
  for axis in (-3, -2):
    moved = np.moveaxis(out, axis, -1)
    pad = np.zeros(moved.shape[:-1] + (moved.shape[-1] + 2 * radius,))
    pad[..., radius:radius + moved.shape[-1]] = moved
    acc = sum(k[j] * pad[..., j:j + moved.shape[-1]] for j in range(2 * radius + 1))
    out = np.moveaxis(acc, -1, axis)
  return out


def test_config_files_keep_every_op_off_and_match_no_op_sections():
  from configs import acdc_centralized, lgg_centralized
  x, y = _batch((2, 12, 12))
  plain = jax.jit(augment.make_augment(_cfg()))(jax.random.PRNGKey(4), x, y)
  for mod in (acdc_centralized, lgg_centralized):
    cfg = mod.get_config().augment
    for op in augment.OPS:
      assert cfg[op].prob == 0.0 and set(cfg[op].keys()) == set(augment.OPS[op])
    out = jax.jit(augment.make_augment(cfg))(jax.random.PRNGKey(4), x, y)
    for a, b in zip(out, plain):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_all_ops_keyed_determinism_and_labels_kept():
  x, y = _positive_batch((4, 16, 16))
  (a1, m1), (a3, m3) = _keyed_outputs(jax.jit(augment.make_augment(_ops_cfg(ALL_ON, flip=True))), x, y)
  assert not np.array_equal(np.asarray(m1), np.asarray(m3))
  for m in (m1, m3):
    assert m.dtype == y.dtype and m.shape == y.shape
    assert set(np.unique(np.asarray(m))) <= {0, 1, 3}
  assert a1.dtype == x.dtype and a1.shape == x.shape and np.isfinite(np.asarray(a1)).all()
  # per sample: the samples of one batch get different draws
  assert not np.array_equal(np.asarray(a1[0]), np.asarray(a1[1]))


def test_intensity_ops_never_change_the_mask_nor_the_geometry():
  x, y = _positive_batch()
  intensity = {k: v for k, v in ALL_ON.items() if k != "elastic"}
  key = jax.random.PRNGKey(9)
  _, m_plain = jax.jit(augment.make_augment(_ops_cfg({}, flip=True)))(key, x, y)
  xa, m_int = jax.jit(augment.make_augment(_ops_cfg(intensity, flip=True)))(key, x, y)
  np.testing.assert_array_equal(np.asarray(m_int), np.asarray(m_plain))
  _, m_still = jax.jit(augment.make_augment(_ops_cfg(intensity, **STILL)))(key, x, y)
  np.testing.assert_array_equal(np.asarray(m_still), np.asarray(y))


def test_elastic_alpha_zero_is_the_identity_and_moves_image_and_mask_together():
  x, y = _batch((2, 16, 16))
  zero = _only("elastic", alpha=(0.0, 0.0), sigma=(3.0, 3.0))
  xa, ya = jax.jit(augment.make_augment(_ops_cfg(zero, **STILL)))(jax.random.PRNGKey(0), x, y)
  np.testing.assert_array_equal(np.asarray(xa), np.asarray(x))
  np.testing.assert_array_equal(np.asarray(ya), np.asarray(y))
  strong = _only("elastic", alpha=(300.0, 300.0), sigma=(3.0, 3.0))
  xa, ya = jax.jit(augment.make_augment(_ops_cfg(strong, **STILL)))(jax.random.PRNGKey(0), x, y)
  assert not np.array_equal(np.asarray(ya), np.asarray(y))
  assert set(np.unique(np.asarray(ya))) <= {0, 1, 3}
  ch0 = np.asarray(xa[..., 0])  # the label map sampled bilinearly at the same coordinates
  inner = np.abs(ch0 - np.round(ch0)) < 1e-3
  assert inner.mean() > 0.5
  np.testing.assert_array_equal(np.round(ch0[inner]).astype(np.int32), np.asarray(ya)[inner])


def test_elastic_field_against_numpy():
  key, h, w, alpha, sigma = jax.random.PRNGKey(3), 12, 10, 40.0, 1.5
  radius = augment.kernel_radius(sigma)
  assert radius == 5  # ⌈3 · 1.5⌉
  dy, dx = jax.jit(augment.elastic_field, static_argnums=(1, 2, 5))(key, h, w, alpha, sigma, radius)
  u = np.asarray(jax.random.uniform(key, (h, w, 2), jnp.float32, -1.0, 1.0))
  ref = alpha * _np_blur(u, sigma, radius)
  np.testing.assert_allclose(np.asarray(dy), ref[..., 0], atol=1e-4)
  np.testing.assert_allclose(np.asarray(dx), ref[..., 1], atol=1e-4)


def test_gamma_against_numpy():
  x, y = _positive_batch()
  g = 1.7
  xa, ya = _apply_only(x, y, "gamma", range=(g, g))
  xn = np.asarray(x, np.float64)
  lo, hi = xn.min(axis=(1, 2), keepdims=True), xn.max(axis=(1, 2), keepdims=True)
  ref = lo + (hi - lo) * ((xn - lo) / (hi - lo + augment.GAMMA_EPS)) ** g
  np.testing.assert_allclose(np.asarray(xa), ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(ya), np.asarray(y))
  # The range [min, max] of every channel is kept.
  np.testing.assert_allclose(np.asarray(xa).min(axis=(1, 2)), lo[:, 0, 0], atol=1e-6)


def test_contrast_against_numpy():
  x, y = _positive_batch()
  f = 1.2
  xa, _ = _apply_only(x, y, "contrast", range=(f, f))
  xn = np.asarray(x, np.float64)
  mu = xn.mean(axis=(1, 2), keepdims=True)
  ref = np.clip((xn - mu) * f + mu, xn.min(axis=(1, 2), keepdims=True), xn.max(axis=(1, 2), keepdims=True))
  np.testing.assert_allclose(np.asarray(xa), ref, rtol=1e-5, atol=1e-5)


def test_brightness_against_numpy():
  x, y = _positive_batch()
  xa, _ = _apply_only(x, y, "brightness", range=(0.8, 0.8))
  np.testing.assert_allclose(np.asarray(xa), 0.8 * np.asarray(x), rtol=1e-6)


def test_blur_against_numpy():
  x, y = _positive_batch()
  xa, _ = _apply_only(x, y, "blur", sigma=(1.0, 1.0))
  np.testing.assert_allclose(np.asarray(xa), _np_blur(x, 1.0, 3), atol=1e-5)


def test_noise_against_numpy():
  x, y = _positive_batch((2, 64, 64), channels=1)
  sigma = 0.3
  xa, _ = _apply_only(x, y, "noise", sigma=(sigma, sigma))
  n = (np.asarray(xa, np.float64) - np.asarray(x, np.float64)) / sigma
  assert abs(n.mean()) < 0.05 and abs(n.std() - 1.0) < 0.05
  # exactly x + σ·N(0, 1) from the op's key: add_noise against NumPy
  k = jax.random.PRNGKey(5)
  ref = np.asarray(x[0], np.float64) + sigma * np.asarray(jax.random.normal(k, x[0].shape, jnp.float32))
  np.testing.assert_allclose(np.asarray(augment.add_noise(x[0], k, sigma)), ref, atol=1e-6)


def test_each_op_applies_with_its_probability_per_sample():
  x, y = _positive_batch((64, 8, 8), channels=1)
  xa, _ = _apply_only(x, y, "brightness", prob=0.5, range=(2.0, 2.0))
  changed = np.asarray([not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(xa, x)])
  assert 16 <= changed.sum() <= 48
  for a, b, c in zip(np.asarray(xa), np.asarray(x), changed):  # applied samples are exactly 2·x
    np.testing.assert_allclose(a, 2.0 * b if c else b, rtol=1e-6)


def test_3d_volumes_with_every_op_but_noise_keep_identical_slices_identical():
  x2, y2 = _positive_batch((2, 16, 16))
  x = jnp.repeat(x2[:, None], 3, axis=1)  # [2, 3, 16, 16, C]
  y = jnp.repeat(y2[:, None], 3, axis=1)
  ops = {k: v for k, v in ALL_ON.items() if k != "noise"}
  xa, ya = jax.jit(augment.make_augment(_ops_cfg(ops, flip=True)))(jax.random.PRNGKey(5), x, y)
  assert xa.shape == x.shape and ya.shape == y.shape and xa.dtype == x.dtype and ya.dtype == y.dtype
  for d in (1, 2):
    np.testing.assert_array_equal(np.asarray(ya[:, d]), np.asarray(ya[:, 0]))
    np.testing.assert_allclose(np.asarray(xa[:, d]), np.asarray(xa[:, 0]), atol=1e-6)
  assert set(np.unique(np.asarray(ya))) <= {0, 1, 3}
  xa, ya = jax.jit(augment.make_augment(_ops_cfg(ALL_ON)))(jax.random.PRNGKey(5), x, y)
  assert np.isfinite(np.asarray(xa)).all() and set(np.unique(np.asarray(ya))) <= {0, 1, 3}


@pytest.mark.parametrize("key,value,match", [
    ("gamma.prob", 1.5, r"config\.augment\.gamma\.prob=1\.5: must be a finite number in \[0, 1\]"),
    ("gamma.range", (0.0, 1.5), r"config\.augment\.gamma\.range=\(0\.0, 1\.5\): must be \(low, high\) with 0 < low"),
    ("blur.sigma", (1.0, 0.5), r"config\.augment\.blur\.sigma="),
    ("noise.sigma", (-0.1, 0.1), r"config\.augment\.noise\.sigma="),
    ("brightness.range", (1.25, 0.75), r"config\.augment\.brightness\.range="),
    ("contrast.prob", -0.1, r"config\.augment\.contrast\.prob="),
    ("elastic.alpha", (0.0, float("inf")), r"config\.augment\.elastic\.alpha="),
    ("elastic.sigma", (0.0, 13.0), r"config\.augment\.elastic\.sigma="),
])
def test_bad_op_values_name_the_key(key, value, match):
  from fedjax_seg import validate
  from configs import acdc_centralized
  config = acdc_centralized.get_config()
  op, k = key.split(".")
  config.augment[op][k] = value
  with pytest.raises(validate.ConfigError, match=match) as e:
    validate.check(config)
  assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match=match):
    augment.make_augment(config.augment)


def test_op_sections_must_be_complete_and_known():
  ops = _only("gamma")
  del ops["gamma"]["range"]
  with pytest.raises(ValueError, match=r"config\.augment\.gamma\.range is missing"):
    augment.make_augment(_ops_cfg(ops))
  ops = _only("noise")
  ops["noise"]["mean"] = 0.0
  with pytest.raises(ValueError, match=r"unknown config\.augment\.noise keys \['mean'\]"):
    augment.make_augment(_ops_cfg(ops))
  from fedjax_seg import validate
  for op, keys in augment.OPS.items():
    for k in keys:
      assert f"augment.{op}.{k}" in validate.RULES
