"""Tests for fedjax_seg.data.layouts (find_lgg) and fedjax_seg.data.io (LGG readers)."""

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from fedjax_seg.data import io as dio
from fedjax_seg.data import layouts, phantom
from fedjax_seg.data.io import DataError


@pytest.fixture
def lgg(tmp_path):
  """A tiny phantom: 2 sites x 1 patient x 11 slices of 16x16 (>= 10 slices for numeric order)."""
  folders = phantom.write_lgg(tmp_path, seed=0, sites=("CS", "DU"), patients_per_site=1,
                              slices_per_patient=11, size=16)
  return tmp_path, folders


def _data_error(call, *args, match=None):
  """The `DataError` that ``call(*args)`` raises (its message matching the regex ``match``)."""
  with pytest.raises(DataError, match=match) as e:
    call(*args)
  return e.value


def _first_patient(root):
  return layouts.find_lgg(root)[0]


def test_round_trip(lgg):
  root, folders = lgg
  patients = layouts.find_lgg(root)
  assert [p.folder for p in patients] == folders
  assert [p.site for p in patients] == ["CS", "DU"]
  assert [p.id for p in patients] == sorted(p.id for p in patients)
  for p in patients:
    images, masks = dio.load_lgg_patient(p)
    assert images.shape == (11, 16, 16, 3) and images.dtype == np.uint8
    assert masks.shape == (11, 16, 16) and masks.dtype == np.uint8
    assert set(np.unique(masks)) <= {0, 1} and masks.any() and not masks.all()
    # Same pixels as generated in memory.
    index = phantom.lgg_patient_names(0, p.site, 1).index(p.id)
    ref_img, ref_mask = phantom.generate_lgg_patient(0, p.site, index, n_slices=11, size=16)
    np.testing.assert_array_equal(images, ref_img)
    np.testing.assert_array_equal(masks, ref_mask // 255)
    # A folder path works too.
    images2, masks2 = dio.load_lgg_patient(p.folder)
    np.testing.assert_array_equal(images2, images)
    np.testing.assert_array_equal(masks2, masks)


def test_numeric_slice_order_and_kaggle_dir_as_root(lgg):
  root, _ = lgg
  (root / "kaggle_3m" / "data.csv").write_text("Patient,death01\n")
  (root / "kaggle_3m" / "README.md").write_text("hi\n")
  (root / "kaggle_3m" / ".ipynb_checkpoints").mkdir()
  p = _first_patient(root / "kaggle_3m")
  numbers = [int(os.path.basename(f)[len(p.id) + 1:-len(".tif")]) for f in p.images]
  assert numbers == list(range(1, 12))  # _10, _11 after _9
  assert all(m == i[:-len(".tif")] + "_mask.tif" for i, m in zip(p.images, p.masks))
  assert layouts.find_lgg(root) == layouts.find_lgg(root / "kaggle_3m")


def test_corrupt_and_truncated_tiff(lgg):
  root, _ = lgg
  p = _first_patient(root)
  path = p.images[2]
  data = open(path, "rb").read()
  with open(path, "wb") as fh:
    fh.write(data[: len(data) // 2])  # truncated pixel data
  assert os.path.basename(path) in str(_data_error(dio.read_lgg_image, path, match="cannot read TIFF"))
  with pytest.raises(DataError, match=os.path.basename(path)):
    dio.load_lgg_patient(p)

  with open(path, "wb") as fh:
    fh.write(b"this is not a tiff")
  assert os.path.basename(path) in str(_data_error(dio.read_lgg_image, path, match="cannot read TIFF"))


def test_not_a_tiff_format(tmp_path):
  path = tmp_path / "x_1.tif"
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path, format="PNG")
  assert "x_1.tif" in str(_data_error(dio.read_lgg_image, path, match="not TIFF"))


def test_grayscale_image(lgg):
  root, _ = lgg
  p = _first_patient(root)
  Image.fromarray(np.zeros((16, 16), np.uint8)).save(p.images[0], format="TIFF")
  assert os.path.basename(p.images[0]) in str(_data_error(dio.load_lgg_patient, p, match="3 channels"))


def test_mask_with_value_128(lgg):
  root, _ = lgg
  p = _first_patient(root)
  mask = np.zeros((16, 16), np.uint8)
  mask[3:5, 3:5] = 255
  mask[0, 0] = 128
  Image.fromarray(mask).save(p.masks[4], format="TIFF")
  assert os.path.basename(p.masks[4]) in str(_data_error(dio.load_lgg_patient, p, match=r"unexpected values \[128\]"))


def test_rgb_mask_identical_channels_accepted_differing_rejected(tmp_path):
  mask = np.zeros((8, 8), np.uint8)
  mask[2:4, 2:6] = 255
  path = tmp_path / "m_1_mask.tif"
  Image.fromarray(np.stack([mask] * 3, -1)).save(path, format="TIFF")
  np.testing.assert_array_equal(dio.read_lgg_mask(path), mask // 255)
  rgb = np.stack([mask, mask, np.zeros_like(mask)], -1)
  Image.fromarray(rgb).save(path, format="TIFF")
  assert "m_1_mask.tif" in str(_data_error(dio.read_lgg_mask, path, match="differ"))


def test_size_mismatch(lgg):
  root, _ = lgg
  p = _first_patient(root)
  Image.fromarray(np.zeros((12, 16), np.uint8)).save(p.masks[1], format="TIFF")
  with pytest.raises(DataError) as e:
    dio.load_lgg_patient(p)
  msg = str(e.value)
  assert os.path.basename(p.images[1]) in msg and os.path.basename(p.masks[1]) in msg
  assert "(16, 16)" in msg and "(12, 16)" in msg


def test_missing_mask(lgg):
  root, _ = lgg
  p = _first_patient(root)
  os.remove(p.masks[9])
  assert os.path.basename(p.images[9]) in str(_data_error(layouts.find_lgg, root, match="missing mask"))


def test_empty_patient_folder(lgg):
  root, _ = lgg
  p = _first_patient(root)
  for f in p.images + p.masks:
    os.remove(f)
  assert p.id in str(_data_error(layouts.find_lgg, root, match="no slices"))
  assert p.id in str(_data_error(dio.load_lgg_patient, p.folder, match="no slices"))


def test_nonexistent_root_and_no_patients(tmp_path):
  missing = tmp_path / "nope"
  assert "nope" in str(_data_error(layouts.find_lgg, missing, match="does not exist"))
  (tmp_path / "kaggle_3m").mkdir()
  (tmp_path / "kaggle_3m" / "data.csv").write_text("x\n")
  assert "kaggle_3m" in str(_data_error(layouts.find_lgg, tmp_path, match="no Kaggle LGG patient folders"))


def test_missing_file_read(tmp_path):
  e = _data_error(dio.read_lgg_mask, tmp_path / "gone_1_mask.tif", match="does not exist")
  assert "gone_1_mask.tif" in str(e) and isinstance(e, ValueError)


def test_patient_dir_copied_elsewhere_keeps_site(lgg, tmp_path):
  root, folders = lgg
  dst = tmp_path / "copy" / os.path.basename(folders[1])
  shutil.copytree(folders[1], dst)
  patient = layouts.find_lgg(tmp_path / "copy")[0]
  assert patient.site == "DU" and len(patient.images) == 11
