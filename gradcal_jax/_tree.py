"""Private helpers shared by every transform: float32 norms, tree maps, validation.

Each piece of maths lives here once. Every helper treats a pytree the way optax
does: ``None`` and ``optax.MaskedNode`` are empty subtrees (``jax.tree`` skips
them), and integer or boolean leaves are not gradients, so they are passed
through untouched and never enter a norm.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

FLOAT32 = jnp.float32


def is_float(x: Any) -> bool:
  """True for a floating-point (real) array leaf: the leaves we calibrate."""
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def map_float(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
  """Maps ``fn`` over the floating leaves of ``tree``; other leaves pass through.

  ``rest`` are trees with the structure of ``tree`` (for example params) whose
  leaves are given to ``fn`` after the leaf of ``tree``.
  """
  return jax.tree.map(
      lambda x, *r: fn(x, *r) if is_float(x) else x, tree, *rest)


def float_leaves(tree: Any) -> list[jax.Array]:
  """The floating leaves of ``tree``, in tree order."""
  return [x for x in jax.tree.leaves(tree) if is_float(x)]


def sum_of_squares(x: jax.Array) -> jax.Array:
  """Sum of squares of one leaf, accumulated in float32."""
  x = x.astype(FLOAT32)
  return jnp.sum(x * x)


def total_sum_of_squares(tree: Any) -> jax.Array:
  """The float32 sum of squares of every floating leaf of ``tree`` (0 for an
  empty tree): the square of :func:`global_norm`, without the root."""
  squares = [sum_of_squares(x) for x in float_leaves(tree)]
  if not squares:
    return jnp.zeros((), FLOAT32)
  return sum(squares)


def global_norm(tree: Any) -> jax.Array:
  """The L2 norm of every floating leaf of ``tree`` together, in float32.

  A float16 gradient whose norm exceeds 65504 still gets its true norm. An
  empty tree has norm 0.
  """
  return jnp.sqrt(total_sum_of_squares(tree))


def leaf_norm(x: jax.Array) -> jax.Array:
  """The L2 norm of one leaf, in float32."""
  return jnp.sqrt(sum_of_squares(x))


def leaf_norms(tree: Any) -> Any:
  """A tree shaped like ``tree`` holding each floating leaf's float32 L2 norm.

  Non-floating leaves map to a float32 zero so the result's structure never
  depends on leaf dtypes.
  """
  return jax.tree.map(
      lambda x: leaf_norm(x) if is_float(x) else jnp.zeros((), FLOAT32), tree)


def count_nonfinite(tree: Any) -> jax.Array:
  """The number of non-finite entries over all floating leaves (int32)."""
  counts = [jnp.sum(~jnp.isfinite(x), dtype=jnp.int32) for x in float_leaves(tree)]
  if not counts:
    return jnp.zeros((), jnp.int32)
  return sum(counts)


def all_finite(tree: Any) -> jax.Array:
  """True (a bool scalar) when no floating leaf holds a NaN or an infinity.

  Each leaf is reduced as ``sum(x - x)`` in float32: zero for finite
  entries, NaN as soon as one is NaN or infinite. That is one plain
  reduction, which XLA fuses with whatever produces ``x``; a count of
  ``isfinite`` writes an integer mask first on XLA:CPU, and a ``max`` of
  ``|x|`` drops NaNs there (measured on arrays of 100,000 entries).
  """
  sums = [jnp.sum(x - x, dtype=FLOAT32) for x in float_leaves(tree)]
  if not sums:
    return jnp.ones((), jnp.bool_)
  return jnp.isfinite(sum(sums))


def size(tree: Any) -> int:
  """The number of entries over all floating leaves (a Python int)."""
  return sum(int(x.size) for x in float_leaves(tree))


def clip_scale(norm: jax.Array, max_norm: jax.Array | float) -> jax.Array:
  """The float32 factor that brings ``norm`` down to ``max_norm``, or 1.

  ``min(1, max_norm / norm)``, written so it never divides by zero: a zero
  norm (with any threshold, 0 included) gives 1. A non-finite norm also gives
  1, so an ``inf`` or ``nan`` gradient stays visible instead of having its
  finite entries silently scaled to zero.
  """
  norm = jnp.asarray(norm, FLOAT32)
  max_norm = jnp.asarray(max_norm, FLOAT32)
  over = jnp.isfinite(norm) & (norm > max_norm)
  safe_norm = jnp.where(over, norm, 1.0)
  return jnp.where(over, max_norm / safe_norm, 1.0).astype(FLOAT32)


def scale_leaf(x: jax.Array, scale: jax.Array) -> jax.Array:
  """``x * scale`` computed in float32 and returned in ``x``'s dtype."""
  return (x.astype(FLOAT32) * scale).astype(x.dtype)


