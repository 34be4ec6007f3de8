"""Traced round programs kept on disk, so that a new process skips Python tracing.

The persistent compilation cache (``compile_cache``) saves XLA's compile in a new process,
but not the tracing before it: every process still runs the Python of the client update,
the loss, the model and the aggregation under ``jax.jit`` to produce the StableHLO that the
cache is keyed by. For the demo-size semi-supervised rounds that tracing was most of the
cached compile (FedWeP-Real, 2026-12-08, 2-core CPU: 1.9 s of 2.7 s; docs/performance.md).

This module stores each program ``runlog.TimedJit`` compiles as a ``jax.export``
artifact (serialized StableHLO + its input/output signature) next to the compilation
cache (``<cache folder>/exported/``). A later process with the same key reads it back
and calls it through ``jax.jit(exported.call)`` instead of tracing: one program per call
as before, the same computation (tests compare the outputs bitwise with the traced path),
its executable read from the compilation cache.

What a stored program is keyed by (:func:`store_key`), since nothing is traced to check it:
  * the caller's key (``runlog.cached_jit``'s, which captures the config the program
    closes over) and the program's name;
  * the argument signature: pytree structure, each leaf's type, shape, dtype, weak type and
    placement (as jax.jit's cache sees them), donated arguments and jit options;
  * the source of every ``fedjax_seg`` module (a digest of the package's ``.py`` files),
    the versions of jax, jaxlib, flax, optax, numpy, ml_collections and dm-pix, JAX's numerics
    settings (x64, matmul precision, PRNG implementation, ...), the backend, its device
    kind and count, and ``XLA_FLAGS``.

Only programs of single-device arguments, positional, without static arguments, are
stored (the sharded strategy traces as before); a program ``jax.export`` cannot serialize
(host callbacks) is traced as before too. A stored file that cannot be read is ignored and
rewritten. The store is on whenever the compilation cache is on; ``rm -rf`` of the cache
folder clears both; ``FEDJAX_SEG_PROGRAM_STORE=0`` turns the store off alone (for A/B
measurements), ``FEDJAX_SEG_PROGRAM_STORE=<folder>`` puts it elsewhere.

Requires the ``flatbuffers`` package (``jax.export``'s serializer); without it the store
is off. Like the compilation cache, the folder is trusted: a stored file is unpickled and
its program run, so it is created private to the user (mode 0700) and must not be a
folder others can write to.
"""
from __future__ import annotations

import functools
import hashlib
import os
import pickle
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
import numpy as np

ENV_VAR = "FEDJAX_SEG_PROGRAM_STORE"
SUBDIR = "exported"
FORMAT = 1  # bumped when the file layout changes
_NUMERICS_FLAGS = ("jax_enable_x64", "jax_default_matmul_precision", "jax_default_prng_impl",
                   "jax_threefry_partitionable", "jax_numpy_rank_promotion",
                   "jax_numpy_dtype_promotion", "jax_softmax_custom_jvp")


def folder() -> Optional[str]:
  """Where programs are stored: ``FEDJAX_SEG_PROGRAM_STORE`` when it names a folder, else
  ``<compilation cache folder>/exported``; None (no store) when the variable is 0/off, the
  compilation cache is off (and no folder is named), or flatbuffers is missing."""
  env = os.environ.get(ENV_VAR, "").strip()
  if env.lower() in ("0", "false", "no", "off") or not _serializable():
    return None
  if env:
    return os.path.abspath(os.path.expanduser(env))
  cache = jax.config.jax_compilation_cache_dir
  return os.path.join(cache, SUBDIR) if cache else None


@functools.lru_cache(maxsize=1)
def _serializable() -> bool:
  try:
    import flatbuffers  # noqa: F401  (jax.export's serializer)
    return True
  except ImportError:
    return False


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
  """sha256 over the path and bytes of every ``.py`` file of the ``fedjax_seg`` package."""
  root = os.path.dirname(os.path.abspath(__file__))
  h = hashlib.sha256()
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    for f in sorted(filenames):
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        h.update(os.path.relpath(path, root).encode() + b"\0")
        with open(path, "rb") as fh:
          h.update(fh.read())
        h.update(b"\0")
  return h.hexdigest()


@functools.lru_cache(maxsize=1)
def _versions() -> Tuple[str, ...]:
  import importlib.metadata as md
  out = []
  for pkg in ("jax", "jaxlib", "flax", "optax", "numpy", "ml_collections", "dm-pix"):
    try:
      out.append(f"{pkg}={md.version(pkg)}")
    except md.PackageNotFoundError:
      out.append(f"{pkg}=-")
  return tuple(out)


def _environment() -> Tuple[str, ...]:
  dev = jax.devices()[0]
  flags = tuple(f"{f}={getattr(jax.config, f, None)}" for f in _NUMERICS_FLAGS)
  return (*_versions(), *flags, f"backend={dev.platform}", f"kind={dev.device_kind}",
          f"devices={jax.device_count()}", f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}")


