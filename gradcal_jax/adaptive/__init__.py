"""Adaptive calibration from the history of gradient norms: AutoClip, ZClip, skip_spikes.

Every state here has a fixed size (ring buffers and running moments, never a
growing list), so the transforms run under ``jax.jit`` and ``jax.lax.scan`` and
round-trip through a checkpoint. A non-finite gradient norm never enters the
history: it stays visible in the output and in the state's ``norm`` field, and
the statistics keep describing the finite norms seen so far.
"""

# The family's transforms, one module each (equinox's internal/_loop layout):
# _ring.py holds the ring buffers autoclip and skip_spikes keep their history
# in. judge_step, advance, zclip_state and zclip_scale are the pieces gradcal_jax.guard
# composes; they are not part of the public API.

from gradcal_jax.adaptive._autoclip import AutoClipState, autoclip
from gradcal_jax.adaptive._skip_spikes import (
  SkipDecision,
  SkipSpikesState,
  advance,
  judge_step,
  skip_spikes,
)
from gradcal_jax.adaptive._zclip import ZClipState, zclip, zclip_scale, zclip_state

__all__ = [
  "AutoClipState",
  "SkipDecision",
  "SkipSpikesState",
  "ZClipState",
  "advance",
  "autoclip",
  "judge_step",
  "skip_spikes",
  "zclip",
  "zclip_scale",
  "zclip_state",
]
