"""Entry point: python launch.py --config configs/<exp>.py --workdir DIR [--config.key=value ...]

Re-running the same command resumes from the last checkpoint in DIR. A re-run whose
config differs from DIR's config.json (beyond the keys that may change on resume) is
refused; --fresh moves the old run to DIR.old-<YYYYmmdd-HHMMSS> and starts anew.
Bad input (an unknown or ill-typed override, an impossible value, a corrupt workdir
file) is one line `error: ...` on stderr and exit code 2, before anything in DIR is
written (docs/reliability.md).

Several processes/hosts: add --distributed [--coordinator_address=HOST:PORT
--num_processes=N --process_id=I] to every process's command (docs/scale.md).

Sweeps (fedjax_seg/sweep.py): --sweep 'seed=0,1,2;algorithm=fedavg,dcew' runs the
grid one point after the other in DIR/<key=value,...>, resumably, then writes
DIR/report.md; a config module with get_sweep() is swept without --sweep
(--sweep=none runs it plainly); --sweep_shard i/n runs every n-th point
(one process per accelerator).
"""
import difflib
import importlib.util
import os
import re
import sys
from typing import List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # so configs/ can import configs.*


def available_configs() -> List[str]:
  """Names of the shipped experiment configs (configs/<name>.py; `--config <name>` works
  with `fedjax-seg train`), from the configs package next to this file or installed."""
  spec = importlib.util.find_spec("configs")
  folders = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
  names = set()
  for folder in folders:
    names |= {f[:-3] for f in os.listdir(folder)
              if f.endswith(".py") and not f.startswith("_") and f != "common.py"}
  return sorted(names)


_NAMES = available_configs()
__doc__ += ("\nConfigs (configs/<name>.py; variants after a colon, e.g. demo:geometric):\n  "
            + "\n  ".join(", ".join(_NAMES[i:i + 6]) for i in range(0, len(_NAMES), 6)) + "\n")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (resumes if it has checkpoints).")
_FRESH = flags.DEFINE_bool("fresh", False, "Move an earlier run in WORKDIR to "
                           "WORKDIR.old-<YYYYmmdd-HHMMSS> and start anew (a re-run with a "
                           "different config is refused without it; docs/reliability.md).")
_SWEEP = flags.DEFINE_string("sweep", None, "Grid 'key=v1,v2;key2=...' run point by point in "
                             "WORKDIR/<key=value,...> (default: the config's get_sweep(), if any; "
                             "'none': no sweep).")
_SWEEP_SHARD = flags.DEFINE_string("sweep_shard", "0/1", "i/n: run only sweep points i, i+n, ...")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize first "
                                  "(several processes/hosts; fedjax_seg/distributed.py).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "--distributed: HOST:PORT of "
                                   "process 0 (default: $JAX_COORDINATOR_ADDRESS or auto-detect).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "--distributed: number of processes "
                                      "(default: $JAX_NUM_PROCESSES or auto-detect).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "--distributed: this process's index "
                                   "(default: $JAX_PROCESS_ID or auto-detect).")
flags.mark_flags_as_required(["config", "workdir"])

EXIT_BAD_INPUT = 2


class UsageLine(Exception):
  """A command line that cannot run; the message is the one line printed after `error: `."""


def _one_line(text: str) -> str:
  return " ".join(str(text).split())


# ---------------------------------------------------------------------------
# Flag parsing with one-line errors.
# ---------------------------------------------------------------------------
def _config_flag_value(argv: Sequence[str]) -> Optional[str]:
  for i, arg in enumerate(argv):
    m = re.match(r"^--?config(=(.*))?$", arg)
    if m:
      return m.group(2) if m.group(1) else (argv[i + 1] if i + 1 < len(argv) else None)
  return None


def _overrides(argv: Sequence[str]) -> List[str]:
  """The dotted keys of every --config.<key>[=value] / --noconfig.<key> in argv."""
  keys = []
  for arg in argv:
    m = re.match(r"^--?(?:no)?config\.([^=]+)", arg)
    if m and m.group(1) not in keys:
      keys.append(m.group(1))
  return keys


