"""Tests for fedjax_seg.data.phantom (deterministic synthetic LGG hospitals)."""

import os
import re

import numpy as np
import pytest
from PIL import Image

from fedjax_seg.data import phantom
from _helpers import read_tree

SMALL = dict(sites=("CS", "DU", "HT"), patients_per_site=2, slices_per_patient=10, size=32)


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
  a, b = read_tree(root), read_tree(tmp_path / "again")
  assert a.keys() == b.keys() and len(a) == 120
  assert all(a[k] == b[k] for k in a)

  phantom.write_lgg(tmp_path / "other", seed=1, **SMALL)
  c = read_tree(tmp_path / "other")
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
  a = read_tree(phantom.write_lgg(tmp_path / "a", tumour_preset="realistic", **kw) and tmp_path / "a")
  b = read_tree(phantom.write_lgg(tmp_path / "b", tumour_preset="realistic", **kw) and tmp_path / "b")
  assert a == b
  c = read_tree(phantom.write_lgg(tmp_path / "c", tumour_preset="classic", **kw) and tmp_path / "c")
  d = read_tree(phantom.write_lgg(tmp_path / "d", **kw) and tmp_path / "d")
  assert c == d and c != a
  # an explicit value wins over the preset (tumour_area=None means "not given": the preset's range stays)
  e = read_tree(phantom.write_lgg(tmp_path / "e", tumour_preset="realistic", tumour_free_fraction=0.3,
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
  assert read_tree(tmp_path / "x") == read_tree(tmp_path / "y") and ref
  with pytest.raises(SystemExit):
    phantom.main(["--layout", "acdc", "--out", str(tmp_path / "z"), "--tumour-preset", "realistic"])


# ---------------------------------------------------------------------------
# The tumour keys of the configs' data.phantom, from the command line to the written masks.
# ---------------------------------------------------------------------------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LGG_CL = os.path.join(ROOT, "configs", "lgg_centralized.py")
BRATS_SMOKE = os.path.join(ROOT, "configs", "brats_3d_centralized.py") + ":smoke"


def _config_with_overrides(config_arg, *overrides):
  """The locked config of ``--config config_arg`` after ``--config.<key>=<value>`` overrides,
  parsed by ml_collections' config_flags exactly as launch.py does (its own FlagValues)."""
  import sys

  from absl import flags
  from ml_collections import config_flags

  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, lock_config=True)
  argv = ["launch.py", "--config", config_arg, *overrides]
  saved, sys.argv = sys.argv, argv  # config_flags reads the override flags from sys.argv
  try:
    fv(argv)
    return fv["config"].value
  finally:
    sys.argv = saved


def _mask_stats(root):
  masks = [np.asarray(Image.open(os.path.join(d, f))) > 0
           for d, _, files in os.walk(root) for f in sorted(files) if f.endswith("_mask.tif")]
  areas = np.array([m.mean() for m in masks])
  return float(np.mean(areas == 0)), areas[areas > 0]


def test_config_tumour_preset_override_reaches_the_writer(tmp_path):
  from fedjax_seg import validate
  from fedjax_seg.data import pipeline

  small = ["--config.data.phantom.size=64", "--config.data.phantom.patients_per_site=3",
           "--config.data.phantom.slices_per_patient=16", f"--config.data.cache_dir={tmp_path}"]
  default = _config_with_overrides(LGG_CL, *small)
  realistic = _config_with_overrides(LGG_CL, *small, "--config.data.phantom.tumour_preset=realistic")
  assert realistic.data.phantom.tumour_preset == "realistic"
  validate.check(realistic)
  root_default = pipeline.resolve_root(default.data, verbose=False)
  root_realistic = pipeline.resolve_root(realistic.data, verbose=False)
  assert root_default != root_realistic  # the cache tells the presets apart
  free_d, areas_d = _mask_stats(root_default)
  free_r, areas_r = _mask_stats(root_realistic)
  lo, hi = phantom.TUMOUR_PRESETS["realistic"]["lgg"]["tumour_area"]
  assert abs(free_r - phantom.TUMOUR_PRESETS["realistic"]["lgg"]["tumour_free_fraction"]) < 0.1, free_r
  assert areas_r.max() < 1.5 * hi and np.median(areas_r) < 0.02, areas_r
  # 'classic': a third of the slices empty, a tail of tumours larger than 'realistic' ever draws
  assert free_d < free_r - 0.2 and areas_d.mean() > 1.5 * areas_r.mean() and areas_d.max() > hi
  # explicit tumour_area / tumour_free_fraction overrides (tuple and float keys) win over the preset
  explicit = _config_with_overrides(LGG_CL, *small, "--config.data.phantom.tumour_preset=realistic",
                                    "--config.data.phantom.tumour_area=(0.01, 0.01)",
                                    "--config.data.phantom.tumour_free_fraction=0.5")
  assert tuple(explicit.data.phantom.tumour_area) == (0.01, 0.01)
  free_e, areas_e = _mask_stats(pipeline.resolve_root(explicit.data, verbose=False))
  assert abs(free_e - 0.5) < 0.1 and free_e < free_r and areas_e.max() < 1.5 * 0.01


def test_phantom_cache_key_resolves_the_tumour_keys():
  from fedjax_seg.data import pipeline

  base = dict(seed=0, sites=("CS",), patients_per_site=2, slices_per_patient=8, size=32)
  key = lambda **kw: pipeline._phantom_key("lgg", {**base, **kw})  # noqa: E731
  unset = dict(tumour_preset="classic", tumour_area=(), tumour_free_fraction=-1.0)
  # the placeholders (and 'classic', the writer's defaults) keep the key of a config without the keys
  assert key(**unset) == key() == key(tumour_preset="", tumour_area=(), tumour_free_fraction=-1)
  realistic = key(**{**unset, "tumour_preset": "realistic"})
  assert realistic != key()
  assert realistic == key(tumour_area=[0.005, 0.03], tumour_free_fraction=0.65)  # same files, same folder
  assert realistic != key(**{**unset, "tumour_preset": "realistic", "tumour_free_fraction": 0.5})
  assert key(**{**unset, "tumour_area": (0.01, 0.02)}) != key(**{**unset, "tumour_area": (0.01, 0.03)})
  kw = pipeline.phantom_writer_kwargs("lgg", {**base, **unset})
  assert kw["tumour_area"] is None and kw["tumour_free_fraction"] is None and kw["tumour_preset"] == "classic"
  assert pipeline.phantom_writer_kwargs("lgg", {**base, "tumour_area": [0.01, 0.02]})["tumour_area"] == (0.01, 0.02)


def test_brats_configs_take_the_tumour_keys():
  c = _config_with_overrides(BRATS_SMOKE, "--config.data.phantom.tumour_preset=realistic",
                             "--config.data.phantom.tumour_free_fraction=0.6")
  assert c.data.phantom.tumour_preset == "realistic" and c.data.phantom.tumour_free_fraction == 0.6
  c2 = _config_with_overrides(os.path.join(ROOT, "configs", "brats_2d_fedavg.py"),
                              "--config.data.phantom.tumour_area=(0.01, 0.02)")
  assert tuple(c2.data.phantom.tumour_area) == (0.01, 0.02)


@pytest.mark.parametrize("override, needle", [
    ("--config.data.phantom.tumour_area=(0.02, 0.01)", "config.data.phantom.tumour_area=(0.02, 0.01): must be ()"),
    ("--config.data.phantom.tumour_area=(0.01,)", "config.data.phantom.tumour_area=(0.01,): must be ()"),
    ("--config.data.phantom.tumour_area=(0.0, 0.6)", "config.data.phantom.tumour_area=(0.0, 0.6): must be ()"),
    ("--config.data.phantom.tumour_preset=huge", "config.data.phantom.tumour_preset='huge': must be one of "
                                                 "'classic', 'realistic'"),
    ("--config.data.phantom.tumour_free_fraction=1.5", "config.data.phantom.tumour_free_fraction=1.5: must be -1"),
])
def test_launch_refuses_bad_tumour_keys(override, needle, tmp_path, capfd):
  import launch

  wd = tmp_path / "run"
  rc = launch.run_cli(["launch.py", "--config", LGG_CL, "--workdir", str(wd), override])
  _, err = capfd.readouterr()
  assert rc == 2 and len(err.splitlines()) == 1 and needle in err, err
  assert not wd.exists()
