"""Tests for fedjax_seg.data.anatomy (ICBM152 anatomical phantom) and the style='anatomical' writers.

Skipped when the template (nilearn wheel data, extra 'anatomy') is not installed.
Small grids only: the whole module runs in well under a minute on 2 CPU cores.
"""
import importlib.util

import ml_collections
import numpy as np
import pytest
from scipy import ndimage

from fedjax_seg.data import anatomy as A
from fedjax_seg.data import io as dio
from fedjax_seg.data import layouts, phantom, pipeline
from _helpers import read_tree

if not A.available():
  pytest.skip("ICBM152 template not installed (pip install -e '.[anatomy]' or pip install --no-deps nilearn)",
              allow_module_level=True)

LGG_SMALL = dict(sites=("CS", "DU"), patients_per_site=1, slices_per_patient=6, size=32)
BRATS_SMALL = dict(sites=("CS", "HT"), patients_per_site=1, slices_per_patient=12, size=32)


@pytest.fixture(scope="module")
def lgg(tmp_path_factory):
  root = tmp_path_factory.mktemp("anat_lgg")
  return root, phantom.write_lgg(root, seed=0, style="anatomical", **LGG_SMALL)


@pytest.fixture(scope="module")
def brats(tmp_path_factory):
  root = tmp_path_factory.mktemp("anat_brats")
  return root, phantom.write_brats(root, seed=0, style="anatomical", **BRATS_SMALL)


def _tumour_crop(seed, enhancing, whole_radius=26.0, spacing=1.5, n=40):
  """A clean rendering centred on a grown tumour (fine voxels: thin rims are resolved)."""
  rng = np.random.default_rng(seed)
  tumour = A.grow_tumour(rng, whole_radius=whole_radius, enhancing=enhancing)
  grid = A.Grid(shape=(n, n, n), spacing=(spacing,) * 3, centre=tuple(tumour.centre))
  return tumour, A.render(grid, None, tumour, rng, template_resolution_mm=2)


# ---------------------------------------------------------------------------
# Template
# ---------------------------------------------------------------------------
def test_template_tissue_model():
  tpl = A.load_template(2)
  assert tpl.gm.shape == tpl.wm.shape == tpl.csf.shape == (99, 117, 95)
  total = tpl.gm + tpl.wm + tpl.csf
  assert total.max() <= 1.0 + 1e-5 and min(tpl.gm.min(), tpl.wm.min(), tpl.csf.min()) >= 0.0
  volume_l = tpl.brain.sum() * tpl.resolution ** 3 / 1e6
  assert 1.5 < volume_l < 2.1, volume_l  # ICBM152 brain incl. cerebellum and ventricles
  # CSF = mask - GM - WM: the lateral ventricles (MNI ~(±8, 0, 20)) are CSF, deep WM is not.
  for x in (-8.0, 8.0):
    i = np.round(tpl.index(np.array([x, 0.0, 20.0])[:, None])[:, 0]).astype(int)
    assert tpl.csf[tuple(i)] > 0.5
  i = np.round(tpl.index(np.array([-28.0, -20.0, 30.0])[:, None])[:, 0]).astype(int)
  assert tpl.wm[tuple(i)] > 0.8 and tpl.csf[tuple(i)] < 0.1
  assert (tpl.hull[tpl.brain] == 0).all() and tpl.hull.max() > 20


def test_missing_template_names_the_extra(monkeypatch, tmp_path):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nilearn" else real(name, *a))
  with pytest.raises(A.TemplateUnavailable, match=r"\.\[anatomy\]"):
    A.template_dir()
  with pytest.raises(ImportError, match="anatomy"):
    phantom.write_lgg(tmp_path, seed=0, style="anatomical", **LGG_SMALL)
  assert phantom.main(["--layout", "brats", "--out", str(tmp_path / "b"), "--style", "anatomical"]) == 2


def test_bad_style_and_options(tmp_path):
  with pytest.raises(ValueError, match="style"):
    phantom.write_lgg(tmp_path, style="cartoon")
  with pytest.raises(ValueError, match="anatomical"):
    phantom.write_lgg(tmp_path, fov_mm=200.0)  # anatomical-only option with the geometric style
  with pytest.raises(TypeError, match="unexpected"):
    phantom.write_brats(tmp_path, style="anatomical", fov_mm=200.0)


