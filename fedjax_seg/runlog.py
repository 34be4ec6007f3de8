"""Run bookkeeping shared by every trainer: metrics files, orbax checkpoints,
progress lines with ETA, results JSON and plots.

Workdir layout:
  config.json        the resolved config of the run
  metrics.jsonl      one JSON object per epoch/round (appended)
  metrics.csv        the same rows as CSV (rewritten after each row)
  tensorboard/       the same rows as TensorBoard scalars (tensorboardX event files)
  checkpoints/       orbax CheckpointManager (latest 2 kept)
  results.json       final metrics (written at the end)
  learning_curves.png, overlays.png
"""
from __future__ import annotations

import csv
import glob
import json
import math
import os
import re
import sys
import time
import warnings
import weakref
from typing import Any, Dict, List, Optional

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


def compile_times(reset: bool = False) -> Dict[str, float]:
  """Seconds spent compiling each ``cached_jit`` program since the last reset:
  ``{name: s}``, ``name`` being the key's leading word (``round``, ``train_step``,
  ``eval``, ...). A program already compiled in this process (same key and
  argument shapes) reads 0.0 once it is called; one that was never called is
  absent. ``reset=True`` returns the times and starts a new record (a run's
  ``finish`` does, so each run's results hold its own compile times)."""
  out = dict(_COMPILE_S)
  if reset:
    _COMPILE_S.clear()
  return out


def reset_compile_times() -> None:
  """Start a new compile-time record (``compile_times()`` is empty until the next call)."""
  _COMPILE_S.clear()


