"""BraTS / ACDC phantoms, NIfTI layouts and loaders, build_dataset for volumes, and the
region-Dice / HD95 evaluation hook."""
import json
import os

import ml_collections
import nibabel as nib
import numpy as np
import pytest

from fedjax_seg import evaluation, metrics
from fedjax_seg.data import io as dio
from fedjax_seg.data import layouts, phantom, pipeline, volumes
from _helpers import read_tree

BRATS_SMALL = dict(sites=("CS", "DU"), patients_per_site=2, slices_per_patient=8, size=16)
ACDC_SMALL = dict(groups=("NOR", "DCM", "HCM"), patients_per_group=1, slices_per_patient=4, size=32)


@pytest.fixture(scope="module")
def brats(tmp_path_factory):
  root = tmp_path_factory.mktemp("brats")
  return root, phantom.write_brats(root, seed=0, **BRATS_SMALL)


@pytest.fixture(scope="module")
def acdc(tmp_path_factory):
  root = tmp_path_factory.mktemp("acdc")
  return root, phantom.write_acdc(root, seed=0, **ACDC_SMALL)


# ---------------------------------------------------------------------------
# BraTS phantom + layout + reader
# ---------------------------------------------------------------------------
def test_brats_phantom_is_deterministic(brats, tmp_path):
  root, _ = brats
  phantom.write_brats(tmp_path / "again", seed=0, **BRATS_SMALL)
  a, b = read_tree(root), read_tree(tmp_path / "again")
  assert a.keys() == b.keys() and len(a) == 4 * 5 + 1
  assert all(a[k] == b[k] for k in a)
  phantom.write_brats(tmp_path / "other", seed=1, **BRATS_SMALL)
  c = read_tree(tmp_path / "other")
  flair = [k for k in a if k.endswith("_flair.nii.gz")]
  assert all(a[k] != c[k] for k in flair)


def test_brats_round_trip(brats):
  root, folders = brats
  patients = layouts.find_brats(root)
  assert [p.folder for p in patients] == folders
  assert [p.id for p in patients] == [f"BraTS20_Training_{i:03d}" for i in range(1, 5)]
  assert sorted(p.site for p in patients) == ["CS", "CS", "DU", "DU"]  # from name_mapping.csv
  assert layouts.find_brats(os.path.join(root, phantom.BRATS_FOLDER)) == patients
  affine = phantom.nifti_affine((8, 16, 16), (1.0, 1.0, 1.0))
  order = phantom.rng_for(0, "brats", phantom._STREAM_IDS).permutation(4)
  pairs = [(s, i) for s in ("CS", "DU") for i in range(2)]
  for p, k in zip(patients, order):
    assert [os.path.basename(f) for f in p.images] == [f"{p.id}_{m}.nii.gz" for m in phantom.BRATS_MODALITIES]
    images, seg, ref = dio.load_brats_patient(p)
    assert images.shape == (8, 16, 16, 4) and images.dtype == np.float32
    assert seg.shape == (8, 16, 16) and seg.dtype == np.uint8
    assert set(np.unique(seg)) <= {0, 1, 2, 4} and 2 in seg
    np.testing.assert_allclose(ref.affine, affine)  # affine preserved
    assert ref.spacing == (1.0, 1.0, 1.0)
    img = nib.load(p.images[0])
    assert img.shape == (16, 16, 8) and img.get_data_dtype() == np.int16
    np.testing.assert_allclose(img.header.get_zooms(), (1.0, 1.0, 1.0))
    # Same voxels as generated in memory ([z, y, x] <-> file (x, y, z)).
    site, i = pairs[int(k)]
    assert p.site == site
    ref_img, ref_seg, grade = phantom.generate_brats_patient(0, site, i, n_slices=8, size=16)
    np.testing.assert_array_equal(images, ref_img.astype(np.float32))
    np.testing.assert_array_equal(seg, ref_seg)
    assert p.meta["grade"] == grade


