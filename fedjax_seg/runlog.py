"""Run bookkeeping shared by every trainer: metrics files, orbax checkpoints,
progress lines with ETA (and rich bars on a terminal, `fedjax_seg.progress`), results JSON
and plots.

Workdir layout:
  config.json        the resolved config of the run
  metrics.jsonl      one JSON object per epoch/round
  metrics.csv        the same rows as CSV
  tensorboard/       the same rows as TensorBoard scalars (tensorboardX event files)
  checkpoints/       orbax CheckpointManager (latest 2 kept) + digests.json (sha256 per step)
  checkpoints_best/  the checkpoint with the highest validation Dice (val_dice_mean) so far
                     + digests.json; absent when no row has a validation Dice
  results.json       final metrics (written at the end)
  learning_curves.png, overlays.png

Reliability (docs/reliability.md): config.json, metrics.jsonl/csv and results.json are
replaced atomically (temporary file + fsync + os.replace), so a killed run leaves the
previous version or the new one, never half a file; ``check_workdir`` refuses, before
anything is written, a workdir whose earlier run has a different config (less
``RESUMABLE_KEYS``), a corrupt config.json or metrics.jsonl, or a path that is a file;
``Checkpointer.restore_latest`` verifies each checkpoint against the digest recorded
when it was saved and falls back to the previous readable one.
"""
from __future__ import annotations

import contextlib
import csv
import errno
import gc
import glob
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import sys
import time
import warnings
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp


def _jsonable(v):
  if isinstance(v, (np.floating, np.integer)):
    return v.item()
  if isinstance(v, np.ndarray):
    return v.tolist()
  if isinstance(v, float) and not math.isfinite(v):
    return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
  return v


_JIT_CACHE: Dict[str, Any] = {}
_COMPILE_S: Dict[str, float] = {}
_TRACE_S: Dict[str, float] = {}


def _add(record: Dict[str, float], name: str, seconds: float) -> None:
  record[name] = record.get(name, 0.0) + float(seconds)


def _take(record: Dict[str, float], reset: bool) -> Dict[str, float]:
  out = dict(record)
  if reset:
    record.clear()
  return out


def compile_times(reset: bool = False) -> Dict[str, float]:
  """Seconds spent compiling each ``cached_jit`` program since the last reset:
  ``{name: s}``, ``name`` being the key's leading word (``round``, ``train_step``,
  ``eval``, ...). A program already compiled in this process (same key and
  argument shapes) reads 0.0 once it is called; one that was never called is
  absent. ``reset=True`` returns the times and starts a new record (a run's
  ``finish`` does, so each run's results hold its own compile times)."""
  return _take(_COMPILE_S, reset)


def trace_times(reset: bool = False) -> Dict[str, float]:
  """The part of ``compile_times()`` spent in Python tracing the program and lowering it to
  StableHLO (before XLA compiles it or reads it from the persistent cache): ``{name: s}``,
  same names and reset rule. A cached compile is mostly this part."""
  return _take(_TRACE_S, reset)


def add_compile_time(name: str, seconds: float, trace: bool = False) -> None:
  """Adds seconds spent compiling outside a TimedJit (e.g. a trace that sizes a program)
  to ``compile_times()[name]`` (and to ``trace_times()[name]`` when ``trace``)."""
  _add(_COMPILE_S, name, seconds)
  if trace:
    _add(_TRACE_S, name, seconds)


def reset_compile_times() -> None:
  """Start a new compile-time record (``compile_times()`` and ``trace_times()`` are empty
  until the next call)."""
  _COMPILE_S.clear()
  _TRACE_S.clear()


def _signature(leaves, tree):
  """What makes jax.jit compile again, from the flattened ``(args, kwargs)``: the pytree
  structure and every leaf's type, shape, dtype, weak type and sharding (also the program
  store's key of the arguments)."""
  if any(isinstance(a, jax.core.Tracer) for a in leaves):
    return None  # called inside another trace: nothing is compiled here
  return tree, tuple((type(a), getattr(a, "shape", None), getattr(a, "dtype", None),
                      getattr(a, "weak_type", None), getattr(a, "sharding", None))
                     for a in leaves)


