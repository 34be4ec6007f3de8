"""Early config validation with messages that name the offending key."""
from __future__ import annotations

REQUIRED = ("algorithm", "seed", "data", "model", "loss", "optimizer", "batch_size",
            "eval_batch_size")


def validate(config) -> None:
  """Raises ValueError naming the key for missing or impossible settings."""
  for k in REQUIRED:
    if k not in config:
      raise ValueError(f"config.{k} is missing")
  if config.batch_size < 1:
    raise ValueError(f"config.batch_size={config.batch_size} must be >= 1")
  d = config.data
  if not 0 < d.val_fraction < 1:
    raise ValueError(f"config.data.val_fraction={d.val_fraction} must be in (0, 1)")
  if not 0 < d.test_fraction < 1:
    raise ValueError(f"config.data.test_fraction={d.test_fraction} must be in (0, 1)")
  depth = config.model.get("depth", 4)
  if d.image_size % (2 ** (depth - 1)):
    raise ValueError(f"config.data.image_size={d.image_size} must be divisible by "
                     f"2**(config.model.depth-1) = {2 ** (depth - 1)}")
  if config.optimizer.get("lr", 1e-3) <= 0:
    raise ValueError(f"config.optimizer.lr={config.optimizer.lr} must be > 0")
