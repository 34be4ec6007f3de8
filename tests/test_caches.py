"""Cache folders (fedjax_seg/caches.py): never the current directory by default."""
import os

from fedjax_seg import caches, compile_cache
from configs import common


def test_data_cache_default_env_and_explicit(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.delenv(caches.DATA_ENV_VAR, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert caches.data_dir("") == str(tmp_path / "xdg" / "fedjax_seg" / "data")
  assert compile_cache.default_dir() == str(tmp_path / "xdg" / "fedjax_seg" / "jax")
  monkeypatch.setenv(caches.DATA_ENV_VAR, str(tmp_path / "env"))
  assert caches.data_dir("") == str(tmp_path / "env")
  assert caches.data_dir("rel/dir") == str(tmp_path / "rel" / "dir")  # explicit: as given
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.delenv(caches.DATA_ENV_VAR)
  assert caches.data_dir("") == os.path.join(os.path.expanduser("~"), ".cache", "fedjax_seg", "data")


def test_configs_default_to_the_user_cache():
  assert common.data("lgg").cache_dir == ""
