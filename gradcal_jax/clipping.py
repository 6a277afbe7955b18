"""Gradient clipping (value, global, layer, unit-wise), centralization, weight clipping.

Every norm is accumulated in float32 whatever the gradient's dtype, every
output leaf keeps its dtype, and a non-finite gradient is never scaled into a
plausible update: its norm is reported as it is and the scale stays 1, so the
``inf`` / ``nan`` reaches the output where a guard or the user can see it.
Kernels follow Flax's layout, output units on the last axis: Dense
``(in, out)``, Conv ``(*spatial, in, out)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradcal_jax import _norms, _stats, _tree

FLOAT32 = jnp.float32

Axes = int | tuple[int, ...] | None
UnitAxes = Any | Callable[[tuple[Any, ...], jax.Array], Axes] | None


def _fraction(count: jax.Array, total: int) -> jax.Array:
  """``count / total`` as float32, 0 for an empty tree."""
  return (jnp.asarray(count, FLOAT32) / max(total, 1)).astype(FLOAT32)


def _sum(values: list[jax.Array], dtype: Any) -> jax.Array:
  return _tree.add_up(values) if values else jnp.zeros((), dtype)


# ----------------------------------------------------------------- by value


@_stats.register_state("clip_by_value", fields=("norm", "clipped_fraction"))
class ClipByValueState(NamedTuple):
  """State of :func:`clip_by_value`.

  Attributes:
    norm: float32 global L2 norm of the gradient before clipping.
    clipped_fraction: float32 fraction of the floating entries with
      ``|g| > max_abs`` at the last update (0 at ``init``); an ``inf`` entry
      counts, a ``nan`` entry makes it ``nan``.
  """

  norm: jax.Array
  clipped_fraction: jax.Array


def _count_above(x: jax.Array, bound: jax.Array) -> jax.Array:
  """The number of entries with ``|x| > bound`` (``inf`` counts, ``nan`` poisons).

  Written as ``sum(sign(max(|x| - bound, 0)))`` rather than a sum of a boolean
  mask, and with ``bound`` behind an optimization barrier: XLA:CPU then fuses
  the count into one read of ``x``. A mask, or a ``bound`` constant shared with
  the clamp, makes it write a full-size temporary, which costs more than the
  clamp itself.
  """
  bound = jax.lax.optimization_barrier(bound)
  excess = jnp.maximum(jnp.abs(x.astype(FLOAT32)) - bound, 0.0)
  return jnp.sum(jnp.sign(excess))


def clip_by_value(
  max_abs: float, *, axis_name: Any = None, partition: Any = None
) -> optax.GradientTransformation:
  """Clamps every entry of the gradient to ``[-max_abs, max_abs]``.

  .. math::
    g_j \\leftarrow \\min(\\max(g_j, -c), c), \\qquad c = \\text{max\\_abs}.

  Non-finite entries are left as they are (an ``inf`` clamped to ``max_abs``
  would look like an ordinary large gradient); they also make the state's
  ``norm`` non-finite. The clamp is computed in float32 and cast back, so a
  bfloat16 gradient stays bfloat16. The two statistics (norm and clamped
  count) cost two more reads of the gradient than ``optax.clip``.

  Args:
    max_abs: the largest absolute value an entry may keep, ``>= 0``.
    axis_name: inside ``shard_map``, the mesh axis name (or tuple of names)
      the gradient is split over: statistics are reduced over it with scalar
      ``psum`` calls, so the result equals the jit/SPMD one. ``None`` outside.
    partition: with ``axis_name``, the gradient's pytree of ``PartitionSpec``
      (``shard_map``'s ``in_specs``) so that replicated leaves count once;
      ``None``: every floating leaf is split over ``axis_name``.

  Returns:
    An ``optax.GradientTransformation`` whose state is :class:`ClipByValueState`.

  Example:
    >>> import jax.numpy as jnp, gradcal_jax as gc
    >>> tx = gc.clip_by_value(1.0)
    >>> g = {"w": jnp.array([-3.0, 0.5, 2.0, 0.0])}
    >>> u, s = tx.update(g, tx.init(g))
    >>> print(u["w"], float(s.clipped_fraction))
    [-1.   0.5  1.   0. ] 0.5

  References:
    Mikolov, `Statistical Language Models Based on Neural Networks
    <https://www.fit.vut.cz/study/phd-thesis-file/283/283.pdf>`_, 2012
    (section 3.3.3, gradient clipping by value).
  """
  _tree.check_number("max_abs", max_abs, low=0.0)
  col = _tree.collective("clip_by_value", axis_name, partition)

  def init_fn(params: Any) -> ClipByValueState:
    del params
    return ClipByValueState(norm=jnp.zeros((), FLOAT32), clipped_fraction=jnp.zeros((), FLOAT32))

  def update_fn(updates, state, params=None):
    del state, params
    bound = jnp.asarray(max_abs, FLOAT32)

    def clamp(x):
      x32 = x.astype(FLOAT32)
      clamped = jnp.where(jnp.isfinite(x32), jnp.clip(x32, -bound, bound), x32)
      return clamped.astype(x.dtype)

    counts = [_count_above(x, bound) for x in _tree.float_leaves(updates)]
    count = (
      _sum(counts, FLOAT32)
      if col is None
      else _tree.sum_over_leaves(col, counts, _tree.leaf_splits(col, updates, floats_only=True))
    )
    new_state = ClipByValueState(
      norm=_norms.global_norm(updates, col),
      clipped_fraction=_fraction(count, _tree.size(updates, col)),
    )
    return _tree.map_float(clamp, updates), new_state

  return optax.GradientTransformation(init_fn, update_fn)


# ------------------------------------------------------------- global norm


@_stats.register_state("clip_by_global_norm", fields=("norm", "scale"))
class ClipByGlobalNormState(NamedTuple):
  """State of :func:`clip_by_global_norm`.

  Attributes:
    norm: float32 global L2 norm of the gradient before clipping (``inf`` or
      ``nan`` when the gradient has such an entry).
    scale: float32 factor applied to the gradient, in ``[0, 1]`` (1 at
      ``init``, and 1 when the norm is not finite).
  """

  norm: jax.Array
  scale: jax.Array


def clip_by_global_norm(
  max_norm: float, *, axis_name: Any = None, partition: Any = None
) -> optax.GradientTransformation:
  """Rescales the gradient so that its global L2 norm is at most ``max_norm``.

  .. math::
    g \\leftarrow g \\cdot \\min\\left(1, \\frac{c}{\\lVert g \\rVert_2}\\right),
    \\qquad \\lVert g \\rVert_2 = \\sqrt{\\textstyle\\sum_{\\text{leaves}}
    \\sum_j g_j^2}, \\quad c = \\text{max\\_norm}.

  Unlike ``optax.clip_by_global_norm`` (0.2.8): the norm is accumulated in
  float32, so a float16 gradient whose norm exceeds 65504 is scaled down
  instead of zeroed; ``max_norm = 0`` with a zero gradient gives zeros, not
  ``nan``; and a gradient with an ``inf`` entry is passed through unscaled
  (its norm, ``inf``, is in the state) instead of having every finite entry
  set to zero. The cost is one read of the gradient for the norm and one
  read and write for the scale.

  Args:
    max_norm: the largest global norm the output may have, ``>= 0``.
    axis_name: inside ``shard_map``, the mesh axis name (or tuple of names)
      the gradient is split over: statistics are reduced over it with scalar
      ``psum`` calls, so the result equals the jit/SPMD one. ``None`` outside.
    partition: with ``axis_name``, the gradient's pytree of ``PartitionSpec``
      (``shard_map``'s ``in_specs``) so that replicated leaves count once;
      ``None``: every floating leaf is split over ``axis_name``.

  Returns:
    An ``optax.GradientTransformation`` whose state is
    :class:`ClipByGlobalNormState`.

  Example:
    >>> import jax.numpy as jnp, gradcal_jax as gc
    >>> tx = gc.clip_by_global_norm(1.0)
    >>> g = {"a": jnp.array([3.0]), "b": jnp.array([4.0])}
    >>> u, s = tx.update(g, tx.init(g))
    >>> print(u["a"], u["b"], s.norm, s.scale)
    [0.6] [0.8] 5.0 0.2

  References:
    Pascanu et al., `On the difficulty of training Recurrent Neural Networks
    <https://arxiv.org/abs/1211.5063>`_, 2013
  """
  _tree.check_number("max_norm", max_norm, low=0.0)
  col = _tree.collective("clip_by_global_norm", axis_name, partition)

  def init_fn(params: Any) -> ClipByGlobalNormState:
    del params
    return ClipByGlobalNormState(norm=jnp.zeros((), FLOAT32), scale=jnp.ones((), FLOAT32))

  def update_fn(updates, state, params=None):
    del state, params
    norm = _norms.global_norm(updates, col)
    scale = _tree.clip_scale(norm, max_norm)
    return (_tree.scale_tree(updates, scale), ClipByGlobalNormState(norm=norm, scale=scale))

  return optax.GradientTransformation(init_fn, update_fn)


# -------------------------------------------------------------- layer norm


@_stats.register_state("clip_by_layer_norm", fields=("norm", "scale"))
class ClipByLayerNormState(NamedTuple):
  """State of :func:`clip_by_layer_norm`.

  Both fields are pytrees shaped like the gradient, one float32 scalar per
  leaf (non-floating leaves get norm 0 and scale 1), so ``stats`` logs one
  value per layer.

  Attributes:
    norm: each leaf's float32 L2 norm before clipping (``inf`` with an
      infinite entry, NaN with a NaN entry).
    scale: the float32 factor applied to each leaf, in ``[0, 1]``; 1 for a
      leaf whose norm is not finite.
  """

  norm: Any
  scale: Any


def clip_by_layer_norm(
  max_norm: float, *, axis_name: Any = None, partition: Any = None
) -> optax.GradientTransformation:
  """Rescales each leaf of the gradient so that its L2 norm is at most ``max_norm``.

  .. math::
    g^{(l)} \\leftarrow g^{(l)} \\cdot
    \\min\\left(1, \\frac{c}{\\lVert g^{(l)} \\rVert_2}\\right)
    \\quad \\text{for every leaf } l, \\qquad c = \\text{max\\_norm}.

  Each leaf is treated as :func:`clip_by_global_norm` treats the whole tree:
  float32 norms, no ``nan`` for a zero threshold, and a leaf with a
  non-finite entry is passed through unscaled.

  Args:
    max_norm: the largest L2 norm each leaf may have, ``>= 0``.
    axis_name: inside ``shard_map``, the mesh axis name (or tuple of names)
      the gradient is split over: statistics are reduced over it with scalar
      ``psum`` calls, so the result equals the jit/SPMD one. ``None`` outside.
    partition: with ``axis_name``, the gradient's pytree of ``PartitionSpec``
      (``shard_map``'s ``in_specs``) so that replicated leaves count once;
      ``None``: every floating leaf is split over ``axis_name``.

  Returns:
    An ``optax.GradientTransformation`` whose state is
    :class:`ClipByLayerNormState`.

  Example:
    >>> import jax.numpy as jnp, gradcal_jax as gc
    >>> tx = gc.clip_by_layer_norm(1.0)
    >>> g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.5])}
    >>> u, s = tx.update(g, tx.init(g))
    >>> print(u["a"], u["b"], float(s.norm["a"]), float(s.scale["b"]))
    [0.6 0.8] [0.5] 5.0 1.0

  References:
    You et al., `Large Batch Training of Convolutional Networks
    <https://arxiv.org/abs/1708.03888>`_, 2017 (per-layer gradient scaling).
  """
  _tree.check_number("max_norm", max_norm, low=0.0)
  col = _tree.collective("clip_by_layer_norm", axis_name, partition)

  def init_fn(params: Any) -> ClipByLayerNormState:
    return ClipByLayerNormState(
      norm=jax.tree.map(lambda _: jnp.zeros((), FLOAT32), params),
      scale=jax.tree.map(lambda _: jnp.ones((), FLOAT32), params),
    )

  def update_fn(updates, state, params=None):
    del state, params
    norms = _norms.leaf_norms(updates, col)
    scales = jax.tree.map(lambda n: _tree.clip_scale(n, max_norm), norms)
    updates = _tree.map_float(_tree.scale_leaf, updates, scales)
    return updates, ClipByLayerNormState(norm=norms, scale=scales)

  return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------- AGC


@_stats.register_state("adaptive_grad_clip", fields=("clipped_fraction", "max_ratio"))
class AdaptiveGradClipState(NamedTuple):
  """State of :func:`adaptive_grad_clip`.

  Attributes:
    clipped_fraction: float32 fraction of the output units (over every
      floating leaf) whose gradient was rescaled at the last update.
    max_ratio: float32 largest ``||G_i|| / max(||W_i||, eps)`` over all units
      before clipping; clipping happens where it exceeds ``clipping``. NaN
      when any unit's ratio is (a NaN in the gradient or the params), on
      every topology.
  """

  clipped_fraction: jax.Array
  max_ratio: jax.Array


def _is_axes(x: Any) -> bool:
  return (
    x is None
    or isinstance(x, int)
    or (isinstance(x, (tuple, list)) and all(isinstance(a, int) for a in x))
  )


def _reduce_axes(axes: Axes, ndim: int, where: str) -> tuple[int, ...]:
  """The sorted, non-negative axes a unit spans; Flax's default for ``None``."""
  if axes is None:
    return tuple(range(ndim - 1)) if ndim >= 2 else tuple(range(ndim))
  if isinstance(axes, int):
    axes = (axes,)
  if not _is_axes(axes) or any(not -ndim <= a < ndim for a in axes):
    raise ValueError(
      f"unit_axes for {where} must be None or a tuple of axes in "
      f"[-{ndim}, {ndim}) for a leaf of rank {ndim}, got {axes!r}."
    )
  return tuple(sorted({a % ndim for a in axes}))


