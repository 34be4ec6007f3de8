"""Entry point: python launch.py --config configs/<exp>.py --workdir DIR [--config.key=value ...]

Re-running the same command resumes from the last checkpoint in DIR.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # so configs/ can import configs.*

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (resumes if it has checkpoints).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if logging.get_verbosity() == logging.INFO and not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  from fedjax_seg import train  # after flag parsing, so --help is fast
  from fedjax_seg.config_utils import validate
  from fedjax_seg.data.io import DataError
  config = _CONFIG.value
  try:
    validate(config)
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
