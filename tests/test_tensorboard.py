"""TensorBoard event files written by runlog.MetricsLog, read back without TensorFlow/TensorBoard."""
import glob
import math
import os
import struct
import sys
import time
import warnings

import numpy as np
import pytest

from fedjax_seg import runlog

pytest.importorskip("tensorboardX")


def read_events(path):
  """Parse the TFRecord framing (u64 length, masked crc32c of it, data, masked crc32c)."""
  from tensorboardX.proto import event_pb2
  from tensorboardX.record_writer import masked_crc32c
  events = []
  with open(path, "rb") as f:
    buf = f.read()
  i = 0
  while i < len(buf):
    header = buf[i:i + 8]
    (n,) = struct.unpack("<Q", header)
    assert struct.unpack("<I", buf[i + 8:i + 12])[0] == masked_crc32c(header)
    data = buf[i + 12:i + 12 + n]
    assert struct.unpack("<I", buf[i + 12 + n:i + 16 + n])[0] == masked_crc32c(data)
    i += 16 + n
    e = event_pb2.Event()
    e.ParseFromString(data)
    events.append(e)
  return events


def event_files(workdir):
  return sorted(glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*")))


def scalars_by_step(path):
  """{step: {tag: value}} of the summary events in one file."""
  out = {}
  for e in read_events(path):
    if e.HasField("summary"):
      out.setdefault(e.step, {}).update({v.tag: v.simple_value for v in e.summary.value})
  return out


def rows(rounds):
  return [{"round": r, "train_loss": 1.0 / (r + 1), "val_dice_mean": np.float32(0.1 * r),
           "weights": [0.25, 0.75 - 0.1 * r], "client": {"a": r, "b": [r, 2 * r]},
           "excluded": ["x"], "failed": r == 2, "note": "text", "missing": None,
           "nan_loss": float("nan"), "arr": np.arange(2) + r}
          for r in rounds]


def expected(row):
  r = row["round"]
  return {"train_loss": 1.0 / (r + 1), "val_dice_mean": 0.1 * r, "weights/0": 0.25,
          "weights/1": 0.75 - 0.1 * r, "client/a": r, "client/b/0": r, "client/b/1": 2 * r,
          "failed": float(r == 2), "nan_loss": float("nan"), "arr/0": r, "arr/1": r + 1}


def assert_matches(got, want_rows):
  assert sorted(got) == [r["round"] for r in want_rows]
  for r in want_rows:
    g, w = got[r["round"]], expected(r)
    assert set(g) == set(w), (set(g) ^ set(w))
    for tag, v in w.items():
      assert (math.isnan(g[tag]) and math.isnan(v)) or g[tag] == pytest.approx(v, rel=1e-6), tag


def eventually(check, timeout=10.0):
  """``check()`` until it passes: the SummaryWriter's thread writes a row within runlog.TB_FLUSH_S s."""
  t_end = time.time() + timeout
  while True:
    try:
      return check()
    except (AssertionError, struct.error):  # not yet (or half) written
      if time.time() > t_end:
        raise
      time.sleep(0.05)


def test_rows_become_scalars_live(tmp_path):
  wd = str(tmp_path)
  log = runlog.MetricsLog(wd, key="round")
  rs = rows(range(3))
  for i, r in enumerate(rs):
    log.append(r)
    (f,) = event_files(wd)
    # written and flushed by the writer thread: readable before close()
    eventually(lambda: assert_matches(scalars_by_step(f), rs[:i + 1]), timeout=runlog.TB_FLUSH_S + 5)
  evs = read_events(f)
  assert evs[0].file_version == "brain.Event:2"
  log.close()
  log.close()  # idempotent
  assert_matches(scalars_by_step(f), rs)
  # metrics.jsonl is unchanged by the TensorBoard writer (NaN -> null there)
  assert runlog.MetricsLog(wd, resume_from=99, key="round").rows[1]["nan_loss"] is None


def test_resume_new_file_no_duplicates(tmp_path):
  wd = str(tmp_path)
  log = runlog.MetricsLog(wd, key="round")
  for r in rows(range(4)):  # rounds 0..3 logged, then "crash" with checkpoint at round 2
    log.append(r)
  del log
  (first,) = event_files(wd)
  log = runlog.MetricsLog(wd, resume_from=2, key="round")
  assert [r["round"] for r in log.rows] == [0, 1, 2]
  for r in rows(range(3, 5)):
    log.append(r)
  log.close()
  first2, second = event_files(wd)
  assert first2 == first
  assert_matches(scalars_by_step(first), rows(range(4)))  # old file untouched
  evs = read_events(second)
  starts = [e for e in evs if e.HasField("session_log")]
  assert len(starts) == 1 and starts[0].step == 3  # TensorBoard purges steps >= 3 of older files
  assert evs.index(starts[0]) < min(i for i, e in enumerate(evs) if e.HasField("summary"))
  assert_matches(scalars_by_step(second), rows(range(3, 5)))  # kept rows 0..2 not rewritten

  # a fresh run (no resume) in the same workdir starts over: old event files removed
  log = runlog.MetricsLog(wd, key="round")
  log.append(rows([0])[0])
  log.close()
  (only,) = event_files(wd)
  assert_matches(scalars_by_step(only), rows([0]))


def test_resume_without_old_event_files_backfills(tmp_path):
  wd = str(tmp_path)
  log = runlog.MetricsLog(wd, key="round", tensorboard=False)
  for r in rows(range(3)):
    log.append(r)
  assert not event_files(wd)
  log = runlog.MetricsLog(wd, resume_from=1, key="round")
  log.append(rows([2])[0])
  log.close()
  (f,) = event_files(wd)
  got = scalars_by_step(f)  # rows from JSON: NaN was stored as null, so no nan_loss for 0, 1
  assert sorted(got) == [0, 1, 2]
  assert "nan_loss" not in got[0] and got[1]["weights/1"] == pytest.approx(0.65)
  assert_matches({2: got[2]}, rows([2]))


def test_without_tensorboardx_warns_once_and_keeps_jsonl(tmp_path, monkeypatch):
  monkeypatch.setattr(runlog, "_TBX", None)
  for name in [m for m in sys.modules if m.split(".")[0] == "tensorboardX"] + ["tensorboardX"]:
    monkeypatch.setitem(sys.modules, name, None)  # as if not installed
  os.makedirs(tmp_path / "a")
  os.makedirs(tmp_path / "b")
  with pytest.warns(RuntimeWarning, match="tensorboardX unavailable"):
    log = runlog.MetricsLog(str(tmp_path / "a"), key="round")
  log.append(rows([0])[0])
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    log2 = runlog.MetricsLog(str(tmp_path / "b"), key="round")  # no second warning
  log2.append(rows([0])[0])
  assert not event_files(str(tmp_path / "a")) and len(log.rows) == 1
  assert os.path.exists(tmp_path / "b" / "metrics.jsonl")


def test_per_client_lists_tagged_by_site(tmp_path):
  wd = str(tmp_path)
  log = runlog.MetricsLog(wd, key="round", clients=("siteA", "site B"))
  log.append({"round": 1, "train_loss": 0.5, "weights": [0.25, 0.75], "client_val_dice": [0.5, None],
              "client_train_loss": [1.0, float("nan")], "client_other": [1, 2, 3], "extra": [4, 5]})
  log.close()
  (f,) = event_files(wd)
  got = scalars_by_step(f)[1]
  assert math.isnan(got.pop("client_train_loss/site_B"))  # NaN kept; "site B" cleaned by tensorboardX
  assert got == {"train_loss": 0.5, "weights/siteA": 0.25, "weights/site_B": 0.75,
                 "client_val_dice/siteA": 0.5, "client_train_loss/siteA": 1.0,
                 "client_other/0": 1, "client_other/1": 2, "client_other/2": 3,  # not one per client
                 "extra/0": 4, "extra/1": 5}  # not a per-client key
  # metrics.jsonl keeps the lists (the source of truth)
  assert runlog.read_metrics(os.path.join(wd, "metrics.jsonl"))[0]["weights"] == [0.25, 0.75]


def test_overlays_image_and_fresh_run_clears_sub_runs(tmp_path):
  wd = str(tmp_path)
  rng = np.random.default_rng(0)
  images = rng.random((3, 16, 12, 2)).astype(np.float32)
  labels = (images[..., 1] > 0.7).astype(np.int32)
  runlog.tb_overlays(wd, images, labels, 1 - labels, step=7)
  (f,) = glob.glob(os.path.join(wd, "tensorboard", "overlays", "events.out.tfevents.*"))
  imgs = [(e.step, v) for e in read_events(f) if e.HasField("summary") for v in e.summary.value
          if v.HasField("image")]
  assert len(imgs) == 1
  step, v = imgs[0]
  assert step == 7 and v.tag == "overlays/test"
  assert (v.image.height, v.image.width, v.image.colorspace) == (3 * 16, 3 * 12, 3)
  runlog.MetricsLog(wd, key="round").close()  # a fresh run: the old overlays go too
  assert not os.path.exists(os.path.join(wd, "tensorboard", "overlays"))


def test_sweep_hparams(tmp_path):
  import json

  from fedjax_seg import sweep
  points = [{"seed": 0, "optimizer.lr": 1e-3, "data.target_spacing": (1.0, 1.0)},
            {"seed": 1, "optimizer.lr": 1e-2, "data.target_spacing": None}]
  dirs = []
  for i, p in enumerate(points):
    d = tmp_path / sweep.point_name(p)
    d.mkdir()
    (d / "results.json").write_text(json.dumps(
        {"metrics": {"val": {"dice_mean": 0.5 + i}, "test": {"dice_mean": 0.25 + i}}}))
    dirs.append(str(d))
  out = sweep.write_hparams(str(tmp_path), points, dirs)
  assert out == os.path.join(str(tmp_path), "hparams")
  for i, d in enumerate(dirs):
    (f,) = glob.glob(os.path.join(out, os.path.basename(d), "events.out.tfevents.*"))
    evs = read_events(f)
    plugins = {v.metadata.plugin_data.plugin_name for e in evs if e.HasField("summary")
               for v in e.summary.value if v.metadata.plugin_data.plugin_name}
    assert plugins == {"hparams"}
    got = scalars_by_step(f)
    vals = {t: x for s in got.values() for t, x in s.items() if t.startswith("hparams/")}
    assert vals == {"hparams/val_dice_mean": 0.5 + i, "hparams/test_dice_mean": 0.25 + i}
