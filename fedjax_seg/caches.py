"""Where fedjax_seg caches what it can rebuild: per user, never the current directory.

  user_dir(kind)    ``$XDG_CACHE_HOME/fedjax_seg/<kind>`` (``~/.cache/fedjax_seg/<kind>``
                    without ``XDG_CACHE_HOME``); kinds: ``jax`` (compiled programs,
                    fedjax_seg/compile_cache.py), ``data`` (phantoms, N4 fields).
  data_dir(value)   the data cache of a run: ``config.data.cache_dir`` when set, else the
                    environment variable ``FEDJAX_SEG_DATA_CACHE``, else ``user_dir('data')``.

Everything under these folders is deterministic output (a phantom is keyed by its
writer settings, an N4 field by its file and settings): ``rm -rf`` only costs a rebuild.
"""
from __future__ import annotations

import os

DATA_ENV_VAR = "FEDJAX_SEG_DATA_CACHE"


def user_dir(kind: str) -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "fedjax_seg", kind)


def data_dir(value: str) -> str:
  """Absolute data-cache folder for ``config.data.cache_dir = value`` ('' -> the default)."""
  path = value or os.environ.get(DATA_ENV_VAR) or user_dir("data")
  return os.path.abspath(os.path.expanduser(path))
