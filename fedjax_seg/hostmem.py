"""Host memory allocator settings for XLA:CPU (glibc's malloc).

XLA:CPU allocates each program execution's temporary buffers with malloc and frees
them when the execution ends. glibc serves allocations above its mmap threshold
(dynamic, 128 KiB to 32 MiB) with fresh ``mmap`` pages and returns them on free, so a
program called many times page-faults its whole working set on every call. That is the
'loop' round's cost per call, and the host-step round's per local step: measured on the
2-core CPU (64×64 U-Net base 16, one client, E = 8, 2026-12-07), the eight one-step calls
took 691 ms with the defaults and 611 ms with the settings below (the same 8 steps as one
program: 626 ms); docs/performance.md.

:func:`tune` raises the mmap threshold to glibc's maximum (32 MiB), keeps up to 2 GiB of
freed memory at the top of the heap instead of returning it to the system, and grows the
heap 512 MiB at a time (address space; pages are only used when touched). The process
keeps up to about 2 GiB of freed memory for reuse. ``launch.py`` and the benchmarks call it
once at start; ``FEDJAX_SEG_MALLOC_TUNING=0`` leaves malloc as it is. Other C libraries
(macOS, musl): nothing is changed. Imports nothing of JAX (the PyTorch benchmark worker
calls it too, so both sides of a comparison run with the same allocator settings).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Mapping, Optional

# mallopt(3) parameters (glibc malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = ((M_MMAP_THRESHOLD, 32 * 2 ** 20), (M_TRIM_THRESHOLD, 2 ** 31 - 1),
            (M_TOP_PAD, 512 * 2 ** 20))
ENV = "FEDJAX_SEG_MALLOC_TUNING"


def tune(environ: Optional[Mapping[str, str]] = None) -> str:
  """Applies :data:`SETTINGS` with ``mallopt``; returns what was done, for the log line
  ('' when ``FEDJAX_SEG_MALLOC_TUNING=0`` or the C library is not glibc)."""
  environ = os.environ if environ is None else environ
  if environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
    return ""
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return ""
  ok = all(mallopt(param, value) == 1 for param, value in SETTINGS)
  return ("malloc: mmap threshold 32 MiB, trim threshold 2 GiB, top pad 512 MiB "
          f"({ENV}=0 to keep the defaults)") if ok else ""
