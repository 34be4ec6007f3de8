"""The bad-input corpus: each broken input is built in a temp dir and must raise one
`DataError` whose message names the offending file (or folder) and the problem.

With ``data.skip_bad_patients = True`` a bad patient is skipped with a printed warning, never
silently.
"""
import gzip
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from fedjax_seg.data import io as dio
from fedjax_seg.data import layouts, phantom, pipeline
from fedjax_seg.data.io import DataError
import _helpers

SHAPE = (4, 6, 6)  # internal [Z, Y, X]
AFFINE = phantom.nifti_affine(SHAPE, (1.0, 1.0, 1.0))


def _write_brats_patient(base, name="BraTS20_Training_001", shape=SHAPE, seg_values=(0, 1, 2, 4)):
  """A minimal valid BraTS patient (tiny volumes) under ``base``; returns its folder."""
  folder = os.path.join(base, name)
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(0)
  for m in layouts.BRATS_MODALITIES:
    phantom.save_nifti(rng.integers(1, 100, shape).astype(np.int16), AFFINE,
                       os.path.join(folder, f"{name}_{m}.nii.gz"), np.int16)
  seg = np.zeros(shape, np.uint8)
  seg.flat[: len(seg_values)] = seg_values
  phantom.save_nifti(seg, AFFINE, os.path.join(folder, f"{name}_seg.nii.gz"), np.uint8)
  return folder


def _patient(folder):
  return layouts.brats_patient(folder)


def _path(folder, suffix):
  return os.path.join(folder, f"{os.path.basename(folder)}_{suffix}.nii.gz")


def _raises(fn, *needles):
  with pytest.raises(DataError) as e:
    fn()
  msg = str(e.value)
  for needle in needles:
    assert needle in msg, f"{needle!r} not in {msg!r}"
  return msg


def test_valid_minimal_patient_loads(tmp_path):
  folder = _write_brats_patient(tmp_path)
  images, seg, ref = dio.load_brats_patient(_patient(folder))
  assert images.shape == SHAPE + (4,) and images.dtype == np.float32
  assert set(np.unique(seg)) == {0, 1, 2, 4} and ref.spacing == (1.0, 1.0, 1.0)


def test_unreadable_nifti(tmp_path):
  folder = _write_brats_patient(tmp_path)
  path = _path(folder, "flair")
  with open(path, "wb") as f:
    f.write(b"definitely not a NIfTI file")
  _raises(lambda: dio.read_nifti_image(path), os.path.basename(path), "cannot read NIfTI")
  _raises(lambda: dio.load_brats_patient(_patient(folder)), os.path.basename(path))


def test_truncated_nifti_gz(tmp_path):
  folder = _write_brats_patient(tmp_path, shape=(16, 16, 16))
  path = _path(folder, "t1")
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 2])  # header intact, voxel stream cut
  _raises(lambda: dio.read_nifti_image(path), os.path.basename(path), "cannot read NIfTI")


def test_missing_modality(tmp_path):
  folder = _write_brats_patient(tmp_path)
  os.remove(_path(folder, "t1ce"))
  _raises(lambda: layouts.find_brats(tmp_path), "BraTS20_Training_001_t1ce.nii.gz", "missing modality 't1ce'")


def test_modalities_of_different_shapes(tmp_path):
  folder = _write_brats_patient(tmp_path)
  phantom.save_nifti(np.ones((4, 6, 5), np.int16), AFFINE, _path(folder, "t2"), np.int16)
  _raises(lambda: dio.load_brats_patient(_patient(folder)), "_t2.nii.gz", "shape", "(5, 6, 4)", "_flair.nii.gz")


def test_modalities_of_different_affines(tmp_path):
  folder = _write_brats_patient(tmp_path)
  shifted = AFFINE.copy()
  shifted[0, 3] += 3.0
  phantom.save_nifti(np.ones(SHAPE, np.int16), shifted, _path(folder, "t1ce"), np.int16)
  _raises(lambda: dio.load_brats_patient(_patient(folder)), "_t1ce.nii.gz", "affine differs", "co-registered")


def test_seg_label_outside_brats_set(tmp_path):
  folder = _write_brats_patient(tmp_path, seg_values=(0, 1, 2, 3, 4))
  _raises(lambda: dio.load_brats_patient(_patient(folder)), "_seg.nii.gz", "unexpected values [3]", "{0, 1, 2, 4}")