def _signature(args, kwargs):
  """What makes jax.jit compile again: the pytree structure and every leaf's
  type, shape, dtype, weak type and sharding."""
  leaves, tree = jax.tree.flatten((args, kwargs))
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
  function, which reuses that executable (no second compilation). Every call
  goes through the jitted function, so jax.jit semantics (donation, new
  shapes, shardings) are unchanged. Attributes (``lower``, ``trace``, ...)
  are the jitted function's.
  """

  def __init__(self, name: str, jitted, verbose: bool = True):
    self.name, self.jitted, self.verbose = name, jitted, verbose
    self._compiled: set = set()

  def __call__(self, *args, **kwargs):
    try:
      sig = _signature(args, kwargs)
      hash(sig)
    except TypeError:  # an unhashable leaf: leave it to jax.jit, untimed
      sig = None
    if sig is None:
      pass
    elif sig not in self._compiled:
      self._compile(args, kwargs)
      self._compiled.add(sig)
    else:
      _COMPILE_S.setdefault(self.name, 0.0)
    return self.jitted(*args, **kwargs)

  def _compile(self, args, kwargs):
    if self.verbose:
      print(f"[compile] compiling {self.name} program ...", flush=True)
    t0 = time.perf_counter()
    self.jitted.lower(*args, **kwargs).compile()
    s = time.perf_counter() - t0
    _COMPILE_S[self.name] = _COMPILE_S.get(self.name, 0.0) + s
    if self.verbose:
      print(f"[compile] {self.name} program: {s:.1f} s", flush=True)

  def __getattr__(self, attr):
    return getattr(self.jitted, attr)


def _program_name(key: str) -> str:
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
    _JIT_CACHE[key] = TimedJit(name or _program_name(key), jax.jit(build(), **jit_kwargs))
  return _JIT_CACHE[key]


_TBX: Any = None  # (EventsWriter, event_pb2, summary_pb2) once imported; False if unavailable


def _tbx():
  """tensorboardX's synchronous event-file writer and protos, or None (warned once).

  ``import tensorboardX`` imports PyTorch when it is installed (the ``bench``
  extra), which costs seconds and loads a second CUDA stack next to JAX's; we
  only need the writer and the protos, so torch is hidden while importing.
  """
  global _TBX
  if _TBX is None:
    hide = "torch" not in sys.modules
    if hide:
      sys.modules["torch"] = None  # `import torch` raises ImportError inside tensorboardX
    try:
      from tensorboardX.event_file_writer import EventsWriter
      from tensorboardX.proto import event_pb2, summary_pb2
      _TBX = (EventsWriter, event_pb2, summary_pb2)
    except Exception as e:  # noqa: BLE001 - any import failure: JSONL/CSV still written
      _TBX = False
      warnings.warn(f"tensorboardX unavailable ({e!r}): no TensorBoard event files are "
                    "written; metrics.jsonl/metrics.csv are unaffected "
                    "(`pip install tensorboardX` to get them)", RuntimeWarning, stacklevel=3)
    finally:
      if hide and sys.modules.get("torch", 0) is None:
        del sys.modules["torch"]
  return _TBX or None


def scalars(row: Dict[str, Any], skip=()) -> Dict[str, float]:
  """Flatten a metrics row into ``{tag: float}``: nested dicts join keys with '/',
  lists/arrays append the index (``weights/0``); bools become 0/1, NaN/inf are
  kept; strings, None and other non-numbers are skipped."""
  out: Dict[str, float] = {}

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
    if k not in skip:
      walk(str(k), v)
  return out


class MetricsLog:
  """Append-only metrics.jsonl + metrics.csv + TensorBoard scalars. Rows past
  ``resume_from`` are dropped on open so that a resumed run never duplicates rows.

  TensorBoard: every row is also written to ``<workdir>/tensorboard/`` as one
  event with one scalar per numeric field (see ``scalars``: ``weights/0``, ...)
  at step ``row[key]``; the file is flushed after each row, so
  ``tensorboard --logdir`` shows the curves live. JSONL/CSV stay the source of
  truth: without tensorboardX (warned once) or on a write error, only they are
  written. Each MetricsLog opens a new event file:
  - fresh run (no row kept): old event files in ``tensorboard/`` are deleted,
    as metrics.jsonl is truncated;
  - resume with kept rows: the kept rows stay in the old event files (not
    rewritten); the new file starts with a SessionLog.START at step
    ``resume_from + 1``, which makes TensorBoard hide the rows the old files
    hold past the checkpoint (the ones dropped from metrics.jsonl), so the
    re-run steps are not shown twice. If there are no old event files (a run
    started before this feature), the kept rows are written to the new file.
  The file is closed by ``close()``, or when the log is garbage-collected
  (trainers do not call ``close()``; every row is already flushed).
  """

  def __init__(self, workdir: str, resume_from: Optional[int] = None, key: str = "epoch",
               tensorboard: bool = True):
    self.path_jsonl = os.path.join(workdir, "metrics.jsonl")
    self.path_csv = os.path.join(workdir, "metrics.csv")
    self.key = key
    self.rows: List[Dict[str, Any]] = []
    if os.path.exists(self.path_jsonl):
      with open(self.path_jsonl) as f:
        self.rows = [json.loads(line) for line in f if line.strip()]
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
    tbx = _tbx()
    if tbx is None:
      return
    writer_cls, self._event_pb2, self._summary_pb2 = tbx
    old = sorted(glob.glob(os.path.join(self.tb_dir, "events.out.tfevents.*")))
    if not self.rows:
      for p in old:
        os.remove(p)
    os.makedirs(self.tb_dir, exist_ok=True)
    # The file name has a 1 s timestamp; the suffix keeps a quick resume from
    # truncating the previous file and sorts files of one second in order.
    self._tb = writer_cls(os.path.join(self.tb_dir, "events"), f".{time.time_ns()}")
    self._tb_close = weakref.finalize(self, self._tb.close)
    if self.rows and old:
      self._tb.write_event(self._event_pb2.Event(
          wall_time=time.time(), step=int(resume_from) + 1,
          session_log=self._event_pb2.SessionLog(status=self._event_pb2.SessionLog.START)))
    elif self.rows:
      for r in self.rows:
        self._tb_write(r, flush=False)
    self._tb.flush()

  def _tb_write(self, row, flush=True):
    vals = scalars(row, skip=(self.key,))
    summ = self._summary_pb2.Summary(value=[
        self._summary_pb2.Summary.Value(tag=t, simple_value=v) for t, v in vals.items()])
    self._tb.write_event(self._event_pb2.Event(
        wall_time=time.time(), step=int(row.get(self.key, len(self.rows) - 1)), summary=summ))
    if flush:
      self._tb.flush()

  def close(self):
    """Close the TensorBoard event file (idempotent; JSONL/CSV are closed per write)."""
    if self._tb_close is not None:
      self._tb_close()
    self._tb = self._tb_close = None

  # -- JSONL / CSV -----------------------------------------------------------
  def _rewrite(self):
    with open(self.path_jsonl, "w") as f:
      for r in self.rows:
        f.write(json.dumps(r) + "\n")
    cols: List[str] = []
    for r in self.rows:
      cols += [k for k in r if k not in cols and not isinstance(r[k], (list, dict))]
    with open(self.path_csv, "w", newline="") as f:
      w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
      w.writeheader()
      for r in self.rows:
        w.writerow(r)

  def append(self, row: Dict[str, Any]):
    raw = row
    row = {k: _jsonable(v) for k, v in row.items()}
    self.rows.append(row)
    with open(self.path_jsonl, "a") as f:
      f.write(json.dumps(row) + "\n")
    self._rewrite() if len(self.rows) < 2 or set(row) - set(self.rows[-2]) else self._append_csv(row)
    if self._tb is not None:  # the raw row: NaN stays NaN (JSON writes null)
      self._tb_guard(self._tb_write, raw)

  def _append_csv(self, row):
    with open(self.path_csv) as f:
      cols = next(csv.reader(f))
    with open(self.path_csv, "a", newline="") as f:
      csv.DictWriter(f, fieldnames=cols, extrasaction="ignore").writerow(row)


class Checkpointer:
  """Thin orbax wrapper: save(step, pytree), restore_latest(abstract) -> (step, pytree)."""

  def __init__(self, workdir: str, max_to_keep: int = 2):
    path = os.path.abspath(os.path.join(workdir, "checkpoints"))
    # Several processes (launch.py --distributed): each process keeps its own copy
    # of the (replicated) state in its own workdir, so orbax runs per process.
    self.local = jax.process_count() > 1
    mp = (ocp.options.MultiprocessingOptions(
        primary_host=jax.process_index(), active_processes={jax.process_index()},
        barrier_sync_key_prefix=f"process{jax.process_index()}")
          if self.local else ocp.options.MultiprocessingOptions())
    if self.local:  # orbax refuses create=True with active_processes
      os.makedirs(path, exist_ok=True)
    self.manager = ocp.CheckpointManager(
        path, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                                   create=not self.local,
                                                   multiprocessing_options=mp))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state) -> None:
    if self.local:  # host copy of the replicated global arrays
      state = jax.device_get(state)
    self.manager.save(step, args=ocp.args.StandardSave(state))
    self.manager.wait_until_finished()

  def restore_latest(self, like):
    step = self.manager.latest_step()
    if step is None:
      return None, None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    if self.local:  # restore on this process's first device; the trainer re-places it
      dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev),
                              abstract)
    return step, self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def close(self):
    self.manager.close()


class Progress:
  """Progress lines with rate and ETA: ``[train] epoch 3/20 ... eta 1m12s``."""

  def __init__(self, total: int, start: int = 0, what: str = "epoch"):
    self.total, self.start, self.what = total, start, what
    self.t0 = time.time()

  def line(self, done: int, extra: str = "") -> str:
    el = time.time() - self.t0
    n = max(done - self.start, 1)
    eta = el / n * (self.total - done)
    return (f"[train] {self.what} {done}/{self.total}  {extra}  "
            f"({el / n:.1f}s/{self.what}, eta {_fmt_s(eta)})")


def _fmt_s(s: float) -> str:
  s = int(round(s))
  return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def write_json(path: str, obj) -> None:
  def conv(o):
    if isinstance(o, dict):
      return {str(k): conv(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
      return [conv(v) for v in o]
    return _jsonable(o)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(conv(obj), f, indent=2, sort_keys=True)
  os.replace(tmp, path)


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


def plot_overlays(images, labels, preds, path: str, channel: int = 1, n: int = 4) -> None:
  """Grid of n slices: image, ground truth overlay, prediction overlay."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fg = np.where(labels.reshape(len(labels), -1).max(axis=1) > 0)[0]
  idx = list(fg[np.linspace(0, len(fg) - 1, min(n, len(fg))).astype(int)]) if len(fg) else []
  idx = idx or list(range(min(n, len(images))))
  fig, axes = plt.subplots(len(idx), 3, figsize=(7.5, 2.5 * len(idx)), squeeze=False)
  for r, i in enumerate(idx):
    img = images[i][..., min(channel, images.shape[-1] - 1)]
    for c, (title, im) in enumerate([("image", np.repeat(img[..., None], 3, -1) / max(img.max(), 1e-8)),
                                     ("ground truth", overlay(img, labels[i])),
                                     ("prediction", overlay(img, preds[i]))]):
      axes[r, c].imshow(np.clip(im, 0, 1)); axes[r, c].set_axis_off()
      if r == 0:
        axes[r, c].set_title(title)
  fig.tight_layout(); fig.savefig(path, dpi=80); plt.close(fig)