def scale_tree(tree: Any, scale: jax.Array) -> Any:
  """Multiplies every floating leaf by the float32 scalar ``scale``."""
  return map_float(lambda x: scale_leaf(x, scale), tree)


def is_concrete(value: Any) -> bool:
  """False for a jax tracer: a value only known when the computation runs."""
  # Under `optax.inject_hyperparams` the factory is re-run inside `update` with
  # traced hyperparameters: those can only be checked when the user builds the
  # transform, so tracers are let through.
  return not isinstance(value, jax.core.Tracer)


def check_number(
    name: str,
    value: Any,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
  """Raises ``ValueError`` naming ``name`` unless ``value`` lies in the range.

  The range is ``[low, high]``; ``low_open`` / ``high_open`` exclude an end.
  The error says the allowed range and the value received.
  """
  if value is None or not is_concrete(value):
    return
  try:
    v = float(value)
  except (TypeError, ValueError):
    raise ValueError(
        f"{name} must be a real number, got {value!r}.") from None
  below = v <= low if low_open else v < low
  above = v >= high if high_open else v > high
  if math.isnan(v) or below or above:
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    raise ValueError(
        f"{name} must be in {left}{low}, {high}{right}, got {value!r}.")


def check_int(name: str, value: Any, *, low: int = 0) -> None:
  """Raises ``ValueError`` naming ``name`` unless ``value`` is an int >= low."""
  if isinstance(value, bool) or not isinstance(value, int):
    if is_concrete(value) and not (
        hasattr(value, "dtype") and jnp.issubdtype(value.dtype, jnp.integer)):
      raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
  if is_concrete(value) and int(value) < low:
    raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")


def require_params(name: str, params: Any) -> None:
  """Raises the contract's ``ValueError`` when a transform needs params."""
  if params is None:
    raise ValueError(
        f"{name} needs the parameters: call update(grads, state, params).")


def run_or_hold(
    run: jax.Array,
    update: Callable[[Any, Any, Any], tuple[Any, Any]],
    updates: Any,
    inner_state: Any,
    params: Any,
) -> tuple[Any, Any]:
  """``update(updates, inner_state, params)`` when ``run``, else zeros and the
  inner state as it is, under one ``lax.cond``: the wrapped transform of a
  guard or an accumulator runs only on the steps that need it.

  The held branch computes nothing gradient-sized but the zero updates; the
  inner state passes through as is, so a training step that donates its
  state updates it in place with no copy (without donation, XLA copies it: an
  output may not alias an input that is not donated). The cast is a no-op
  except where the inner state's own dtype changes on its first update
  (optax.adam's moments of an integer leaf). ``update`` is the true branch:
  in the other order XLA:CPU copies the inner state after the cond even when
  it is donated (measured).
  """
  def run_branch(operands: tuple[Any, Any, Any]) -> tuple[Any, Any]:
    return update(*operands)

  operands = (updates, inner_state, params)
  shapes, state_shapes = jax.eval_shape(run_branch, operands)

  def hold(operands: tuple[Any, Any, Any]) -> tuple[Any, Any]:
    return (optax.tree.zeros_like(shapes),
            optax.tree.cast_like(operands[1], state_shapes))

  return jax.lax.cond(run, run_branch, hold, operands)
