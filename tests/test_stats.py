"""Paired comparisons (fedjax_seg.stats, `report compare`) and the per-patient records they pair."""
import json
import os

import ml_collections
import numpy as np
import pytest

from fedjax_seg import evaluation, metrics, report, stats

N_BOOT = 2_000  # enough for stable 95% intervals here; the CLI default is 10,000


def _method(values):
  """{seed: {patient id: value}} from a [seeds, patients] array."""
  return {s: {f"p{i:02d}": float(v) for i, v in enumerate(row)} for s, row in enumerate(values)}


# ---------------------------------------------------------------------------
# stats
# ---------------------------------------------------------------------------
def test_known_shift_is_found():
  rng = np.random.default_rng(0)
  a = rng.uniform(0.5, 0.9, size=(3, 20))
  b = a + 0.05 + rng.normal(0, 0.02, size=a.shape)
  c = stats.paired_comparison(_method(a), _method(b), "dice_mean", N_BOOT, 0, 0.95)
  lo, hi = c["ci"]
  assert lo > 0 and lo <= 0.05 <= hi
  assert c["mean_diff"] == pytest.approx(float(np.mean(b - a)))
  assert c["mean_reference"] == pytest.approx(a.mean()) and c["mean_method"] == pytest.approx(b.mean())
  assert c["verdict"] == "better" and not c["ci_covers_zero"]
  assert c["p_wilcoxon"] < 1e-6
  assert c["wins"] + c["ties"] + c["losses"] == c["n_pairs"] == 60 and c["wins"] > 50
  assert c["n_seeds"] == 3 and c["patients_per_seed"] == [20, 20, 20] and c["n_patients"] == 20
  assert c["mdd"] == pytest.approx(stats.MDD_FACTOR * c["se"]) and 0 < c["mdd"] < 0.05
  # the same shift on a distance metric (lower is better) is a loss
  d = stats.paired_comparison(_method(a), _method(b), "hd95/tumour", N_BOOT, 0, 0.95)
  assert d["verdict"] == "worse" and d["losses"] == c["wins"] and d["ci"] == c["ci"]


def test_identical_runs_no_difference():
  a = np.random.default_rng(1).uniform(0, 1, size=(2, 7))
  c = stats.paired_comparison(_method(a), _method(a.copy()), "dice_mean", N_BOOT, 0, 0.95)
  assert c["ci"][0] <= 0.0 <= c["ci"][1] and c["ci_covers_zero"]
  assert c["p_wilcoxon"] == 1.0 and c["mean_diff"] == 0.0 and c["mdd"] == 0.0
  assert (c["wins"], c["ties"], c["losses"]) == (0, 14, 0)
  assert c["verdict"] == "no difference detected"
  res = stats.compare({"A": _method(a), "B": _method(a)}, "A", "dice_mean", N_BOOT, 0, 0.95)
  assert res["comparisons"][0]["p_holm"] == 1.0
  assert "no difference detected" in stats.markdown(res)


def test_holm_hand_computed():
  # sorted 0.01, 0.03, 0.04 -> 3 * 0.01 = 0.03; max(0.03, 2 * 0.03) = 0.06; max(0.06, 1 * 0.04) = 0.06
  assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
  assert stats.holm([0.5, 0.01]) == pytest.approx([0.5, 0.02])
  assert stats.holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])  # capped at 1, monotone
  assert stats.holm([0.2]) == pytest.approx([0.2])


def test_compare_applies_holm_over_methods():
  rng = np.random.default_rng(2)
  a = rng.uniform(0.5, 0.9, size=(2, 15))
  methods = {"ref": _method(a), "small": _method(a + rng.normal(0.01, 0.05, a.shape)),
             "big": _method(a + rng.normal(0.05, 0.05, a.shape))}
  res = stats.compare(methods, "ref", "dice_mean", N_BOOT, 0, 0.95)
  assert [c["method"] for c in res["comparisons"]] == ["small", "big"]
  ps = [c["p_wilcoxon"] for c in res["comparisons"]]
  assert [c["p_holm"] for c in res["comparisons"]] == pytest.approx(stats.holm(ps))
  assert res["n_boot"] == N_BOOT and res["rng_seed"] == 0 and res["mdd_factor"] == 2.8