def _axes_getter(unit_axes: UnitAxes) -> Callable[[tuple[Any, ...], jax.Array], Axes]:
  """A function ``(path, leaf) -> axes`` for each form of ``unit_axes``."""
  if unit_axes is None:
    return lambda path, leaf: None
  if callable(unit_axes):
    return unit_axes
  flat = jax.tree_util.tree_flatten_with_path(unit_axes, is_leaf=_is_axes)[0]
  bad = [(p, a) for p, a in flat if not _is_axes(a)]
  if bad:
    raise ValueError(
      "unit_axes must be None, a callable (path, leaf) -> axes, or a pytree "
      "like the params whose leaves are None or tuples of ints; got "
      f"{bad[0][1]!r} at {_stats.path_str(bad[0][0])!r}."
    )
  table = {_stats.path_str(p): a for p, a in flat}

  def lookup(path, leaf):
    del leaf
    key = _stats.path_str(path)
    if key not in table:
      raise ValueError(
        f"unit_axes has no entry for the parameter {key!r}; give it None "
        "for the default (every axis but the last)."
      )
    return table[key]

  return lookup


def adaptive_grad_clip(
  clipping: float = 0.01,
  eps: float = 1e-3,
  unit_axes: UnitAxes = None,
  *,
  axis_name: Any = None,
  partition: Any = None,
) -> optax.GradientTransformation:
  """Unit-wise adaptive gradient clipping (AGC), for Flax's kernel layout.

  For every output unit ``i`` of a parameter ``W`` with gradient ``G``:

  .. math::
    G_i \\leftarrow \\begin{cases}
      \\lambda \\dfrac{W^\\star_i}{\\lVert G_i \\rVert} G_i &
        \\text{if } \\dfrac{\\lVert G_i \\rVert}{W^\\star_i} > \\lambda \\\\
      G_i & \\text{otherwise}
    \\end{cases},
    \\qquad W^\\star_i = \\max(\\lVert W_i \\rVert, \\epsilon),

  with Frobenius norms in float32 and :math:`\\lambda` = ``clipping``. A unit
  is the slice along every axis but the last for a leaf of rank >= 2 (Dense
  ``(in, out)``, Conv1D ``(w, in, out)``, Conv2D ``(h, w, in, out)``, Conv3D),
  and the whole leaf for rank <= 1. ``optax.adaptive_grad_clip`` reduces only
  axis 0 of a rank-3 leaf, which mixes the units of a Flax Conv1D kernel. A
  unit with a non-finite gradient norm is left unscaled.

  Args:
    clipping: the largest allowed ratio :math:`\\lambda` of a unit's gradient
      norm to its parameter norm, ``>= 0``.
    eps: the smallest parameter norm used, ``> 0``, so that zero-initialised
      units (biases) can still move.
    unit_axes: which axes one unit spans, overriding the default per leaf:
      either a pytree like the params whose leaves are tuples of axes (or
      ``None`` for the default), matched by path, or a callable
      ``(path, leaf) -> axes or None`` with ``path`` a ``jax.tree_util`` key
      path.
    axis_name: inside ``shard_map``, the mesh axis name (or tuple of names)
      the gradient and params are split over: a unit's norms are summed over
      the devices that hold parts of it (a ``psum`` of one value per unit)
      and the statistics with scalar ``psum`` calls, so the result equals the
      jit/SPMD one. ``None`` outside.
    partition: with ``axis_name``, required: the gradient's pytree of
      ``PartitionSpec`` (``shard_map``'s ``in_specs``; the params must be
      split alike).

  Returns:
    An ``optax.GradientTransformation`` whose state is
    :class:`AdaptiveGradClipState`; ``update`` needs ``params``.

  Example:
    >>> import jax.numpy as jnp, gradcal_jax as gc
    >>> tx = gc.adaptive_grad_clip(clipping=0.1)
    >>> w = {"kernel": jnp.array([[1.0, 1.0], [0.0, 1.0]])}
    >>> g = {"kernel": jnp.array([[1.0, 0.01], [0.0, 0.0]])}
    >>> u, s = tx.update(g, tx.init(w), w)
    >>> print(u["kernel"], float(s.clipped_fraction))
    [[0.1  0.01]
     [0.   0.  ]] 0.5

  References:
    Brock et al., `High-Performance Large-Scale Image Recognition Without
    Normalization <https://arxiv.org/abs/2102.06171>`_, 2021
  """
  _tree.check_number("clipping", clipping, low=0.0)
  _tree.check_number("eps", eps, low=0.0, low_open=True)
  get_axes = _axes_getter(unit_axes)
  col = _tree.collective("adaptive_grad_clip", axis_name, partition)
  if col is not None and partition is None:
    raise ValueError(
      "adaptive_grad_clip with axis_name= needs partition= (the "
      "gradient's PartitionSpecs), got partition=None."
    )

  def init_fn(params: Any) -> AdaptiveGradClipState:
    del params
    return AdaptiveGradClipState(
      clipped_fraction=jnp.zeros((), FLOAT32), max_ratio=jnp.zeros((), FLOAT32)
    )

  def update_fn(updates, state, params=None):
    del state
    _tree.require_params("adaptive_grad_clip", params)
    flat, treedef = jax.tree_util.tree_flatten_with_path(updates)
    splits = _tree.leaf_splits(col, updates) if col is not None else [None] * len(flat)
    results = []

    def clip_leaf(path, g, w, split):
      if not _tree.is_float(g):
        return g
      axes = _reduce_axes(get_axes(path, g), g.ndim, repr(_stats.path_str(path)))
      unit_dims = [d for d in range(g.ndim) if d not in axes]
      # A unit's entries may lie on several devices (its reduced dimensions
      # split): their partial sums add up; the units themselves are split
      # over the other dimensions' axes, which the counts sum over.
      within = () if split is None else _tree.dims_axes(split, axes)
      across = () if split is None else _tree.dims_axes(split, unit_dims)

      def unit_norms(x: jax.Array) -> jax.Array:
        # Per unit, without overflow; a unit whose squares all flushed to
        # zero keeps norm 0 (a dead unit is not re-read every step), which
        # changes no decision: its ratio is far below any threshold.
        def squares(c: Any = None) -> jax.Array:
          return _tree.psum_over(_norms.sum_of_squares(x, c, axis=axes), within)

        return _norms.rescued_norm(squares(), squares, zero_is_exact=True)

      g_norm = unit_norms(g)
      w_norm = jnp.maximum(unit_norms(w), eps)
      scale = _tree.clip_scale(g_norm, clipping * w_norm)
      units = math.prod(g.shape[d] for d in unit_dims) * math.prod(
        jax.lax.axis_size(a) for a in across
      )
      results.append(
        (
          _tree.psum_over(jnp.sum(scale < 1.0, dtype=jnp.int32), across),
          _tree.nan_pmax(_tree.nan_max(g_norm / w_norm), across),
          units,
        )
      )
      return _tree.scale_leaf(g, scale)

    leaves = [
      clip_leaf(path, g, w, split)
      for (path, g), w, split in zip(flat, _tree.flatten_up_to(treedef, params), splits)
    ]
    updates = jax.tree.unflatten(treedef, leaves)
    clipped = _sum([c for c, _, _ in results], jnp.int32)
    max_ratio = _tree.nan_max(
      jnp.stack([r for _, r, _ in results]) if results else jnp.zeros((0,), FLOAT32)
    )
    total = sum(n for _, _, n in results)
    return updates, AdaptiveGradClipState(
      clipped_fraction=_fraction(clipped, total), max_ratio=max_ratio.astype(FLOAT32)
    )

  return optax.GradientTransformation(init_fn, update_fn)


