"""Random unit directions on a leaf (hashed, reproducible) and the points along them."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradcal_jax import _tree


def _draw(key: jax.Array, shapes: list[tuple[int, ...]], dtype: Any) -> list[jax.Array]:
  """One array of uniform entries in [-1, 1] per shape, from a single draw.

  Uniform rather than normal: XLA fuses the generator's tail into every
  consumer of every slice, and the normal's inverse error function made that
  tail, and the compile time of a check with many outputs, large.
  """
  sizes = [math.prod(shape) for shape in shapes]
  flat = jax.random.uniform(key, (sum(sizes),), dtype, -1.0, 1.0)
  bounds = np.cumsum([0, *sizes])
  return [flat[a:b].reshape(shape) for a, b, shape in zip(bounds[:-1], bounds[1:], shapes)]


def _unit(v: jax.Array) -> jax.Array:
  """Each ``v[d]`` scaled to unit L2 norm: the directions of one leaf."""
  axes = tuple(range(1, v.ndim))
  return v / jnp.sqrt(jnp.sum(v * v, axis=axes, keepdims=True))


def _select_member(k: jax.Array, xs: list[jax.Array]) -> jax.Array:
  """Member ``k`` of a chunk by a select per member, not by indexing a stack
  of the chunk's leaves (which copies all of them into the temporaries)."""
  out = xs[-1]
  for j in range(len(xs) - 2, -1, -1):
    out = jnp.where(k == j, xs[j], out)
  return out


def _replaced(leaves: list[Any], treedef: Any, idx: list[int], ys: Sequence[jax.Array]) -> Any:
  """The tree of ``leaves`` with ``leaves[idx[j]]`` replaced by ``ys[j]``."""
  new = list(leaves)
  for i, y in zip(idx, ys):
    new[i] = y
  return jax.tree.unflatten(treedef, new)


def _perturbed(
  objective: Callable[[Any], jax.Array],
  leaves: list[Any],
  treedef: Any,
  idx: list[int],
  k: jax.Array,
) -> Callable[[jax.Array], jax.Array]:
  """``y -> objective(leaves with member k of the chunk idx replaced by y)``.

  A select per member, not a scatter into a stack: each stays one op fused
  next to its use under ``jax.vmap``."""
  return lambda y: objective(
    _replaced(leaves, treedef, idx, [jnp.where(k == j, y, leaves[i]) for j, i in enumerate(idx)])
  )


def _directions(
  chunk_key: jax.Array,
  k: jax.Array,
  num_directions: int,
  like: jax.Array,
  check_dtype: Any,
  dtype: Any,
) -> jax.Array:
  """Member ``k``'s ``num_directions`` unit directions, shaped like its leaf.

  Uniform entries in [-1, 1], normalized: a random direction whose law is
  continuous, so a bug never cancels out exactly (as random signs can). Each
  entry is a counter hash (``lowbias32``) of its index and a 32-bit seed drawn
  with ``jax.random`` from the member's key. Elementwise, the draw fuses into
  what uses it and a sharded leaf's entries are computed where its shards
  live. ``jax.random``'s threefry is a rolled loop on CPU that holds several
  leaf-sized buffers, and its ``rbg`` computes the whole leaf on every
  device; in :func:`gradient_check` those buffers are allocated with every
  training step's. The directions depend on the key and the leaf's shape
  alone, so they can be drawn again where only the gradient is at hand.
  """
  seed = jax.random.bits(jax.random.fold_in(chunk_key, k), (), jnp.uint32)
  shape = (num_directions, *like.shape)
  x = _tree.flat_index(shape, jnp.uint32) * np.uint32(0x9E3779B9) + seed
  x = (x ^ (x >> 16)) * np.uint32(0x7FEB352D)
  x = (x ^ (x >> 15)) * np.uint32(0x846CA68B)
  x = x ^ (x >> 16)
  v = (x >> 8).astype(check_dtype) * (2.0**-23) - 1.0
  return _unit(v.astype(dtype))
