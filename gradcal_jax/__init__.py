"""gradcal_jax: gradient calibration for JAX training, as pure optax transforms.

Every public transform is a factory returning an ``optax.GradientTransformation``
that composes with ``optax.chain``; ``stats(opt_state)`` reads what they record.
"""

from gradcal_jax.accumulation import AccumulateState, accumulate
from gradcal_jax.adaptive import (
  AutoClipState,
  SkipSpikesState,
  ZClipState,
  autoclip,
  skip_spikes,
  zclip,
)
from gradcal_jax.checking import (
  GradientCheckError,
  GradientCheckReport,
  GradientCheckRow,
  GradientCheckState,
  check_gradients,
  gradient_check,
)
from gradcal_jax.clipping import (
  AdaptiveGradClipState,
  ClipByGlobalNormState,
  ClipByLayerNormState,
  ClipByValueState,
  ClipWeightsState,
  adaptive_grad_clip,
  centralize,
  clip_by_global_norm,
  clip_by_layer_norm,
  clip_by_value,
  clip_weights,
)
from gradcal_jax.log import log_stats
from gradcal_jax.loss_scaling import DynamicLossScaleState, dynamic_loss_scale, loss_scale
from gradcal_jax.monitoring import MonitorState, leaf_paths, monitor, report, stats
from gradcal_jax.nnx_utils import nnx_value_fn
from gradcal_jax.safety import GuardState, guard
from gradcal_jax.spikes import (
  AdaGCState,
  ClipUpdateRMSState,
  SpamState,
  adagc,
  clip_update_rms,
  spam,
)
from gradcal_jax.truncation import TruncateTopKState, truncate_top_k

__version__ = "0.1.0"

# The names before 0.2, importable for one release (not in __all__, so the
# docs list each class once): the family is GradientCheck*.
GradCheckReport = GradientCheckReport
GradCheckRow = GradientCheckRow

__all__ = [
  "AccumulateState",
  "AdaGCState",
  "AdaptiveGradClipState",
  "AutoClipState",
  "ClipByGlobalNormState",
  "ClipByLayerNormState",
  "ClipByValueState",
  "ClipUpdateRMSState",
  "ClipWeightsState",
  "DynamicLossScaleState",
  "GradientCheckError",
  "GradientCheckReport",
  "GradientCheckRow",
  "GradientCheckState",
  "GuardState",
  "MonitorState",
  "SkipSpikesState",
  "SpamState",
  "TruncateTopKState",
  "ZClipState",
  "__version__",
  "accumulate",
  "adagc",
  "adaptive_grad_clip",
  "autoclip",
  "centralize",
  "check_gradients",
  "clip_by_global_norm",
  "clip_by_layer_norm",
  "clip_by_value",
  "clip_update_rms",
  "clip_weights",
  "dynamic_loss_scale",
  "gradient_check",
  "guard",
  "leaf_paths",
  "log_stats",
  "loss_scale",
  "monitor",
  "nnx_value_fn",
  "report",
  "skip_spikes",
  "spam",
  "stats",
  "truncate_top_k",
  "zclip",
]
