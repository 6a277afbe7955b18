"""Private float32 norms that neither overflow nor underflow: one leaf's, a
tree's, each leaf's, inside ``shard_map`` too.

Every transform takes its norms from here, computed the same way, so XLA's
common-subexpression elimination merges the norms of a chain.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from gradcal_jax._control import cond
from gradcal_jax._tree import (
  FLOAT32,
  Collective,
  add_up,
  copies_apart,
  float_leaves,
  is_float,
  leaf_splits,
  per_leaf,
  psum_over,
  scale_leaf,
  sum_over_leaves,
)


def safe_sqrt(x: jax.Array) -> jax.Array:
  """``jnp.sqrt(x)``, bit for bit (NaN stays NaN), whose derivative at 0 is 0
  instead of ``inf``: under ``jax.grad`` the norm of a zero gradient or the
  standard deviation of equal values then gives a finite derivative, not the
  NaN of ``0 * inf``."""
  zero = x == 0
  return jnp.where(zero, jnp.zeros_like(x), jnp.sqrt(jnp.where(zero, jnp.ones_like(x), x)))


def sum_of_squares(x: jax.Array, scale: Any = None, axis: Any = None) -> jax.Array:
  """Sum of squares of one leaf (times ``scale`` first, if given),
  accumulated in float32; with ``axis``, over those axes only (kept, size 1)."""
  x = x.astype(FLOAT32)
  if scale is not None:
    x = x * scale
  if axis is None:
    return jnp.sum(x * x)
  return jnp.sum(x * x, axis=axis, keepdims=True)


def total_sum_of_squares(tree: Any, col: Collective | None = None) -> jax.Array:
  """The float32 sum of squares of every floating leaf of ``tree`` (0 for an
  empty tree): the square of :func:`global_norm`, without the root. With
  ``col``, over the whole tree that ``shard_map``'s blocks make up."""
  floats = float_leaves(tree)
  if not floats:
    return jnp.zeros((), FLOAT32)
  squares = [sum_of_squares(x) for x in floats]
  if col is not None:
    return sum_over_leaves(col, squares, leaf_splits(col, tree, floats_only=True))
  return add_up(squares)


# A float32 sum of squares overflows once the norm passes 1.8e19 and loses
# entries below 1e-19 (their squares flush to zero). Such a sum is redone,
# under a lax.cond, with every entry scaled by 2**-64 (overflow) or 2**64
# (small) first, exactly (powers of two), and the norm scaled back: finite
# entries up to float32's largest and down to 6e-39 then count. Below _SMALL
# the squares that flushed may matter. XLA's byte count, which takes a cond's
# larger branch, includes the redo's read; a step runs it only when needed.
_SMALL = 2.0**-60
_RESCALE = 2.0**64
# Read when a transform is traced. tests/test_traffic.py turns it off to pin
# the traffic of the steps that need no rescue (the redo branch left out).
RESCUE_NORMS = True


def _rescue_scale(squares: jax.Array, zero_is_exact: bool = False) -> jax.Array:
  """The factor that a sum of squares' entries are redone with: 2**-64 for
  an overflowed sum, 2**64 for a small one, 1 for one that needs no redo
  (also for NaN, which stays NaN, and, with ``zero_is_exact``, for 0)."""
  small = (squares < _SMALL) & ((squares > 0) if zero_is_exact else True)
  return jnp.where(jnp.isinf(squares), 1.0 / _RESCALE, jnp.where(small, _RESCALE, 1.0)).astype(
    FLOAT32
  )


def rescued_norm(
  squares: jax.Array, again: Callable[[jax.Array], jax.Array], *, zero_is_exact: bool = False
) -> jax.Array:
  """``sqrt(squares)``, or, where that sum overflowed or is small enough to
  have lost entries, ``sqrt(again(c)) / c``: ``again(c)`` is the same sum
  with every entry scaled by ``c`` first (``c`` has the shape of
  ``squares``, so an array of sums, one per unit, works too).

  An infinite entry gives ``inf``, a NaN one NaN. With ``zero_is_exact`` a
  zero sum is taken as exact (all entries zero) rather than redone.
  """
  squares = jnp.asarray(squares, FLOAT32)
  if not RESCUE_NORMS:
    return safe_sqrt(squares)
  scale = _rescue_scale(squares, zero_is_exact)
  return cond(
    jnp.any(scale != 1.0), lambda: safe_sqrt(again(scale)) / scale, lambda: safe_sqrt(squares)
  )


