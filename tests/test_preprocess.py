"""Tests for the volume preprocessing: N4 (+ cache), resampling, crop / pad, normalisation."""
import os

import ml_collections
import numpy as np
import pytest

from fedjax_seg.data import phantom, pipeline, preprocess

N4_FAST = preprocess.N4Params(shrink_factor=2, iterations=(20, 20))


def _slab_with_bias(n_slices=8, size=32):
  """A phantom head slab (WM / GM / CSF, constant per tissue + 1 % noise) times a known bias field."""
  rng = phantom.rng_for(0, "n4-test")
  labels = phantom.head_labels(rng, n_slices, size, tumour_slices=(0, 0), tumour_radius=0.2, enhancing=False)
  clean = np.where(labels >= phantom.CSF, phantom.BRATS_CONTRAST[labels, 1] * 1000.0, 0.0)
  clean = clean * (1.0 + 0.01 * rng.standard_normal(clean.shape)) * (labels >= phantom.CSF)
  y, x = phantom.grid_2d(size)
  z = np.linspace(-1.0, 1.0, n_slices)
  field = phantom.bias_field(np.array([0.3, -0.25, 0.1, 0.2, 0.1, 0.1, 0.0, 0.0]), z[:, None, None], y[None],
                             x[None])
  return (clean * field).astype(np.float32), labels == phantom.WHITE


def _cv(a, region):
  return float(a[region].std() / a[region].mean())


def test_n4_reduces_white_matter_cv():
  biased, wm = _slab_with_bias()
  log_bias = preprocess.n4_log_bias(biased, (1.0, 1.0, 1.0), N4_FAST)
  assert log_bias.shape == (4, 16, 16)  # fitted on the image shrunk by 2
  corrected = preprocess.apply_log_bias(biased, (1.0, 1.0, 1.0), log_bias, 2)
  assert corrected.shape == biased.shape and corrected.dtype == np.float32
  before, after = _cv(biased, wm), _cv(corrected, wm)
  assert before > 0.05
  assert after < 0.5 * before, (before, after)
  assert np.all(corrected[biased == 0] == 0)  # background stays 0


def test_n4_on_empty_image_is_a_no_op():
  z = np.zeros((4, 8, 8), np.float32)
  lb = preprocess.n4_log_bias(z, (1, 1, 1), N4_FAST)
  np.testing.assert_array_equal(preprocess.apply_log_bias(z, (1, 1, 1), lb, 2), z)


def test_n4_cache_cold_then_warm_identical_and_keyed_by_content_and_params(tmp_path):
  biased, _ = _slab_with_bias()
  path = tmp_path / "vol_flair.nii.gz"
  phantom.save_nifti(biased, np.eye(4), path, np.float32)
  cache = preprocess.N4Cache(str(tmp_path / "n4"), N4_FAST)
  cold, hit = cache.correct(biased, (1.0, 1.0, 1.0), str(path))
  assert not hit
  warm, hit = cache.correct(biased, (1.0, 1.0, 1.0), str(path))
  assert hit and (cache.hits, cache.misses) == (1, 1)
  np.testing.assert_array_equal(cold, warm)  # same result cold or warm
  entries = [f for _, _, fs in os.walk(tmp_path / "n4") for f in fs]
  assert len(entries) == 1 and entries[0].endswith(".npy")
  # Other parameters -> other key; other file content -> other key; same content elsewhere -> same key.
  other = preprocess.N4Cache(str(tmp_path / "n4"), preprocess.N4Params(shrink_factor=2, iterations=(10,)))
  assert other.key(str(path)) != cache.key(str(path))
  copy = tmp_path / "copy.nii.gz"
  copy.write_bytes(path.read_bytes())
  assert cache.key(str(copy)) == cache.key(str(path))
  assert cache.key(str(path), channel=1) != cache.key(str(path))
  phantom.save_nifti(biased * 2.0, np.eye(4), path, np.float32)
  assert cache.key(str(path)) != cache.key(str(copy))


def test_n4_params_from_config():
  p = preprocess.N4Params.from_config(dict(enabled=True, shrink_factor=3, iterations=[5, 5], cache_dir=""))
  assert p.shrink_factor == 3 and p.iterations == (5, 5)
  with pytest.raises(ValueError, match="unknown config.data.n4 keys"):
    preprocess.N4Params.from_config(dict(shrink=3))
  with pytest.raises(ValueError, match="iterations"):
    preprocess.N4Params.from_config(dict(iterations=()))


