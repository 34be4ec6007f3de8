"""Early config validation with messages that name the offending key.

The rules live in :mod:`fedjax_seg.validate` (``RULES``, one table key -> rule, and
``CROSS_CHECKS``); ``validate(config)`` is the name the trainers and launch.py call.
"""
from __future__ import annotations

from fedjax_seg.validate import REQUIRED, ConfigError, check  # noqa: F401


def validate(config) -> None:
  """Raises ValueError ``config.<key>=<value>: <why>`` for missing or impossible settings."""
  check(config)
