"""Tests for fedjax_seg.data.phantom (deterministic synthetic LGG hospitals)."""

import os
import re

import numpy as np
import pytest
from PIL import Image

from fedjax_seg.data import phantom

SMALL = dict(sites=("CS", "DU", "HT"), patients_per_site=2, slices_per_patient=10, size=32)


def _all_files(root):
  out = {}
  for dirpath, _, files in os.walk(root):
    for f in files:
      path = os.path.join(dirpath, f)
      with open(path, "rb") as fh:
        out[os.path.relpath(path, root)] = fh.read()
  return out


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  root = tmp_path_factory.mktemp("phantom")
  folders = phantom.write_lgg(root, seed=0, **SMALL)
  return root, folders


def test_layout_names(written):
  root, folders = written
  assert len(folders) == 6
  assert folders == sorted(folders, key=os.path.basename)
  for folder in folders:
    assert os.path.dirname(folder) == os.path.join(str(root), "kaggle_3m")
    name = os.path.basename(folder)
    assert re.fullmatch(r"TCGA_(CS|DU|HT)_\d{4}_(199\d|200\d)\d{4}", name), name
    expected = {f"{name}_{n}.tif" for n in range(1, 11)} | {f"{name}_{n}_mask.tif" for n in range(1, 11)}
    assert set(os.listdir(folder)) == expected
  assert sorted(os.path.basename(f).split("_")[1] for f in folders) == ["CS", "CS", "DU", "DU", "HT", "HT"]


def test_same_seed_same_bytes_different_seed_different_bytes(written, tmp_path):
  root, _ = written
  phantom.write_lgg(tmp_path / "again", seed=0, **SMALL)
  a, b = _all_files(root), _all_files(tmp_path / "again")
  assert a.keys() == b.keys() and len(a) == 120
  assert all(a[k] == b[k] for k in a)

  phantom.write_lgg(tmp_path / "other", seed=1, **SMALL)
  c = _all_files(tmp_path / "other")
  assert set(a).isdisjoint(c)  # different patient ids
  a_imgs = sorted(v for k, v in a.items() if not k.endswith("_mask.tif"))
  c_imgs = sorted(v for k, v in c.items() if not k.endswith("_mask.tif"))
  assert all(x != y for x, y in zip(a_imgs, c_imgs))


def test_images_rgb_uint8_masks_binary_and_tumour_free_fraction(written):
  _, folders = written
  n_empty = n_total = 0
  for folder in folders:
    name = os.path.basename(folder)
    has_tumour = []
    for n in range(1, 11):
      img = Image.open(os.path.join(folder, f"{name}_{n}.tif"))
      assert img.format == "TIFF" and img.mode == "RGB" and img.size == (32, 32)
      mask = np.asarray(Image.open(os.path.join(folder, f"{name}_{n}_mask.tif")))
      assert mask.dtype == np.uint8 and mask.shape == (32, 32)
      assert set(np.unique(mask)) <= {0, 255}
      has_tumour.append(bool(mask.any()))
    # first/last tumour-free, tumour slices contiguous
    assert not has_tumour[0] and not has_tumour[-1]
    idx = np.flatnonzero(has_tumour)
    assert idx.size and np.all(np.diff(idx) == 1)
    n_empty += len(has_tumour) - idx.size
    n_total += len(has_tumour)
  assert 0.15 <= n_empty / n_total <= 0.45


def test_tumour_brighter_on_flair_within_each_patient():
  for site in ("CS", "DU", "HT"):
    images, masks = phantom.generate_lgg_patient(0, site, 0, n_slices=10, size=32)
    flair = images[..., 1].astype(float)
    tumour = masks > 0
    brain = (images[..., 0] > 40) & ~tumour
    assert flair[tumour].mean() > flair[brain].mean() + 30, site


