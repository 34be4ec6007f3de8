"""JAX's persistent compilation cache, on by default for every run.

XLA compiles each round/step program once per process; with the persistent
cache the executable is also written to disk, and the next process that
compiles the same program (a re-run, a sweep point in a new process, a test
run, a resumed run) reads it back instead of compiling again.

Where the cache lives, first match wins:
  1. the ``path`` passed to ``enable`` (launch.py passes the config key
     ``compile_cache_dir``): a folder, or '' to disable the cache;
  2. the environment variable ``FEDJAX_SEG_COMPILE_CACHE`` (a folder, or ''
     to disable);
  3. JAX's own setting, if already set (``JAX_COMPILATION_CACHE_DIR``);
  4. the per-user default ``$XDG_CACHE_HOME/fedjax_seg/jax``
     (``~/.cache/fedjax_seg/jax`` without ``XDG_CACHE_HOME``).

Every program is cached, however small or fast to compile (JAX's defaults
skip programs that compile in under a second). Clearing the cache is
``rm -rf`` of the folder; a stale or half-written entry only costs a
recompile (JAX warns and compiles). The folder is created private to the
user: JAX treats the cache as trusted code.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

ENV_VAR = "FEDJAX_SEG_COMPILE_CACHE"


def default_dir() -> str:
  """The per-user cache folder: ``$XDG_CACHE_HOME/fedjax_seg/jax`` or ``~/.cache/fedjax_seg/jax``."""
  from fedjax_seg import caches
  return caches.user_dir("jax")


def resolve(path: Optional[str] = None) -> Optional[str]:
  """The cache folder ``enable(path)`` would use (absolute), or None if disabled."""
  if path is None:
    path = os.environ.get(ENV_VAR)
  if path is None:
    import jax
    path = jax.config.jax_compilation_cache_dir or default_dir()
  if not str(path).strip():
    return None
  return os.path.abspath(os.path.expanduser(str(path)))


def current() -> Optional[str]:
  """The folder JAX's persistent cache writes to now, or None."""
  import jax
  return jax.config.jax_compilation_cache_dir or None


def _reset_jax_cache():
  """Forget the cache object JAX built for the previous folder (it is built once)."""
  try:
    from jax._src import compilation_cache as cc
    if getattr(cc, "_cache", None) is not None:
      cc.reset_cache()
  except Exception:  # noqa: BLE001 - private API: at worst the old folder stays in use
    pass


def enable(path: Optional[str] = None) -> Optional[str]:
  """Turn the persistent compilation cache on (see the module docstring for ``path``).

  Returns the folder in use, or None when the cache is disabled ('' from the
  config or the environment) or the folder cannot be created (warned; the run
  goes on without it). Safe to call more than once, also after programs were
  compiled: later compilations use the new folder.
  """
  import jax
  folder = resolve(path)
  if folder is not None:
    try:
      os.makedirs(folder, mode=0o700, exist_ok=True)
    except OSError as e:
      warnings.warn(f"compilation cache disabled: cannot create {folder} ({e})", RuntimeWarning,
                    stacklevel=2)
      folder = None
  if folder != current():
    _reset_jax_cache()
    jax.config.update("jax_compilation_cache_dir", folder)
  if folder is not None:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # no size floor
  return folder
