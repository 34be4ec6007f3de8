"""Quirks of the real data sets and the data-side guards: the BraTS 2020 patient-355 seg alias,
missing-file messages that list what the patient folder holds, and by_site without sites."""
import os
import shutil

import ml_collections
import numpy as np
import pytest

from fedjax_seg.data import io as dio
from fedjax_seg.data import layouts, partition, phantom, pipeline
from fedjax_seg.data.io import DataError
import _helpers

BRATS_TINY = dict(sites=("CS", "DU"), patients_per_site=2, slices_per_patient=4, size=16)


@pytest.fixture
def brats(tmp_path):
  """A tiny phantom BraTS set (4 patients); returns its MICCAI_BraTS2020_TrainingData folder."""
  phantom.write_brats(tmp_path, seed=0, **BRATS_TINY)
  return os.path.join(tmp_path, phantom.BRATS_FOLDER)


def _rename_patient(base, old, new):
  """Renames a patient folder and its files (and its name_mapping.csv row) from ``old`` to ``new``."""
  src, dst = os.path.join(base, old), os.path.join(base, new)
  os.rename(src, dst)
  for name in os.listdir(dst):
    os.rename(os.path.join(dst, name), os.path.join(dst, name.replace(old, new)))
  csv = os.path.join(base, "name_mapping.csv")
  with open(csv) as f:
    text = f.read()
  with open(csv, "w") as f:
    f.write(text.replace(old, new))
  return dst


def _cfg(root):
  return ml_collections.ConfigDict(dict(
      layout="brats", root=str(root), cache_dir="", image_size=8, ndim=2, normalize="zscore",
      skip_bad_patients=False, split_seed=0, stratify_by_site=False, val_fraction=0.25, test_fraction=0.34,
      verbose=False, **_helpers.NIFTI_DATA))


def test_brats_patient_355_seg_alias_loads(brats):
  folder = _rename_patient(brats, "BraTS20_Training_003", "BraTS20_Training_355")
  seg = os.path.join(folder, "BraTS20_Training_355_seg.nii.gz")
  # The Kaggle copy: uncompressed and named after the scan, not the patient.
  import nibabel as nib
  nib.save(nib.load(seg), os.path.join(folder, "W39_1998.09.19_Segm.nii"))
  os.remove(seg)
  patients = layouts.find_brats(brats)
  assert [p.id for p in patients] == ["BraTS20_Training_001", "BraTS20_Training_002", "BraTS20_Training_004",
                                      "BraTS20_Training_355"]
  p355 = patients[-1]
  assert p355.masks == (os.path.join(folder, "W39_1998.09.19_Segm.nii"),)
  _, seg_data, _ = dio.load_brats_patient(p355)
  assert set(np.unique(seg_data)) <= {0, 1, 2, 4} and seg_data.any()
  ds = pipeline.build_dataset(_cfg(brats), verbose=False)
  assert sorted(ds.patients) == [p.id for p in patients]  # every patient, 355 included
  # The alias belongs to patient 355 only: another patient with that file name still has no seg.
  other = os.path.join(brats, "BraTS20_Training_001")
  shutil.move(os.path.join(other, "BraTS20_Training_001_seg.nii.gz"),
              os.path.join(other, "W39_1998.09.19_Segm.nii.gz"))
  with pytest.raises(DataError, match="missing segmentation"):
    layouts.find_brats(brats)


def test_missing_alias_names_it(brats):
  folder = _rename_patient(brats, "BraTS20_Training_003", "BraTS20_Training_355")
  os.remove(os.path.join(folder, "BraTS20_Training_355_seg.nii.gz"))
  with pytest.raises(DataError) as e:
    layouts.brats_patient(folder)
  assert "W39_1998.09.19_Segm.nii[.gz]" in str(e.value)


def test_missing_modality_lists_present_files(brats):
  folder = os.path.join(brats, "BraTS20_Training_002")
  os.remove(os.path.join(folder, "BraTS20_Training_002_t1ce.nii.gz"))
  with open(os.path.join(folder, "BraTS20_Training_002_T1CE.nii.gz"), "wb") as f:  # the usual culprit
    f.write(b"x")
  with pytest.raises(DataError) as e:
    layouts.find_brats(brats)
  msg = str(e.value)
  assert "\n" not in msg
  assert msg.startswith(os.path.join(folder, "BraTS20_Training_002_t1ce.nii.gz"))
  assert "missing modality 't1ce'" in msg and "BraTS20_Training_002/ holds:" in msg
  for name in ("BraTS20_Training_002_T1CE.nii.gz", "BraTS20_Training_002_flair.nii.gz",
               "BraTS20_Training_002_seg.nii.gz"):
    assert name in msg


def test_missing_seg_and_acdc_gt_list_present_files(brats, tmp_path):
  folder = os.path.join(brats, "BraTS20_Training_004")
  os.remove(os.path.join(folder, "BraTS20_Training_004_seg.nii.gz"))
  with pytest.raises(DataError) as e:
    layouts.brats_patient(folder)
  msg = str(e.value)
  assert "missing segmentation" in msg and "BraTS20_Training_004/ holds:" in msg
  assert "BraTS20_Training_004_t2.nii.gz" in msg and "\n" not in msg
  phantom.write_acdc(tmp_path / "acdc", seed=0, groups=("NOR",), patients_per_group=1, slices_per_patient=2,
                     size=16)
  p = layouts.find_acdc(tmp_path / "acdc")[0]
  os.remove(p.masks[1])
  with pytest.raises(DataError) as e:
    layouts.acdc_patient(p.folder)
  msg = str(e.value)
  assert "missing ground truth of the ES frame" in msg and "patient001/ holds:" in msg
  assert "Info.cfg" in msg and os.path.basename(p.images[1]) in msg


def test_many_files_are_elided(tmp_path):
  folder = tmp_path / "BraTS20_Training_009"
  folder.mkdir()
  for i in range(20):
    (folder / f"junk_{i:02d}.txt").write_text("")
  with pytest.raises(DataError) as e:
    layouts.brats_patient(folder)
  assert "junk_00.txt" in str(e.value) and "(8 more)" in str(e.value)


def test_by_site_without_sites_is_an_error(brats):
  os.remove(os.path.join(brats, "name_mapping.csv"))
  patients = layouts.find_brats(brats)
  sites = {p.id: p.site for p in patients}
  assert set(sites.values()) == {layouts.UNKNOWN_SITE}
  ids = sorted(sites)
  for k in (0, 1):
    with pytest.raises(ValueError) as e:
      partition.by_site(ids, sites, k)
    msg = str(e.value)
    assert "config.fl.partition" in msg and "name_mapping.csv" in msg
    assert "--config.fl.partition=iid --config.fl.num_clients=N" in msg
  with pytest.raises(ValueError, match="config.fl.partition"):
    partition.make_partition("by_site", ids, 0, 0, sites)
  with pytest.raises(ValueError, match="config.fl.partition"):
    partition.by_site(ids, {i: "" for i in ids})
  # Other partitions do not need sites; a partly known mapping keeps 'other' as one more client.
  assert sum(map(len, partition.make_partition("iid", ids, 2, 0, sites))) == 4
  mixed = dict(sites, BraTS20_Training_001="CS")
  assert partition.by_site(ids, mixed) == [["BraTS20_Training_001"], ids[1:]]
