"""fedjax_seg.infer: checkpoint -> mask + overlay, on phantom NIfTI volumes and LGG TIFFs; clear errors."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from fedjax_seg import infer, models, runlog, steps, train
from fedjax_seg.data import phantom


def _fake_run(config, workdir, num_classes, channels):
  """A run folder as the centralised trainer leaves it (config.json + orbax state), untrained:
  inference mechanics do not need a trained model. Weights are drawn with NumPy into the
  model's variable shapes (jax.eval_shape): compiling Flax's threefry initialisers costs
  ~25 s of CPU, more than the rest of this module."""
  train.save_config(config, workdir)
  fns = models.build(config.model, num_classes)
  spatial = ((8,) if config.model.get("ndim", 2) == 3 else ()) + (config.data.image_size,) * 2
  shapes = jax.eval_shape(lambda: fns.init(jax.random.PRNGKey(0), jnp.zeros((1,) + spatial + (channels,))))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.2, s.shape), s.dtype), shapes)
  tx = steps.make_optimizer(config.optimizer)
  ck = runlog.Checkpointer(workdir)
  ck.save(1, {"variables": variables, "opt_state": tx.init(variables["params"]),
              "epoch": jnp.asarray(1, jnp.int32)})
  ck.close()
  return workdir


def _brats_config(ndim):
  from configs import brats_2d_fedavg
  c = brats_2d_fedavg.get_config("smoke")
  c.algorithm = "centralized"
  c.data.image_size = 16
  c.model.base = 4
  c.model.depth = 2
  if ndim == 3:
    c.model.ndim = c.data.ndim = 3
    c.data.depth = 8
    c.data.target_spacing = (2.0, 2.0, 2.0)  # resample + pad + sliding window, then back
  return c


@pytest.fixture(scope="module")
def brats(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("brats_phantom"))
  folders = phantom.write_brats(root, sites=("CS",), patients_per_site=1, slices_per_patient=12, size=24)
  folder = folders[0]
  seg = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith("_seg.nii.gz")][0]
  runs = {nd: _fake_run(_brats_config(nd), str(tmp_path_factory.mktemp(f"brats{nd}d")), 4, 4)
          for nd in (2, 3)}
  return folder, seg, runs


@pytest.fixture(scope="module")
def lgg_run(data_cache, tmp_path_factory):
  """(run folder of a tiny LGG U-Net, the phantom's kaggle_3m/ folder)."""
  from conftest import tiny_config
  from fedjax_seg.data import pipeline
  c = tiny_config(data_cache)
  root = pipeline.resolve_root(c.data, verbose=False)  # writes the phantom once per session
  wd = _fake_run(c, str(tmp_path_factory.mktemp("lgg_run")), 2, 3)
  return wd, os.path.join(root, "kaggle_3m")


@pytest.mark.parametrize("ndim", [2, 3])
def test_nifti_roundtrip(brats, tmp_path, ndim):
  folder, seg, runs = brats
  out = str(tmp_path / "pred.nii.gz")
  s = infer.infer(runs[ndim], folder, out, gt=seg)
  ref, pred = nib.load(seg), nib.load(out)
  assert np.array_equal(pred.affine, ref.affine)
  assert pred.shape == ref.shape
  assert pred.header.get_sform(coded=True)[1] == ref.header.get_sform(coded=True)[1]
  assert pred.header.get_qform(coded=True)[1] == ref.header.get_qform(coded=True)[1]
  assert np.allclose(pred.header.get_zooms(), ref.header.get_zooms())
  assert pred.get_data_dtype() == np.uint8
  labels = np.unique(np.asarray(pred.dataobj))
  assert set(labels.tolist()) <= {0, 1, 2, 4}  # BraTS convention: class 3 written back as 4
  assert os.path.isfile(s["overlay"]) and s["overlay"].endswith("pred_overlay.png")
  planes = [t.split()[0] for t in s["panels"]]
  assert planes == ["axial", "coronal", "sagittal"] * 2  # prediction row, ground-truth row
  assert sum("ground truth" in t for t in s["panels"]) == 3
  assert Image.open(s["overlay"]).size[0] > 0
  assert set(s["dice"]) == {"necrotic", "edema", "enhancing"}


def test_sliding_window_places_and_averages():
  x = np.random.default_rng(0).random((10, 12, 7, 3)).astype(np.float32)
  calls = []

  def identity(batch):
    calls.append(batch.shape)
    return batch
  out = infer.sliding_window(identity, x, (4, 8, 4))
  np.testing.assert_allclose(out, x, rtol=1e-6)  # every voxel covered, windows put back in place
  assert all(s[1:4] == (4, 8, 4) for s in calls)
  assert infer.window_starts(10, 4, 2) == [0, 2, 4, 6]
  assert infer.window_starts(11, 4, 2) == [0, 2, 4, 6, 7]
  assert infer.window_starts(3, 4, 2) == [0]


def test_tiff_folder_and_single_slice(lgg_run, tmp_path):
  wd, root = lgg_run
  folder = os.path.join(root, sorted(os.listdir(root))[0])
  s = infer.infer(wd, folder, str(tmp_path / "masks"), gt=folder)
  n = len(infer.tiff_slices(folder))
  assert len(s["mask"]) == n and all(p.endswith("_mask.tif") for p in s["mask"])
  m = np.asarray(Image.open(s["mask"][0]))
  src = np.asarray(Image.open(infer.tiff_slices(folder)[0]))
  assert m.shape == src.shape[:2] and m.dtype == np.uint8
  assert set(np.unique(m).tolist()) <= {0, 255}
  assert [t.split()[0] for t in s["panels"]] == ["axial", "coronal", "sagittal"] * 2
  one = infer.tiff_slices(folder)[2]
  rc = infer.main(["--workdir", wd, "--input", one, "--output", str(tmp_path / "one.tif")])
  assert rc == 0
  assert set(np.unique(np.asarray(Image.open(tmp_path / "one.tif"))).tolist()) <= {0, 255}
  assert os.path.isfile(tmp_path / "one_overlay.png")
  s1 = infer.infer(wd, one, str(tmp_path / "one2.tif"))
  assert s1["panels"] == [s1["panels"][0]] and s1["panels"][0].startswith("axial")  # one plane


def _run_main(capsys, *args):
  rc = infer.main(list(args))
  err = capsys.readouterr().err
  assert "Traceback" not in err
  return rc, err


def test_clear_errors(lgg_run, brats, tmp_path, capsys):
  wd, root = lgg_run
  folder, seg, runs = brats
  tif = infer.tiff_slices(os.path.join(root, sorted(os.listdir(root))[0]))[0]
  out = str(tmp_path / "o")
  rc, err = _run_main(capsys, "--workdir", str(tmp_path / "nope"), "--input", tif, "--output", out)
  assert rc == 2 and err.startswith("error: run folder") and "does not exist" in err
  empty = tmp_path / "no_ckpt"
  empty.mkdir()
  shutil.copy(os.path.join(wd, "config.json"), empty / "config.json")
  rc, err = _run_main(capsys, "--workdir", str(empty), "--input", tif, "--output", out)
  assert rc == 2 and "no checkpoint" in err
  # config.json edited after training: the checkpoint no longer fits the model it describes
  bad = tmp_path / "mismatch"
  shutil.copytree(wd, bad)
  cfg = json.load(open(bad / "config.json"))
  cfg["model"]["base"] = 16
  json.dump(cfg, open(bad / "config.json", "w"))
  rc, err = _run_main(capsys, "--workdir", str(bad), "--input", tif, "--output", out)
  assert rc == 2 and "config/model mismatch" in err and "kernel" in err
  # a 3-channel LGG slice into the 4-channel BraTS model, a 1-channel NIfTI into the LGG model
  rc, err = _run_main(capsys, "--workdir", runs[2], "--input", tif, "--output", out)
  assert rc == 2 and "has 3 channel(s)" in err and "trained on 4" in err
  flair = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith("_flair.nii.gz")][0]
  rc, err = _run_main(capsys, "--workdir", wd, "--input", flair, "--output", out + ".nii.gz")
  assert rc == 2 and "has 1 channel(s)" in err and "trained on 3" in err
  rc, err = _run_main(capsys, "--workdir", wd, "--input", str(tmp_path / "missing.nii.gz"), "--output", out)
  assert rc == 2 and "does not exist" in err


