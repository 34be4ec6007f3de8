"""Workdir safety: a bad command never changes an earlier run; corrupt files are named;
a corrupt latest checkpoint falls back to the previous one; a full disk loses nothing.

One tiny federated run (2 rounds) is made once per module; every case works on a copy
of it, runs launch.py in this process (``launch.run_cli``) and, for the refused
commands, checks exit code 2, exactly one line on stderr naming the key or file, and
every file of the copy byte-identical afterwards.
"""
import errno
import glob
import json
import os
import shutil

import orbax.checkpoint as ocp
import pytest

import launch
from fedjax_seg import runlog
from _helpers import read_tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FEDAVG = os.path.join(ROOT, "configs", "lgg_fedavg.py")
TINY = {"data.phantom.size": 16, "data.phantom.patients_per_site": 4,
        "data.phantom.slices_per_patient": 2, "data.image_size": 8, "model.base": 2,
        "model.depth": 2, "model.dropout": 0.0, "fl.local_steps": 1, "fl.client_batch_size": 2,
        "fl.stats_samples": 2, "fl.client_strategy": "vmap", "fl.step_strategy": "scan",
        "fl.eval_clients": False, "eval_batch_size": 8, "fl.rounds": 2}


def command(workdir, data_cache, *extra, **overrides):
  ov = {**TINY, "data.cache_dir": data_cache, **overrides}
  return (["launch.py", "--config", FEDAVG, "--workdir", str(workdir)]
          + [f"--config.{k}={v}" for k, v in ov.items()] + list(extra))


@pytest.fixture(scope="module")
def earlier(tmp_path_factory, data_cache):
  wd = tmp_path_factory.mktemp("earlier") / "run"
  assert launch.run_cli(command(wd, data_cache)) == 0
  assert [r["round"] for r in runlog.read_metrics(str(wd / "metrics.jsonl"))] == [0, 1, 2]
  return wd


@pytest.fixture
def copy(earlier, tmp_path):
  wd = tmp_path / "run"
  shutil.copytree(earlier, wd)
  return wd


def run(capfd, argv):
  rc = launch.run_cli(argv)
  out, err = capfd.readouterr()
  return rc, out, err


def refused(capfd, argv, folder, *needles):
  """Runs argv, which must be refused: exit 2, one stderr line holding every needle,
  ``folder`` byte-identical afterwards. Returns the line."""
  before = read_tree(folder)
  rc, out, err = run(capfd, argv)
  lines = err.splitlines()
  assert rc == 2, (out, err)
  assert len(lines) == 1, err
  assert lines[0].startswith("error: "), lines[0]
  for n in needles:
    assert n in lines[0], (n, lines[0])
  after = read_tree(folder)
  assert sorted(after) == sorted(before), set(after) ^ set(before)
  assert [k for k in before if before[k] != after[k]] == []
  return lines[0]


