"""Every benchmark script parses its command line and imports its modules
(`--help` exits 0): a renamed option or a broken import in a benchmark that
only runs for hours is caught here in seconds."""
import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "benchmarks", "*.py"))
                 if not os.path.basename(p).startswith("_"))


def test_scripts_found():
  assert {"fedwep_table.py", "fcl_table.py", "label_at_server_study.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
  r = subprocess.run([sys.executable, os.path.join("benchmarks", script), "--help"], cwd=ROOT,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "usage" in r.stdout.lower()


@pytest.mark.slow
def test_round_speed_rows_compute_the_same_round(tmp_path):
  """The timed strategies of round_speed run the same round: after round 0 from the same
  state and keys, the loop of jitted client updates, the trainers' loop round with 2
  clients per call (remainder call at K = 3) and the one-program round agree."""
  import json
  r = subprocess.run([sys.executable, os.path.join("benchmarks", "round_speed.py"), "--quick",
                      "--ks", "3", "--strategies", "loop", "looped2", "unrolled", "--reps", "1",
                      "--no-cached-compile", "--tag", "speed_test", "--out", str(tmp_path)],
                     cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  row = json.load(open(tmp_path / "speed_test.json"))["rows"][0]
  assert row["agreement_ref"] == "loop"
  assert row["loop_max_abs_diff"] == 0.0
  for s in ("looped2", "unrolled"):
    assert 0.0 <= row[f"{s}_max_abs_diff"] < 1e-4, (s, row[f"{s}_max_abs_diff"])
  assert "Same round: max |Δ|" in open(tmp_path / "speed_test.md").read()