# ---------------------------------------------------------------------------
# One preprocessing for training and inference: trained tiny runs whose
# volumes are larger than the training crop (the crop, the normalisation
# region and the mapping back all matter).
# ---------------------------------------------------------------------------
def _train_tiny(config, workdir):
  from fedjax_seg.data import pipeline
  results = train.train_and_evaluate(config, workdir)
  ds = pipeline.build_dataset(config.data, verbose=False)
  return infer.load_run(workdir), ds, results["per_patient"]["test"]


def _pooled_dice(pairs, num_classes):
  """Dice per foreground class over all (pred, gt) pairs of a patient, as results.json pools its slices."""
  inter, total = np.zeros(num_classes), np.zeros(num_classes)
  for pred, gt in pairs:
    for k in range(num_classes):
      inter[k] += np.sum((pred == k) & (gt == k))
      total[k] += np.sum(pred == k) + np.sum(gt == k)
  return {k: (1.0 if total[k] == 0 else 2.0 * inter[k] / total[k]) for k in range(1, num_classes)}


@pytest.fixture(scope="module")
def acdc_trained(data_cache, tmp_path_factory):
  """A tiny trained 2D ACDC run: 40 x 40 frames at 5 mm (FOV 200 mm), cropped to 32 x 32 in training."""
  from configs import acdc_centralized
  c = acdc_centralized.get_config("smoke")
  c.data.cache_dir = data_cache
  c.data.phantom.patients_per_group = 2
  c.data.phantom.size = 40
  c.data.phantom.fov_mm = (200.0, 200.0)
  c.data.target_spacing = (0.0, 5.0, 5.0)
  c.data.image_size = 32
  c.model.dropout = 0.0
  c.augment.enabled = False
  c.num_epochs = 20
  c.batch_size = 8
  c.eval_batch_size = 16
  return _train_tiny(c, str(tmp_path_factory.mktemp("acdc_trained")))


