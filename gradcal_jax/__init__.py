"""gradcal_jax: gradient calibration for JAX training, as pure optax transforms.

Every public transform is a factory returning an ``optax.GradientTransformation``
that composes with ``optax.chain``; ``stats(opt_state)`` reads what they record.
"""

from gradcal_jax.accumulation import AccumulateState, accumulate
from gradcal_jax.adaptive import (
    AutoClipState, SkipSpikesState, ZClipState, autoclip, skip_spikes, zclip)
from gradcal_jax.clipping import (
    AdaptiveGradClipState, ClipByGlobalNormState, ClipByLayerNormState,
    ClipByValueState, ClipWeightsState, adaptive_grad_clip, centralize,
    clip_by_global_norm, clip_by_layer_norm, clip_by_value, clip_weights)
from gradcal_jax.checking import (
    GradCheckReport, GradCheckRow, GradientCheckError, GradientCheckState,
    check_gradients, gradient_check)
from gradcal_jax.loss_scaling import (
    DynamicLossScaleState, dynamic_loss_scale, loss_scale)
from gradcal_jax.monitoring import MonitorState, monitor, report, stats
from gradcal_jax.spikes import (
    AdaGCState, ClipUpdateRMSState, SpamState, adagc, clip_update_rms, spam)
from gradcal_jax.truncation import TruncateTopKState, truncate_top_k

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "AutoClipState",
    "SkipSpikesState",
    "ZClipState",
    "autoclip",
    "skip_spikes",
    "zclip",
    "AdaptiveGradClipState",
    "ClipByGlobalNormState",
    "ClipByLayerNormState",
    "ClipByValueState",
    "ClipWeightsState",
    "adaptive_grad_clip",
    "centralize",
    "clip_by_global_norm",
    "clip_by_layer_norm",
    "clip_by_value",
    "clip_weights",
    "AccumulateState",
    "accumulate",
    "AdaGCState",
    "ClipUpdateRMSState",
    "SpamState",
    "adagc",
    "clip_update_rms",
    "spam",
    "TruncateTopKState",
    "truncate_top_k",
    "GradCheckReport",
    "GradCheckRow",
    "GradientCheckError",
    "GradientCheckState",
    "check_gradients",
    "gradient_check",
    "DynamicLossScaleState",
    "dynamic_loss_scale",
    "loss_scale",
    "MonitorState",
    "monitor",
    "report",
    "stats",
]
