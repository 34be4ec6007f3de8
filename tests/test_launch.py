"""launch.py: bad input gives one clear error line naming the file, exit code 2."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(*args):
  return subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), *args],
                        capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_corrupt_tiff_is_a_clear_error(tmp_path):
  d = tmp_path / "kaggle_3m" / "TCGA_CS_0001_20000101"
  d.mkdir(parents=True)
  (d / "TCGA_CS_0001_20000101_1.tif").write_bytes(b"not a tiff")
  (d / "TCGA_CS_0001_20000101_1_mask.tif").write_bytes(b"not a tiff")
  r = _launch("--config", "configs/demo.py:geometric", "--workdir", str(tmp_path / "run"),
              f"--config.data.root={tmp_path}")
  assert r.returncode == 2, r.stderr
  assert "TCGA_CS_0001_20000101_1.tif" in r.stderr and "cannot read TIFF" in r.stderr
  assert "Traceback" not in r.stderr


def test_impossible_config_names_the_key(tmp_path):
  r = _launch("--config", "configs/demo.py:geometric", "--workdir", str(tmp_path / "run"),
              "--config.data.image_size=60")
  assert r.returncode == 2
  assert "config.data.image_size=60" in r.stderr and "Traceback" not in r.stderr


def test_unknown_override_is_rejected(tmp_path):
  r = _launch("--config", "configs/demo.py:geometric", "--workdir", str(tmp_path / "run"),
              "--config.no_such_key=1")
  assert r.returncode == 2 and r.stderr.splitlines() == ["error: unknown config key no_such_key"]


def test_override_errors_are_one_line_through_app_run(tmp_path):
  """The real entry point (absl app.run with launch's flags parser), not run_cli."""
  r = _launch("--config", "configs/lgg_fedavg.py", "--workdir", str(tmp_path / "run"),
              "--config.fl.roundz=3")
  assert r.returncode == 2
  assert r.stderr.splitlines() == ["error: unknown config key fl.roundz (did you mean fl.rounds?)"]
  r = _launch("--config", "configs/lgg_fedavg.py", "--workdir", str(tmp_path / "run"),
              "--config.fl.rounds=abc")
  assert r.returncode == 2 and r.stderr.splitlines() == [
      "error: config.fl.rounds='abc': expected int (invalid literal for int() with base 10: 'abc')"]
  assert not (tmp_path / "run").exists()