def combine_norms(norms: Any) -> jax.Array:
  """The L2 norm of a vector (or list) of norms, without overflow or underflow:
  ``sqrt(sum(n**2))`` where that sum is safe, else the same with the norms
  scaled by 2**-64 or 2**64 first and the result scaled back (a power of
  two: dividing by the largest norm instead flushes to zero on XLA:CPU,
  whose ``1/3e38`` is subnormal). NaN if any norm is NaN, else ``inf`` if
  any is (or the norm exceeds float32's range)."""
  if isinstance(norms, (list, tuple)):
    norms = jnp.stack(norms) if norms else jnp.zeros((0,), FLOAT32)
  norms = jnp.asarray(norms, FLOAT32)
  squares = jnp.sum(jnp.square(norms))
  scale = _rescue_scale(squares)
  return jnp.where(
    scale == 1.0, safe_sqrt(squares), safe_sqrt(jnp.sum(jnp.square(norms * scale))) / scale
  )


def global_norm(
  tree: Any, col: Collective | None = None, *, scale: jax.Array | None = None
) -> jax.Array:
  """The L2 norm of every floating leaf of ``tree`` together, in float32.

  A float16 gradient whose norm exceeds 65504 still gets its true norm, a
  float32 one of norm 1e30 too (no overflow of the sum of squares), and
  entries of 1e-25 do not vanish (see :func:`rescued_norm`). An empty tree
  has norm 0. With ``col``, the norm of the whole gradient inside
  ``shard_map`` (one scalar ``psum`` per distinct way of splitting leaves).

  With ``scale``, the norm of ``scale_tree(tree, scale)`` (each leaf times
  the float32 scalar, rounded back to its dtype: a clipped gradient), bit
  for bit, without writing that tree out: each sum reads the leaf and
  scales it on the way, the redo too.
  """
  floats = float_leaves(tree)
  if not floats:
    return jnp.zeros((), FLOAT32)
  if scale is None:
    view = lambda: floats
  else:
    copies = copies_apart(scale, len(floats))
    view = lambda: [scale_leaf(x, c) for x, c in zip(floats, copies)]
  squares = [sum_of_squares(x) for x in view()]
  splits = None if col is None else leaf_splits(col, tree, floats_only=True)
  if col is None or splits is None:
    total = add_up(squares)
  else:
    total = sum_over_leaves(col, squares, splits)
  if not RESCUE_NORMS:
    return safe_sqrt(total)

  def redo() -> jax.Array:
    # Each leaf with its own scale (from its own sum: one shared scale would
    # be one broadcast that XLA:CPU materializes for every leaf of a shape),
    # the leaf norms combined without overflow. The leaves are viewed again
    # here, so a scaled tree is rebuilt from ``tree`` inside the branch.
    whole = squares if col is None or splits is None else per_leaf(col, squares, splits)
    norms = []
    for i, (x, q) in enumerate(zip(view(), whole)):
      c = _rescue_scale(q)
      axes = () if splits is None else splits[i].axes
      norms.append(safe_sqrt(psum_over(sum_of_squares(x, c), axes)) / c)
    return combine_norms(norms)

  return cond(_rescue_scale(total) != 1.0, redo, lambda: safe_sqrt(total))


def norm_from_squares(squares: jax.Array, x: jax.Array, axes: tuple[str, ...] = ()) -> jax.Array:
  """The L2 norm of leaf ``x`` from its float32 sum of squares ``squares``
  (already ``psum``'d over the ``shard_map`` ``axes`` its blocks lie on),
  redone from ``x`` where that sum overflowed or is tiny."""
  return rescued_norm(squares, lambda c: psum_over(sum_of_squares(x, c), axes))


def leaf_norm(x: jax.Array, axes: tuple[str, ...] = ()) -> jax.Array:
  """The L2 norm of one leaf, in float32, without overflow or underflow
  (:func:`rescued_norm`); with ``axes``, of the whole leaf whose blocks lie
  on the devices along those ``shard_map`` axes."""
  return norm_from_squares(psum_over(sum_of_squares(x), axes), x, axes)


def leaf_norms(tree: Any, col: Collective | None = None) -> Any:
  """A tree shaped like ``tree`` holding each floating leaf's float32 L2 norm.

  Non-floating leaves map to a float32 zero so the result's structure never
  depends on leaf dtypes. With ``col``, each norm is the whole leaf's.
  """
  if col is None:
    return jax.tree.map(lambda x: leaf_norm(x) if is_float(x) else jnp.zeros((), FLOAT32), tree)
  leaves, treedef = jax.tree.flatten(tree)
  splits = leaf_splits(col, tree)
  squares = [sum_of_squares(x) if is_float(x) else jnp.zeros((), FLOAT32) for x in leaves]
  squares = per_leaf(col, squares, splits)
  return jax.tree.unflatten(
    treedef,
    [
      norm_from_squares(q, x, split.axes) if is_float(x) else q
      for q, x, split in zip(squares, leaves, splits)
    ],
  )