def test_brats_tumour_nested_and_modalities_differ():
  images, seg, grade = phantom.generate_brats_patient(0, "CS", 1, n_slices=16, size=32)
  assert grade == "HGG" and set(np.unique(seg)) == {0, 1, 2, 4}
  def bbox(m):
    idx = np.nonzero(m)
    return np.array([[i.min(), i.max()] for i in idx])
  wt, tc, et, nc = bbox(seg > 0), bbox((seg == 1) | (seg == 4)), bbox(seg == 4), bbox(seg == 1)
  assert np.all(wt[:, 0] <= tc[:, 0]) and np.all(tc[:, 1] <= wt[:, 1])
  assert np.all(et[:, 0] <= nc[:, 0]) and np.all(nc[:, 1] <= et[:, 1])  # core inside the rim
  flair, t1, t1ce, t2 = (images[..., m].astype(float) for m in range(4))
  brain = images.max(-1) > 0
  normal = brain & (seg == 0)
  assert t1ce[seg == 4].mean() > 1.3 * t1ce[seg == 2].mean()    # enhancing rim on T1ce
  assert flair[seg == 2].mean() > 1.3 * flair[normal].mean()     # edema on FLAIR
  assert t2[seg == 1].mean() > t1[seg == 1].mean()               # necrosis: T2 bright, T1 dark
  assert np.all(images[~brain] == 0)                               # skull-stripped background
  e1, e2 = phantom.brats_site_effects("CS", 0), phantom.brats_site_effects("HT", 0)
  assert e1 != e2 and e1 == phantom.brats_site_effects("CS", 0)


def test_remap_brats_labels():
  seg = np.array([[0, 1], [2, 4]], np.uint8)
  np.testing.assert_array_equal(volumes.remap_brats_labels(seg), [[0, 1], [2, 3]])
  with pytest.raises(ValueError, match="BraTS labels"):
    volumes.remap_brats_labels(np.array([3]))


# ---------------------------------------------------------------------------
# ACDC phantom + layout + reader
# ---------------------------------------------------------------------------
def test_acdc_round_trip(acdc, tmp_path):
  root, folders = acdc
  patients = layouts.find_acdc(root)
  assert [p.id for p in patients] == ["patient001", "patient002", "patient003"]
  assert [p.site for p in patients] == ["NOR", "DCM", "HCM"]  # site = Group
  for p, folder in zip(patients, folders):
    info = layouts.read_info_cfg(os.path.join(folder, "Info.cfg"))
    assert set(info) == {"ED", "ES", "Group", "Height", "NbFrame", "Weight"}
    assert info["ED"] == 1 and 1 < info["ES"] <= info["NbFrame"]
    assert p.meta["frame_numbers"] == (info["ED"], info["ES"])
    assert p.images[1].endswith(f"_frame{info['ES']:02d}.nii.gz") and p.masks[1].endswith("_gt.nii.gz")
    pat = phantom.generate_acdc_patient(0, p.site, 0, n_slices=4, size=32)  # 1 patient per group
    lv = {}
    for phase, image_path, gt_path in zip(("ED", "ES"), p.images, p.masks):
      image, gt = dio.load_acdc_frame(image_path, gt_path)
      assert image.data.shape == gt.data.shape == (4, 32, 32)
      assert set(np.unique(gt.data)) == {0, 1, 2, 3}
      dz, dy, dx = image.spacing
      assert dz == pytest.approx(10.0) and dy == pytest.approx(dx) and dy < 7.0  # anisotropic
      np.testing.assert_allclose(image.affine, phantom.nifti_affine((4, 32, 32), pat.spacing, pat.angle),
                                 atol=1e-5)
      ref_img, ref_gt = pat.frames[info[phase]]
      np.testing.assert_array_equal(gt.data, ref_gt)
      np.testing.assert_array_equal(image.data, ref_img.astype(np.float32))
      lv[phase] = (gt.data == 3).sum()
    assert lv["ES"] < lv["ED"]  # the LV contracts
  phantom.write_acdc(tmp_path, seed=0, **ACDC_SMALL)
  assert read_tree(root) == read_tree(tmp_path)  # deterministic