def _load_config(path_arg: str):
  """The config of ``path[:arg]`` without overrides (as config_flags loads it)."""
  path, _, arg = path_arg.partition(":")
  spec = importlib.util.spec_from_file_location("_fedjax_seg_launch_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _all_keys(config, prefix: str = "") -> List[str]:
  import ml_collections
  out = []
  for k, v in config.items():
    out.append(prefix + k)
    if isinstance(v, ml_collections.ConfigDict):
      out += _all_keys(v, f"{prefix}{k}.")
  return out


def _unknown_override(config, keys: Sequence[str]) -> Optional[str]:
  """'unknown config key fl.roundz (did you mean fl.rounds?)' for the first override
  key the config does not have, else None."""
  import ml_collections
  known = _all_keys(config)
  for key in keys:
    node = config
    for part in key.split("."):
      if isinstance(node, ml_collections.ConfigDict) and part in node:
        node = node[part]
        continue
      close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
      hint = f" (did you mean {close[0]}?)" if close else ""
      return f"unknown config key {key}{hint}"
  return None


def flag_error(e: BaseException, argv: Sequence[str]) -> str:
  """One line for an exception raised while parsing ``argv`` into the flags."""
  path_arg = _config_flag_value(argv)
  config = None
  if path_arg:
    try:
      config = _load_config(path_arg)
    except Exception as load_error:  # noqa: BLE001 - the config file itself is the problem
      if not os.path.isfile(path_arg.partition(":")[0]):
        return f"--config={path_arg}: no such config file"
      return f"--config={path_arg}: cannot load it ({_one_line(f'{type(load_error).__name__}: {load_error}')})"
  if config is not None:
    unknown = _unknown_override(config, _overrides(argv))
    if unknown:
      return unknown
  msg = _one_line(e)
  m = re.match(r"flag --config\.([^=]+)=(.*?): (.*)$", msg)
  if m:  # an override that does not parse as the field's type
    key, value, why = m.groups()
    if config is not None:
      from fedjax_seg import validate
      old = validate.get(config, key)
      if isinstance(old, bool):
        why = "expected bool (true or false)"
      elif old is not None:
        why = f"expected {type(old).__name__} ({why})"
    return f"config.{key}={value!r}: {why}"
  m = re.match(r"flag --(\w+)=None: Flag --\w+ must have a value other than None\.?$", msg)
  if m:
    return f"--{m.group(1)} is required"
  return msg


def parse_flags(argv: Sequence[str]) -> List[str]:
  """Parses ``argv`` into the flags (the config file loaded, overrides applied);
  returns the remaining arguments. Raises :class:`UsageLine` with one line.
  ``--config demo`` (a bare name) means the shipped ``configs/demo.py``."""
  from fedjax_seg import cli
  resolved = cli.resolve_config_argv(argv)
  if list(sys.argv) == list(argv):  # config_flags and the workdir check read sys.argv too
    sys.argv[:] = resolved
  argv = resolved
  try:
    rest = flags.FLAGS(list(argv))
    _CONFIG.value.keys()  # a config file that failed to load raises on first access
  except Exception as e:  # noqa: BLE001 - absl, ml_collections and the config module's errors
    raise UsageLine(flag_error(e, argv)) from e
  return rest


def _app_flags_parser(argv):
  """``app.run``'s flags_parser: one line and exit code 2 instead of a traceback."""
  try:
    return parse_flags(argv)
  except UsageLine as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


# ---------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------
def main(argv) -> int:
  """Validates the config and the workdir, then trains (or sweeps). Returns the exit
  code: 0, or 2 after one `error: ...` line on stderr for bad input."""
  if os.environ.get("FEDJAX_SEG_TRACEBACK"):
    return _main(argv)
  from fedjax_seg.data.io import DataError
  try:
    return _main(argv)
  except (UsageLine, DataError, ValueError, OSError, FloatingPointError) as e:
    # Bad input, config or workdir: one clear line naming the file/key, not an XLA stack
    # trace. Set FEDJAX_SEG_TRACEBACK=1 to see the full traceback.
    print(f"error: {_one_line(e)}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _main(argv) -> int:
  if len(argv) > 1:
    raise UsageLine(f"unexpected arguments: {' '.join(argv[1:])}")
  if logging.get_verbosity() == logging.INFO and not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  workdir = _WORKDIR.value
  if _DISTRIBUTED.value:  # before any JAX computation
    from fedjax_seg import distributed
    info = distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    workdir = distributed.process_workdir(workdir)
    print(f"[distributed] process {info['process_index']}/{info['process_count']}, "
          f"{info['local_devices']} local of {info['devices']} {info['backend']} devices, "
          f"workdir {workdir}", flush=True)
  import json
  import shlex
  from fedjax_seg import runlog, sweep, validate
  config = _CONFIG.value
  # Everything below up to the training reads only: nothing is written when it refuses.
  validate.check(config)
  file_config = _load_config(_config_flag_value(sys.argv))  # the file's own values
  validate.check_unread(config, dict(validate.leaves(file_config)))
  points = sweep.resolve(_SWEEP.value, flags.FLAGS["config"].config_filename)
  shard = sweep.parse_shard(_SWEEP_SHARD.value) if points is not None else None
  if _FRESH.value:  # whatever the old run holds is moved aside, unread
    moved = runlog.move_aside(workdir)
    if moved:
      print(f"[train] --fresh: the earlier run in {workdir} was moved to {moved}", flush=True)
  elif points is not None:  # each point's workdir is checked when the point starts
    runlog.check_workdir(workdir)
  else:  # the config file's own values tell an override of a key newer than the run
    defaults = json.loads(file_config.to_json_best_effort())
    runlog.check_workdir(workdir, json.loads(config.to_json_best_effort()), defaults)
    key = "num_epochs" if config.algorithm == "centralized" else "fl.rounds"
    if validate.get(config, key) is not None:
      runlog.check_extent(workdir, key, validate.get(config, key))
  from fedjax_seg import compile_cache, hostmem, program_store  # docs/performance.md
  cache_dir = compile_cache.enable(config.get("compile_cache_dir"))
  print(f"[compile] persistent compilation cache: {cache_dir or 'off'}; program store: "
        f"{program_store.folder() or 'off'}", flush=True)
  tuned = hostmem.tune()
  if tuned:
    print(f"[runtime] {tuned}", flush=True)
  from fedjax_seg import train
  fresh = not os.path.exists(workdir)
  try:
    if points is not None:
      sweep.run_sweep(config, workdir, points, shard=shard,
                      command="python " + shlex.join(sys.argv))
    else:
      train.run(config, workdir)
  except BaseException:
    # a run that fails before its first checkpoint or metrics row (bad data, a missing
    # extra) leaves no workdir behind if it created it
    if points is None and fresh and os.path.isdir(workdir) and not runlog.has_run(workdir):
      import shutil
      shutil.rmtree(workdir, ignore_errors=True)
    raise
  return 0


def _reset_flags() -> None:
  """Forgets an earlier in-process parse: values unparsed and the config.<key> override
  flags that config_flags defined for it removed (they are defined per parse)."""
  fv = flags.FLAGS
  for name in [n for n in fv if n.startswith("config.")]:
    delattr(fv, name)
  fv.unparse_flags()


def run_cli(argv: Sequence[str]) -> int:
  """``python launch.py ARGS`` in this process (``argv[0]`` is the program name):
  returns the exit code instead of exiting. For tests: one process, many commands."""
  saved = sys.argv
  sys.argv = list(argv)  # config_flags reads the overrides from sys.argv
  try:
    _reset_flags()
    try:
      rest = parse_flags(argv)
    except UsageLine as e:
      print(f"error: {e}", file=sys.stderr)
      return EXIT_BAD_INPUT
    return main(rest)
  finally:
    sys.argv = saved
    _reset_flags()


if __name__ == "__main__":
  app.run(main, flags_parser=_app_flags_parser)