# -------------------------------------------------------------- centralize


def _centralize_leaf(g: jax.Array, split: _tree.LeafSplit | None = None) -> jax.Array:
  """One leaf minus its mean over every axis but the last; with ``split``
  (inside ``shard_map``), the mean of the whole unit, wherever it lies."""
  if g.ndim < 2:
    return g
  g32 = g.astype(FLOAT32)
  reduced = tuple(range(g.ndim - 1))
  if split is None:
    mean = jnp.mean(g32, axis=reduced, keepdims=True)
  else:
    within = _tree.dims_axes(split, reduced)
    count = math.prod(g.shape[d] for d in reduced) * math.prod(jax.lax.axis_size(a) for a in within)
    mean = _tree.psum_over(jnp.sum(g32, axis=reduced, keepdims=True), within) / count
  centred = g32 - mean
  # A finite entry minus a finite mean can pass the dtype's largest value
  # (float16: 65504 - (-21835)); it saturates there instead of turning inf.
  largest = float(jnp.finfo(g.dtype).max)
  finite = jnp.isfinite(g32) & jnp.isfinite(mean)
  return jnp.where(finite, jnp.clip(centred, -largest, largest), centred).astype(g.dtype)


def centralize(*, axis_name: Any = None, partition: Any = None) -> optax.GradientTransformation:
  """Gradient centralization for Flax's layout: zero mean per output unit.

  For every floating leaf of rank >= 2, with output units on the last axis,

  .. math::
    G_{\\dots, i} \\leftarrow G_{\\dots, i} - \\operatorname{mean}(G_{\\dots, i}),

  the mean taken over every axis but the last, in float32. Leaves of rank
  <= 1 (biases, scales) are unchanged. A centred entry beyond the dtype's
  range (float16: ``65504 - (-21835)``) saturates at its largest finite
  value, so finite input gives finite output; a NaN or inf entry makes its
  unit's mean, and so the whole unit, non-finite (a float32 unit whose sum
  passes 3.4e38 too). ``optax.centralize`` instead keeps the
  leading axis (PyTorch's ``(out, in, ...)`` layout) and so centres the wrong
  slices of a Flax kernel. The transform has no statistics worth logging and
  its state is ``optax.EmptyState()``.

  Args:
    axis_name: inside ``shard_map``, the mesh axis name (or tuple of names)
      the gradient is split over: where a unit's entries lie on several
      devices, its sum is a ``psum`` of one value per unit, so the result
      equals the jit/SPMD one. ``None`` outside.
    partition: with ``axis_name``, required: the gradient's pytree of
      ``PartitionSpec`` (``shard_map``'s ``in_specs``).

  Returns:
    An ``optax.GradientTransformation`` with an empty state.

  Example:
    >>> import jax.numpy as jnp, gradcal_jax as gc
    >>> tx = gc.centralize()
    >>> g = {"kernel": jnp.array([[1.0, 2.0], [3.0, 6.0]])}
    >>> u, _ = tx.update(g, tx.init(g))
    >>> print(u["kernel"])
    [[-1. -2.]
     [ 1.  2.]]

  References:
    Yong et al., `Gradient Centralization: A New Optimization Technique for
    Deep Neural Networks <https://arxiv.org/abs/2004.01461>`_, 2020
  """
  col = _tree.collective("centralize", axis_name, partition)
  if col is not None and partition is None:
    raise ValueError(
      "centralize with axis_name= needs partition= (the "
      "gradient's PartitionSpecs), got partition=None."
    )

  def init_fn(params: Any) -> optax.EmptyState:
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    if col is None:
      return _tree.map_float(_centralize_leaf, updates), state
    leaves, treedef = jax.tree.flatten(updates)
    return jax.tree.unflatten(
      treedef,
      [
        _centralize_leaf(g, split) if _tree.is_float(g) else g
        for g, split in zip(leaves, _tree.leaf_splits(col, updates))
      ],
    ), state

  return optax.GradientTransformation(init_fn, update_fn)


