"""ZClip: clip global-norm outliers by their z-score against running moments."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradcal_jax import _norms, _stats, _tree

FLOAT32 = jnp.float32
INT32 = jnp.int32


@_stats.register_state("zclip", fields=("norm", "threshold", "mean", "variance", "clipped"))
class ZClipState(NamedTuple):
  """State of :func:`zclip`.

  Attributes:
    mean: float32 running mean of the gradient norm (sample mean during
      warm-up, then the exponential moving average of the clipped norms).
    variance: float32 running variance of the norm (population variance
      during warm-up, then the exponential moving average).
    step: int32, how many finite norms were seen (saturates at 2**31-1).
    norm: float32 global norm of the last gradient, before clipping.
    threshold: float32 norm the last gradient was clipped to; its own norm
      (capped by ``max_norm``) when it was not clipped.
    clipped: int32, 1 if the last gradient was scaled down, else 0.
  """

  mean: jax.Array
  variance: jax.Array
  step: jax.Array
  norm: jax.Array
  threshold: jax.Array
  clipped: jax.Array


def zclip(
  z_threshold: float = 2.5,
  alpha: float = 0.97,
  warmup_steps: int = 25,
  max_norm: float | None = None,
  eps: float = 1e-6,
  *,
  axis_name: Any = None,
  partition: Any = None,
) -> optax.GradientTransformation:
  r"""Clips gradient-norm outliers by their z-score against running moments (ZClip).

  For the first ``warmup_steps`` finite norms nothing is clipped adaptively;
  at the end of warm-up the mean :math:`\mu` and variance :math:`\sigma^2` are
  the sample mean and population variance of the warm-up norms. Afterwards,
  with global norm :math:`g` and :math:`z = (g - \mu) / (\sigma + \epsilon)`:

  .. math::
    g_c = \begin{cases}
      \mu + \frac{z_{thr}^2}{z}\,\sigma & z > z_{thr} \\ g & \text{otherwise}
    \end{cases}, \qquad
    \mu \leftarrow \alpha\mu + (1-\alpha) g_c, \qquad
    \sigma^2 \leftarrow \alpha\sigma^2 + (1-\alpha)(g_c - \mu)^2,

  the variance using the new mean, so a spike does not inflate the statistics.
  The gradient is rescaled to the norm ``min(g_c, max_norm)``; ``max_norm``
  (when given) also applies during warm-up. As in the authors' code, the
  moments follow the adaptive :math:`g_c` even when ``max_norm`` clips lower.
  A non-finite norm leaves the moments and ``step`` unchanged and the gradient
  unscaled.

  Args:
    z_threshold: z-score above which a norm is an outlier; > 0.
    alpha: EMA decay of the moments, in (0, 1).
    warmup_steps: number of norms averaged before clipping starts; >= 1.
    max_norm: optional fixed cap on the norm at every step; >= 0.
    eps: added to the standard deviation in the z-score; >= 0.
    axis_name: inside ``shard_map``, the mesh axis name (or tuple of names)
      the gradient is split over: statistics are reduced over it with scalar
      ``psum`` calls, so the result equals the jit/SPMD one. ``None`` outside.
    partition: with ``axis_name``, the gradient's pytree of ``PartitionSpec``
      (``shard_map``'s ``in_specs``) so that replicated leaves count once;
      ``None``: every floating leaf is split over ``axis_name``.

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`ZClipState`.

  Example:
    >>> import jax.numpy as jnp, gradcal_jax as gc
    >>> tx = gc.zclip(warmup_steps=2)
    >>> state = tx.init({"w": jnp.zeros(1)})
    >>> for g in (1.0, 3.0, 50.0):
    ...   updates, state = tx.update({"w": jnp.array([g])}, state)
    >>> int(state.clipped), round(float(updates["w"][0]), 3)
    (1, 2.13)

  References:
    Kumar et al., `ZClip: Adaptive Spike Mitigation for LLM Pre-Training
    <https://arxiv.org/abs/2504.02507>`_, 2025; reference code at
    https://github.com/bluorion-com/ZClip.
  """
  _tree.check_number("z_threshold", z_threshold, low=0.0, low_open=True)
  _tree.check_number("alpha", alpha, low=0.0, high=1.0, low_open=True, high_open=True)
  _tree.check_int("warmup_steps", warmup_steps, low=1)
  _tree.check_number("max_norm", max_norm, low=0.0, optional=True)
  _tree.check_number("eps", eps, low=0.0)
  col = _tree.collective("zclip", axis_name, partition)

  def init_fn(params: Any) -> ZClipState:
    del params
    # One array per field: fields sharing a buffer cannot be donated.
    zero = lambda: jnp.zeros((), FLOAT32)
    return ZClipState(
      mean=zero(),
      variance=zero(),
      step=jnp.zeros((), INT32),
      norm=zero(),
      threshold=zero(),
      clipped=jnp.zeros((), INT32),
    )

  def update_fn(updates: Any, state: ZClipState, params: Any = None) -> tuple[Any, ZClipState]:
    del params
    new_state = zclip_state(
      updates,
      state,
      z_threshold=z_threshold,
      alpha=alpha,
      warmup_steps=warmup_steps,
      max_norm=max_norm,
      eps=eps,
      col=col,
    )
    return _tree.scale_tree(updates, zclip_scale(new_state)), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def zclip_state(
  updates: Any,
  state: ZClipState,
  *,
  z_threshold: float,
  alpha: float,
  warmup_steps: int,
  max_norm: float | None,
  eps: float,
  col: _tree.Collective | None,
) -> ZClipState:
  """The state :func:`zclip` leaves after it saw ``updates`` (its update,
  without writing the clipped gradient out): :func:`gradcal_jax.guard`
  applies :func:`zclip_scale` of it inside its ``lax.cond`` instead."""
  norm = _norms.global_norm(updates, col)
  finite = jnp.isfinite(norm)
  mean, variance = state.mean, state.variance
  warmup = state.step < warmup_steps

  # Welford's update: after the last warm-up norm these are exactly the
  # sample mean and population variance of the warm-up norms.
  n = (state.step + 1).astype(FLOAT32)
  delta = norm - mean
  warm_mean = mean + delta / n
  warm_variance = variance + (delta * (norm - warm_mean) - variance) / n

  std = _norms.safe_sqrt(variance)
  z = (norm - mean) / (std + eps)
  outlier = ~warmup & (z > z_threshold)
  safe_z = jnp.where(outlier, z, 1.0)
  adaptive = jnp.where(outlier, mean + (z_threshold**2 / safe_z) * std, norm)
  threshold = adaptive if max_norm is None else jnp.minimum(adaptive, max_norm)
  scale = _tree.clip_scale(norm, threshold)

  ema_mean = alpha * mean + (1.0 - alpha) * adaptive
  ema_variance = alpha * variance + (1.0 - alpha) * (adaptive - ema_mean) ** 2
  new_mean = jnp.where(warmup, warm_mean, ema_mean)
  new_variance = jnp.where(warmup, warm_variance, ema_variance)
  return ZClipState(
    mean=jnp.where(finite, new_mean, mean).astype(FLOAT32),
    variance=jnp.where(finite, new_variance, variance).astype(FLOAT32),
    step=_tree.count_if(state.step, finite),
    norm=norm,
    threshold=jnp.asarray(threshold, FLOAT32),
    clipped=(scale < 1.0).astype(INT32),
  )


def zclip_scale(state: ZClipState) -> jax.Array:
  """The factor :func:`zclip` multiplies the gradient by at the step that
  left ``state``: ``clip_scale(norm, threshold)``."""
  return _tree.clip_scale(state.norm, state.threshold)