def _garble_checkpoint(wd, step, how):
  d = os.path.join(wd, "checkpoints", str(step))
  if how == "metadata":  # orbax cannot parse its metadata
    p = os.path.join(d, "default", "_METADATA")
    with open(p, "r+b") as f:
      f.truncate(os.path.getsize(p) // 2)
  elif how == "arrays":  # every array chunk overwritten: tensorstore cannot decode them
    chunks = glob.glob(os.path.join(d, "default", "**", "d", "*"), recursive=True)
    assert chunks
    for p in chunks:
      open(p, "wb").write(b"\x5a" * os.path.getsize(p))
  else:  # "digest": the bytes read back are not those saved (what a flipped bit that
    # still decodes gives): only the sha256 recorded at save time can tell
    p = os.path.join(wd, "checkpoints", runlog.DIGESTS)
    digests = json.load(open(p))
    digests[str(step)] = "0" * 64
    open(p, "w").write(json.dumps(digests))


# ---------------------------------------------------------------------------
# Refused commands: the earlier run is untouched.
# ---------------------------------------------------------------------------
DIFFERENT = [
    ("local_steps", {"fl.local_steps": 2}, "fl.local_steps 1 -> 2"),
    ("model_base", {"model.base": 4}, "model.base 2 -> 4"),
    ("seed", {"seed": 1}, "seed 0 -> 1"),
    ("algorithm", {"algorithm": "fedcostw"}, "algorithm 'fedavg' -> 'fedcostw'"),
    ("lr", {"optimizer.lr": 0.01}, "optimizer.lr 0.001 -> 0.01"),
    ("loss", {"loss": "dice"}, "loss 'dice_ce' -> 'dice'"),
    ("image_size", {"data.image_size": 16, "data.phantom.size": 32},
     "data.image_size 8 -> 16, data.phantom.size 16 -> 32"),
    ("partition", {"fl.partition": "iid", "fl.num_clients": 3}, "fl.num_clients 0 -> 3, fl.partition"),
    ("dp", {"fl.dp.enabled": True, "fl.dp.clip_norm": 2.0}, "fl.dp.clip_norm 1.0 -> 2.0"),
]


@pytest.mark.parametrize("name, overrides, needle", DIFFERENT, ids=[d[0] for d in DIFFERENT])
def test_different_config_is_refused(name, overrides, needle, copy, data_cache, capfd):
  refused(capfd, command(copy, data_cache, **overrides), copy,
          f"{copy}/config.json: this workdir holds a run with a different config (", needle, "--fresh")


def test_many_differences_name_eight_keys(copy, data_cache, capfd):
  ov = {"seed": 3, "model.base": 4, "fl.local_steps": 3, "fl.client_batch_size": 3, "fl.stats_samples": 3,
        "optimizer.lr": 0.01, "optimizer.b1": 0.8, "fl.norm_k": 5.0, "model.dropout": 0.25, "fl.prox_mu": 0.1}
  line = refused(capfd, command(copy, data_cache, **ov), copy, "and 2 more")
  assert line.count(" -> ") == 8


VALIDATION = [
    ("bad_value", {"fl.rounds": 0}, "config.fl.rounds=0:"),
    ("bad_lr", {"optimizer.lr": "nan"}, "config.optimizer.lr=nan:"),
    ("bad_type", {"fl.local_steps": "x"}, "config.fl.local_steps='x': expected int"),
    ("unknown_key", {"fl.roundz": 3}, "unknown config key fl.roundz (did you mean fl.rounds?)"),
    ("fewer_rounds", {"fl.rounds": 1}, "checkpoints: the latest checkpoint is at step 2, past config.fl.rounds=1"),
]


@pytest.mark.parametrize("name, overrides, needle", VALIDATION, ids=[v[0] for v in VALIDATION])
def test_invalid_command_leaves_the_run_alone(name, overrides, needle, copy, data_cache, capfd):
  refused(capfd, command(copy, data_cache, **overrides), copy, needle)


def test_workdir_that_is_a_file(tmp_path, data_cache, capfd):
  f = tmp_path / "not_a_dir"
  f.write_bytes(b"precious")
  refused(capfd, command(f, data_cache), tmp_path, f"{f}: exists and is not a folder")
  refused(capfd, command(f, data_cache, "--fresh"), tmp_path, f"{f}: exists and is not a folder")


def test_workdir_below_a_file(copy, data_cache, capfd):
  refused(capfd, command(copy / "config.json" / "sub", data_cache), copy, "Not a directory",
          "config.json")


CORRUPT_FILES = [
    ("config_garbage", "config.json", b"{\"seed\": 0, \"fl\": {", "config.json: corrupt, not valid JSON"),
    ("config_list", "config.json", b"[1, 2]", "config.json: corrupt, a JSON list"),
    ("config_binary", "config.json", b"\xff\xfe\x00garbage", "config.json: corrupt"),
    ("metrics_bad_line", "metrics.jsonl", None, "metrics.jsonl: corrupt at line 2"),
    ("metrics_truncated", "metrics.jsonl", "truncate", "metrics.jsonl: corrupt at line 3"),
    ("metrics_not_object", "metrics.jsonl", b"[0]\n", "metrics.jsonl: corrupt at line 1"),
]


@pytest.mark.parametrize("name, fname, content, needle", CORRUPT_FILES, ids=[c[0] for c in CORRUPT_FILES])
def test_corrupt_file_is_named(name, fname, content, needle, copy, data_cache, capfd):
  p = copy / fname
  if content is None:
    lines = p.read_bytes().splitlines(keepends=True)
    p.write_bytes(lines[0] + b"{\"round\": 1, oops\n" + b"".join(lines[2:]))
  elif content == "truncate":
    data = p.read_bytes()
    p.write_bytes(data[:-40])
  else:
    p.write_bytes(content)
  refused(capfd, command(copy, data_cache), copy, f"{copy}/{needle}", "--fresh")


@pytest.mark.parametrize("how", ["metadata", "arrays", "digest"])
def test_no_readable_checkpoint_is_one_line(how, copy, data_cache, capfd):
  for step in (1, 2):
    _garble_checkpoint(copy, step, how)
  line = refused(capfd, command(copy, data_cache), copy,
                 f"{copy}/checkpoints: no checkpoint can be restored (step 2: ", "step 1: ", "--fresh")
  if how == "digest":  # caught by the digest, not by orbax
    assert "differs from the sha256 recorded when it was saved" in line


# ---------------------------------------------------------------------------
# Commands that run.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["arrays", "digest"])
def test_corrupt_latest_checkpoint_falls_back_to_the_previous(how, copy, earlier, data_cache, capfd):
  _garble_checkpoint(copy, 2, how)
  rc, out, err = run(capfd, command(copy, data_cache))
  assert rc == 0, err
  assert (f"[checkpoint] warning: the checkpoint of step 2 in {copy}/checkpoints cannot be restored"
          in out)
  assert "resumed from checkpoint at round 1" in out
  assert os.path.isdir(copy / runlog.CORRUPT_DIR / "2")
  assert runlog.checkpoint_steps(str(copy)) == [1, 2]
  assert [r["round"] for r in runlog.read_metrics(str(copy / "metrics.jsonl"))] == [0, 1, 2]
  # the re-run round 2 equals the lost one bit for bit
  assert (copy / "final_model.msgpack").read_bytes() == (earlier / "final_model.msgpack").read_bytes()


def test_fresh_moves_the_old_run_aside(copy, earlier, data_cache, capfd):
  """A config that differs (seed: another init, the same compiled round) runs with --fresh."""
  before = read_tree(copy)
  rc, out, err = run(capfd, command(copy, data_cache, "--fresh", seed=1))
  assert rc == 0, err
  moved = glob.glob(f"{copy}.old-*")
  assert len(moved) == 1 and f"moved to {moved[0]}" in out
  assert read_tree(moved[0]) == before  # the old run, byte for byte
  assert json.load(open(copy / "config.json"))["seed"] == 1
  assert [r["round"] for r in runlog.read_metrics(str(copy / "metrics.jsonl"))] == [0, 1, 2]
  assert "resumed" not in out
  assert (copy / "final_model.msgpack").read_bytes() != before["final_model.msgpack"]


def test_resumable_keys_may_change(copy, data_cache, capfd):
  rc, out, err = run(capfd, command(copy, data_cache, **{"fl.eval_every": 2, "eval_batch_size": 4}))
  assert rc == 0, err
  cfg = json.load(open(copy / "config.json"))
  assert cfg["fl"]["eval_every"] == 2 and cfg["eval_batch_size"] == 4
  assert {"fl.rounds", "num_epochs", "fl.eval_every", "compile_cache_dir"} <= runlog.RESUMABLE_KEYS
  assert not {"seed", "model.base", "fl.local_steps", "optimizer.lr", "algorithm"} & runlog.RESUMABLE_KEYS


def test_key_newer_than_the_run(copy, data_cache, capfd):
  """A run made before fl.prox_mu existed resumes; overriding the new key is a difference."""
  stored = json.load(open(copy / "config.json"))
  del stored["fl"]["prox_mu"]
  (copy / "config.json").write_text(runlog.json_text(stored))
  refused(capfd, command(copy, data_cache, **{"fl.prox_mu": 0.2}), copy,
          "different config (fl.prox_mu (absent) -> 0.2)")
  rc, out, err = run(capfd, command(copy, data_cache))
  assert rc == 0, err
  assert "config.json in" in out and "updated (fl.prox_mu)" in out
  assert json.load(open(copy / "config.json"))["fl"]["prox_mu"] == 0.0


def _fail_fsync_for(monkeypatch, suffix):
  real = os.fsync

  def fsync(fd):
    if os.readlink(f"/proc/self/fd/{fd}").endswith(suffix):
      raise OSError(errno.ENOSPC, "No space left on device")
    return real(fd)
  monkeypatch.setattr(os, "fsync", fsync)


def _write_fails_on_full_disk(capfd, monkeypatch, copy, data_cache, name):
  """Three rounds in ``copy`` with ENOSPC on the fsync of ``name``.tmp: exit 2, one line naming ``name``."""
  with monkeypatch.context() as m:
    _fail_fsync_for(m, name + ".tmp")
    rc, out, err = run(capfd, command(copy, data_cache, **{"fl.rounds": 3}))
  assert rc == 2 and err.splitlines() == [
      f"error: {copy}/{name}: cannot write it (no space left on device); the previous "
      f"version is unchanged"]


def test_full_disk_loses_nothing(copy, data_cache, capfd, monkeypatch):
  """ENOSPC while saving the checkpoint of round 3, then while writing metrics.jsonl,
  then results.json: each is one line; the checkpoint of round 2 (then 3) and the
  metrics stay intact; the same command then completes the run."""
  files = lambda: {f: (copy / f).read_bytes() for f in ("metrics.jsonl", "metrics.csv", "results.json",
                                                       "checkpoints/digests.json")}
  before = files()
  real_save = ocp.CheckpointManager.save

  def full_disk_save(self, step, *a, **k):  # a partial temporary folder, then ENOSPC
    tmp = os.path.join(str(self.directory), f"{step}.orbax-checkpoint-tmp-1")
    os.makedirs(os.path.join(tmp, "default"))
    open(os.path.join(tmp, "default", "partial"), "wb").write(b"\0" * 100)
    raise OSError(errno.ENOSPC, "No space left on device")
  with monkeypatch.context() as m:
    m.setattr(ocp.CheckpointManager, "save", full_disk_save)
    rc, out, err = run(capfd, command(copy, data_cache, **{"fl.rounds": 3}))
  assert rc == 2 and err.splitlines() == [
      f"error: {copy}/checkpoints: cannot save the checkpoint of round 3 (no space left on device); "
      f"the checkpoint of round 2 and metrics.jsonl up to it are intact: free space and re-run the "
      f"same command to resume"]
  assert ocp.CheckpointManager.save is real_save
  assert files() == before and sorted(os.listdir(copy / "checkpoints")) == ["1", "2", "digests.json"]

  _write_fails_on_full_disk(capfd, monkeypatch, copy, data_cache, "metrics.jsonl")
  assert files() == before and not (copy / "metrics.jsonl.tmp").exists()
  assert runlog.checkpoint_steps(str(copy)) == [1, 2]

  _write_fails_on_full_disk(capfd, monkeypatch, copy, data_cache, "results.json")
  assert (copy / "results.json").read_bytes() == before["results.json"]
  assert runlog.checkpoint_steps(str(copy)) == [2, 3]

  rc, out, err = run(capfd, command(copy, data_cache, **{"fl.rounds": 3}))
  assert rc == 0, err
  assert json.load(open(copy / "results.json"))["rounds"] == 3
  assert [r["round"] for r in runlog.read_metrics(str(copy / "metrics.jsonl"))] == [0, 1, 2, 3]


def test_config_diff_and_unit_helpers(tmp_path):
  old = {"seed": 0, "fl": {"rounds": 2, "local_steps": 1}, "compile_cache_dir": "a"}
  new = {"seed": 0, "fl": {"rounds": 5, "local_steps": 2, "new_key": True}, "compile_cache_dir": "b"}
  assert [k for k, _, _ in runlog.config_diff(old, new)] == ["fl.local_steps"]
  defaults = {"fl": {"new_key": False}}  # the config file's value: True is an override
  assert [k for k, _, _ in runlog.config_diff(old, new, defaults=defaults)] == [
      "fl.local_steps", "fl.new_key"]
  assert runlog.config_diff(new, old) == [("fl.local_steps", 2, 1)]  # removed keys: nobody reads them
  p = tmp_path / "m.jsonl"
  p.write_text('{"round": 0}\n\n{"round": 1}\n')
  assert runlog.read_metrics(str(p)) == [{"round": 0}, {"round": 1}]
  with pytest.raises(runlog.WorkdirError, match=r"m\.jsonl: corrupt at line 4"):
    p.write_text('{"round": 0}\n\n{"round": 1}\n{"rou')
    runlog.read_metrics(str(p))
  assert runlog.move_aside(str(tmp_path / "absent")) is None