class TimedJit:
  """``jax.jit(fn)`` that compiles ahead of time, and times it, the first time
  it is called with each argument signature.

  The first call with a new signature runs ``jitted.lower(*args).compile()``
  (printing ``[compile] compiling <name> program ...`` before and the seconds
  after), adds the seconds to ``compile_times()[name]``, then calls the jitted
  function, which reuses that executable (no second compilation), so jax.jit
  semantics (donation, new shapes, shardings) are unchanged. Attributes
  (``lower``, ``trace``, ...) are the jitted function's.

  With ``fn`` and ``key`` given (``cached_jit`` gives them) and the program store on
  (``program_store``: the compilation cache is on), a signature the store can take is
  served by a stored program instead: read back without tracing when an earlier process
  stored it, otherwise traced once through ``jax.export`` and stored; either way called
  as ``jax.jit(exported.call)`` with the same donation and options, on the default device.
  """

  def __init__(self, name: str, jitted, verbose: bool = True, fn: Optional[Callable] = None,
               key: Optional[str] = None, jit_kwargs: Optional[Dict[str, Any]] = None):
    self.name, self.jitted, self.verbose = name, jitted, verbose
    self.fn, self.key, self.jit_kwargs = fn, key, dict(jit_kwargs or {})
    self._compiled: Dict[Any, Any] = {}  # signature -> None (the jitted function) or a Program

  def __call__(self, *args, **kwargs):
    leaves, tree = jax.tree.flatten((args, kwargs))
    try:
      sig = _signature(leaves, tree)
      hash(sig)
    except TypeError:  # an unhashable leaf: leave it to jax.jit, untimed
      sig = None
    if sig is None:
      return self.jitted(*args, **kwargs)
    if sig not in self._compiled:
      self._compiled[sig] = self._compile(args, kwargs, leaves, sig)
    else:
      _COMPILE_S.setdefault(self.name, 0.0)
      _TRACE_S.setdefault(self.name, 0.0)
    program = self._compiled[sig]
    # a stored program takes positional arguments only: its leaves are those of args
    return self.jitted(*args, **kwargs) if program is None else program(leaves)

  def _compile(self, args, kwargs, leaves, sig):
    """Compiles for this signature; returns the program store's Program serving it, or
    None (the jitted function)."""
    if self.verbose:
      print(f"[compile] compiling {self.name} program ...", flush=True)
    t0 = time.perf_counter()
    program, how = self._stored(args, kwargs, leaves, sig)
    if program is None:
      lowered = self.jitted.lower(*args, **kwargs)
      t1 = time.perf_counter()
      lowered.compile()
    else:
      t1 = time.perf_counter()
      program.lower_compile(leaves)
    s = time.perf_counter() - t0
    _add(_COMPILE_S, self.name, s)
    _add(_TRACE_S, self.name, t1 - t0)
    if self.verbose:
      # The two parts: tracing + lowering to StableHLO (or reading a stored program), then
      # XLA's compile, or (from the persistent cache) reading the executable back, which
      # for a large XLA:CPU program is itself slow (docs/performance.md).
      first = "stored program read" if how == "read" else "trace + lower"
      print(f"[compile] {self.name} program: {s:.1f} s ({first} {t1 - t0:.1f} s, "
            f"compile or cache read {s - (t1 - t0):.1f} s)", flush=True)
    return program

  def _stored(self, args, kwargs, leaves, sig):
    """``(Program, 'read' | 'traced')`` from the program store, or ``(None, '')`` when the
    store is off or cannot take this call (the jitted function serves it)."""
    from fedjax_seg import program_store as ps
    if self.fn is None or self.key is None:
      return None, ""
    root = ps.folder()
    if root is None or not ps.eligible(leaves, kwargs, self.jit_kwargs):
      return None, ""
    donate = ps.flat_donation(args, self.jit_kwargs.get("donate_argnums"))
    path = os.path.join(root, ps.store_key(self.key, self.name, sig, self.jit_kwargs))
    got = ps.load(path)
    if got is not None:
      return ps.Program(*got, donate, self.jit_kwargs), "read"
    try:
      exported, out_tree, serialized = ps.export(self.fn, args, donate, self.jit_kwargs)
    except Exception as e:  # noqa: BLE001 - not exportable (host callbacks, ...): jax.jit traces
      if self.verbose:
        print(f"[compile] {self.name} program not stored: {one_line(e, 160)}", flush=True)
      return None, ""
    ps.save(path, serialized, out_tree)
    return ps.Program(exported, out_tree, donate, self.jit_kwargs), "traced"

  def executables(self) -> int:
    """Entries in this program's jit caches in this process (the jitted function's and the
    stored programs'): one per argument signature and placement (committed or not)."""
    return self.jitted._cache_size() + sum(p.jitted._cache_size()
                                           for p in self._compiled.values() if p is not None)

  def __getattr__(self, attr):
    return getattr(self.jitted, attr)


def program_name(key: str) -> str:
  m = re.match(r"[A-Za-z0-9_]+", key)
  return m.group(0) if m else "jit"


def cached_jit(key: str, build, name: Optional[str] = None, **jit_kwargs) -> TimedJit:
  """``jax.jit(build(), **jit_kwargs)`` memoised by ``key`` within this process,
  with its compile time measured (``TimedJit``, ``compile_times()``).

  Re-running the same experiment config in one process (a resumed run, a
  sweep point, a test) then reuses the compiled program instead of
  re-tracing and re-compiling a structurally identical function. ``key``
  must capture everything ``build`` closes over (callers use the config JSON).
  ``name`` (default: the key's leading word, e.g. ``round``) labels the
  progress line and the compile-time record.
  """
  if key not in _JIT_CACHE:
    fn = build()
    _JIT_CACHE[key] = TimedJit(name or program_name(key), jax.jit(fn, **jit_kwargs), fn=fn,
                               key=key, jit_kwargs=jit_kwargs)
  return _JIT_CACHE[key]


_TBX: Any = None  # tensorboardX.SummaryWriter once imported; False if unavailable
TB_SUBRUNS = ("overlays",)  # TensorBoard runs under <workdir>/tensorboard/ besides the metrics (tb_overlays)
TB_FLUSH_S = 1  # the writer thread of tensorboardX flushes the event file at most this long after a row


def _tbx():
  """tensorboardX's ``SummaryWriter`` class, or None (warned once).

  ``import tensorboardX`` imports PyTorch when it is installed (the ``bench``
  extra), which costs seconds and loads a second CUDA stack next to JAX's;
  tensorboardX only uses it for torch tensors, so torch is hidden while importing.
  """
  global _TBX
  if _TBX is None:
    hide = "torch" not in sys.modules
    if hide:
      sys.modules["torch"] = None  # `import torch` raises ImportError inside tensorboardX
    try:
      from tensorboardX import SummaryWriter
      _TBX = SummaryWriter
      # A NaN scalar (a diverged round's loss) is a value to plot, not a warning per row.
      logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)
    except Exception as e:  # noqa: BLE001 - any import failure: JSONL/CSV still written
      _TBX = False
      warnings.warn(f"tensorboardX unavailable ({e!r}): no TensorBoard event files are "
                    "written; metrics.jsonl/metrics.csv are unaffected "
                    "(`pip install tensorboardX` to get them)", RuntimeWarning, stacklevel=3)
    finally:
      if hide and sys.modules.get("torch", 0) is None:
        del sys.modules["torch"]
  return _TBX or None


def tb_writer(logdir: str, **kwargs):
  """A ``tensorboardX.SummaryWriter`` on ``logdir`` (flushed every `TB_FLUSH_S` s), or None without tensorboardX."""
  cls = _tbx()
  if cls is None:
    return None
  return cls(logdir, flush_secs=TB_FLUSH_S, filename_suffix=f".{time.time_ns()}", **kwargs)


