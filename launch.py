"""Entry point: python launch.py --config configs/<exp>.py --workdir DIR [--config.key=value ...]

Re-running the same command resumes from the last checkpoint in DIR.

Several processes/hosts: add --distributed [--coordinator_address=HOST:PORT
--num_processes=N --process_id=I] to every process's command (docs/scale.md).

Sweeps (fedjax_seg/sweep.py): --sweep 'seed=0,1,2;algorithm=fedavg,dcew' runs the
grid one point after the other in DIR/<key=value,...>, resumably, then writes
DIR/report.md; a config module with get_sweep() is swept without --sweep
(--sweep=none runs it plainly); --sweep_shard i/n runs every n-th point
(one process per accelerator).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # so configs/ can import configs.*

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (resumes if it has checkpoints).")
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if logging.get_verbosity() == logging.INFO and not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  if _DISTRIBUTED.value:  # before any JAX computation
    from fedjax_seg import distributed
    info = distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    flags.FLAGS.workdir = distributed.process_workdir(_WORKDIR.value)
    print(f"[distributed] process {info['process_index']}/{info['process_count']}, "
          f"{info['local_devices']} local of {info['devices']} {info['backend']} devices, "
          f"workdir {_WORKDIR.value}", flush=True)
  from fedjax_seg import train  # after flag parsing, so --help is fast
  from fedjax_seg.config_utils import validate
  from fedjax_seg.data.io import DataError
  config = _CONFIG.value
  from fedjax_seg import compile_cache  # persistent XLA cache: docs/performance.md
  cache_dir = compile_cache.enable(config.get("compile_cache_dir"))
  print(f"[compile] persistent compilation cache: {cache_dir or 'off'}", flush=True)
  try:
    validate(config)
    import shlex
    from fedjax_seg import sweep
    points = sweep.resolve(_SWEEP.value, flags.FLAGS["config"].config_filename)
    if points is not None:
      sweep.run_sweep(config, _WORKDIR.value, points, shard=sweep.parse_shard(_SWEEP_SHARD.value),
                      command="python " + shlex.join(sys.argv))
      return
    train.run(config, _WORKDIR.value)
  except (DataError, ValueError, FileNotFoundError, FloatingPointError) as e:
    # Bad input or config: one clear line naming the file/key, not an XLA stack trace.
    # Set FEDJAX_SEG_TRACEBACK=1 to see the full traceback.
    if os.environ.get("FEDJAX_SEG_TRACEBACK"):
      raise
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