def test_single_patient_per_seed_is_a_seed_bootstrap():
  v = np.array([0.1, -0.3, 0.25, 0.05, 0.4])
  h = stats.hierarchical_bootstrap([[x] for x in v], 500, 7)
  s = stats.seed_bootstrap(v, 500, 7)
  np.testing.assert_array_equal(h, s)
  idx = np.random.default_rng(7).integers(0, 5, size=(500, 5))
  np.testing.assert_allclose(s, v[idx].mean(axis=1))
  # one seed: a plain patient bootstrap (the outer draw is trivial and comes first)
  g = np.array([1.0, 2.0, 4.0, 8.0])
  rng = np.random.default_rng(3)
  rng.integers(0, 1, size=(300, 1))
  ref = g[rng.integers(0, 4, size=(300, 4))].mean(axis=1)
  np.testing.assert_allclose(stats.hierarchical_bootstrap([g], 300, 3), ref)


def test_hierarchical_bootstrap_resamples_both_levels():
  # seeds differ (between-seed spread) and patients differ (within-seed spread): the replicate
  # spread exceeds both one-level bootstraps'.
  rng = np.random.default_rng(4)
  groups = [m + rng.normal(0, 0.2, 30) for m in (-0.2, 0.0, 0.3)]
  h = stats.hierarchical_bootstrap(groups, 4000, 0)
  seed_only = stats.seed_bootstrap([g.mean() for g in groups], 4000, 0)
  assert h.mean() == pytest.approx(np.mean([g.mean() for g in groups]), abs=0.01)
  assert h.std() > seed_only.std() * 1.01
  assert stats.hierarchical_bootstrap(groups, 4000, 0) == pytest.approx(h)  # deterministic
  with pytest.raises(ValueError):
    stats.hierarchical_bootstrap([[1.0], []], 10, 0)


def test_wilcoxon_and_pairing_details():
  from scipy import stats as sps
  d = np.array([0.3, -0.1, 0.2, 0.5, 0.05, -0.02, 0.4])
  assert stats.wilcoxon_p(d) == pytest.approx(sps.wilcoxon(d).pvalue)
  assert stats.wilcoxon_p(np.zeros(5)) == 1.0 and stats.wilcoxon_p([]) == 1.0
  a = {0: {"x": 1.0, "y": 2.0}, 1: {"x": 1.0}, 5: {"x": 0.0}}
  b = {0: {"x": 1.5, "z": 9.0}, 1: {"x": 1.0}, 7: {"x": 3.0}}
  pr = stats.pair(a, b)
  assert pr["seeds"] == [0, 1] and pr["patients"] == [["x"], ["x"]]
  assert pr["seeds_only_a"] == [5] and pr["seeds_only_b"] == [7] and pr["unpaired_patients"] == 2
  with pytest.raises(ValueError, match="no .seed, patient. pairs"):
    stats.paired_comparison({0: {"x": 1.0}}, {1: {"x": 1.0}}, "dice_mean", 10, 0, 0.95)


# ---------------------------------------------------------------------------
# report compare (CLI) on hand-written run folders
# ---------------------------------------------------------------------------
def _fake_run(wd, seed, dice, split="test", per_patient=True, algorithm="centralized"):
  os.makedirs(wd, exist_ok=True)
  json.dump({"seed": seed, "algorithm": algorithm, "fl": {"rounds": 3}},
            open(os.path.join(wd, "config.json"), "w"))
  recs = [{"id": pid, "site": "CS", "num_samples": 2, "dice": {"background": 1.0, "tumour": v},
           "iou": {"background": 1.0, "tumour": v / (2 - v)}, "hd95": {"tumour": 10 * (1 - v)},
           "dice_mean": v, "iou_mean": v / (2 - v), "hd95_mean": 10 * (1 - v)} for pid, v in dice.items()]
  res = {"algorithm": "centralized", "metrics": {split: {"dice_mean": float(np.mean(list(dice.values())))}}}
  if per_patient:
    res["per_patient"] = {split: recs, "hd95_convention": "pooled", "hd95_units": "pixels"}
  json.dump(res, open(os.path.join(wd, "results.json"), "w"))


A_VALS = {0: {"p1": 0.60, "p2": 0.70, "p3": 0.80}, 1: {"p1": 0.62, "p2": 0.66, "p3": 0.81}}
B_VALS = {0: {"p1": 0.65, "p2": 0.72, "p3": 0.86}, 1: {"p1": 0.66, "p2": 0.70, "p3": 0.88}}