def scalars(row: Dict[str, Any], skip=(), clients: Sequence[str] = ()) -> Dict[str, float]:
  """Flatten a metrics row into ``{tag: float}``: nested dicts join keys with '/',
  lists/arrays append the index (``weights/0``); bools become 0/1, NaN/inf are
  kept; strings, None and other non-numbers are skipped.

  ``clients`` (site names, in client order): a top-level per-client list
  (``weights`` or a ``client_*`` key, one entry per client) is tagged by site
  instead of index (``client_val_dice/siteA``)."""
  out: Dict[str, float] = {}
  clients = list(clients)

  def walk(tag, v):
    if isinstance(v, dict):
      for k, x in v.items():
        walk(f"{tag}/{k}", x)
    elif isinstance(v, (list, tuple)):
      for i, x in enumerate(v):
        walk(f"{tag}/{i}", x)
    elif isinstance(v, (bool, int, float, np.bool_, np.integer, np.floating)):
      out[tag] = float(v)
    elif hasattr(v, "__array__") and not isinstance(v, (str, bytes)):
      a = np.asarray(v)
      if a.dtype.kind in "biuf":
        walk(tag, a.tolist())

  for k, v in row.items():
    if k in skip:
      continue
    if (clients and (k == "weights" or str(k).startswith("client_")) and isinstance(v, (list, tuple))
        and len(v) == len(clients)):
      for name, x in zip(clients, v):
        walk(f"{k}/{name}", x)
    else:
      walk(str(k), v)
  return out


class MetricsLog:
  """metrics.jsonl + metrics.csv + TensorBoard scalars. Rows past ``resume_from``
  are dropped on open so that a resumed run never duplicates rows. Both files are
  rewritten whole and replaced atomically on every row (``atomic_write``): a run
  killed at any moment leaves complete rows only. A metrics.jsonl that is not one
  JSON object per line raises :class:`WorkdirError` naming the file and line.

  TensorBoard: every row is also written to ``<workdir>/tensorboard/`` by a
  ``tensorboardX.SummaryWriter``, one scalar per numeric field (see ``scalars``:
  ``weights/0``, ..., or ``weights/<site>`` with ``clients``) at step
  ``row[key]``. The writer's thread writes each row and flushes the file within
  `TB_FLUSH_S` s, so ``tensorboard --logdir`` shows the curves live; a run
  killed in that second may lack its last row(s) in TensorBoard (metrics.jsonl
  has them). JSONL/CSV stay the source of truth: without tensorboardX (warned
  once) or on a write error, only they are written. Each MetricsLog opens a new
  event file:
  - fresh run (no row kept): old event files in ``tensorboard/`` (and its
    ``overlays/`` run, `tb_overlays`) are deleted, as metrics.jsonl is truncated;
  - resume with kept rows: the kept rows stay in the old event files (not
    rewritten); the writer is opened with ``purge_step=resume_from + 1`` (a
    SessionLog.START at that step), which makes TensorBoard hide the rows the old
    files hold past the checkpoint (the ones dropped from metrics.jsonl), so the
    re-run steps are not shown twice. If there are no old event files (a run
    started before this feature), the kept rows are written to the new file.
  The file is closed by ``close()``, or when the log is garbage-collected
  (trainers do not call ``close()``).
  """

  def __init__(self, workdir: str, resume_from: Optional[int] = None, key: str = "epoch",
               tensorboard: bool = True, clients: Sequence[str] = ()):
    self.path_jsonl = os.path.join(workdir, "metrics.jsonl")
    self.path_csv = os.path.join(workdir, "metrics.csv")
    self.key = key
    self.clients = tuple(str(c) for c in clients)
    self.rows: List[Dict[str, Any]] = read_metrics(self.path_jsonl)
    if resume_from is not None:
      self.rows = [r for r in self.rows if r.get(key, 0) <= resume_from]
    else:
      self.rows = []
    self._rewrite()
    self.tb_dir = os.path.join(workdir, "tensorboard")
    self._tb = None
    self._tb_close = None
    if tensorboard:
      self._tb_guard(self._tb_open, resume_from)

  # -- TensorBoard -----------------------------------------------------------
  def _tb_guard(self, fn, *args):
    try:
      fn(*args)
    except Exception as e:  # noqa: BLE001 - TensorBoard is a convenience, never fatal
      warnings.warn(f"TensorBoard logging to {self.tb_dir} disabled: {e!r}", RuntimeWarning,
                    stacklevel=3)
      self.close()

  def _tb_open(self, resume_from):
    if _tbx() is None:
      return
    old = sorted(glob.glob(os.path.join(self.tb_dir, "events.out.tfevents.*")))
    if not self.rows:
      for p in old:
        os.remove(p)
      for sub in TB_SUBRUNS:
        shutil.rmtree(os.path.join(self.tb_dir, sub), ignore_errors=True)
    os.makedirs(self.tb_dir, exist_ok=True)
    # The file name has a 1 s timestamp; the suffix (tb_writer) keeps a quick resume from
    # truncating the previous file and sorts files of one second in order.
    purge = int(resume_from) + 1 if self.rows and old else None
    self._tb = tb_writer(self.tb_dir, purge_step=purge)
    self._tb_close = weakref.finalize(self, self._tb.close)
    if self.rows and not old:
      for r in self.rows:
        self._tb_write(r, flush=False)
    self._tb.flush()

  def _tb_write(self, row, flush=True):
    step = int(row.get(self.key, len(self.rows) - 1))
    now = time.time()
    for tag, v in scalars(row, skip=(self.key,), clients=self.clients).items():
      self._tb.add_scalar(tag, v, step, walltime=now)
    if flush:
      self._tb.flush()

  def close(self):
    """Close the TensorBoard event file (idempotent; JSONL/CSV are closed per write)."""
    if self._tb_close is not None:
      self._tb_close()
    self._tb = self._tb_close = None

  # -- JSONL / CSV -----------------------------------------------------------
  def _rewrite(self, only_if_changed: bool = True):
    """Replaces metrics.csv, then metrics.jsonl (the source of truth), with
    ``self.rows``, each atomically; a file whose content is unchanged is left alone
    (``only_if_changed``)."""
    jsonl = "".join(json.dumps(r) + "\n" for r in self.rows)
    cols: List[str] = []
    for r in self.rows:
      cols += [k for k in r if k not in cols and not isinstance(r[k], (list, dict))]
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in self.rows:
      w.writerow(r)
    for path, text in ((self.path_csv, buf.getvalue()), (self.path_jsonl, jsonl)):
      if not only_if_changed or read_bytes(path) != text.encode():
        atomic_write(path, text)

  def append(self, row: Dict[str, Any]):
    """Adds one row to both files. On a write error (``WorkdirError``) the row is not
    added and metrics.jsonl is as before the call."""
    raw = row
    row = {k: _jsonable(v) for k, v in row.items()}
    self.rows.append(row)
    try:
      self._rewrite(only_if_changed=False)
    except WorkdirError:
      self.rows.pop()
      try:  # metrics.csv may already hold the row: put it back (best effort, disk full?)
        self._rewrite()
      except WorkdirError:
        pass
      raise
    if self._tb is not None:  # the raw row: NaN stays NaN (JSON writes null)
      self._tb_guard(self._tb_write, raw)

  def truncate(self, last: int) -> None:
    """Drops the rows past ``row[key] = last`` (both files rewritten)."""
    self.rows = [r for r in self.rows if r.get(self.key, 0) <= last]
    self._rewrite()