def test_sites_differ_in_statistics():
  stats = {}
  for site in ("CS", "DU", "HT"):
    flair_means, tumour_px = [], []
    for i in range(3):
      images, masks = phantom.generate_lgg_patient(0, site, i, n_slices=10, size=32)
      flair_means.append(images[..., 1].mean())
      tumour_px.append((masks > 0).sum())
    stats[site] = (np.mean(flair_means), np.mean(tumour_px))
  flair = [s[0] for s in stats.values()]
  assert max(flair) - min(flair) > 5
  assert stats["DU"][1] > stats["HT"][1]  # DU has larger tumours than HT by design
  e_cs, e_du = phantom.site_effects("CS", 0), phantom.site_effects("DU", 0)
  assert e_cs != e_du
  assert phantom.site_effects("CS", 0) == e_cs  # deterministic
  assert phantom.site_effects("CS", 1) != e_cs  # seed-dependent
  assert phantom.site_effects("ZZ", 0) == phantom.site_effects("ZZ", 0)  # unknown site, still deterministic


def test_existing_output_requires_overwrite(written, tmp_path):
  phantom.write_lgg(tmp_path, seed=0, sites=("CS",), patients_per_site=1, slices_per_patient=3, size=16)
  with pytest.raises(FileExistsError, match="overwrite"):
    phantom.write_lgg(tmp_path, seed=0, sites=("CS",), patients_per_site=1, slices_per_patient=3, size=16)
  folders = phantom.write_lgg(tmp_path, seed=1, sites=("DU",), patients_per_site=1, slices_per_patient=3,
                              size=16, overwrite=True)
  assert os.listdir(tmp_path / "kaggle_3m") == [os.path.basename(folders[0])]


@pytest.mark.parametrize("kwargs, match", [
    (dict(sites=("C_S",)), "alphanumeric"),
    (dict(sites=("CS", "CS")), "distinct"),
    (dict(size=8), "size"),
    (dict(tumour_free_fraction=1.5), "tumour_free_fraction"),
    (dict(seed=-1), "seed"),
])
def test_invalid_arguments(tmp_path, kwargs, match):
  with pytest.raises(ValueError, match=match):
    phantom.write_lgg(tmp_path, **kwargs)


def test_cli(tmp_path, capsys):
  rc = phantom.main(["--layout", "lgg", "--out", str(tmp_path), "--seed", "3", "--size", "16",
                     "--sites", "CS,EZ", "--patients-per-site", "1", "--slices-per-patient", "3"])
  assert rc == 0
  out = capsys.readouterr().out
  assert "wrote 2 patients, 12 files" in out
  assert sorted(d.split("_")[1] for d in os.listdir(tmp_path / "kaggle_3m")) == ["CS", "EZ"]


# ---------------------------------------------------------------------------
# Tumour size options and presets.
# ---------------------------------------------------------------------------
def _tumour_stats(layout, preset=None, tumour_area=None, n_slices=20, size=64):
  """(fraction of tumour-free slices, widest cross-section per patient, all tumour-slice areas)."""
  opts = dict(phantom.TUMOUR_PRESETS[preset][layout]) if preset else {}
  if tumour_area is not None:
    opts["tumour_area"] = tumour_area
  tf = opts.get("tumour_free_fraction", 0.3 if layout == "lgg" else 0.4)
  free, widest, areas = [], [], []
  for site in ("CS", "DU", "HT"):
    for i in range(5):
      if layout == "lgg":
        _, m = phantom.generate_lgg_patient(0, site, i, n_slices=n_slices, size=size, tumour_free_fraction=tf,
                                            tumour_area=opts.get("tumour_area"))
      else:
        _, m, _ = phantom.generate_brats_patient(0, site, i, n_slices=n_slices, size=size,
                                                 tumour_free_fraction=tf, tumour_area=opts.get("tumour_area"))
      a = (m > 0).mean(axis=(1, 2))
      free += list(a == 0)
      widest.append(a.max())
      areas += list(a[a > 0])
  return float(np.mean(free)), np.array(widest), np.array(areas)


@pytest.mark.parametrize("layout", ["lgg", "brats"])
def test_tumour_area_range_sets_the_widest_cross_section(layout):
  _, widest, _ = _tumour_stats(layout, tumour_area=(0.01, 0.02))
  # the irregular border and the pixel grid move the area a little around the drawn ellipse
  assert np.all(widest > 0.6 * 0.01) and np.all(widest < 1.5 * 0.02), widest
  _, small, _ = _tumour_stats(layout, tumour_area=(0.005, 0.005))
  assert np.all(small < 0.01) and np.all(small > 0)  # ~20 px at 64 x 64, never empty


