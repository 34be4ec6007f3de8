"""The ``fedjax-seg`` console entry point (fedjax_seg/cli.py)."""
import os
import subprocess
import sys

import pytest

from fedjax_seg import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_help_lists_every_subcommand(capsys):
  assert cli.main(["--help"]) == 0
  out = capsys.readouterr().out
  for command in ("train", "infer", "report", "serve", "phantom"):
    assert f"  {command}" in out


def test_no_command_is_a_usage_error(capsys):
  assert cli.main([]) == 2
  assert "usage: fedjax-seg" in capsys.readouterr().err


def test_unknown_command(capsys):
  assert cli.main(["trian"]) == 2
  assert "unknown command 'trian'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, expect", [
    (["report", "--help"], "--splits"),
    (["report", "compare", "--help"], "usage"),
    (["infer", "--help"], "--workdir"),
    (["phantom", "--help"], "--layout"),
])
def test_subcommand_help(capsys, argv, expect):
  assert cli.main(argv) == 0
  assert expect in capsys.readouterr().out


def test_train_is_launch_py():
  assert os.path.samefile(cli.launch_path(), os.path.join(ROOT, "launch.py"))


def test_train_help_runs_launch_py():
  # A subprocess: launch.py defines absl flags at import, once per process.
  out = subprocess.run([sys.executable, "-m", "fedjax_seg.cli", "train", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
  direct = subprocess.run([sys.executable, "launch.py", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
  assert out.returncode == direct.returncode, out.stderr  # absl's --help exit status, passed on
  assert "--workdir" in out.stdout and "--sweep_shard" in out.stdout


def test_config_path_resolves_to_the_configs_package(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # no configs/ folder here
  resolved = cli.resolve_config_path("configs/demo.py:geometric")
  assert resolved.endswith(os.path.join("configs", "demo.py") + ":geometric")
  assert os.path.isfile(resolved.rsplit(":", 1)[0])
  assert cli.resolve_config_path("elsewhere/x.py") == "elsewhere/x.py"
  bare = cli.resolve_config_path("demo:geometric")  # a bare name = configs/<name>.py
  assert bare.endswith(os.path.join("configs", "demo.py") + ":geometric"), bare
  assert os.path.isfile(bare.rsplit(":", 1)[0])
  assert cli.resolve_config_path("no_such_config") == "no_such_config"


def test_bare_config_name_in_a_checkout(monkeypatch):
  monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert cli.resolve_config_path("lgg_fedavg:smoke") == "configs/lgg_fedavg.py:smoke"


def test_phantom_writes_files(tmp_path, capsys):
  out = tmp_path / "lgg"
  assert cli.main(["phantom", "--layout", "lgg", "--out", str(out), "--size", "32",
                   "--slices-per-patient", "2", "--patients-per-site", "1"]) == 0
  assert any(p.suffix == ".tif" for p in out.rglob("*"))