def store_key(key: str, name: str, signature, jit_kwargs: Dict[str, Any]) -> str:
  """The file name (sha256 hex) of a program: see the module docstring for what enters.
  ``signature``: ``runlog.TimedJit``'s (the argument pytree structure and each leaf's
  type, shape, dtype, weak type and sharding); ``jit_kwargs`` include the donation."""
  blob = repr((FORMAT, key, name, signature,
               sorted((k, repr(v)) for k, v in jit_kwargs.items()), code_digest(),
               _environment()))
  return hashlib.sha256(blob.encode()).hexdigest()


def eligible(leaves, kwargs: Dict[str, Any], jit_kwargs: Dict[str, Any]) -> bool:
  """Whether a call can go through the store: positional arguments only, jit options
  limited to donation and compiler options, every leaf an array (or Python scalar) on
  JAX's default device."""
  if kwargs or set(jit_kwargs) - {"donate_argnums", "compiler_options"}:
    return False
  default = jax.devices()[0]
  for a in leaves:
    if isinstance(a, (bool, int, float, np.ndarray, np.generic)):
      continue
    if not isinstance(a, jax.Array):
      return False
    devs = a.sharding.device_set
    if len(devs) != 1 or default not in devs:
      return False
  return True


def flat_donation(args: Sequence[Any], donate_argnums) -> Tuple[int, ...]:
  """The flat leaf indices of the positional arguments ``donate_argnums`` names."""
  if donate_argnums is None:
    return ()
  donated = {donate_argnums} if isinstance(donate_argnums, int) else set(donate_argnums)
  out, start = [], 0
  for i, a in enumerate(args):
    n = len(jax.tree.leaves(a))
    if i in donated:
      out.extend(range(start, start + n))
    start += n
  return tuple(out)


class Program:
  """A stored (or just exported) program: ``__call__(leaves)`` runs ``jax.jit(exported.call)``
  on the flat leaves of the positional arguments and rebuilds the output pytree."""

  def __init__(self, exported, out_tree, donate: Tuple[int, ...], jit_kwargs: Dict[str, Any]):
    self.exported, self.out_tree = exported, out_tree
    opts = {k: v for k, v in jit_kwargs.items() if k != "donate_argnums"}
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    self.jitted = jax.jit(exported.call, donate_argnums=donate, in_shardings=one,
                          out_shardings=one, **opts)

  def lower_compile(self, leaves) -> None:
    self.jitted.lower(*leaves).compile()

  def __call__(self, leaves):
    return jax.tree.unflatten(self.out_tree, self.jitted(*leaves))


def export(fn: Callable, args: Sequence[Any], donate: Tuple[int, ...],
           jit_kwargs: Dict[str, Any]):
  """Trace and lower ``fn(*args)`` once, as a function of the flat leaves of ``args``;
  returns ``(exported, out_tree, serialized bytes)``. Raises what jax.export raises for a
  program it cannot serialize."""
  from jax import export as jex
  leaves, in_tree = jax.tree.flatten(tuple(args))
  box = {}

  def flat(*ls):
    out = fn(*jax.tree.unflatten(in_tree, ls))
    out_leaves, box["tree"] = jax.tree.flatten(out)
    return out_leaves
  opts = {k: v for k, v in jit_kwargs.items() if k != "donate_argnums"}
  exported = jex.export(jax.jit(flat, donate_argnums=donate, **opts))(*leaves)
  blob = bytes(exported.serialize())  # raises here (host callbacks, ...), not when saving
  return exported, box["tree"], blob


def load(path: str):
  """``(exported, out_tree)`` from a stored file, or None when it is absent or unreadable."""
  from jax import export as jex
  try:
    with open(path, "rb") as f:
      blob = pickle.load(f)
    if blob.get("format") != FORMAT:
      return None
    return jex.deserialize(bytearray(blob["exported"])), blob["out_tree"]
  except FileNotFoundError:
    return None
  except Exception:  # noqa: BLE001 - a damaged or foreign file costs a trace, never the run
    return None


def save(path: str, serialized: bytes, out_tree) -> bool:
  """Writes a program (``export``'s bytes and output tree) atomically: a per-process
  temporary file + os.replace, so that two processes storing the same program never mix
  their bytes. False (nothing written) when it cannot be."""
  tmp = f"{path}.{os.getpid()}.tmp"
  try:
    blob = pickle.dumps({"format": FORMAT, "exported": serialized, "out_tree": out_tree})
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    with open(tmp, "wb") as f:
      f.write(blob)
    os.replace(tmp, path)
    return True
  except Exception:  # noqa: BLE001 - an unwritable store only costs the next process a trace
    try:
      os.remove(tmp)
    except OSError:
      pass
    return False