@contextlib.contextmanager
def _swallow_unraisable():
  """Drops the 'Exception ignored in <coroutine ...>' reports orbax's reader leaves when
  a corrupt array fails to read (the failure itself is raised and reported once)."""
  hook = sys.unraisablehook
  sys.unraisablehook = lambda unraisable: None
  try:
    try:
      yield
    finally:
      gc.collect()
  finally:
    sys.unraisablehook = hook


BEST_DIR = "checkpoints_best"
BEST_METRIC = "val_dice_mean"  # the metrics row's validation Dice (foreground mean)


def _metric_value(metrics: Optional[Dict[str, Any]], key: str) -> Optional[float]:
  """``metrics[key]`` as a finite float, else None (absent, None, NaN, not a number)."""
  if not metrics or key not in metrics:
    return None
  try:
    v = float(metrics[key])
  except (TypeError, ValueError):
    return None
  return v if math.isfinite(v) else None


def _mp_options(local: bool, suffix: str = ""):
  if not local:
    return ocp.options.MultiprocessingOptions()
  return ocp.options.MultiprocessingOptions(
      primary_host=jax.process_index(), active_processes={jax.process_index()},
      barrier_sync_key_prefix=f"process{jax.process_index()}{suffix}")


def _best_manager(path: str, metric: str = BEST_METRIC, create: bool = True,
                  local: bool = False) -> ocp.CheckpointManager:
  """The orbax manager of ``path`` (``checkpoints_best/``) that keeps the one checkpoint
  with the highest ``metrics[metric]`` (``best_fn``/``best_mode='max'``; a step saved
  without metrics is not kept)."""
  if local and create:  # orbax refuses create=True with active_processes
    os.makedirs(path, exist_ok=True)
  return ocp.CheckpointManager(
      path, options=ocp.CheckpointManagerOptions(
          max_to_keep=1, best_fn=lambda m: float(m[metric]), best_mode="max",
          keep_checkpoints_without_metrics=False, create=create and not local,
          cleanup_tmp_directories=create, multiprocessing_options=_mp_options(local, "_best")))


def best_checkpoint(workdir: str, metric: str = BEST_METRIC) -> Optional[Tuple[int, float]]:
  """(step, ``metric``) of the best checkpoint in ``workdir/checkpoints_best``, or None
  when the run has none (no row with a finite ``metric``, or a run from before best
  checkpoints were kept). Reads only (creates nothing)."""
  path = os.path.join(os.path.abspath(workdir), BEST_DIR)
  if not os.path.isdir(path) or not any(n.isdigit() for n in os.listdir(path)):
    return None
  mngr = _best_manager(path, metric, create=False)
  try:
    return _best_of(mngr, metric)
  finally:
    mngr.close()


def _best_of(mngr: Optional[ocp.CheckpointManager], metric: str) -> Optional[Tuple[int, float]]:
  """(step, finite ``metric``) of ``mngr``'s best step, or None."""
  step = mngr.best_step() if mngr is not None else None
  value = _metric_value(mngr.metrics(step), metric) if step is not None else None
  return None if value is None else (int(step), value)