# ------------------------------------------------------------ clip weights


@_stats.register_state("clip_weights", fields=("clipped_fraction",))
class ClipWeightsState(NamedTuple):
  """State of :func:`clip_weights`.

  Attributes:
    clipped_fraction: float32 fraction of the floating weights whose update
      was changed to keep them in range at the last update; a weight whose
      ``w + u`` is not finite is left as it is and not counted.
  """

  clipped_fraction: jax.Array


def _next_toward(x: jax.Array, direction: float) -> jax.Array:
  return jnp.nextafter(x, jnp.asarray(direction, x.dtype))


def _round_to(x: jax.Array, dtype: Any) -> jax.Array:
  """Float32 ``x`` rounded to ``dtype``'s precision and range, kept float32."""
  info = jnp.finfo(dtype)
  if info.bits >= 32:
    return x
  return jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)


def _inner_bound(bound: jax.Array, dtype: Any) -> jax.Array:
  """The largest value of ``dtype`` not above ``bound`` (>= 0), in float32."""
  b = _round_to(bound, dtype)
  return jnp.where(b > bound, _next_toward(b.astype(dtype), 0.0).astype(FLOAT32), b)


def _clip_weight_update(
  u: jax.Array, w: jax.Array, bound: jax.Array, counts: list[jax.Array]
) -> jax.Array:
  """One leaf of :func:`clip_weights` (counting its clipped entries)."""
  out = jnp.promote_types(u.dtype, w.dtype)
  w32 = w.astype(FLOAT32)
  target = w32 + u.astype(FLOAT32)
  w_fixed = jax.lax.stop_gradient(w32)

  def lands(d: jax.Array) -> jax.Array:
    # What `optax.apply_updates` computes, w + d in `out` cast to w's dtype,
    # with each rounding explicit: under jit XLA may otherwise keep bfloat16
    # sums in float32 (`xla_allow_excess_precision`) and see a weight inside
    # that `apply_updates` rounds outside.
    return _round_to(_round_to(w_fixed + d.astype(FLOAT32), out), w.dtype)

  outside = jnp.isfinite(target) & (
    (jnp.abs(target) > bound) | (jnp.abs(lands(u.astype(out))) > bound)
  )
  counts.append(jnp.sum(outside, dtype=jnp.int32))
  inner = _inner_bound(bound, w.dtype)
  # The clip formula: its derivative is the derivative of the result.
  delta = (jnp.clip(target, -inner, inner) - w32).astype(out)
  # Where rounding in `optax.apply_updates` would land outside, nudge delta by
  # one unit in the last place; where that is not enough, -w (lands at 0).
  # Computed without a derivative.
  d = jax.lax.stop_gradient(delta)
  landed = lands(d)
  d = jnp.where(landed > inner, _next_toward(d, -jnp.inf), d)
  d = jnp.where(landed < -inner, _next_toward(d, jnp.inf), d)
  d = jnp.where(jnp.abs(lands(d)) > inner, -w_fixed.astype(out), d)
  return jnp.where(outside, delta + jax.lax.stop_gradient(d - delta), u.astype(out))