@pytest.mark.parametrize("bad, word", [(np.nan, "NaN"), (np.inf, "Inf")])
def test_nan_or_inf_voxels(tmp_path, bad, word):
  folder = _write_brats_patient(tmp_path)
  data = np.ones(SHAPE, np.float32)
  data[1, 2, 3] = bad
  phantom.save_nifti(data, AFFINE, _path(folder, "flair"), np.float32)
  msg = _raises(lambda: dio.load_brats_patient(_patient(folder)), "_flair.nii.gz", "non-finite")
  assert f"1 {word}" in msg


def test_2d_file_where_3d_expected(tmp_path):
  import nibabel as nib
  folder = _write_brats_patient(tmp_path)
  path = _path(folder, "t1")
  nib.save(nib.Nifti1Image(np.ones((6, 6), np.int16), np.eye(4)), path)
  _raises(lambda: dio.load_brats_patient(_patient(folder)), "_t1.nii.gz", "expected a 3D volume", "2D")


def test_empty_patient_folder(tmp_path):
  (tmp_path / "BraTS20_Training_007").mkdir()
  _raises(lambda: layouts.find_brats(tmp_path), "BraTS20_Training_007", "empty patient folder")
  (tmp_path / "acdc" / "training" / "patient001").mkdir(parents=True)
  _raises(lambda: layouts.find_acdc(tmp_path / "acdc"), "patient001", "empty patient folder")


def test_image_mask_size_mismatch(tmp_path):
  folder = _write_brats_patient(tmp_path)
  phantom.save_nifti(np.zeros((5, 6, 6), np.uint8), AFFINE, _path(folder, "seg"), np.uint8)
  _raises(lambda: dio.load_brats_patient(_patient(folder)), "_seg.nii.gz", "image/mask size mismatch",
          "_flair.nii.gz")


def test_acdc_image_gt_size_mismatch(tmp_path):
  img, gt = tmp_path / "p_frame01.nii.gz", tmp_path / "p_frame01_gt.nii.gz"
  phantom.save_nifti(np.ones(SHAPE, np.int16), AFFINE, img, np.int16)
  phantom.save_nifti(np.zeros((4, 6, 7), np.uint8), AFFINE, gt, np.uint8)
  _raises(lambda: dio.load_acdc_frame(img, gt), "p_frame01_gt.nii.gz", "image/mask size mismatch")


def _lgg(tmp_path):
  folders = phantom.write_lgg(tmp_path, seed=0, sites=("CS",), patients_per_site=1, slices_per_patient=3,
                              size=16)
  return layouts.find_lgg(tmp_path)[0], folders[0]


def test_lgg_mask_not_binary(tmp_path):
  p, _ = _lgg(tmp_path)
  mask = np.zeros((16, 16), np.uint8)
  mask[2:4, 2:4] = 7
  Image.fromarray(mask).save(p.masks[1], format="TIFF")
  _raises(lambda: dio.load_lgg_patient(p), os.path.basename(p.masks[1]), "unexpected values [7]")


def test_lgg_non_numeric_slice_index(tmp_path):
  p, folder = _lgg(tmp_path)
  bad = os.path.join(folder, f"{p.id}_x2.tif")
  os.rename(p.images[2], bad)
  _raises(lambda: layouts.find_lgg(tmp_path), f"{p.id}_x2.tif", "non-numeric slice index 'x2'")


def _acdc_patient(tmp_path, info):
  folder = tmp_path / "training" / "patient001"
  folder.mkdir(parents=True)
  (folder / "Info.cfg").write_text(info)
  for n in (1, 9):
    phantom.save_nifti(np.ones(SHAPE, np.int16), AFFINE, folder / f"patient001_frame{n:02d}.nii.gz", np.int16)
    phantom.save_nifti(np.zeros(SHAPE, np.uint8), AFFINE, folder / f"patient001_frame{n:02d}_gt.nii.gz", np.uint8)
  return folder


@pytest.mark.parametrize("missing", ["ED", "ES"])
def test_info_cfg_missing_ed_or_es(tmp_path, missing):
  lines = {"ED": "ED: 1", "ES": "ES: 9", "Group": "NOR"}
  text = "\n".join(v if k != "Group" else "Group: NOR" for k, v in lines.items() if k != missing) + "\n"
  _acdc_patient(tmp_path, text + "Height: 170.0\nNbFrame: 20\nWeight: 70.0\n")
  _raises(lambda: layouts.find_acdc(tmp_path), "Info.cfg", f"missing {missing}")


