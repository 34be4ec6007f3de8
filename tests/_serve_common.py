"""Shared by tests/test_serve*.py: a tiny BraTS run (random weights, as tests/test_infer.py builds
it) and a small phantom BraTS patient (32 x 32 x 16 voxels, 1 x 1 x 2 mm)."""
import os

from fedjax_seg.data import phantom


def brats_run(workdir):
  from test_infer import _brats_config, _fake_run  # same untrained-run recipe as the infer tests
  c = _brats_config(2)
  c.data.image_size = 32
  return _fake_run(c, workdir, 4, 4)


def brats_patient(root):
  """The folder of one phantom BraTS patient: <ID>_{flair,t1,t1ce,t2,seg}.nii.gz."""
  folders = phantom.write_brats(root, sites=("CS",), patients_per_site=1, slices_per_patient=16, size=32,
                                spacing=(1.0, 1.0, 2.0))
  return folders[0]


def modality_files(folder):
  pid = os.path.basename(folder)
  return [os.path.join(folder, f"{pid}_{m}.nii.gz") for m in ("flair", "t1", "t1ce", "t2")]


def lgg_run(workdir, cache_dir):
  from conftest import tiny_config
  from test_infer import _fake_run
  return _fake_run(tiny_config(cache_dir), workdir, 2, 3)


def lgg_patient(root):
  """The folder of one phantom Kaggle LGG patient: <PATIENT>_<n>.tif + <PATIENT>_<n>_mask.tif, 32 x 32."""
  folders = phantom.write_lgg(root, sites=("CS",), patients_per_site=1, slices_per_patient=10, size=32)
  return folders[0]