# ---------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------
def test_deterministic_from_seed(lgg, tmp_path):
  a1, m1 = A.generate_lgg_patient(0, "CS", 0, n_slices=6, size=32)
  a2, m2 = A.generate_lgg_patient(0, "CS", 0, n_slices=6, size=32)
  np.testing.assert_array_equal(a1, a2)
  np.testing.assert_array_equal(m1, m2)
  b1, _ = A.generate_lgg_patient(1, "CS", 0, n_slices=6, size=32)
  assert not np.array_equal(a1, b1)
  assert A.scanner_profile("CS", 0) == A.scanner_profile("CS", 0) != A.scanner_profile("DU", 0)
  root, _ = lgg
  phantom.write_lgg(tmp_path / "again", seed=0, style="anatomical", **LGG_SMALL)
  x, y = read_tree(root), read_tree(tmp_path / "again")
  assert x.keys() == y.keys() and len(x) == 2 * 2 * 6
  assert all(x[k] == y[k] for k in x)


# ---------------------------------------------------------------------------
# Labels: tumour inside the brain, nested regions, grown in white matter
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("enhancing", [True, False])
def test_tumour_nested_inside_brain_and_seeded_in_white_matter(enhancing):
  tumour, r = _tumour_crop(3, enhancing)
  tpl = A.load_template(2)
  seed_idx = tuple(np.round(tpl.index(tumour.centre[:, None])[:, 0]).astype(int))
  assert tpl.wm[seed_idx] > 0.9
  cls = r.classes
  tum = np.isin(cls, A.TUMOUR_CLASSES)
  assert tum.sum() > 500
  # Tumour voxels are brain voxels (tissue fraction >= 0.5): the skull-stripped mask keeps them.
  brats = A.BRATS_LABEL_OF[cls]
  assert set(np.unique(brats)) <= {0, 1, 2, 4}
  core = np.isin(cls, (A.ENHANCING, A.NECROTIC, A.NON_ENHANCING))
  assert core.any() and (cls == A.EDEMA).any()
  if enhancing:
    nec = cls == A.NECROTIC
    assert nec.any() and (cls == A.ENHANCING).any() and not (cls == A.NON_ENHANCING).any()
    # Necrosis is surrounded by enhancing rim: every 6-neighbour of a necrotic voxel is core.
    assert (nec & ~ndimage.binary_erosion(core, border_value=1)).sum() == 0
  else:
    assert not np.isin(cls, (A.ENHANCING, A.NECROTIC)).any()
  # Template-space fields are nested: core inside the whole tumour, necrosis inside the core.
  whole_t = tumour.invasion >= tumour.threshold
  assert (whole_t | ~(tumour.core < 1)).all()


def test_lgg_and_brats_labels(lgg, brats):
  images, masks, pat = A.generate_lgg_patient(0, "DU", 0, n_slices=8, size=32, return_patient=True)
  cls = pat.clean.classes
  tum = np.isin(cls, A.TUMOUR_CLASSES)
  np.testing.assert_array_equal(masks == 255, tum)
  assert tum.any() and (masks.reshape(8, -1).max(1) == 0).any()  # some tumour-free slices
  assert (cls == A.SKULL).any() and (cls == A.SCALP).any()  # LGG images are not skull-stripped
  assert images.shape == (8, 32, 32, 3) and images.dtype == np.uint8
  img, seg, grade, p = A.generate_brats_patient(0, "HT", 0, n_slices=12, size=32, return_patient=True)
  assert grade in ("HGG", "LGG") and set(np.unique(seg)) <= {0, 1, 2, 4} and (seg > 0).any()
  brain = p.clean.brain
  assert not (seg[~brain] > 0).any()          # tumour inside the brain
  assert not img[~brain].any()                # skull-stripped: background exactly 0
  assert not np.isin(p.clean.classes, (A.SCALP, A.SKULL)).any()


# ---------------------------------------------------------------------------
# Contrasts
# ---------------------------------------------------------------------------
def test_intensity_table_follows_documented_order():
  for m, name in enumerate(A.MODALITIES):
    values = [A.INTENSITY[c, m] for c in A.CONTRAST_ORDER[name]]
    assert all(a > b for a, b in zip(values, values[1:])), (name, values)


def _pure(r, c):
  """Voxels of class c away from partial volume: normal tissue with fraction >= 0.85, tumour regions
  with all 6 neighbours in the same region."""
  if c in (A.CSF, A.GREY, A.WHITE):
    return (r.classes == c) & (r.fractions[..., c - A.CSF] >= 0.85)
  return ndimage.binary_erosion(r.classes == c)