def test_acdc_groups_differ():
  def lv_and_wall(group):
    pat = phantom.generate_acdc_patient(0, group, 0, n_slices=6, size=64)
    gt = pat.frames[pat.info["ED"]][1]
    return (gt == 3).sum() * pat.spacing[0] ** 2, (gt == 2).sum() * pat.spacing[0] ** 2, (gt == 1).sum() * pat.spacing[0] ** 2
  dcm, hcm, nor, rv = (lv_and_wall(g) for g in ("DCM", "HCM", "NOR", "RV"))
  assert dcm[0] > nor[0] > hcm[0]            # dilated vs hypertrophic LV cavity
  assert hcm[1] / hcm[0] > nor[1] / nor[0]   # thick wall relative to the cavity
  assert rv[2] > nor[2]                      # dilated RV
  with pytest.raises(ValueError, match="unknown ACDC group"):
    phantom.generate_acdc_patient(0, "XYZ", 0)


def test_phantom_cli_brats_and_acdc(tmp_path, capsys):
  assert phantom.main(["--layout", "brats", "--out", str(tmp_path / "b"), "--size", "16",
                       "--slices-per-patient", "4", "--sites", "CS", "--patients-per-site", "1"]) == 0
  assert "wrote 1 patients, 5 files (brats" in capsys.readouterr().out
  assert phantom.main(["--layout", "acdc", "--out", str(tmp_path / "a"), "--size", "16",
                       "--slices-per-patient", "2", "--sites", "NOR,RV", "--patients-per-site", "1"]) == 0
  assert "wrote 2 patients, 10 files (acdc" in capsys.readouterr().out
  assert sorted(p.site for p in layouts.find_acdc(tmp_path / "a")) == ["NOR", "RV"]


# ---------------------------------------------------------------------------
# build_dataset for volumes
# ---------------------------------------------------------------------------
def _data_cfg(layout, root, **kw):
  d = dict(layout=layout, root=str(root), cache_dir="", image_size=16, ndim=2, depth=0, target_spacing=(),
           normalize="zscore", split_seed=0, stratify_by_site=False, val_fraction=0.25, test_fraction=0.2,
           skip_bad_patients=False, min_foreground_fraction=0.0, frames=("ED", "ES"), verbose=False,
           fold=None, num_folds=5, n4=dict(enabled=False))
  d.update(kw)
  return ml_collections.ConfigDict(d)


def test_build_dataset_brats_2d_and_3d(brats):
  root, _ = brats
  ds2 = pipeline.build_dataset(_data_cfg("brats", root, image_size=8, normalize="slice_max"), verbose=False)
  assert ds2.class_names == metrics.BRATS_CLASS_NAMES and ds2.num_classes == 4 and ds2.layout == "brats"
  p = ds2.patients["BraTS20_Training_001"]
  assert p.images.shape == (8, 8, 8, 4) and p.labels.shape == (8, 8, 8) and p.images.dtype == np.float32
  assert p.images.max() <= 1.0 and set(np.unique(p.labels)) <= {0, 1, 2, 3}
  assert p.spacing == (1.0, 2.0, 2.0)  # 16 -> 8 in-plane
  ds3 = pipeline.build_dataset(_data_cfg("brats", root, ndim=3, depth=4, target_spacing=(2.0, 2.0, 2.0),
                                         image_size=8), verbose=False)
  p = ds3.patients["BraTS20_Training_001"]
  assert p.images.shape == (1, 4, 8, 8, 4) and p.labels.shape == (1, 4, 8, 8)
  assert p.spacing == (2.0, 2.0, 2.0)
  x, y = ds3.split("train")
  assert x.ndim == 5 and y.ndim == 4 and len(x) == len(ds3.splits["train"])
  fg = p.images[0].max(-1) != 0
  assert abs(float(p.images[0][fg].mean())) < 0.2  # z-scored within the brain


