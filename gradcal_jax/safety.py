"""The safety stack as one transform: ``guard`` = monitor, ZClip and skip_spikes.

``optax.chain(gc.monitor(), gc.zclip(), gc.skip_spikes(inner))`` is the stack
we recommend against loss spikes. As a chain each link only sees its input, so
XLA compiles it as written: ZClip writes the clipped gradient out because it
is an operand of skip_spikes' ``lax.cond``, skip_spikes reads it back for its
norm, and monitor counts non-finite entries under a ``lax.cond`` of its own.
:func:`guard` computes the same updates and statistics with less traffic:
ZClip's scale is applied inside the cond (it fuses into the inner update's
read of the gradient), the clipped gradient's norm is one fused read, and the
non-finite count runs in the held branch, the only steps that can have one.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import optax

from gradcal_jax import _control, _norms, _tree, adaptive, monitoring
from gradcal_jax.adaptive import SkipSpikesState, ZClipState
from gradcal_jax.monitoring import MonitorState


class GuardState(NamedTuple):
  """State of :func:`guard`: the states of the chain it stands for, so
  :func:`gradcal_jax.stats` gives the chain's keys (``monitor/...``,
  ``zclip/...``, ``skip_spikes/...``) with the chain's values.

  Attributes:
    monitor: the :class:`~gradcal_jax.MonitorState` of the gradient as
      received (its ``nonfinite`` count is taken on held steps only: a step
      with a non-finite entry is always held).
    zclip: the :class:`~gradcal_jax.ZClipState`.
    skip_spikes: the :class:`~gradcal_jax.SkipSpikesState` of the clipped
      gradient, ``inner``'s state inside (``skip_spikes.inner_state``).
  """

  monitor: MonitorState
  zclip: ZClipState
  skip_spikes: SkipSpikesState


def guard(
  inner: optax.GradientTransformation,
  *,
  z_threshold: float = 2.5,
  alpha: float = 0.97,
  warmup_steps: int = 25,
  max_norm: float | None = None,
  eps: float = 1e-6,
  sigma: float = 6.0,
  window: int = 128,
  min_history: int = 64,
  vanishing_below: float = monitoring.VANISHING_BELOW,
  exploding_above: float = monitoring.EXPLODING_ABOVE,
  axis_name: Any = None,
  partition: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""``chain(monitor(), zclip(), skip_spikes(inner))`` in one transform, moving less memory.

  For a gradient :math:`g` it records :func:`~gradcal_jax.monitor`'s
  statistics of :math:`g`, clips it with :func:`~gradcal_jax.zclip` to
  :math:`s\,g` (:math:`s \le 1` from the z-score of :math:`\|g\|_2`), and
  runs ``inner`` on :math:`s\,g` unless :func:`~gradcal_jax.skip_spikes`
  skips the step:

  .. math::
    \|s\,g\|_2 > \bar n + \sigma\,\mathrm{std}(n)
    \quad\text{or}\quad \|s\,g\|_2 \notin \mathbb{R},

  over its buffer :math:`n` of accepted norms (and the same for ``loss=``).
  Statistics equal the chain's bit for bit; updates and ``inner``'s state
  too where XLA emits no FMA (``--xla_cpu_max_isa=SSE4_2``), else within one
  rounding, as the scale fused into ``inner``'s read contracts differently
  (tested). The state holds the three states, so
  :func:`~gradcal_jax.stats` gives the chain's keys. What differs is the
  memory moved. XLA's bytes accessed, over the floor of reading and writing
  the gradient once, with ``inner`` Adam on ten
  float32 leaves (``tests/test_traffic.py``, norms needing no rescue):

  ============================  ===========  ====================
  update                        undonated    donated train step
  ============================  ===========  ====================
  the chain                     10.5         10.0
  ``guard(adam)``               8.0          7.5
  optax clip + adam             7.0          7.5
  ============================  ===========  ====================

  In a training step that donates params and state, the guard moves no more
  than optax's ``chain(clip_by_global_norm, adam)`` while recording,
  clipping adaptively and skipping spikes. Undonated, the 2.0 above optax's
  figure that remains is Adam's two moments copied so that a held step can
  return them (``_control.run_or_hold``).

  Args:
    inner: the transform to guard, for example ``optax.adamw(1e-3)``.
    z_threshold, alpha, warmup_steps, max_norm, eps: :func:`~gradcal_jax.zclip`'s
      arguments, with its defaults and ranges.
    sigma, window, min_history: :func:`~gradcal_jax.skip_spikes`'s arguments.
    vanishing_below, exploding_above: :func:`~gradcal_jax.monitor`'s.
    axis_name: inside ``shard_map``, the mesh axis name (or tuple of names)
      the gradient is split over: statistics are reduced over it with scalar
      ``psum`` calls, so the result equals the jit/SPMD one. ``None`` outside.
    partition: with ``axis_name``, the gradient's pytree of ``PartitionSpec``
      (``shard_map``'s ``in_specs``) so that replicated leaves count once;
      ``None``: every floating leaf is split over ``axis_name``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`GuardState`; its ``update`` takes an optional ``loss=`` (a
    scalar, judged as by :func:`~gradcal_jax.skip_spikes`), other keyword
    arguments go to ``inner``.

  Example:
    >>> import jax.numpy as jnp, optax, gradcal_jax as gc
    >>> tx = gc.guard(optax.sgd(1.0), warmup_steps=2, window=4, min_history=2)
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> for g in (1.0, 1.1, 0.9, 1.0, jnp.nan):
    ...   updates, state = tx.update({"w": jnp.array([g, 0.0])}, state)
    >>> s = gc.stats(state)
    >>> int(s["skip_spikes/num_skipped"]), int(s["monitor/nonfinite"]), updates["w"].tolist()
    (1, 1, [0.0, 0.0])

  References:
    Kumar et al., `ZClip: Adaptive Spike Mitigation for LLM Pre-Training
    <https://arxiv.org/abs/2504.02507>`_, 2025; Groeneveld et al., `OLMo:
    Accelerating the Science of Language Models
    <https://arxiv.org/abs/2402.00838>`_, 2024 (skipped steps).
  """
  # Each factory validates its own arguments and builds its own state.
  watch = monitoring.monitor(
    vanishing_below, exploding_above, axis_name=axis_name, partition=partition
  )
  clip = adaptive.zclip(
    z_threshold, alpha, warmup_steps, max_norm, eps, axis_name=axis_name, partition=partition
  )
  skip = adaptive.skip_spikes(
    inner, sigma, window, min_history, axis_name=axis_name, partition=partition
  )
  inner = optax.with_extra_args_support(inner)
  col = _tree.collective("guard", axis_name, partition)
  low, high = monitoring.thresholds(vanishing_below, exploding_above)

  def init_fn(params: Any) -> GuardState:
    return GuardState(watch.init(params), clip.init(params), skip.init(params))

  def update_fn(
    updates: Any, state: GuardState, params: Any = None, **extra_args: Any
  ) -> tuple[Any, GuardState]:
    loss = extra_args.pop("loss", None)
    seen = monitoring.observe(updates, state.monitor, low, high, col, count=False)
    # zclip's state only: its scale is applied below, once to measure and
    # once inside the cond, and the clipped gradient is never written out.
    clipped = adaptive.zclip_state(
      updates,
      state.zclip,
      z_threshold=z_threshold,
      alpha=alpha,
      warmup_steps=warmup_steps,
      max_norm=max_norm,
      eps=eps,
      col=col,
    )
    scale = adaptive.zclip_scale(clipped)
    norm = _norms.global_norm(updates, col, scale=scale)
    decision = adaptive.judge_step(
      state.skip_spikes, norm, loss, sigma=sigma, min_history=min_history, col=col
    )
    # A step with a non-finite entry has a non-finite norm and is held, so
    # monitor's count is taken on held steps only (0 on the others, as the
    # count of a finite gradient).
    new_updates, inner_state, nonfinite = _control.run_or_hold(
      ~decision.skip,
      lambda u, s, p: inner.update(_tree.scale_tree(u, scale), s, p, **extra_args),
      updates,
      state.skip_spikes.inner_state,
      params,
      when_held=lambda u: monitoring.count_nonfinite(u, col),
    )
    return new_updates, GuardState(
      monitor=seen._replace(nonfinite=nonfinite),
      zclip=clipped,
      skip_spikes=adaptive.advance(state.skip_spikes, decision, inner_state),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