def test_build_dataset_with_n4_prints_progress_and_uses_cache(tmp_path, capsys):
  phantom.write_brats(tmp_path / "data", seed=0, sites=("CS", "DU", "HT"), patients_per_site=1,
                      slices_per_patient=4, size=16)
  cfg = ml_collections.ConfigDict(dict(
      layout="brats", root=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"), image_size=16, ndim=2,
      normalize="zscore", split_seed=0, stratify_by_site=False, val_fraction=0.34, test_fraction=0.5,
      n4=dict(enabled=True, shrink_factor=4, iterations=(5,), cache_dir=""), depth=0, target_spacing=(),
      min_foreground_fraction=0.0, skip_bad_patients=False, fold=None, num_folds=5))
  a = pipeline.build_dataset(cfg, verbose=False)
  out = capsys.readouterr().out
  assert "[n4] 1/3 BraTS20_Training_001: 4 volumes, 0 from cache, 4 fitted" in out
  assert "[n4] BraTS: 12 volumes, 0 from cache, 12 fitted" in out
  assert os.path.isdir(tmp_path / "cache" / "n4")
  b = pipeline.build_dataset(cfg, verbose=False)
  assert "[n4] BraTS: 12 volumes, 12 from cache, 0 fitted" in capsys.readouterr().out
  for pid in a.patients:
    np.testing.assert_array_equal(a.patients[pid].images, b.patients[pid].images)


# ---------------------------------------------------------------------------
# Resampling, crop / pad, normalisation
# ---------------------------------------------------------------------------
def test_resample_volume_image_and_labels():
  img = np.arange(4 * 6 * 8, dtype=np.float32).reshape(4, 6, 8)
  out, sp = preprocess.resample_volume(img, (2.0, 1.0, 1.0), (1.0, 2.0, 2.0))
  assert out.shape == (8, 3, 4) and sp == (1.0, 2.0, 2.0) and out.dtype == np.float32
  assert img.min() <= out.min() and out.max() <= img.max()  # linear: no overshoot
  labels = np.zeros((4, 6, 8), np.uint8)
  labels[1:3, 2:5, 3:7] = 3
  labels[2, 3, 4] = 1
  lab, sp = preprocess.resample_volume(labels, (2.0, 1.0, 1.0), (1.0, 0.5, 0.5), is_label=True)
  assert lab.shape == (8, 12, 16) and lab.dtype == np.uint8 and set(np.unique(lab)) == {0, 1, 3}
  np.testing.assert_array_equal(lab[::2, ::2, ::2][:, 1:, 1:], labels[:, 1:, 1:])  # nearest keeps values
  # In-plane only (ACDC): z kept.
  out, sp = preprocess.resample_volume(img, (10.0, 1.5, 1.5), (None, 3.0, 3.0))
  assert out.shape == (4, 3, 4) and sp == (10.0, 3.0, 3.0)
  # Same spacing: unchanged object.
  same, sp = preprocess.resample_volume(img, (1.0, 1.0, 1.0), (1.0, 0, None))
  assert same is img and sp == (1.0, 1.0, 1.0)
  # Channels.
  out, _ = preprocess.resample_volume(np.stack([img, -img], -1), (1.0, 1.0, 1.0), (2.0, 2.0, 2.0))
  assert out.shape == (2, 3, 4, 2)
  np.testing.assert_allclose(out[..., 1], -out[..., 0])


def test_resample_constant_image_has_no_zero_rim():
  img = np.full((4, 5, 5), 7.0, np.float32)
  out, _ = preprocess.resample_volume(img, (1.0, 1.0, 1.0), (1.0, 0.3, 0.3))
  np.testing.assert_allclose(out, 7.0)


def test_crop_or_pad():
  a = np.arange(10 * 6).reshape(10, 6)
  c = preprocess.crop_or_pad(a, (4, 8))
  assert c.shape == (4, 8)
  np.testing.assert_array_equal(c[:, 1:7], a[3:7])  # centred crop rows 3..6, padded columns
  assert (c[:, 0] == 0).all() and (c[:, 7] == 0).all()
  c = preprocess.crop_or_pad(a, (4,), center=(0.0,))
  np.testing.assert_array_equal(c, a[:4])  # window kept inside the array
  c = preprocess.crop_or_pad(a, (3,), center=(7.0,))
  np.testing.assert_array_equal(c, a[6:9])
  v = np.ones((5, 4, 4, 2))
  assert preprocess.crop_or_pad(v, (8, 2, 2)).shape == (8, 2, 2, 2)
  assert preprocess.foreground_center(np.zeros((4, 4), bool)) == (1.5, 1.5)
  m = np.zeros((10, 10), bool)
  m[2:5, 6:9] = True
  assert preprocess.foreground_center(m) == (3.0, 7.0)


def test_normalize_volume_modes():
  rng = np.random.default_rng(0)
  v = np.zeros((3, 6, 6, 2), np.float32)
  v[:, 1:5, 1:5] = rng.uniform(1, 10, (3, 4, 4, 2))
  z = preprocess.normalize_volume(v, "zscore")
  fg = v.max(-1) > 0
  np.testing.assert_allclose(z[fg].mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(z[fg].std(0), 1.0, atol=1e-3)
  assert np.all(z[~fg] == 0)
  m = preprocess.normalize_volume(v, "max")
  np.testing.assert_allclose(m.max(axis=(0, 1, 2)), 1.0)
  s = preprocess.normalize_volume(v, "slice_max")
  np.testing.assert_allclose(s.max(axis=(1, 2)), 1.0)
  np.testing.assert_array_equal(preprocess.normalize_volume(v, "none"), v)
  assert not preprocess.normalize_volume(np.zeros_like(v), "zscore").any()
  with pytest.raises(ValueError, match="data.normalize"):
    preprocess.normalize_volume(v, "minmax")
