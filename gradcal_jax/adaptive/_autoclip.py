"""AutoClip: clip at a percentile of the recent global norms."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradcal_jax import _norms, _stats, _tree
from gradcal_jax.adaptive._ring import record

FLOAT32 = jnp.float32
INT32 = jnp.int32


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
    norms, count = record(state.norms, state.count, norm, finite)
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