def test_build_dataset_acdc_in_plane_resampling(acdc):
  root, _ = acdc
  ds = pipeline.build_dataset(_data_cfg("acdc", root, target_spacing=(0.0, 8.0, 8.0), image_size=16),
                              verbose=False)
  assert ds.class_names == volumes.ACDC_CLASS_NAMES
  p = ds.patients["patient002"]
  assert p.site == "DCM" and p.images.shape == (8, 16, 16, 1)  # 4 ED + 4 ES slices
  dz, dy, dx = p.spacing
  assert dz == pytest.approx(10.0) and dy == pytest.approx(8.0, rel=0.06) and dx == dy
  assert set(np.unique(p.labels)) <= {0, 1, 2, 3} and (p.labels == 3).any()
  ds3 = pipeline.build_dataset(_data_cfg("acdc", root, ndim=3, depth=4, image_size=32), verbose=False)
  assert ds3.patients["patient001"].images.shape == (2, 4, 32, 32, 1)  # ED and ES volumes


def test_volume_options_validation():
  with pytest.raises(ValueError, match="config.data.ndim"):
    volumes.VolumeOptions.from_config(_data_cfg("brats", "/x", ndim=4))
  with pytest.raises(ValueError, match="target_spacing"):
    volumes.VolumeOptions.from_config(_data_cfg("brats", "/x", target_spacing=(1.0, 1.0)))
  with pytest.raises(ValueError, match="frames"):
    volumes.VolumeOptions.from_config(_data_cfg("acdc", "/x", frames=("ED", "MID")))
  with pytest.raises(ValueError, match="unknown config.data.n4 keys"):
    volumes.VolumeOptions.from_config(_data_cfg("brats", "/x", n4=dict(enabled=True, shrink=2)))


# ---------------------------------------------------------------------------
# Evaluation hook: region Dice and HD95 in mm
# ---------------------------------------------------------------------------
def _one_patient_dataset(labels, spacing, class_names=metrics.BRATS_CLASS_NAMES):
  arr = pipeline.PatientArrays("p", "s", np.zeros(labels.shape + (1,), np.float32), labels.astype(np.int32),
                               spacing)
  return pipeline.SegDataset({"p": arr}, {"test": ["p"]}, len(class_names), tuple(class_names), "", "brats")


def test_region_metrics_hd95_hand_computed():
  # One 3D volume [1, 12, 12, 12]: an enhancing cube (class 3) inside an edema shell.
  y = np.zeros((1, 12, 12, 12), np.int32)
  y[0, 3:9, 3:9, 3:9] = 2
  y[0, 4:8, 4:8, 4:8] = 3
  pred = y.copy()
  pred[0] = np.roll(y[0], 1, axis=0)  # everything shifted by one voxel along z
  ds = _one_patient_dataset(y, (2.0, 1.0, 1.0))
  fake_predict = lambda variables, x: pred[:1].repeat(len(x), 0)  # noqa: E731
  m = evaluation.region_metrics(ds, ["p"], fake_predict, None, batch_size=1)
  # ET: 4x4x4 cube shifted 1 voxel along z (2 mm): as metrics' 3D cube test, HD95 = one voxel = 2 mm.
  assert m["hd95/ET"] == pytest.approx(2.0)
  assert m["hd95/WT"] == pytest.approx(2.0) and m["hd95/TC"] == pytest.approx(2.0)
  # ET Dice: overlap 3 of 4 slices -> 2·48 / (64 + 64) = 0.75.
  assert m["dice/ET"] == pytest.approx(0.75)
  assert m["dice/WT"] == pytest.approx(2 * 180 / 432)  # 6x6x6 cubes, 5 of 6 slices overlap
  assert m["num_volumes"] == 1
  ds_iso = _one_patient_dataset(y, (1.0, 1.0, 1.0))
  assert evaluation.region_metrics(ds_iso, ["p"], fake_predict, None, 1)["hd95/ET"] == pytest.approx(1.0)


def test_region_metrics_2d_stacks_slices_and_acdc_regions():
  y = np.zeros((6, 10, 10), np.int32)  # 2D slices of one patient, ACDC classes
  y[1:5, 2:6, 2:6] = 3
  y[1:5, 6:8, 2:6] = 2
  ds = _one_patient_dataset(y, (10.0, 1.5, 1.5), volumes.ACDC_CLASS_NAMES)
  fake_predict = lambda variables, x: np.asarray(y[: len(x)])  # noqa: E731
  m = evaluation.region_metrics(ds, ["p"], fake_predict, None, batch_size=6)
  assert m["dice/LV"] == 1.0 and m["hd95/LV"] == 0.0 and m["dice/RV"] == 1.0 and m["hd95/RV"] == 0.0
  assert m["num_volumes"] == 1


