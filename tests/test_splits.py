"""Patient splits: the historical split, k-fold by patient stratified by site, split_seed from the run seed."""
import collections

import ml_collections
import numpy as np
import pytest

from fedjax_seg.data import pipeline, preprocess

# 5 sites of uneven size (ACDC-like groups plus a small hospital): 37 patients.
SITES = {"DCM": 9, "HCM": 8, "MINF": 7, "NOR": 10, "RV": 3}
IDS = [f"{site}_{i:02d}" for site, n in SITES.items() for i in range(n)]
STRATA = {p: p.split("_")[0] for p in IDS}


def _cfg(**kw):
  return ml_collections.ConfigDict({**dict(split_seed=0, val_fraction=0.2, test_fraction=0.15, fold=None, num_folds=5), **kw})


@pytest.mark.parametrize("k", [2, 3, 5])
def test_folds_partition_the_patients_stratified_by_site(k):
  tests = [preprocess.kfold_split(IDS, f, k, seed=4, strata=STRATA)["test"] for f in range(k)]
  flat = [p for t in tests for p in t]
  assert sorted(flat) == sorted(IDS) and len(flat) == len(set(flat))  # disjoint, every patient once
  assert max(map(len, tests)) - min(map(len, tests)) <= 1
  for site in SITES:
    counts = [sum(STRATA[p] == site for p in t) for t in tests]
    assert max(counts) - min(counts) <= 1, (site, counts)
  assign = preprocess.kfold_assignment(IDS, k, 4, STRATA)
  assert {p: f for f, t in enumerate(tests) for p in t} == assign


def test_kfold_train_val_test_disjoint_and_val_fraction():
  for f in range(5):
    s = preprocess.kfold_split(IDS, f, 5, seed=1, val_fraction=0.2, strata=STRATA)
    sets = [set(s[n]) for n in ("train", "val", "test")]
    assert set.union(*sets) == set(IDS) and sum(map(len, sets)) == len(IDS)
    rest = len(IDS) - len(s["test"])
    assert abs(len(s["val"]) - 0.2 * rest) <= len(SITES) / 2  # rounded per site
    assert {STRATA[p] for p in s["val"]} >= {"DCM", "HCM", "MINF", "NOR"}  # drawn per site
    assert s == preprocess.kfold_split(IDS, f, 5, seed=1, val_fraction=0.2, strata=STRATA)


def test_kfold_deterministic_per_seed_and_seeds_differ():
  a = [preprocess.kfold_split(IDS, 0, 5, seed=s, strata=STRATA)["test"] for s in range(6)]
  b = [preprocess.kfold_split(IDS, 0, 5, seed=s, strata=STRATA)["test"] for s in range(6)]
  assert a == b
  assert len({tuple(t) for t in a}) == 6  # every seed its own test patients
  # without strata: one stratum, still a partition
  tests = [preprocess.kfold_split(IDS, f, 4, seed=0)["test"] for f in range(4)]
  assert sorted(p for t in tests for p in t) == sorted(IDS)


def test_kfold_errors():
  with pytest.raises(ValueError, match="data.fold=5"):
    preprocess.kfold_split(IDS, 5, 5, seed=0)
  with pytest.raises(ValueError, match="at least 2 folds"):
    preprocess.kfold_split(IDS, 0, 1, seed=0)
  with pytest.raises(ValueError, match="only 3 patients"):
    preprocess.kfold_split(IDS[:3], 0, 4, seed=0)


def test_make_splits_default_unchanged_and_fold_keys():
  # no fold key: exactly the historical split
  assert pipeline.make_splits(IDS, _cfg(), STRATA) == preprocess.split_patients(IDS, 0, 0.2, 0.15, STRATA)
  assert pipeline.make_splits(IDS, _cfg(fold=None), STRATA) == pipeline.make_splits(IDS, _cfg(), STRATA)
  s = pipeline.make_splits(IDS, _cfg(fold=2, num_folds=4, split_seed=3), STRATA)
  assert s == preprocess.kfold_split(IDS, 2, 4, 3, 0.2, STRATA)
  assert pipeline.make_splits(IDS, _cfg(fold=1), STRATA) == preprocess.kfold_split(IDS, 1, 5, 0, 0.2, STRATA)


def test_split_seed_from_the_run_seed():
  cfg = _cfg(split_seed="seed")
  by_seed = [pipeline.make_splits(IDS, cfg, STRATA, seed=s) for s in range(4)]
  assert by_seed[1] == pipeline.make_splits(IDS, _cfg(split_seed=1), STRATA)
  assert len({tuple(s["test"]) for s in by_seed}) == 4  # the test patients vary with the seed
  assert by_seed[2] == pipeline.make_splits(IDS, cfg, STRATA, seed=2)  # deterministic
  folds = [pipeline.make_splits(IDS, _cfg(split_seed="seed", fold=0), STRATA, seed=s)["test"] for s in (0, 1)]
  assert folds[0] != folds[1]
  with pytest.raises(ValueError, match="needs the run's seed"):
    pipeline.make_splits(IDS, cfg, STRATA)
  # -1: the same, and accepted by an int-typed config field (e.g. --config.data.split_seed=-1)
  typed = _cfg()
  typed.split_seed = -1
  assert pipeline.make_splits(IDS, typed, STRATA, seed=3) == pipeline.make_splits(IDS, cfg, STRATA, seed=3)
  with pytest.raises(ValueError, match="expected an int >= 0"):
    pipeline.make_splits(IDS, _cfg(split_seed=-2), STRATA)
  with pytest.raises(ValueError, match="expected an int"):
    pipeline.make_splits(IDS, _cfg(split_seed="random"), STRATA)


def test_build_dataset_with_folds(data_cache):
  """A phantom LGG data set (3 sites x 4 patients) in 4 folds: every patient tested once, per-site balance."""
  from conftest import tiny_config
  c = tiny_config(data_cache).data
  c.fold = 0
  c.num_folds = 4
  tests = []
  for f in range(4):
    c.fold = f
    ds = pipeline.build_dataset(c, verbose=False)
    tests.append(ds.splits["test"])
    assert not set(ds.splits["test"]) & (set(ds.splits["train"]) | set(ds.splits["val"]))
  assert sorted(p for t in tests for p in t) == sorted(ds.patients)
  per_site = collections.Counter((ds.patients[p].site, f) for f, t in enumerate(tests) for p in t)
  for site in {p.site for p in ds.patients.values()}:
    counts = [per_site[(site, f)] for f in range(4)]
    assert max(counts) - min(counts) <= 1
  assert np.all([len(t) == 3 for t in tests])