def test_info_cfg_non_integer_frame(tmp_path):
  _acdc_patient(tmp_path, "ED: one\nES: 9\nGroup: NOR\n")
  _raises(lambda: layouts.find_acdc(tmp_path), "Info.cfg", "ED must be an integer", "'one'")


def test_acdc_missing_frame_named_by_info_cfg(tmp_path):
  folder = _acdc_patient(tmp_path, "ED: 1\nES: 12\nGroup: NOR\n")
  assert (folder / "patient001_frame09.nii.gz").exists()
  _raises(lambda: layouts.find_acdc(tmp_path), "patient001_frame12.nii.gz", "missing ES frame 12")


def test_zero_size_volume(tmp_path):
  folder = _write_brats_patient(tmp_path)
  phantom.save_nifti(np.zeros((0, 6, 6), np.int16), AFFINE, _path(folder, "t2"), np.int16)
  _raises(lambda: dio.load_brats_patient(_patient(folder)), "_t2.nii.gz", "zero-size volume")


def test_gzip_of_garbage_is_reported_not_crashing(tmp_path):
  path = tmp_path / "x_flair.nii.gz"
  with gzip.open(path, "wb") as f:
    f.write(b"\0" * 10)
  _raises(lambda: dio.read_nifti_image(path), "x_flair.nii.gz", "cannot read NIfTI")


# ---------------------------------------------------------------------------
# skip_bad_patients
# ---------------------------------------------------------------------------
def _brats_cfg(root, skip):
  return ml_collections.ConfigDict(dict(
      layout="brats", root=str(root), cache_dir="", image_size=8, ndim=2, normalize="zscore",
      skip_bad_patients=skip, split_seed=0, stratify_by_site=False, val_fraction=0.2, test_fraction=0.15,
      verbose=False, **_helpers.NIFTI_DATA))


def test_skip_bad_patients_warns_and_skips(tmp_path, capsys):
  for i in range(1, 6):
    _write_brats_patient(tmp_path, f"BraTS20_Training_{i:03d}")
  bad = tmp_path / "BraTS20_Training_002"
  os.remove(bad / "BraTS20_Training_002_t1.nii.gz")
  seg3 = tmp_path / "BraTS20_Training_003" / "BraTS20_Training_003_seg.nii.gz"
  phantom.save_nifti(np.full(SHAPE, 3, np.uint8), AFFINE, seg3, np.uint8)
  with pytest.raises(DataError, match="missing modality 't1'"):
    pipeline.build_dataset(_brats_cfg(tmp_path, False), verbose=False)
  ds = pipeline.build_dataset(_brats_cfg(tmp_path, True), verbose=False)
  assert sorted(ds.patients) == ["BraTS20_Training_001", "BraTS20_Training_004", "BraTS20_Training_005"]
  err = capsys.readouterr().err
  assert err.count("WARNING: skipping bad patient") == 2
  assert "BraTS20_Training_002_t1.nii.gz" in err and "BraTS20_Training_003_seg.nii.gz" in err


def test_skip_bad_patients_lgg(tmp_path, capsys):
  phantom.write_lgg(tmp_path, seed=0, sites=("CS", "DU", "HT"), patients_per_site=1, slices_per_patient=3,
                    size=16)
  p = layouts.find_lgg(tmp_path)[1]
  Image.fromarray(np.full((16, 16), 9, np.uint8)).save(p.masks[0], format="TIFF")
  cfg = ml_collections.ConfigDict(dict(
      layout="lgg", root=str(tmp_path), cache_dir="", image_size=16, normalize="slice_max",
      skip_bad_patients=True, split_seed=0, stratify_by_site=False, val_fraction=0.2, test_fraction=0.15,
      fold=None, num_folds=5))
  with pytest.raises(ValueError, match="at least 3 patients"):  # 2 left: the split needs 3
    pipeline.build_dataset(cfg, verbose=False)
  err = capsys.readouterr().err
  assert "WARNING: skipping bad patient" in err and os.path.basename(p.masks[0]) in err
  cfg.skip_bad_patients = False
  with pytest.raises(DataError, match="unexpected values"):
    pipeline.build_dataset(cfg, verbose=False)


def test_all_patients_bad_is_an_error(tmp_path, capsys):
  _write_brats_patient(tmp_path)
  os.remove(tmp_path / "BraTS20_Training_001" / "BraTS20_Training_001_seg.nii.gz")
  with pytest.raises(DataError, match="no usable BraTS patient: all 1 skipped"):
    pipeline.build_dataset(_brats_cfg(tmp_path, True), verbose=False)
  assert "missing segmentation" in capsys.readouterr().err