def clip_weights(
  max_abs: float, *, axis_name: Any = None, partition: Any = None
) -> optax.GradientTransformation:
  """Changes the update so that the new weights lie in ``[-max_abs, max_abs]``.

  .. math::
    u_j \\leftarrow \\min(\\max(w_j + u_j, -c), c) - w_j,
    \\qquad c = \\text{max\\_abs},

  applied only where ``w_j + u_j`` is finite and outside the range, so that
  ``optax.apply_updates(params, updates)`` gives clipped weights, as in
  WGAN's critic. Put it last in a chain, after the learning rate. A
  non-finite ``w_j + u_j`` keeps its update unchanged, so it stays visible.

  The new weights are exactly inside whatever the dtypes: :math:`c` is taken
  as the largest value of the weight's dtype not above ``max_abs``, the
  difference is computed in float32 and, where the rounding of
  ``apply_updates`` would still land outside, nudged by one unit in the last
  place (or, where no nudge suffices, set to :math:`-w_j`: the weight lands
  at 0). Each output leaf has the dtype of ``u + w``
  (``jnp.promote_types``): a bfloat16 update of float32 weights becomes
  float32, since no bfloat16 difference can move a float32 weight of 1002
  into ``[-0.5, 0.5]``; with equal dtypes the dtype is kept.

  Derivative (``jax.grad`` through a training step): that of the clip
  formula above (1 with respect to ``u_j`` where the weight stays inside,
  :math:`-1` with respect to ``w_j`` and 0 with respect to ``u_j`` where it
  is clipped); the nudges have none.

  Args:
    max_abs: the largest absolute value a weight may take, ``>= 0``.
    axis_name: inside ``shard_map``, the mesh axis name (or tuple of names)
      the gradient is split over: statistics are reduced over it with scalar
      ``psum`` calls, so the result equals the jit/SPMD one. ``None`` outside.
    partition: with ``axis_name``, the gradient's pytree of ``PartitionSpec``
      (``shard_map``'s ``in_specs``) so that replicated leaves count once;
      ``None``: every floating leaf is split over ``axis_name``.

  Returns:
    An ``optax.GradientTransformation`` whose state is
    :class:`ClipWeightsState`; ``update`` needs ``params``.

  Example:
    >>> import jax.numpy as jnp, optax, gradcal_jax as gc
    >>> tx = gc.clip_weights(0.5)
    >>> w = {"w": jnp.array([0.25, -0.25, 0.0])}
    >>> u = {"w": jnp.array([0.5, -0.5, 0.125])}
    >>> u, s = tx.update(u, tx.init(w), w)
    >>> print(optax.apply_updates(w, u)["w"], round(float(s.clipped_fraction), 3))
    [ 0.5   -0.5    0.125] 0.667

  References:
    Arjovsky et al., `Wasserstein GAN <https://arxiv.org/abs/1701.07875>`_,
    2017
  """
  _tree.check_number("max_abs", max_abs, low=0.0)
  col = _tree.collective("clip_weights", axis_name, partition)

  def init_fn(params: Any) -> ClipWeightsState:
    del params
    return ClipWeightsState(clipped_fraction=jnp.zeros((), FLOAT32))

  def update_fn(updates, state, params=None):
    del state
    _tree.require_params("clip_weights", params)
    bound = jnp.asarray(max_abs, FLOAT32)
    counts: list[jax.Array] = []

    def clip_leaf(u, w):
      return _clip_weight_update(u, w, bound, counts) if _tree.is_float(u) else u

    updates = jax.tree.map(clip_leaf, updates, params)
    return updates, ClipWeightsState(
      clipped_fraction=_fraction(
        _sum(counts, jnp.int32)
        if col is None
        else _tree.sum_over_leaves(col, counts, _tree.leaf_splits(col, updates, floats_only=True)),
        _tree.size(updates, col),
      )
    )

  return optax.GradientTransformation(init_fn, update_fn)