@pytest.fixture
def sweeps(tmp_path):
  for name, vals in (("fedavg", A_VALS), ("dcew", B_VALS)):
    for seed, dice in vals.items():
      _fake_run(str(tmp_path / name / f"seed={seed},lr=0.01"), seed, dice)
  return tmp_path


def test_cli_compare_two_sweeps(sweeps, tmp_path, capsys):
  out = str(tmp_path / "cmp.json")
  assert report.main(["compare", str(sweeps / "fedavg"), str(sweeps / "dcew"), "--out", out,
                      "--n-boot", "1000"]) == 0
  text = capsys.readouterr().out
  assert "| method | seeds | patients / seed | pairs |" in text
  row = next(l for l in text.splitlines() if l.startswith("| dcew |"))
  cells = [c.strip() for c in row.strip("|").split("|")]
  diffs = [B_VALS[s][p] - A_VALS[s][p] for s in A_VALS for p in A_VALS[s]]
  assert cells[1:4] == ["2", "3", "6"]
  assert cells[6] == f"{np.mean(diffs):+.4f}" and cells[11] == "6 / 0 / 0"
  saved = json.load(open(out))
  c = saved["comparisons"][0]
  assert saved["reference"] == "fedavg" and saved["metric"] == "dice_mean" and saved["split"] == "test"
  assert c["method"] == "dcew" and c["seeds"] == [0, 1] and c["mean_diff"] == pytest.approx(np.mean(diffs))
  assert c["p_holm"] == c["p_wilcoxon"] and saved["n_boot"] == 1000
  # another metric, a single run as the reference, three methods -> Holm over two comparisons
  assert report.main(["compare", str(sweeps / "fedavg" / "seed=0,lr=0.01"), str(sweeps / "dcew"),
                      str(sweeps / "fedavg"), "--metric", "hd95/tumour", "--n-boot", "200"]) == 0
  text = capsys.readouterr().out
  assert "lower is better" in text and "a single common seed" in text and "seeds left unpaired: 1" in text


def test_cli_compare_one_sweep_of_two_algorithms(tmp_path, capsys):
  """A 'seed=...;algorithm=...' sweep in one folder: PATH@algorithm=NAME selects each method."""
  for name, vals in (("fedavg", A_VALS), ("dcew", B_VALS)):
    for seed, dice in vals.items():
      _fake_run(str(tmp_path / "cmp" / f"seed={seed},algorithm={name}"), seed, dice, algorithm=name)
  cmp = str(tmp_path / "cmp")
  assert report.main(["compare", cmp + "@algorithm=fedavg", cmp + "@algorithm=dcew,fl.rounds=3",
                      "--n-boot", "200"]) == 0
  text = capsys.readouterr().out
  assert "against `algorithm=fedavg`" in text
  row = next(l for l in text.splitlines() if l.startswith("| algorithm=dcew,fl.rounds=3 |"))
  assert "6 / 0 / 0" in row
  assert report.main(["compare", cmp, cmp + "@algorithm=dcew"]) == 2
  assert "two runs with seed 0" in capsys.readouterr().err
  assert report.main(["compare", cmp + "@algorithm=fedavg", cmp + "@algorithm=nope"]) == 2
  assert "no run matches algorithm=nope" in capsys.readouterr().err


def test_cli_compare_errors(sweeps, tmp_path, capsys):
  def err(args):
    assert report.main(["compare", *args]) == 2
    e = capsys.readouterr().err
    assert e.startswith("error: ") and e.count("\n") == 1
    return e
  os.remove(sweeps / "dcew" / "seed=1,lr=0.01" / "results.json")
  assert "no results.json" in err([str(sweeps / "fedavg"), str(sweeps / "dcew")])
  _fake_run(str(tmp_path / "other" / "s5"), 5, {"p1": 0.5})
  assert "no common seeds" in err([str(sweeps / "fedavg"), str(tmp_path / "other")])
  _fake_run(str(tmp_path / "old" / "s0"), 0, {"p1": 0.5}, per_patient=False)
  assert "no per_patient records" in err([str(sweeps / "fedavg"), str(tmp_path / "old")])
  assert "no per-patient metric 'dice/WT'" in err([str(sweeps / "fedavg"), str(tmp_path / "other"),
                                                   "--metric", "dice/WT"])
  assert "does not exist" in err([str(sweeps / "fedavg"), str(tmp_path / "nothing")])
  assert "at least one more" in err([str(sweeps / "fedavg")])