class Checkpointer:
  """Thin orbax wrapper: save(step, pytree, metrics), restore_latest(abstract) -> (step,
  pytree), best() -> (step, value), restore_best(abstract).

  Latest checkpoints (``checkpoints/``, the newest ``max_to_keep``): every save also
  records the sha256 of the saved state (``state_digest``) in
  ``checkpoints/digests.json``; ``restore_latest`` restores the newest step whose
  checkpoint reads back with that digest. A step that does not (unreadable files,
  flipped bytes) is reported on stdout as a warning naming the step, and the next
  older step is tried; once one restores, the bad ones are moved to
  ``<workdir>/checkpoints_corrupt/`` (so later saves of those steps do not collide
  with them). If none restores, :class:`WorkdirError` names the folder and every step.
  A save that fails (a full disk: OSError ENOSPC) removes its partial temporary
  folder and re-raises; the older checkpoints are untouched (orbax writes a step to a
  temporary folder and renames it when complete, and deletes old steps only after).

  Best checkpoint (``checkpoints_best/``, one step): a save whose ``metrics`` hold a
  finite ``best_metric`` (``val_dice_mean``: the validation Dice of the row) higher
  than the best so far also saves the state there, with the value as orbax metrics;
  a second orbax manager (``best_fn``, ``best_mode='max'``) keeps only the best step
  and deletes the one it beat (after the new one is complete). Its digests are in
  ``checkpoints_best/digests.json``. A run whose rows carry no validation Dice (FCL
  pre-training) has no ``checkpoints_best/``. The best is saved *before* the latest
  checkpoint of the same step, so a run killed between the two resumes from the step
  before, re-runs that step (bit-identical: exact resume) and finds it already best
  (an equal value does not replace it): the best survives a resume unchanged.
  ``reset_best`` (a fresh start) deletes a stale ``checkpoints_best/``.
  """

  def __init__(self, workdir: str, max_to_keep: int = 2, best_metric: str = BEST_METRIC):
    self.workdir = os.path.abspath(workdir)
    self.path = path = os.path.join(self.workdir, "checkpoints")
    self.digests_path = os.path.join(path, DIGESTS)
    self.best_metric = best_metric
    self.best_path = os.path.join(self.workdir, BEST_DIR)
    self.best_digests_path = os.path.join(self.best_path, DIGESTS)
    self._best_mngr: Optional[ocp.CheckpointManager] = None  # opened when first needed
    self._best_cache: Any = _ABSENT  # best() memoised between saves
    # Several processes (launch.py --distributed): each process keeps its own copy
    # of the (replicated) state in its own workdir, so orbax runs per process.
    self.local = jax.process_count() > 1
    mp = _mp_options(self.local)
    if self.local:  # orbax refuses create=True with active_processes
      os.makedirs(path, exist_ok=True)
    self.manager = ocp.CheckpointManager(
        path, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                                   create=not self.local,
                                                   cleanup_tmp_directories=True,
                                                   multiprocessing_options=mp))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def _digests(self, path: Optional[str] = None) -> Dict[str, str]:
    try:
      with open(path or self.digests_path) as f:
        d = json.load(f)
      return d if isinstance(d, dict) else {}
    except (OSError, ValueError):  # absent, or unreadable: the checkpoints are not verified
      return {}

  def _save_to(self, manager, root: str, digests_path: str, step: int, state, digest: str,
               metrics: Optional[Dict[str, float]] = None) -> None:
    try:
      manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics)
      manager.wait_until_finished()
    except BaseException:
      for tmp in glob.glob(os.path.join(root, f"{step}.orbax-checkpoint-tmp*")):
        shutil.rmtree(tmp, ignore_errors=True)
      raise
    kept = {str(s) for s in manager.all_steps()}
    digests = {k: v for k, v in self._digests(digests_path).items() if k in kept}
    digests[str(step)] = digest
    # A kill before this write leaves the step without a digest: restored unverified.
    atomic_write(digests_path, json.dumps(digests, sort_keys=True, indent=1))

  def save(self, step: int, state, metrics: Optional[Dict[str, Any]] = None) -> None:
    """Saves ``state`` as the latest checkpoint of ``step``; also as the best one when
    ``metrics[best_metric]`` is finite and beats ``best()`` (saved first)."""
    host = jax.device_get(state)  # the digest's bytes (orbax copies to host as well)
    digest = state_digest(host)
    value = _metric_value(metrics, self.best_metric)
    if value is not None:
      best = self.best()
      if best is None or value > best[1]:
        mngr = self._best_manager(create=True)
        if step in mngr.all_steps():  # a step re-run after a resume that now scores higher
          mngr.delete(step)
        self._best_cache = _ABSENT
        self._save_to(mngr, self.best_path, self.best_digests_path, step,
                      host if self.local else state, digest, {self.best_metric: value})
        self._best_cache = (int(step), value)
    self._save_to(self.manager, self.path, self.digests_path, step,
                  host if self.local else state, digest)

  def _best_manager(self, create: bool = False) -> Optional[ocp.CheckpointManager]:
    if self._best_mngr is None and (create or os.path.isdir(self.best_path)):
      self._best_mngr = _best_manager(self.best_path, self.best_metric, create=create,
                                      local=self.local)
    return self._best_mngr

  def best(self) -> Optional[Tuple[int, float]]:
    """(step, value of ``best_metric``) of the best checkpoint, or None when there is none."""
    if self._best_cache is _ABSENT:
      self._best_cache = _best_of(self._best_manager(), self.best_metric)
    return self._best_cache

  def reset_best(self) -> None:
    """Deletes ``checkpoints_best/`` (a fresh start: a best of an earlier run is stale)."""
    if self._best_mngr is not None:
      self._best_mngr.close()
      self._best_mngr = None
    shutil.rmtree(self.best_path, ignore_errors=True)
    self._best_cache = _ABSENT

  def _abstract(self, like):
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    if self.local:  # restore on this process's first device; the trainer re-places it
      dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev),
                              abstract)
    return abstract

  def _restore(self, step: int, abstract, manager=None, digests_path: Optional[str] = None):
    restored = (manager or self.manager).restore(step, args=ocp.args.StandardRestore(abstract))
    want = self._digests(digests_path).get(str(step))
    if want is not None and state_digest(restored) != want:
      raise ValueError("its content differs from the sha256 recorded when it was saved")
    return restored

  def restore_best(self, like):
    """(step, state) of the best checkpoint, verified against its digest; (None, None)
    when there is none. A checkpoint that does not read back raises
    :class:`WorkdirError` naming it."""
    best = self.best()
    if best is None:
      return None, None
    step = best[0]
    try:
      with _swallow_unraisable():
        return step, self._restore(step, self._abstract(like), self._best_manager(),
                                   self.best_digests_path)
    except Exception as e:  # noqa: BLE001 - any failure to read back
      why = one_line(str(e).split(" See full TensorStore details")[0])
      raise WorkdirError(f"{self.best_path}: the best checkpoint (step {step}) cannot be "
                         f"restored ({why})") from e

  def restore_latest(self, like):
    steps = sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      return None, None
    abstract = self._abstract(like)
    bad: List[Tuple[int, str]] = []
    for i, step in enumerate(steps):
      try:
        with _swallow_unraisable():
          restored = self._restore(step, abstract)
      except Exception as e:  # noqa: BLE001 - any failure to read back is a bad checkpoint
        why = one_line(str(e).split(" See full TensorStore details")[0])
        bad.append((step, why))
        nxt = (f"trying step {steps[i + 1]}" if i + 1 < len(steps) else "no older checkpoint")
        print(f"[checkpoint] warning: the checkpoint of step {step} in {self.path} cannot be "
              f"restored ({why}); {nxt}", flush=True)
        continue
      if bad:
        self._quarantine([s for s, _ in bad])
        print(f"[checkpoint] resuming from step {step}; the unreadable step(s) "
              f"{', '.join(str(s) for s, _ in bad)} were moved to "
              f"{os.path.join(self.workdir, CORRUPT_DIR)}", flush=True)
      return step, restored
    raise WorkdirError(
        f"{self.path}: no checkpoint can be restored ("
        + "; ".join(f"step {s}: {w}" for s, w in bad)
        + "); move the folder away, or re-run with --fresh to start anew")

  def _quarantine(self, steps: List[int]) -> None:
    dest_root = os.path.join(self.workdir, CORRUPT_DIR)
    os.makedirs(dest_root, exist_ok=True)
    for step in steps:
      src = os.path.join(self.path, str(step))
      if os.path.exists(src):
        os.rename(src, _unique(os.path.join(dest_root, str(step))))
    self.manager.reload()

  def close(self):
    self.manager.close()
    if self._best_mngr is not None:
      self._best_mngr.close()
      self._best_mngr = None


