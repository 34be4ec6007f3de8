"""The ``fedjax-seg`` command: one entry point over the project's existing commands.

    fedjax-seg train   --config configs/<exp>.py --workdir DIR [--config.key=value ...]
    fedjax-seg infer   --workdir RUN --input PATH --output OUT [--gt GT] ...
    fedjax-seg report  RUN [RUN ...] [--out report.md]   |   fedjax-seg report compare ...
    fedjax-seg serve   --workdir RUN [--db URL] [--port 8000] ...
    fedjax-seg phantom --layout lgg|brats|acdc --out DIR [--style geometric|anatomical] ...

Each subcommand hands its remaining arguments unchanged to the module that owns it:
``train`` runs ``launch.py`` (loaded lazily with :mod:`runpy`, so launch.py stays the one
definition of the training flags), ``infer`` / ``report`` / ``serve`` call
``fedjax_seg.{infer,report,serve}.main`` and ``phantom`` calls
``fedjax_seg.data.phantom.main``. ``fedjax-seg <command> --help`` shows that command's
own options.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import runpy
import sys
from collections.abc import Sequence
from typing import Optional

# name -> (module whose main(argv) runs it, or None for launch.py; one-line help)
COMMANDS = {
    "train": (None, "train or resume a run, or a sweep (launch.py)"),
    "infer": ("fedjax_seg.infer", "segment new images with a run's checkpoint"),
    "report": ("fedjax_seg.report", "Markdown report over runs; 'report compare': paired comparisons"),
    "serve": ("fedjax_seg.serve", "the segmentation viewer (web app; extra [viewer])"),
    "phantom": ("fedjax_seg.data.phantom", "write a phantom data set in a real on-disk layout"),
}

PROG = "fedjax-seg"


def usage() -> str:
  width = max(len(c) for c in COMMANDS)
  lines = [f"usage: {PROG} <command> [args ...]", "", "commands:"]
  lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
  lines += ["", f"'{PROG} <command> --help' lists the options of one command."]
  return "\n".join(lines)


def launch_path() -> str:
  """launch.py of this checkout, else the installed top-level module ``launch``."""
  here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch.py")
  if os.path.isfile(here):
    return here
  spec = importlib.util.find_spec("launch")
  if spec is not None and spec.origin and os.path.isfile(spec.origin):
    return spec.origin
  raise FileNotFoundError("launch.py not found next to the fedjax_seg package nor installed as a module")


def resolve_config_path(value: str) -> str:
  """``configs/<exp>.py[:arg]`` that does not exist here -> the installed ``configs`` package's
  file; a bare name (``demo``, ``lgg_fedavg:smoke``) means ``configs/<name>.py``."""
  path, sep, arg = value.partition(":")
  if os.path.exists(path):
    return value
  norm = path.replace(os.sep, "/")
  if "/" not in norm and not norm.endswith(".py") and norm:
    norm = f"configs/{norm}.py"
    if os.path.isfile(norm):  # a checkout's configs/ folder
      return norm + sep + arg
  if not norm.startswith("configs/"):
    return value
  spec = importlib.util.find_spec("configs")
  if spec is None or not spec.submodule_search_locations:
    return value
  for folder in spec.submodule_search_locations:
    candidate = os.path.join(folder, norm[len("configs/"):])
    if os.path.isfile(candidate):
      return candidate + sep + arg
  return value


def resolve_config_argv(argv: Sequence[str]) -> list[str]:
  """``argv`` with its ``--config`` value resolved by ``resolve_config_path``."""
  out = list(argv)
  for i, a in enumerate(out):
    if a.startswith("--config="):
      out[i] = "--config=" + resolve_config_path(a[len("--config="):])
    elif a == "--config" and i + 1 < len(out):
      out[i + 1] = resolve_config_path(out[i + 1])
  return out


def run_train(argv: Sequence[str]) -> int:
  path = launch_path()
  saved = sys.argv
  sys.argv = [f"{PROG} train", *resolve_config_argv(argv)]
  try:
    runpy.run_path(path, run_name="__main__")  # launch.py ends in app.run(main), which exits
  except SystemExit as e:
    return _exit_code(e)
  finally:
    sys.argv = saved
  return 0


def _exit_code(e: SystemExit) -> int:
  if e.code is None:
    return 0
  if isinstance(e.code, int):
    return e.code
  print(e.code, file=sys.stderr)
  return 1


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv:
    print(usage(), file=sys.stderr)
    return 2
  if argv[0] in ("-h", "--help", "help"):
    print(usage())
    return 0
  command, rest = argv[0], argv[1:]
  if command not in COMMANDS:
    print(f"{PROG}: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
    return 2
  module, _ = COMMANDS[command]
  if module is None:
    return run_train(rest)
  try:
    code = importlib.import_module(module).main(rest)
  except SystemExit as e:  # argparse --help / usage errors
    return _exit_code(e)
  return int(code or 0)


if __name__ == "__main__":
  sys.exit(main())