def test_acdc_full_frame_matches_training_time_dice(acdc_trained):
  run, ds, test_records = acdc_trained
  assert test_records
  for rec in test_records:
    patient = ds.patients[rec["id"]]
    folder = os.path.join(ds.root, "training", rec["id"])
    frames = sorted(f for f in os.listdir(folder) if f.endswith(".nii.gz") and "_gt" not in f)  # ED, ES
    pairs, offset = [], 0
    for f in frames:
      inp = infer.load_input(os.path.join(folder, f))
      assert inp.data.shape[1:3] == (40, 40)  # larger than the 32 x 32 training crop
      x, geo = infer.preprocess_input(run, inp)
      # the network input is the training sample, bit for bit (ED slices, then ES slices)
      np.testing.assert_array_equal(x, patient.images[offset:offset + len(x)])
      offset += len(x)
      gt = infer.load_ground_truth(os.path.join(folder, f.replace(".nii.gz", "_gt.nii.gz")), inp, run)
      pred = infer.segment(run, inp)
      assert pred.shape == gt.shape == inp.data.shape[:3]
      pairs.append((pred, gt))
    assert offset == len(patient.images)
    dice = _pooled_dice(pairs, 4)
    for k, name in enumerate(("RV", "myocardium", "LV"), start=1):
      assert abs(dice[k] - rec["dice"][name]) <= 0.02, (rec["id"], name, dice[k], rec["dice"][name])
    assert rec["dice"]["LV"] > 0.5  # a model that segments: the comparison means something


@pytest.fixture(scope="module")
def brats_trained(data_cache, tmp_path_factory):
  """A tiny trained 2D BraTS run: 40 x 40 slices at 1 mm, cropped to 32 x 32 in training, zscore."""
  c = _brats_config(2)
  d = c.data
  d.cache_dir = data_cache
  d.phantom.sites = ("CS",)
  d.phantom.patients_per_site = 6
  d.phantom.slices_per_patient = 12
  d.phantom.size = 40
  d.image_size = 32
  d.target_spacing = (1.0, 1.0, 1.0)
  d.normalize = "zscore"
  d.min_foreground_fraction = 0.0
  c.model.base = 8
  c.model.depth = 3
  c.model.dropout = 0.0
  c.num_epochs = 20
  c.batch_size = 8
  c.eval_batch_size = 16
  return _train_tiny(c, str(tmp_path_factory.mktemp("brats_trained")))


def test_brats_volume_larger_than_crop_matches_training_time_dice(brats_trained, tmp_path):
  run, ds, test_records = brats_trained
  assert test_records
  for rec in test_records:
    folder = os.path.join(ds.root, phantom.BRATS_FOLDER, rec["id"])
    seg = os.path.join(folder, f"{rec['id']}_seg.nii.gz")
    inp = infer.load_input(folder)
    assert inp.data.shape[1:3] == (40, 40)
    x, _ = infer.preprocess_input(run, inp)
    np.testing.assert_array_equal(x, ds.patients[rec["id"]].images)
    s = infer.infer(run.workdir, folder, str(tmp_path / f"{rec['id']}.nii.gz"), gt=seg, run=run)
    # the written mask lies on the input's grid (BraTS labels) and gives the same Dice
    written = np.asarray(nib.load(s["mask"]).dataobj).transpose(2, 1, 0)
    gt = infer.load_ground_truth(seg, inp, run)
    pred = np.array([0, 1, 2, 3, 3], np.int32)[written]
    dice = _pooled_dice([(pred, gt)], 4)
    for k, name in enumerate(("necrotic", "edema", "enhancing"), start=1):
      assert abs(dice[k] - rec["dice"][name]) <= 0.02, (rec["id"], name, dice[k], rec["dice"][name])
      assert abs(s["dice"][name] - dice[k]) < 1e-9
    assert rec["dice"]["edema"] > 0.3