@pytest.mark.parametrize("layout, free", [("lgg", 0.65), ("brats", 0.55)])
def test_realistic_preset_small_tumours_and_mostly_tumour_free_slices(layout, free):
  f, widest, areas = _tumour_stats(layout, "realistic")
  assert abs(f - free) < 0.08, f
  lo, hi = phantom.TUMOUR_PRESETS["realistic"][layout]["tumour_area"]
  assert np.all(widest > 0.6 * lo) and np.all(widest < 1.5 * hi)
  assert np.mean(areas < 0.02) > 0.5  # most tumour slices are small
  assert np.mean((areas >= 0.005) & (areas <= 0.02)) > 0.3
  f_classic, widest_classic, _ = _tumour_stats(layout, "classic")
  assert f_classic < f and np.median(widest) < np.median(widest_classic)


def test_tumour_preset_deterministic_and_classic_is_the_default(tmp_path):
  kw = dict(sites=("CS",), patients_per_site=2, slices_per_patient=8, size=32)
  a = _all_files(phantom.write_lgg(tmp_path / "a", tumour_preset="realistic", **kw) and tmp_path / "a")
  b = _all_files(phantom.write_lgg(tmp_path / "b", tumour_preset="realistic", **kw) and tmp_path / "b")
  assert a == b
  c = _all_files(phantom.write_lgg(tmp_path / "c", tumour_preset="classic", **kw) and tmp_path / "c")
  d = _all_files(phantom.write_lgg(tmp_path / "d", **kw) and tmp_path / "d")
  assert c == d and c != a
  # an explicit value wins over the preset (tumour_area=None means "not given": the preset's range stays)
  e = _all_files(phantom.write_lgg(tmp_path / "e", tumour_preset="realistic", tumour_free_fraction=0.3,
                                   tumour_area=None, **kw) and tmp_path / "e")
  assert e != a
  masks = [np.asarray(Image.open(os.path.join(tmp_path / "e", k))) for k in e if k.endswith("_mask.tif")]
  masks_a = [np.asarray(Image.open(os.path.join(tmp_path / "a", k))) for k in a if k.endswith("_mask.tif")]
  assert sum(m.any() for m in masks) > sum(m.any() for m in masks_a)


@pytest.mark.parametrize("kwargs, match", [
    (dict(tumour_area=(0.02, 0.01)), "tumour_area"),
    (dict(tumour_area=(0.0, 0.01)), "tumour_area"),
    (dict(tumour_area=(0.01,)), "tumour_area"),
    (dict(tumour_preset="huge"), "tumour_preset"),
])
def test_invalid_tumour_options(tmp_path, kwargs, match):
  with pytest.raises(ValueError, match=match):
    phantom.write_lgg(tmp_path, sites=("CS",), patients_per_site=1, slices_per_patient=2, size=16, **kwargs)
  with pytest.raises(ValueError, match=match):
    phantom.write_brats(tmp_path / "b", sites=("CS",), patients_per_site=1, slices_per_patient=2, size=16,
                        **kwargs)


def test_cli_tumour_options(tmp_path, capsys):
  rc = phantom.main(["--layout", "lgg", "--out", str(tmp_path / "x"), "--size", "16", "--sites", "CS",
                     "--patients-per-site", "1", "--slices-per-patient", "4", "--tumour-area", "0.01", "0.02",
                     "--tumour-preset", "realistic"])
  assert rc == 0
  ref = phantom.write_lgg(tmp_path / "y", sites=("CS",), patients_per_site=1, slices_per_patient=4, size=16,
                          tumour_area=(0.01, 0.02), tumour_preset="realistic")
  assert _all_files(tmp_path / "x") == _all_files(tmp_path / "y") and ref
  with pytest.raises(SystemExit):
    phantom.main(["--layout", "acdc", "--out", str(tmp_path / "z"), "--tumour-preset", "realistic"])
