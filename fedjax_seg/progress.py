"""Progress bars with ETA (``rich.progress``) on a terminal; nothing otherwise.

    bar = Bar(total, "[n4] BraTS", completed=0)
    bar.update(i, info="BraTS20_Training_001")
    bar.close()

The plain progress lines (``[train] epoch 3/20 ... eta 1m12s``, ``[n4] ...``,
``[sweep] point ...``) are printed as before, whether or not a bar shows; a bar
is added only when stdout is a terminal (not under pytest, CI or a redirect to a
log file) and ``FEDJAX_SEG_PROGRESS`` is not ``plain``. All bars share one
``rich.progress.Progress`` display (rich allows one live display at a time), so
nested loops (a sweep, the runs inside it, their N4 pass) stack their bars;
while it shows, ``print`` output appears above the bars. Without rich (it comes
with flax), there are no bars.
"""
from __future__ import annotations

import os
import sys
import weakref
from typing import Any, Optional

_LIVE: Any = None  # the shared rich.progress.Progress while at least one bar is open
_OPEN = 0


def interactive() -> bool:
  """Bars are shown: stdout is a terminal and FEDJAX_SEG_PROGRESS is not 'plain'."""
  if os.environ.get("FEDJAX_SEG_PROGRESS", "").lower() == "plain":
    return False
  try:
    return bool(sys.stdout.isatty()) and os.environ.get("TERM", "") != "dumb"
  except (AttributeError, ValueError):  # a replaced or closed stdout
    return False


def _live():
  global _LIVE
  if _LIVE is None:
    from rich import progress as rp
    _LIVE = rp.Progress(rp.TextColumn("{task.description}"), rp.BarColumn(),
                        rp.MofNCompleteColumn(), rp.TimeElapsedColumn(), rp.TextColumn("eta"),
                        rp.TimeRemainingColumn(), rp.TextColumn("{task.fields[info]}"),
                        transient=True)
    _LIVE.start()
  return _LIVE


def _remove(task) -> None:
  global _LIVE, _OPEN
  if _LIVE is None:
    return
  _LIVE.remove_task(task)
  _OPEN -= 1
  if _OPEN == 0:
    _LIVE.stop()
    _LIVE = None


class Bar:
  """One bar (description, bar, done/total, elapsed, ETA, info) of the shared display; a
  no-op when not `interactive` (or ``enabled=False``). Removed by ``close()``, on leaving a
  ``with`` block, or when the Bar is garbage-collected (a loop left by an exception)."""

  def __init__(self, total: int, description: str, completed: int = 0, enabled: Optional[bool] = None):
    global _OPEN
    self._task = None
    self._close = None
    if not (interactive() if enabled is None else enabled):
      return
    try:
      live = _live()
    except ImportError:
      return
    from rich.markup import escape  # '[n4]' is text, not a style tag
    self._escape = escape
    self._task = live.add_task(escape(description), total=max(int(total), 0), completed=int(completed),
                               info="")
    _OPEN += 1
    self._close = weakref.finalize(self, _remove, self._task)

  @property
  def shown(self) -> bool:
    return self._task is not None

  def update(self, completed: int, info: str = "") -> None:
    if self._task is not None:
      _LIVE.update(self._task, completed=int(completed), info=self._escape(info))

  def advance(self, n: int = 1, info: Optional[str] = None) -> None:
    if self._task is not None:
      kw = {} if info is None else {"info": self._escape(info)}
      _LIVE.update(self._task, advance=n, **kw)

  def close(self) -> None:
    if self._close is not None:
      self._close()
    self._task = self._close = None

  def __enter__(self) -> "Bar":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
