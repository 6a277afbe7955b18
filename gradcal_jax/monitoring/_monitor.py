"""monitor: record the health of each gradient as it passes through."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradcal_jax import _control, _norms, _stats, _tree

# monitor's default thresholds on a leaf's L2 norm (guard's too).
VANISHING_BELOW = 1e-7
EXPLODING_ABOVE = 1e3


@_stats.register_state(
  "monitor",
  fields=("count", "norm", "leaf_norms", "max_abs", "nonfinite", "vanishing", "exploding"),
)
class MonitorState(NamedTuple):
  """What :func:`monitor` saw in the last gradient it passed through.

  Every field exists from ``init`` on (zeros), so the state's structure never
  changes and a ``lax.scan`` training loop can carry it.

  Attributes:
    count: number of updates seen (int32).
    norm: global L2 norm of the last gradient (float32).
    leaf_norms: a pytree shaped like the gradient holding each leaf's L2 norm
      (float32 scalars; ``None`` for integer and empty leaves).
    max_abs: largest absolute entry of the last gradient (float32; NaN if it
      held a NaN).
    nonfinite: number of NaN or infinite entries in the last gradient (int32).
    vanishing: number of floating leaves whose norm is below
      ``vanishing_below`` (int32).
    exploding: number of floating leaves whose norm is above
      ``exploding_above``, an infinite norm included (int32).
    vanishing_below: the threshold used (float32), kept for :func:`report`.
    exploding_above: the threshold used (float32), kept for :func:`report`.
  """

  count: jax.Array  # type: ignore[assignment]  # optax's name; shadows tuple.count
  norm: jax.Array
  leaf_norms: Any
  max_abs: jax.Array
  nonfinite: jax.Array
  vanishing: jax.Array
  exploding: jax.Array
  vanishing_below: jax.Array
  exploding_above: jax.Array


def check_thresholds(vanishing_below: Any, exploding_above: Any) -> None:
  _tree.check_number("vanishing_below", vanishing_below, low=0.0)
  _tree.check_number("exploding_above", exploding_above, low=0.0)
  concrete = _tree.is_concrete(vanishing_below) and _tree.is_concrete(exploding_above)
  if concrete and not float(vanishing_below) < float(exploding_above):
    raise ValueError(
      "vanishing_below must be smaller than exploding_above, got "
      f"vanishing_below={vanishing_below!r} and "
      f"exploding_above={exploding_above!r}."
    )


def is_gradient(x: Any) -> bool:
  # Integer leaves (step counters) and empty leaves can neither vanish nor
  # explode: they get no norm, so they are never flagged.
  return _tree.is_float(x) and x.size > 0


def _max_abs(largest: jax.Array, norm: jax.Array) -> jax.Array:
  """A leaf's largest |entry| (float32), NaN when the leaf holds a NaN.

  A leaf's sum of squares is NaN exactly when an entry is (squares of
  infinities are +inf, which no sum of non-negative terms turns into NaN), so
  its norm says what XLA:CPU's max reduction may drop, at no extra pass.
  """
  return jnp.where(jnp.isnan(norm), jnp.nan, largest)


def count_nonfinite(tree: Any, col: _tree.Collective | None = None) -> jax.Array:
  """The number of NaN or infinite entries of ``tree``'s floating leaves
  (int32); with ``col``, of the whole leaves that ``shard_map``'s blocks make
  up. A pass of its own: :func:`monitor` runs it only when the global norm
  says there is something to count, :func:`gradcal_jax.guard` only on held
  steps."""
  leaves = _tree.float_leaves(tree)
  counts = [jnp.sum(~jnp.isfinite(x), dtype=jnp.int32) for x in leaves]
  if col is None or not counts:
    return sum(counts, jnp.zeros((), jnp.int32))
  return _tree.sum_over_leaves(col, counts, _tree.leaf_splits(col, tree, floats_only=True))


def observe(
  updates: Any,
  state: MonitorState,
  low: jax.Array,
  high: jax.Array,
  col: _tree.Collective | None = None,
  *,
  count: bool = True,
) -> MonitorState:
  """:func:`monitor`'s state after it saw ``updates``: per-leaf norms, the
  global norm (from the leaf norms: no second pass), the largest |entry|,
  the leaves below ``low`` and above ``high``. With ``col``, of the whole
  leaves that ``shard_map``'s blocks make up (scalar collectives only).

  With ``count=False`` the non-finite count is left at 0 for the caller to
  fill (``_replace(nonfinite=...)``), as :func:`gradcal_jax.guard` does.
  """
  leaves, treedef = jax.tree.flatten(updates)
  index = [i for i, x in enumerate(leaves) if is_gradient(x)]
  splits = _tree.leaf_splits(col, updates) if col is not None else None
  squares = [_norms.sum_of_squares(leaves[i]) for i in index]
  maxima = [jnp.max(jnp.abs(leaves[i]), initial=0).astype(_tree.FLOAT32) for i in index]
  if col is not None and splits is not None:
    picked = [splits[i] for i in index]
    squares = _tree.per_leaf(col, squares, picked)
    maxima = _tree.per_leaf(col, maxima, picked, op="max")
  per_leaf: list[Any] = [None] * len(leaves)
  for i, q in zip(index, squares):
    axes = () if splits is None else splits[i].axes
    per_leaf[i] = _norms.norm_from_squares(q, leaves[i], axes)
  norm_list = [per_leaf[i] for i in index]
  norm = _norms.combine_norms(norm_list)
  norms = jnp.stack(norm_list) if norm_list else jnp.zeros((0,), _tree.FLOAT32)
  nonfinite = jnp.zeros((), jnp.int32)
  if count:
    # A finite global norm proves every entry finite: skip the count then.
    # The norm is global, so every device takes the same branch.
    nonfinite = _control.cond(
      jnp.isfinite(norm), lambda: nonfinite, lambda: count_nonfinite(updates, col)
    )
  maxima = [_max_abs(m, per_leaf[i]) for i, m in zip(index, maxima)]
  return MonitorState(
    count=optax.safe_increment(state.count),
    norm=norm,
    leaf_norms=jax.tree.unflatten(treedef, per_leaf),
    max_abs=_tree.nan_max(jnp.stack(maxima) if maxima else jnp.zeros((0,), _tree.FLOAT32)),
    nonfinite=nonfinite,
    vanishing=jnp.sum(norms < low, dtype=jnp.int32),
    exploding=jnp.sum(norms > high, dtype=jnp.int32),
    vanishing_below=low,
    exploding_above=high,
  )


def fresh_state(params: Any, low: jax.Array, high: jax.Array) -> MonitorState:
  """:func:`monitor`'s state before any update: every statistic zero."""
  # One array per field: fields sharing a buffer cannot be donated.
  zero_f = lambda: jnp.zeros((), _tree.FLOAT32)
  zero_i = lambda: jnp.zeros((), jnp.int32)
  return MonitorState(
    count=zero_i(),
    norm=zero_f(),
    leaf_norms=jax.tree.map(lambda x: zero_f() if is_gradient(x) else None, params),
    max_abs=zero_f(),
    nonfinite=zero_i(),
    vanishing=zero_i(),
    exploding=zero_i(),
    vanishing_below=low,
    exploding_above=high,
  )