@pytest.mark.parametrize("enhancing", [True, False])
def test_rendered_contrast_ordering(enhancing):
  """Median signal per tissue class in a clean rendering follows `CONTRAST_ORDER` per modality."""
  _, r = _tumour_crop(5, enhancing)
  masks = {c: _pure(r, c) for c in range(len(A.CLASS_NAMES))}
  for m, name in enumerate(A.MODALITIES):
    present = [c for c in A.CONTRAST_ORDER[name] if masks[c].sum() >= 10]
    assert {A.CSF, A.EDEMA, A.GREY, A.WHITE} <= set(present)
    assert (A.ENHANCING in present and A.NECROTIC in present) if enhancing else A.NON_ENHANCING in present
    med = [float(np.median(r.images[..., m][masks[c]])) for c in present]
    assert all(a > b for a, b in zip(med, med[1:])), (name, [A.CLASS_NAMES[c] for c in present], med)


def test_contrast_survives_scanner_effects():
  """After a hospital's scanner (bias, gain, noise, blur): lesion bright on FLAIR / T2, ET bright on T1ce."""
  _, r = _tumour_crop(5, True)
  for site in ("CS", "DU"):
    img = A.apply_scanner(r, A.scanner_profile(site, 0), np.random.default_rng(0), skull_stripped=True)
    med = lambda m, c: float(np.median(img[..., m][r.classes == c]))  # noqa: E731
    fl, t1, t1ce, t2 = range(4)
    assert med(fl, A.EDEMA) > max(med(fl, A.GREY), med(fl, A.WHITE))
    assert med(t2, A.EDEMA) > max(med(t2, A.GREY), med(t2, A.WHITE))
    assert med(t1ce, A.ENHANCING) > max(med(t1ce, A.WHITE), med(t1ce, A.NECROTIC))
    assert med(t1, A.WHITE) > med(t1, A.GREY) > med(t1, A.CSF)
    assert med(t1, A.NECROTIC) < med(t1, A.GREY)


# ---------------------------------------------------------------------------
# Writers round-trip through the project's loaders
# ---------------------------------------------------------------------------
def _found_as_written(written, find, sites):
  """The patients ``find`` sees under the root of ``written`` (root, folders): the folders written, of ``sites``."""
  root, folders = written
  patients = find(root)
  assert [p.folder for p in patients] == folders
  assert sorted(p.site for p in patients) == sites
  return patients


def test_lgg_writer_round_trip(lgg):
  for p in _found_as_written(lgg, layouts.find_lgg, ["CS", "DU"]):
    images, masks = dio.load_lgg_patient(p)
    ref_img, ref_mask = A.generate_lgg_patient(0, p.site, 0, n_slices=6, size=32)
    np.testing.assert_array_equal(images, ref_img)
    np.testing.assert_array_equal(masks, ref_mask // 255)


def test_brats_writer_round_trip(brats):
  for p in _found_as_written(brats, layouts.find_brats, ["CS", "HT"]):
    images, seg, ref = dio.load_brats_patient(p)
    ref_img, ref_seg, grade = A.generate_brats_patient(0, p.site, 0, n_slices=12, size=32)
    np.testing.assert_array_equal(images, ref_img.astype(images.dtype))
    np.testing.assert_array_equal(seg, ref_seg)
    np.testing.assert_allclose(ref.spacing, (155.0 / 12, 240.0 / 32, 240.0 / 32))
    assert p.meta.get("grade") == grade


def test_build_dataset_with_anatomical_style(tmp_path):
  from configs import lgg_centralized

  data = lgg_centralized.get_data_config()
  data.cache_dir = str(tmp_path)
  data.phantom = ml_collections.ConfigDict(dict(seed=0, sites=("CS", "DU", "HT"), patients_per_site=2,
                                                slices_per_patient=4, size=32, style="anatomical"))
  data.image_size = 32
  ds = pipeline.build_dataset(data, verbose=False)
  assert len(ds.patients) == 6 and ds.num_classes == 2
  x, y = ds.split("train")
  assert x.shape[1:] == (32, 32, 3) and y.max() == 1


def test_cli_style(tmp_path):
  assert phantom.main(["--layout", "lgg", "--out", str(tmp_path), "--style", "anatomical", "--size", "16",
                       "--sites", "EZ", "--patients-per-site", "1", "--slices-per-patient", "3"]) == 0
  (p,) = layouts.find_lgg(tmp_path)
  assert p.site == "EZ" and len(p.images) == 3