class Progress:
  """Progress lines with rate and ETA: ``[train] epoch 3/20 ... eta 1m12s``; on a
  terminal also a `fedjax_seg.progress.Bar` (rich) with the same ETA.

  ``step(done, extra)`` prints the line and moves the bar; ``close()`` removes the
  bar (idempotent). ``bar=False``: lines only.
  """

  def __init__(self, total: int, start: int = 0, what: str = "epoch", bar: bool = False,
               tag: str = "[train]"):
    from fedjax_seg import progress
    self.total, self.start, self.what = total, start, what
    self.t0 = time.time()
    self.bar = progress.Bar(total, f"{tag} {what}s", completed=start, enabled=None if bar else False)

  def line(self, done: int, extra: str = "") -> str:
    el = time.time() - self.t0
    n = max(done - self.start, 1)
    eta = el / n * (self.total - done)
    return (f"[train] {self.what} {done}/{self.total}  {extra}  "
            f"({el / n:.1f}s/{self.what}, eta {_fmt_s(eta)})")

  def step(self, done: int, extra: str = "", verbose: bool = True) -> None:
    if verbose:
      print(self.line(done, extra), flush=True)
    self.bar.update(done)

  def close(self) -> None:
    self.bar.close()


def _fmt_s(s: float) -> str:
  s = int(round(s))
  return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def json_text(obj) -> str:
  """The text ``write_json`` writes: NumPy scalars/arrays converted, keys sorted, indent 2."""
  def conv(o):
    if isinstance(o, dict):
      return {str(k): conv(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
      return [conv(v) for v in o]
    return _jsonable(o)
  return json.dumps(conv(obj), indent=2, sort_keys=True)


def write_json(path: str, obj) -> None:
  """``json_text(obj)`` to ``path``, replaced atomically (``atomic_write``)."""
  atomic_write(path, json_text(obj))


# ---------------------------------------------------------------------------
# Workdir safety (docs/reliability.md).
# ---------------------------------------------------------------------------
DIGESTS = "digests.json"
CORRUPT_DIR = "checkpoints_corrupt"

# Config keys that may differ when a workdir is re-run (resumed): they extend the run
# or change what is evaluated / where caches live, never the training so far. Any other
# key that differs from the stored config.json (a key present on one side only
# included) refuses the re-run, unless launch.py --fresh moves the old run aside.
RESUMABLE_KEYS = frozenset({
    "fl.rounds",          # extend (or keep) the number of rounds
    "num_epochs",         # extend the number of epochs (centralised runs)
    "pretrain.rounds",    # extend FCL pre-training
    "fl.eval_every",      # how often the global model is evaluated
    "fl.eval_clients",    # per-client validation Dice in the rows
    "eval_batch_size",    # evaluation batch size (evaluation only)
    "compile_cache_dir",  # where compiled programs are cached
    "fl.host_threads",    # threads issuing the loop round's client calls (same results)
    "data.cache_dir",     # where the (deterministic) phantom / preprocessed data are cached
    "data.n4.cache_dir",  # where N4-corrected volumes are cached
})


class WorkdirError(ValueError):
  """A workdir that cannot be used as asked; the message names the file or folder."""


def one_line(e: BaseException, limit: int = 240) -> str:
  text = " ".join(str(e).split()) or type(e).__name__
  return text if len(text) <= limit else text[:limit - 3] + "..."


def os_error(e: BaseException) -> Optional[OSError]:
  """The OSError ``e`` is, or was raised from (orbax may wrap it), else None."""
  seen = set()
  while e is not None and id(e) not in seen:
    if isinstance(e, OSError):
      return e
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  return None


def os_error_text(e: OSError) -> str:
  """'no space left on device' for ENOSPC, else the error's text."""
  return "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or one_line(e))


def read_bytes(path: str) -> Optional[bytes]:
  try:
    with open(path, "rb") as f:
      return f.read()
  except FileNotFoundError:
    return None


def _unique(path: str) -> str:
  if not os.path.exists(path):
    return path
  i = 2
  while os.path.exists(f"{path}-{i}"):
    i += 1
  return f"{path}-{i}"


def atomic_write(path: str, data) -> None:
  """Writes ``data`` (str or bytes) to ``path`` through ``path.tmp`` + fsync + os.replace:
  readers (and a run killed at any moment) see the old file or the new one. An
  OSError (a full disk, ...) removes the temporary file, leaves ``path`` as it was and
  raises :class:`WorkdirError` naming ``path``."""
  tmp = path + ".tmp"
  try:
    with open(tmp, "wb") as f:
      f.write(data.encode() if isinstance(data, str) else data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as e:
    try:
      os.remove(tmp)
    except OSError:
      pass
    raise WorkdirError(f"{path}: cannot write it ({os_error_text(e)}); the previous version is "
                       f"unchanged") from e


def state_digest(state) -> str:
  """sha256 over every leaf's dtype, shape and bytes, in tree order (typed PRNG keys by
  their key data)."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(state):
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    a = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
    h.update(f"{a.dtype.str}{a.shape};".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def read_json_file(path: str) -> Dict[str, Any]:
  """A JSON object file; :class:`WorkdirError` naming it when it is not one."""
  try:
    with open(path) as f:
      obj = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise WorkdirError(f"{path}: corrupt, not valid JSON ({one_line(e, 80)}); repair it, or "
                       f"re-run with --fresh to move the old run aside") from e
  if not isinstance(obj, dict):
    raise WorkdirError(f"{path}: corrupt, a JSON {type(obj).__name__} where an object is "
                       f"expected; repair it, or re-run with --fresh to move the old run aside")
  return obj


def read_metrics(path: str) -> List[Dict[str, Any]]:
  """The rows of a metrics.jsonl ([] when absent); :class:`WorkdirError` naming the file
  and line when a line is not a JSON object."""
  if not os.path.exists(path):
    return []
  rows = []
  with open(path, "rb") as f:
    for i, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except (ValueError, UnicodeDecodeError) as e:
        row, err = None, one_line(e, 80)
      else:
        err = None if isinstance(row, dict) else f"a JSON {type(row).__name__}, not an object"
      if err is not None:
        raise WorkdirError(f"{path}: corrupt at line {i} ({err}); repair or delete that line, "
                           f"or re-run with --fresh to move the old run aside")
      rows.append(row)
  return rows


def flatten(blob: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
  """Nested dicts -> {dotted key: leaf value}."""
  out: Dict[str, Any] = {}
  for k, v in blob.items():
    if isinstance(v, dict) and v:
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


_ABSENT = object()


def config_diff(old: Dict[str, Any], new: Dict[str, Any], allowed=RESUMABLE_KEYS,
                defaults: Optional[Dict[str, Any]] = None) -> List[Tuple[str, Any, Any]]:
  """[(dotted key, old value, new value)] of the keys whose value differs, less
  ``allowed``. A key the stored config ``old`` does not have (added to the configs after
  the run began; ``_ABSENT`` on that side) counts only when the config file's own values
  ``defaults`` are given and the new value is not the default there (an override of the
  new key); without ``defaults`` it does not count. A key ``new`` no longer has does not
  count (nothing reads it)."""
  fo, fn = flatten(old), flatten(new)
  fd = flatten(defaults) if defaults is not None else None
  out = []
  for k in sorted(set(fo) | set(fn)):
    a, b = fo.get(k, _ABSENT), fn.get(k, _ABSENT)
    if a == b or k in allowed or b is _ABSENT:
      continue
    if a is _ABSENT and (fd is None or fd.get(k, _ABSENT) == b):
      continue
    out.append((k, a, b))
  return out


def _short(v) -> str:
  if v is _ABSENT:
    return "(absent)"
  text = json.dumps(v) if not isinstance(v, str) else repr(v)
  return text if len(text) <= 24 else text[:21] + "..."


def has_run(workdir: str) -> bool:
  """Whether ``workdir`` holds training state: a checkpoint, a metrics row or results."""
  ck = os.path.join(workdir, "checkpoints")
  if os.path.isdir(ck) and any(n.isdigit() for n in os.listdir(ck)):
    return True
  if os.path.isfile(os.path.join(workdir, "results.json")):
    return True
  m = os.path.join(workdir, "metrics.jsonl")
  return os.path.isfile(m) and os.path.getsize(m) > 0


def check_workdir(workdir: str, config_blob: Optional[Dict[str, Any]] = None,
                  defaults: Optional[Dict[str, Any]] = None,
                  max_keys: int = 8) -> Optional[Dict[str, Any]]:
  """Refuses, before anything is written, a workdir this run must not use: a path that
  is not a folder, a corrupt config.json or metrics.jsonl, or an earlier run (training
  state: ``has_run``) whose config.json differs from ``config_blob`` in any key but
  ``RESUMABLE_KEYS`` (``config_diff``, ``defaults`` the config file's values without
  overrides; the first ``max_keys`` differing keys are named). Reads only. Returns the
  stored config (None when there is none)."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f"{workdir}: exists and is not a folder (--workdir must be a folder)")
  if not os.path.isdir(workdir):
    return None
  path = os.path.join(workdir, "config.json")
  old = read_json_file(path) if os.path.exists(path) else None
  read_metrics(os.path.join(workdir, "metrics.jsonl"))
  if old is not None and config_blob is not None and has_run(workdir):
    diff = config_diff(old, config_blob, defaults=defaults)
    if diff:
      shown = ", ".join(f"{k} {_short(a)} -> {_short(b)}" for k, a, b in diff[:max_keys])
      more = f" and {len(diff) - max_keys} more" if len(diff) > max_keys else ""
      raise WorkdirError(
          f"{path}: this workdir holds a run with a different config ({shown}{more}); re-run "
          f"it with its own config, or pass --fresh to move it aside and start anew")
  return old


def steps_in(folder: str, item: Optional[str] = None) -> List[int]:
  """The completed orbax steps of a checkpoint folder (step folder names; orbax's temporary
  folders of an unfinished save excluded; with ``item``, only steps holding ``<step>/<item>``),
  read without restoring."""
  if not os.path.isdir(folder):
    return []
  return sorted(int(n) for n in os.listdir(folder)
                if n.isdigit() and os.path.isdir(os.path.join(folder, n, item or "")))


def checkpoint_steps(workdir: str) -> List[int]:
  """The completed checkpoint steps in ``workdir/checkpoints`` (`steps_in`)."""
  return steps_in(os.path.join(workdir, "checkpoints"))


def check_extent(workdir: str, key: str, total: int) -> None:
  """Refuses a re-run asking for fewer steps (``config.<key>=total``) than the latest
  checkpoint in ``workdir`` has completed (its results would describe a longer run)."""
  steps = checkpoint_steps(workdir)
  if steps and steps[-1] > total:
    raise WorkdirError(
        f"{os.path.join(workdir, 'checkpoints')}: the latest checkpoint is at step "
        f"{steps[-1]}, past config.{key}={total}; ask for at least {steps[-1]}, or re-run "
        f"with --fresh to start anew")


def move_aside(workdir: str, now: Optional[float] = None) -> Optional[str]:
  """``launch.py --fresh``: renames an existing ``workdir`` to
  ``<workdir>.old-<YYYYmmdd-HHMMSS>`` (``-2``, ``-3``, ... if taken); returns the new
  path, or None when there was nothing to move."""
  workdir = workdir.rstrip(os.sep) or workdir
  if not os.path.lexists(workdir):
    return None
  if not os.path.isdir(workdir):
    raise WorkdirError(f"{workdir}: exists and is not a folder (--workdir must be a folder)")
  dest = _unique(f"{workdir}.old-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}")
  os.rename(workdir, dest)
  return dest


def metrics_table(named: Dict[str, Dict[str, float]], keys: List[str]) -> str:
  """Markdown table: one row per split/run, one column per metric key."""
  head = "| | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys) + "\n"
  rows = []
  for name, m in named.items():
    cells = []
    for k in keys:
      v = m.get(k)
      cells.append("–" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v)))
    rows.append(f"| {name} | " + " | ".join(cells) + " |")
  return head + "\n".join(rows)


def plot_learning_curves(rows: List[Dict[str, Any]], path: str, x_key: str = "epoch") -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  xs = [r[x_key] for r in rows]
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for k in [k for k in ("train_loss", "val_loss") if any(k in r for r in rows)]:
    axes[0].plot(xs, [r.get(k) for r in rows], marker=".", label=k)
  axes[0].set_xlabel(x_key); axes[0].set_ylabel("loss"); axes[0].legend(); axes[0].grid(alpha=.3)
  for k in [k for k in ("val_dice_mean", "val_iou_mean") if any(k in r for r in rows)]:
    axes[1].plot(xs, [r.get(k) for r in rows], marker=".", label=k)
  axes[1].set_xlabel(x_key); axes[1].set_ylabel("foreground mean (background excluded)")
  axes[1].set_ylim(0, 1); axes[1].legend(); axes[1].grid(alpha=.3)
  fig.tight_layout(); fig.savefig(path, dpi=90); plt.close(fig)


# Colours per SPEC §5: blue = necrotic/core (1), green = edema (2), red = enhancing (3).
LABEL_COLOURS = np.array([[0, 0, 0], [0, 90, 255], [0, 200, 0], [255, 40, 40]], np.float32) / 255.


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
  """RGB overlay of integer ``labels`` [H, W] on a grey ``image`` [H, W]."""
  g = image.astype(np.float32)
  g = (g - g.min()) / max(float(g.max() - g.min()), 1e-8)
  rgb = np.repeat(g[..., None], 3, axis=-1)
  lab = np.clip(labels.astype(int), 0, len(LABEL_COLOURS) - 1)
  col = LABEL_COLOURS[lab]
  m = (lab > 0)[..., None]
  return np.where(m, (1 - alpha) * rgb + alpha * col, rgb)


def _overlay_panels(images, labels, preds, channel: int = 1, n: int = 4):
  """[(image, ground truth overlay, prediction overlay)] RGB of up to n slices, foreground slices first."""
  fg = np.where(labels.reshape(len(labels), -1).max(axis=1) > 0)[0]
  idx = list(fg[np.linspace(0, len(fg) - 1, min(n, len(fg))).astype(int)]) if len(fg) else []
  idx = idx or list(range(min(n, len(images))))
  out = []
  for i in idx:
    img = images[i][..., min(channel, images.shape[-1] - 1)]
    out.append(tuple(np.clip(im, 0, 1) for im in (
        np.repeat(img[..., None], 3, -1) / max(img.max(), 1e-8), overlay(img, labels[i]),
        overlay(img, preds[i]))))
  return out


def tb_overlays(workdir: str, images, labels, preds, step: int, tag: str = "overlays/test") -> None:
  """The overlays of `plot_overlays` as one TensorBoard image (rows: slices; columns: image,
  ground truth, prediction) in the run ``<workdir>/tensorboard/overlays``; nothing without
  tensorboardX, a warning on a write error (never fatal)."""
  panels = _overlay_panels(images, labels, preds)
  if not panels:
    return
  try:
    w = tb_writer(os.path.join(workdir, "tensorboard", "overlays"))
    if w is None:
      return
    with w:
      grid = np.concatenate([np.concatenate(row, axis=1) for row in panels], axis=0)
      w.add_image(tag, grid.astype(np.float32), int(step), dataformats="HWC")
  except Exception as e:  # noqa: BLE001 - TensorBoard is a convenience
    warnings.warn(f"TensorBoard overlays in {workdir}/tensorboard/overlays not written: {e!r}",
                  RuntimeWarning, stacklevel=2)


def plot_overlays(images, labels, preds, path: str, channel: int = 1, n: int = 4) -> None:
  """Grid of n slices: image, ground truth overlay, prediction overlay."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  panels = _overlay_panels(images, labels, preds, channel, n)
  fig, axes = plt.subplots(len(panels), 3, figsize=(7.5, 2.5 * len(panels)), squeeze=False)
  for r, row in enumerate(panels):
    for c, (title, im) in enumerate(zip(("image", "ground truth", "prediction"), row)):
      axes[r, c].imshow(im); axes[r, c].set_axis_off()
      if r == 0:
        axes[r, c].set_title(title)
  fig.tight_layout(); fig.savefig(path, dpi=80); plt.close(fig)
