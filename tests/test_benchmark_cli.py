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