def test_seed001_table_rows_and_overlay_views():
  named = {"Test": {"loss": 0.5, "pixel_accuracy": 0.99, "iou_mean": 0.3, "dice_mean": 0.4,
                    "dice/necrotic": 0.1, "region/dice/WT": 0.8, "region/hd95/WT": 3.25}}
  text, table = evaluation.seed001_table(named)
  for row in ("Loss", "Accuracy", "mean IoU", "Dice Coef", "Precision", "Sensitivity", "Specificity",
              "Necrotic Dice coef", "Edema Dice coef", "Enhancing Dice coef", "WT Dice", "TC Dice", "ET Dice",
              "WT HD95 (mm)"):
    assert f"| {row} |" in text
  assert table["Dice Coef"]["seed 001 Test"] == 0.5927 and table["WT HD95 (mm)"]["Test"] == 3.25
  assert "| WT HD95 (mm) | 3.25 | – |" in text
  x = np.zeros((2, 4, 8, 8, 3)); y = np.zeros((2, 4, 8, 8), int); y[1, 2, 3, 3] = 1
  xo, yo, po = evaluation.overlay_samples(x, y, y)
  assert xo.shape == (2, 8, 8, 3) and yo[1].sum() == 1


def test_finish_hook_on_3d_brats_writes_seed_table(brats, tmp_path, capsys):
  """train.finish with a 1x1x1-conv model (cheap to compile): BraTS extras in results.json + printout."""
  import flax.linen as nn
  import jax
  from fedjax_seg import models, steps, train

  class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return nn.Conv(4, (1, 1, 1))(x)

  root, _ = brats
  ds = pipeline.build_dataset(_data_cfg("brats", root, ndim=3, depth=4, target_spacing=(2.0, 2.0, 2.0),
                                        image_size=8, val_fraction=0.25, test_fraction=0.34), verbose=False)
  fns = models.ModelFns(Tiny())
  variables = fns.init(jax.random.PRNGKey(0), np.zeros((1, 4, 8, 8, 4), np.float32))
  eval_batch = jax.jit(steps.make_eval_batch(fns, "dice_ce", 4))
  config = ml_collections.ConfigDict(dict(algorithm="centralized", eval_batch_size=2))
  res = train.finish(config, str(tmp_path), fns, variables, ds, eval_batch, [], extra={})
  assert res["hd95_units"] == "mm" and "seed001_table" in res
  test = res["region_metrics"]["test"]
  assert set(test) >= {"dice/WT", "dice/TC", "dice/ET", "hd95/WT", "hd95/TC", "hd95/ET"}
  assert all(np.isfinite(v) for v in test.values())
  with open(tmp_path / "results.json") as f:
    saved = json.load(f)
  assert saved["seed001_table"]["Dice Coef"]["seed 001 Test"] == 0.5927
  assert set(saved["seed001_table"]["WT HD95 (mm)"]) == {"Train", "Validation", "Test", "seed 001 Test"}
  assert os.path.exists(tmp_path / "overlays.png")
  out = capsys.readouterr().out
  assert "seed 001 metric table" in out and "| ET HD95 (mm) |" in out


