"""Adaptive calibration from the history of gradient norms: AutoClip, ZClip, skip_spikes.

Every state here has a fixed size (ring buffers and running moments, never a
growing list), so the transforms run under ``jax.jit`` and ``jax.lax.scan`` and
round-trip through a checkpoint. A non-finite gradient norm never enters the
history: it stays visible in the output and in the state's ``norm`` field, and
the statistics keep describing the finite norms seen so far.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradcal_jax import _norms, _stats, _tree

FLOAT32 = jnp.float32
INT32 = jnp.int32


def _record(
  buffer: jax.Array, count: jax.Array, value: jax.Array, keep: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Writes ``value`` at the ring position of ``count`` when ``keep``.

  The count cycles near the int32 maximum instead of freezing there
  (:func:`_tree.cycle_count`), so the ring keeps turning past 2**31-1 records.
  """
  position = count % buffer.shape[0]
  buffer = jnp.where(keep, buffer.at[position].set(value), buffer)
  return buffer, jnp.where(keep, _tree.cycle_count(count, buffer.shape[0]), count)


def _valid(buffer: jax.Array, count: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The mask of filled ring entries and how many there are (int32)."""
  n = jnp.minimum(count, buffer.shape[0]).astype(INT32)
  return jnp.arange(buffer.shape[0]) < n, n


@_stats.register_state("autoclip", fields=("norm", "threshold"))
class AutoClipState(NamedTuple):
  """State of :func:`autoclip`.

  Attributes:
    norms: float32 ring buffer of the last ``history`` finite global norms.
    sorted_norms: float32, the same norms in ascending order, unfilled entries
      ``+inf`` at the end: kept sorted by one insertion and one removal per
      step, so no step pays for a sort.
    count: int32, how many finite norms were recorded; from 2**31-1 on it
      stays within ``history`` of it (never negative) and the ring keeps turning.
    norm: float32 global norm of the last gradient, before clipping.
    threshold: float32 clipping threshold used at the last step.
  """

  norms: jax.Array
  sorted_norms: jax.Array
  count: jax.Array  # type: ignore[assignment]  # optax's name; shadows tuple.count
  norm: jax.Array
  threshold: jax.Array


def _sorted_replace(
  ordered: jax.Array, old: jax.Array, evict: jax.Array, new: jax.Array, insert: jax.Array
) -> jax.Array:
  """Removes ``old`` (when ``evict``) then inserts ``new`` (when ``insert``).

  ``ordered`` is ascending with ``+inf`` padding. Each edit is a shift of the
  entries past one position, O(len) elementwise work instead of a sort.
  """
  index = jnp.arange(ordered.shape[0])
  at = jnp.sum(ordered < old)
  tail = jnp.append(ordered[1:], jnp.inf)
  ordered = jnp.where(evict & (index >= at), tail, ordered)
  at = jnp.sum(ordered < new)
  head = jnp.roll(ordered, 1)
  shifted = jnp.where(index == at, new, jnp.where(index > at, head, ordered))
  return jnp.where(insert, shifted, ordered)


def autoclip(
  percentile: float = 10.0,
  history: int = 1000,
  *,
  axis_name: Any = None,
  partition: Any = None,
) -> optax.GradientTransformation:
  r"""Clips by global norm to a percentile of the recent gradient norms (AutoClip).

  Each step records the global L2 norm :math:`g_t` of the gradient, then clips
  to the ``percentile``-th percentile of the last ``history`` recorded norms,
  the current one included (of all of them while fewer were recorded):

  .. math::
    \eta_t = \mathrm{percentile}_p(g_{t-h+1}, \dots, g_t), \qquad
    u_t = g \cdot \min(1, \eta_t / \lVert g \rVert_2),

  with linear interpolation between order statistics, as ``numpy.percentile``
  does. ``percentile=100`` never clips. A non-finite norm is not recorded and
  the gradient is returned unscaled, so the problem stays visible.

  Args:
    percentile: the percentile ``p`` in [0, 100] of the history to clip to.
    history: how many past norms (the current one included) are kept; an
      integer >= 1. It sets the state's size, so it cannot be injected with
      ``optax.inject_hyperparams`` (pass it in ``static_args``).
    axis_name: inside ``shard_map``, the mesh axis name (or tuple of names)
      the gradient is split over: statistics are reduced over it with scalar
      ``psum`` calls, so the result equals the jit/SPMD one. ``None`` outside.
    partition: with ``axis_name``, the gradient's pytree of ``PartitionSpec``
      (``shard_map``'s ``in_specs``) so that replicated leaves count once;
      ``None``: every floating leaf is split over ``axis_name``.

  Returns:
    An ``optax.GradientTransformation`` whose state is an
    :class:`AutoClipState`.

  Example:
    >>> import jax.numpy as jnp, gradcal_jax as gc
    >>> tx = gc.autoclip(percentile=50.0, history=3)
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> for g in (3.0, 4.0, 10.0):
    ...   updates, state = tx.update({"w": jnp.array([g, 0.0])}, state)
    >>> float(state.threshold), updates["w"].tolist()
    (4.0, [4.0, 0.0])

  References:
    Seetharaman et al., `AutoClip: Adaptive Gradient Clipping for Source
    Separation Networks <https://arxiv.org/abs/2007.14469>`_, MLSP 2020.
  """
  _tree.check_number("percentile", percentile, low=0.0, high=100.0)
  _tree.check_int("history", history, low=1)
  col = _tree.collective("autoclip", axis_name, partition)

  def init_fn(params: Any) -> AutoClipState:
    del params
    return AutoClipState(
      norms=jnp.zeros((history,), FLOAT32),
      sorted_norms=jnp.full((history,), jnp.inf, FLOAT32),
      count=jnp.zeros((), INT32),
      norm=jnp.zeros((), FLOAT32),
      threshold=jnp.zeros((), FLOAT32),
    )

  def update_fn(
    updates: Any, state: AutoClipState, params: Any = None
  ) -> tuple[Any, AutoClipState]:
    del params
    norm = _norms.global_norm(updates, col)
    finite = jnp.isfinite(norm)
    full = state.count >= history
    evicted = state.norms[state.count % history]
    ordered = _sorted_replace(state.sorted_norms, evicted, full & finite, norm, finite)
    norms, count = _record(state.norms, state.count, norm, finite)
    n = jnp.minimum(count, history)
    rank = (jnp.asarray(percentile, FLOAT32) / 100.0) * jnp.maximum(n - 1, 0)
    low = jnp.clip(jnp.floor(rank).astype(INT32), 0, jnp.maximum(n - 1, 0))
    high = jnp.minimum(low + 1, jnp.maximum(n - 1, 0))
    frac = rank - low
    below, above = ordered[low], ordered[high]
    # numpy's linear interpolation, anchored at the nearer order statistic.
    threshold = jnp.where(
      frac < 0.5, below + (above - below) * frac, above - (above - below) * (1.0 - frac)
    )
    # Before any finite norm was seen there is no history: report the norm.
    threshold = jnp.where(n > 0, threshold, norm)
    scale = _tree.clip_scale(norm, threshold)
    return _tree.scale_tree(updates, scale), AutoClipState(
      norms=norms, sorted_norms=ordered, count=count, norm=norm, threshold=threshold
    )

  return optax.GradientTransformation(init_fn, update_fn)


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
    new_state = ZClipState(
      mean=jnp.where(finite, new_mean, mean).astype(FLOAT32),
      variance=jnp.where(finite, new_variance, variance).astype(FLOAT32),
      step=_tree.count_if(state.step, finite),
      norm=norm,
      threshold=jnp.asarray(threshold, FLOAT32),
      clipped=(scale < 1.0).astype(INT32),
    )
    return _tree.scale_tree(updates, scale), new_state

  return optax.GradientTransformation(init_fn, update_fn)


@_stats.register_state(
  "skip_spikes", fields=("norm", "threshold", "num_skipped", "num_nonfinite", "skipped")
)
class SkipSpikesState(NamedTuple):
  """State of :func:`skip_spikes`.

  Attributes:
    inner_state: the wrapped transform's state, untouched on skipped steps.
    norms: float32 ring buffer of the last ``window`` accepted global norms.
    norm_count: int32, how many norms were accepted; from 2**31-1 on it stays
      within ``window`` of it (never negative) and the ring keeps turning.
    losses: float32 ring buffer of the last ``window`` accepted losses.
    loss_count: int32, how many losses were accepted (cycles near 2**31-1
      as ``norm_count`` does).
    norm: float32 global norm of the last gradient.
    threshold: float32 ``mean + sigma * std`` of the norm buffer at the last
      step (it only skips once ``min_history`` norms were accepted).
    num_skipped: int32, total skipped steps.
    num_nonfinite: int32, steps skipped for a non-finite gradient norm or loss.
    skipped: int32, 1 if the last step was skipped, else 0.
  """

  inner_state: Any
  norms: jax.Array
  norm_count: jax.Array
  losses: jax.Array
  loss_count: jax.Array
  norm: jax.Array
  threshold: jax.Array
  num_skipped: jax.Array
  num_nonfinite: jax.Array
  skipped: jax.Array


def _limit(buffer: jax.Array, count: jax.Array, sigma: float) -> jax.Array:
  """``mean + sigma * std`` (population std) of the filled ring entries."""
  valid, n = _valid(buffer, count)
  n = jnp.maximum(n, 1).astype(FLOAT32)
  mean = jnp.sum(jnp.where(valid, buffer, 0.0)) / n
  variance = jnp.sum(jnp.where(valid, (buffer - mean) ** 2, 0.0)) / n
  return mean + sigma * _norms.safe_sqrt(variance)


def skip_spikes(
  inner: optax.GradientTransformation,
  sigma: float = 6.0,
  window: int = 128,
  min_history: int = 64,
  *,
  axis_name: Any = None,
  partition: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Skips steps whose gradient norm (or loss) is a spike or non-finite.

  Keeps the last ``window`` accepted global gradient norms. Once at least
  ``min_history`` were accepted, a step whose norm :math:`g` satisfies

  .. math::
    g > \bar g + \sigma \cdot \mathrm{std}(g)

  over that buffer (the current norm excluded, population std) is skipped, as
  is any step whose norm is not finite. A skipped step returns zero updates,
  leaves ``inner``'s state exactly as it was (``inner`` does not run: it sits
  in a ``lax.cond``) and does not enter the buffer. With ``loss=`` given to
  ``update``, the scalar loss is checked the same way against a buffer of its
  own. Other keyword arguments are passed on to ``inner``.

  Args:
    inner: the transform to guard, for example ``optax.adam(1e-3)``.
    sigma: how many standard deviations above the mean is a spike; > 0.
    window: length of the history buffers; an integer >= 1.
    min_history: accepted steps needed before spikes are skipped, in
      [1, window]. Non-finite steps are always skipped.
    axis_name: inside ``shard_map``, the mesh axis name (or tuple of names)
      the gradient is split over: statistics are reduced over it with scalar
      ``psum`` calls, so the result equals the jit/SPMD one. ``None`` outside.
    partition: with ``axis_name``, the gradient's pytree of ``PartitionSpec``
      (``shard_map``'s ``in_specs``) so that replicated leaves count once;
      ``None``: every floating leaf is split over ``axis_name``.
      Inside ``shard_map`` a ``loss=`` that differs between devices is
      averaged over the axes it varies on (per-device losses of equal
      batches become the global one); a global loss stays as it is.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`SkipSpikesState`; its ``update`` takes an optional ``loss=``.

  Example:
    >>> import jax.numpy as jnp, optax, gradcal_jax as gc
    >>> tx = gc.skip_spikes(optax.sgd(1.0), window=4, min_history=2)
    >>> state = tx.init({"w": jnp.zeros(1)})
    >>> for g in (1.0, 1.1, 0.9, 100.0, jnp.nan):
    ...   updates, state = tx.update({"w": jnp.array([g])}, state)
    >>> int(state.num_skipped), int(state.num_nonfinite), updates["w"].tolist()
    (2, 1, [0.0])

  References:
    Groeneveld et al., `OLMo: Accelerating the Science of Language Models
    <https://arxiv.org/abs/2402.00838>`_ (OLMo-core's ``SkipStepOptimizer``);
    Levanter's skip-step optimizer (https://github.com/stanford-crfm/levanter).
  """
  _tree.check_number("sigma", sigma, low=0.0, low_open=True)
  _tree.check_int("window", window, low=1)
  _tree.check_int("min_history", min_history, low=1)
  _tree.check_number("min_history", min_history, low=1, high=window)
  _tree.check_transform("inner", inner)
  inner = optax.with_extra_args_support(inner)
  col = _tree.collective("skip_spikes", axis_name, partition)

  def init_fn(params: Any) -> SkipSpikesState:
    # One array per field: fields sharing a buffer cannot be donated.
    zero = lambda: jnp.zeros((), FLOAT32)
    count = lambda: jnp.zeros((), INT32)
    return SkipSpikesState(
      inner_state=inner.init(params),
      norms=jnp.zeros((window,), FLOAT32),
      norm_count=count(),
      losses=jnp.zeros((window,), FLOAT32),
      loss_count=count(),
      norm=zero(),
      threshold=zero(),
      num_skipped=count(),
      num_nonfinite=count(),
      skipped=count(),
    )

  def update_fn(
    updates: Any, state: SkipSpikesState, params: Any = None, **extra_args: Any
  ) -> tuple[Any, SkipSpikesState]:
    loss = extra_args.pop("loss", None)
    norm = _norms.global_norm(updates, col)
    threshold = _limit(state.norms, state.norm_count, sigma)
    nonfinite = ~jnp.isfinite(norm)
    spike = (state.norm_count >= min_history) & (norm > threshold)
    if loss is not None:
      loss = jnp.asarray(loss, FLOAT32)
      if loss.shape != ():
        raise ValueError(
          f"skip_spikes: loss= must be a scalar (the mean loss of the batch), got shape "
          f"{loss.shape}; reduce it first, e.g. loss=jnp.mean(per_example_losses)."
        )
      loss = _tree.over_devices(col, loss, op="mean")
      loss_limit = _limit(state.losses, state.loss_count, sigma)
      nonfinite = nonfinite | ~jnp.isfinite(loss)
      spike = spike | ((state.loss_count >= min_history) & (loss > loss_limit))
    skip = nonfinite | spike

    new_updates, inner_state = _tree.run_or_hold(
      ~skip, lambda u, s, p: inner.update(u, s, p, **extra_args), updates, state.inner_state, params
    )
    accept = ~skip
    norms, norm_count = _record(state.norms, state.norm_count, norm, accept)
    losses, loss_count = state.losses, state.loss_count
    if loss is not None:
      losses, loss_count = _record(losses, loss_count, loss, accept)
    return new_updates, SkipSpikesState(
      inner_state=inner_state,
      norms=norms,
      norm_count=norm_count,
      losses=losses,
      loss_count=loss_count,
      norm=norm,
      threshold=threshold,
      num_skipped=_tree.count_if(state.num_skipped, skip),
      num_nonfinite=_tree.count_if(state.num_nonfinite, nonfinite),
      skipped=skip.astype(INT32),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