# ---------------------------------------------------------------------------
# per-patient records (evaluation.patient_record, train.finish)
# ---------------------------------------------------------------------------
def test_patient_record_hand_computed():
  from fedjax_seg.data.pipeline import PatientArrays
  labels = np.zeros((2, 4, 4), np.int32)
  labels[0, 1:3, 1:3] = 1                  # 4 tumour voxels, slice 1 empty
  pred = np.zeros_like(labels)
  pred[0, 1:3, 1:4] = 1                    # 6 predicted on slice 0 ...
  pred[1, 0, 0] = 1                        # ... and 1 false positive on slice 1
  p = PatientArrays("TCGA_CS_1", "CS", np.zeros((2, 4, 4, 1), np.float32), labels)
  r = evaluation.patient_record(p, pred, ("background", "tumour"), use_spacing=False)
  # tumour tp 4, fp 3, fn 0; background: 28 true, 25 predicted, all correct
  assert r["dice"]["tumour"] == pytest.approx(8 / 11) and r["iou"]["tumour"] == pytest.approx(4 / 7)
  assert r["dice"]["background"] == pytest.approx(50 / 53) and r["dice_mean"] == pytest.approx(8 / 11)
  assert r["gt_voxels"] == {"tumour": 4} and r["id"] == "TCGA_CS_1" and r["site"] == "CS"
  # HD95 on the stacked [2, 4, 4] volume in pixels, as metrics.hd95 with unit spacing
  assert r["hd95"]["tumour"] == pytest.approx(metrics.hd95(pred == 1, labels == 1, (1.0, 1.0, 1.0)))
  assert r["hd95_mean"] == r["hd95"]["tumour"] > 0
  with pytest.raises(ValueError, match="prediction"):
    evaluation.patient_record(p, pred[:1], ("background", "tumour"), use_spacing=False)


def test_finish_writes_per_patient_records_3d_brats(tmp_path):
  """train.finish with a 1x1x1-conv model on a tiny 3D BraTS phantom: records in mm with regions."""
  import flax.linen as nn
  import jax
  from fedjax_seg import models, steps, train
  from fedjax_seg.data import phantom, pipeline

  class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return nn.Conv(4, (1, 1, 1))(x)

  root = tmp_path / "brats"
  phantom.write_brats(root, seed=0, sites=("CS", "DU"), patients_per_site=2, slices_per_patient=8, size=16)
  data = ml_collections.ConfigDict(dict(
      layout="brats", root=str(root), cache_dir="", image_size=8, ndim=3, depth=4,
      target_spacing=(2.0, 2.0, 2.0), normalize="zscore", split_seed=0, stratify_by_site=False,
      val_fraction=0.25, test_fraction=0.34, skip_bad_patients=False, min_foreground_fraction=0.0,
      frames=("ED", "ES"), verbose=False, fold=None, num_folds=5, n4=dict(enabled=False)))
  ds = pipeline.build_dataset(data, verbose=False)
  fns = models.ModelFns(Tiny())
  variables = fns.init(jax.random.PRNGKey(0), np.zeros((1, 4, 8, 8, 4), np.float32))
  eval_batch = jax.jit(steps.make_eval_batch(fns, "dice_ce", 4))
  config = ml_collections.ConfigDict(dict(algorithm="centralized", eval_batch_size=2))
  os.makedirs(tmp_path / "run")
  res = train.finish(config, str(tmp_path / "run"), fns, variables, ds, eval_batch, [], extra={})
  saved = json.load(open(tmp_path / "run" / "results.json"))
  pp = saved["per_patient"]
  assert pp["hd95_units"] == "mm" and pp["hd95_convention"] == saved["hd95_convention"] == "pooled"
  for split in ("val", "test"):
    assert [r["id"] for r in pp[split]] == ds.splits[split]
    for r in pp[split]:
      assert set(r["hd95"]) == {"necrotic", "edema", "enhancing"}
      assert set(r["region_dice"]) == set(r["region_hd95"]) == {"WT", "TC", "ET"}
  # one volume per patient: the split's mean HD95 (region_metrics) = the mean of the records'
  for region in ("WT", "TC", "ET"):
    assert res["region_metrics"]["test"][f"hd95/{region}"] == pytest.approx(
        np.mean([r["region_hd95"][region] for r in pp["test"]]))