@pytest.mark.slow
def test_train_3d_end_to_end_writes_seed_table(brats, tmp_path):
  """A tiny 3D U-Net run through train.run on the phantom: results.json gets the BraTS extras.

  Slow on CPU (compiles a 3D U-Net train step): ``make test-slow``.
  """
  import sys
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import brats_3d_centralized
  from fedjax_seg import train
  root, _ = brats
  c = brats_3d_centralized.get_config("smoke")
  c.data.root = str(root)
  c.data.cache_dir = str(tmp_path / "cache")
  c.data.verbose = False
  c.data.stratify_by_site = False
  c.data.val_fraction, c.data.test_fraction = 0.25, 0.34
  c.data.image_size, c.data.depth, c.data.target_spacing = 8, 4, (2.0, 2.0, 2.0)
  c.data.n4.enabled = False
  c.model.base, c.model.depth = 2, 2
  c.num_epochs = 1
  res = train.run(c, str(tmp_path / "run"))
  for key in ("region_metrics", "seed001_table", "hd95_units"):
    assert key in res
  assert res["hd95_units"] == "mm"
  test = res["region_metrics"]["test"]
  assert set(test) >= {"dice/WT", "dice/TC", "dice/ET", "hd95/WT", "hd95/TC", "hd95/ET"}
  assert all(np.isfinite(v) for v in test.values())
  with open(tmp_path / "run" / "results.json") as f:
    saved = json.load(f)
  assert saved["seed001_table"]["Dice Coef"]["seed 001 Test"] == 0.5927
  assert os.path.exists(tmp_path / "run" / "overlays.png")


@pytest.mark.parametrize("target, size, ndim, depth", [
    ((2.0, 1.5, 1.5), 12, 2, 0),     # resample, then crop in-plane
    ((0.0, 0.8, 0.8), 40, 2, 0),     # resample, then pad in-plane
    ((), 16, 2, 0),                  # resize in-plane
    ((2.0, 1.0, 1.0), 20, 3, 4),     # 3D: resample, crop in-plane, crop z to depth
])
def test_prepare_volume_geometry_maps_back_onto_the_input_grid(target, size, ndim, depth):
  rng = np.random.default_rng(0)
  labels = np.zeros((10, 24, 28), np.uint8)
  labels[3:8, 6:18, 8:20] = 1
  labels[4:7, 9:14, 11:16] = 2
  images = np.where(labels[..., None] > 0, 1.0 + labels[..., None], 0.0) * np.ones((1, 1, 1, 2))
  images = (images + 0.1 * rng.random(images.shape) * (images > 0)).astype(np.float32)
  opts = volumes.VolumeOptions(ndim=ndim, image_size=size, depth=depth,
                               target_spacing=tuple(t if t > 0 else None for t in target))
  spacing = (2.5, 1.2, 1.1)
  x_train, y_train, sp = volumes.preprocess_volume(images, labels, spacing, opts)
  x, none, geo = volumes.prepare_volume(images, None, spacing, opts)
  assert none is None
  np.testing.assert_array_equal(x, x_train)  # labels or not: the same network input
  assert geo.shape == x.shape[:3] and geo.spacing == sp and geo.input_shape == labels.shape
  probs = np.eye(3, dtype=np.float32)[y_train]  # the "prediction" = the training labels
  back = volumes.restore_geometry(probs, geo)
  assert back.shape == labels.shape + (3,)
  agree = np.argmax(back, axis=-1) == labels
  assert agree.mean() > 0.97, agree.mean()
  for k in (1, 2):  # the objects land where they are in the input (no shift)
    dice = 2 * np.sum((np.argmax(back, -1) == k) & (labels == k)) / (np.sum(np.argmax(back, -1) == k) +
                                                                     np.sum(labels == k))
    assert dice > 0.85, (k, dice)


def test_restore_geometry_outside_the_crop_is_background():
  images = np.ones((2, 30, 30, 1), np.float32)
  opts = volumes.VolumeOptions(image_size=10, target_spacing=(1.0, 1.0, 1.0))
  x, _, geo = volumes.prepare_volume(images, None, (1.0, 1.0, 1.0), opts)
  assert geo.mode == "resample" and geo.windows[1:] == ((10, 0, 10), (10, 0, 10))
  back = volumes.restore_geometry(np.stack([np.zeros((2, 10, 10)), np.ones((2, 10, 10))], -1), geo)
  lab = np.argmax(back, -1)
  assert lab[:, 10:20, 10:20].all() and lab.sum() == 2 * 100
  with pytest.raises(ValueError, match="network grid"):
    volumes.restore_geometry(np.zeros((2, 12, 10, 2)), geo)
