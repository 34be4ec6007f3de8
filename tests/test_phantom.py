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