def thresholds(vanishing_below: Any, exploding_above: Any) -> tuple[jax.Array, jax.Array]:
  """:func:`monitor`'s two thresholds as float32 scalars."""
  return (
    jnp.asarray(vanishing_below, _tree.FLOAT32),
    jnp.asarray(exploding_above, _tree.FLOAT32),
  )


def monitor(
  vanishing_below: float = VANISHING_BELOW,
  exploding_above: float = EXPLODING_ABOVE,
  *,
  axis_name: Any = None,
  partition: Any = None,
) -> optax.GradientTransformation:
  r"""Records the health of each gradient and passes it through unchanged.

  For a gradient :math:`g` with leaves :math:`g_l` it records the global norm
  :math:`\|g\|_2`, each leaf's norm :math:`\|g_l\|_2` (all in float32), the
  largest entry :math:`\max |g|`, the number of non-finite entries, and how
  many leaves have :math:`\|g_l\|_2 <` ``vanishing_below`` (vanishing) or
  :math:`\|g_l\|_2 >` ``exploding_above`` (exploding). The updates returned
  are the very objects received: put it anywhere in an ``optax.chain`` to see
  the gradient at that point, read it with :func:`stats` (for a logger) or
  :func:`report` (for a person).

  Unlike ``optax.monitor``, the state holds every statistic from ``init`` on,
  so it can be carried by ``lax.scan`` and checkpointed.

  Args:
    vanishing_below: a leaf whose L2 norm is below this (>= 0) counts as
      vanishing.
    exploding_above: a leaf whose L2 norm is above this (> vanishing_below)
      counts as exploding.
    axis_name: inside ``shard_map``, the mesh axis name (or tuple of names)
      the gradient is split over: statistics are reduced over it with scalar
      ``psum`` calls, so the result equals the jit/SPMD one. ``None`` outside.
    partition: with ``axis_name``, the gradient's pytree of ``PartitionSpec``
      (``shard_map``'s ``in_specs``) so that replicated leaves count once;
      ``None``: every floating leaf is split over ``axis_name``.

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`MonitorState`.

  Example:
    >>> import jax.numpy as jnp, optax, gradcal_jax as gc
    >>> tx = optax.chain(gc.monitor(), optax.sgd(0.1))
    >>> grads = {"b": jnp.zeros(2), "w": jnp.array([3.0, 4.0])}
    >>> _, state = tx.update(grads, tx.init(grads))
    >>> s = gc.stats(state)
    >>> float(s["monitor/norm"]), float(s["monitor/leaf_norms/w"])
    (5.0, 5.0)
    >>> int(s["monitor/vanishing"])
    1

  References:
    Bengio, Simard and Frasconi, "Learning long-term dependencies with
    gradient descent is difficult", IEEE Trans. Neural Networks, 1994.
    Pascanu, Mikolov and Bengio, "On the difficulty of training recurrent
    neural networks", ICML 2013.
  """
  check_thresholds(vanishing_below, exploding_above)
  col = _tree.collective("monitor", axis_name, partition)

  def init_fn(params: Any) -> MonitorState:
    return fresh_state(params, *thresholds(vanishing_below, exploding_above))

  def update_fn(updates: Any, state: MonitorState, params: Any = None) -> tuple[Any, MonitorState]:
    del params
    new_state = observe(updates, state, *thresholds(vanishing_below, exploding_above), col)
    return updates, new_state

  return optax.GradientTransformation(init_fn, update_fn)
