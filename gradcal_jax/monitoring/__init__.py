"""Gradient-health monitoring: ``monitor``, and ``stats`` / ``report`` to read it.

``_monitor.py`` holds the transform (and the pieces :func:`gradcal_jax.guard`
composes: ``observe``, ``count_nonfinite``, ``thresholds``); ``_read.py`` holds
what reads any gradcal state for a logger or a person.
"""

from gradcal_jax.monitoring._monitor import (
  EXPLODING_ABOVE,
  VANISHING_BELOW,
  MonitorState,
  count_nonfinite,
  monitor,
  observe,
  thresholds,
)
from gradcal_jax.monitoring._read import leaf_paths, report, stats

__all__ = [
  "EXPLODING_ABOVE",
  "VANISHING_BELOW",
  "MonitorState",
  "count_nonfinite",
  "leaf_paths",
  "monitor",
  "observe",
  "report",
  "stats",
  "thresholds",
]
