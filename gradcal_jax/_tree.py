"""Private helpers shared by every transform: float32 norms, tree maps, validation.

Each piece of maths lives here once. Every helper treats a pytree the way optax
does: ``None`` and ``optax.MaskedNode`` are empty subtrees (``jax.tree`` skips
them), and integer or boolean leaves are not gradients, so they are passed
through untouched and never enter a norm.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

FLOAT32 = jnp.float32


def is_float(x: Any) -> bool:
  """True for a floating-point (real) array leaf: the leaves we calibrate."""
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def flatten_up_to(treedef: Any, tree: Any) -> list[Any]:
  """``tree``'s subtrees at the leaves of ``treedef`` (a ``None`` there is kept)."""
  return treedef.flatten_up_to(tree)


def add_up(values: Sequence[Any]) -> Any:
  """``values[0] + values[1] + ...`` in order (``sum`` without its leading 0)."""
  return functools.reduce(operator.add, values)


def map_float(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
  """Maps ``fn`` over the floating leaves of ``tree``; other leaves pass through.

  ``rest`` are trees with the structure of ``tree`` (for example params) whose
  leaves are given to ``fn`` after the leaf of ``tree``.
  """
  return jax.tree.map(lambda x, *r: fn(x, *r) if is_float(x) else x, tree, *rest)


def float_leaves(tree: Any) -> list[jax.Array]:
  """The floating leaves of ``tree``, in tree order."""
  return [x for x in jax.tree.leaves(tree) if is_float(x)]


# ------------------------------------------------------- inside shard_map


class Collective(NamedTuple):
  """How a transform reduces its statistics inside ``shard_map``.

  ``shard_map`` hands each device a block of every leaf. A statistic of the
  whole gradient (a global norm, a count, a top-k threshold) is then the
  ``psum`` (or ``pmax``) of the blocks' own values over the mesh axes the leaf
  is split on, and only over those: a leaf replicated along an axis already
  holds the whole value there. Every such reduction moves scalars only.

  Attributes:
    axis_names: the mesh axes the transform reduces over (``axis_name=``).
    partition: ``None`` (every floating leaf is split over all of
      ``axis_names``, dimension unknown), or a pytree of ``PartitionSpec``
      shaped like the updates: the ``in_specs`` the gradient was given to
      ``shard_map`` with (``None`` entries mean replicated).
  """

  axis_names: tuple[str, ...]
  partition: Any


class LeafSplit(NamedTuple):
  """How one leaf is split over a :class:`Collective`'s axes.

  Attributes:
    axes: the axes any of its dimensions is split on (sorted as given).
    dims: per dimension, the axes it is split on; ``None`` when the
      partition is not known (``Collective.partition`` is ``None``).
  """

  axes: tuple[str, ...]
  dims: tuple[tuple[str, ...], ...] | None


def collective(name: str, axis_name: Any, partition: Any = None) -> Collective | None:
  """The :class:`Collective` of a factory's ``axis_name=`` / ``partition=``
  (``None`` outside ``shard_map``), validated at build time."""
  if axis_name is None:
    if partition is not None:
      raise ValueError(f"{name}: partition= needs axis_name=, got axis_name=None.")
    return None
  names = (axis_name,) if isinstance(axis_name, str) else axis_name
  if not isinstance(names, tuple) or not names or not all(isinstance(n, str) and n for n in names):
    raise ValueError(
      f"axis_name must be a mesh axis name or a non-empty tuple of names, got {axis_name!r}."
    )
  return Collective(tuple(names), partition)


def _is_spec(x: Any) -> bool:
  return x is None or isinstance(x, jax.sharding.PartitionSpec)


def leaf_splits(col: Collective, tree: Any, floats_only: bool = False) -> list[LeafSplit]:
  """Each leaf's :class:`LeafSplit` (its floating leaves only, with
  ``floats_only``), in ``jax.tree.leaves`` order."""
  leaves, treedef = jax.tree.flatten(tree)
  if col.partition is None:
    specs = [None] * len(leaves)
    known = False
  else:
    known = True
    try:
      specs = flatten_up_to(treedef, jax.tree.map(lambda s: s, col.partition, is_leaf=_is_spec))
    except (ValueError, TypeError) as e:
      raise ValueError(
        f"partition= must be a pytree of PartitionSpec shaped like the updates: {e}"
      ) from None
  splits = []
  for x, spec in zip(leaves, specs):
    if floats_only and not is_float(x):
      continue
    if not known:
      splits.append(LeafSplit(col.axis_names, None))
      continue
    entries = tuple(spec or ()) + (None,) * max(0, x.ndim - len(spec or ()))
    dims = []
    for entry in entries[: x.ndim]:
      named = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
      dims.append(tuple(n for n in named if n in col.axis_names))
    axes = tuple(n for n in col.axis_names if any(n in d for d in dims))
    splits.append(LeafSplit(axes, tuple(dims)))
  return splits


def _groups(splits: list[LeafSplit]) -> dict[tuple[str, ...], list[int]]:
  groups: dict[tuple[str, ...], list[int]] = {}
  for i, split in enumerate(splits):
    groups.setdefault(split.axes, []).append(i)
  return groups


def sum_over_leaves(col: Collective, values: list[jax.Array], splits: list[LeafSplit]) -> jax.Array:
  """The sum of per-leaf block values over every leaf's whole extent and
  over the leaves: one scalar ``psum`` per distinct :attr:`LeafSplit.axes`."""
  del col
  total = jnp.zeros((), jnp.result_type(*values)) if values else jnp.zeros((), FLOAT32)
  for axes, index in _groups(splits).items():
    part = sum(values[i] for i in index)
    total = total + (jax.lax.psum(part, axes) if axes else part)
  return total


def per_leaf(
  col: Collective, values: list[jax.Array], splits: list[LeafSplit], op: str = "sum"
) -> list[jax.Array]:
  """Each leaf's block value reduced over the axes it is split on (``"sum"``
  or ``"max"``): one ``psum``/``pmax`` of a short vector per group."""
  del col
  out = list(values)
  reduce = jax.lax.psum if op == "sum" else jax.lax.pmax
  for axes, index in _groups(splits).items():
    if not axes:
      continue
    stacked = reduce(jnp.stack([values[i] for i in index]), axes)
    for j, i in enumerate(index):
      out[i] = stacked[j]
  return out


def flat_index(shape: tuple[int, ...], dtype: Any, split: LeafSplit | None = None) -> jax.Array:
  """The row-major position of every entry of an array of ``shape``, as
  ``dtype`` (unsigned wraps modulo its range: a hash input), built from
  per-axis iotas so a sharded leaf is never reshaped (a reshape could move
  data between devices). Inside ``shard_map`` (``split``), the position in
  the whole leaf: each split dimension is offset by this device's block
  along it."""
  dtype = jnp.dtype(dtype)
  modulus = 2 ** (8 * dtype.itemsize)
  index = jnp.zeros(shape, dtype)
  stride = 1
  for axis in reversed(range(len(shape))):
    iota = jax.lax.broadcasted_iota(dtype, shape, axis)
    extent = shape[axis]
    if split is not None and split.dims is not None and split.dims[axis]:
      names = split.dims[axis]
      iota = iota + jax.lax.axis_index(names).astype(dtype) * extent
      extent *= math.prod(int(jax.lax.axis_size(a)) for a in names)
    index = index + iota * dtype.type(stride % modulus)
    stride *= extent
  return index


def dims_axes(split: LeafSplit, dims: Any) -> tuple[str, ...]:
  """The mesh axes that the dimensions ``dims`` of a leaf are split on."""
  if split.dims is None:
    raise ValueError(
      "this statistic needs partition= to know which dimensions are split (shard_map's in_specs)."
    )
  named = [a for d in dims for a in split.dims[d]]
  return tuple(dict.fromkeys(named))


def psum_over(value: jax.Array, axes: tuple[str, ...]) -> jax.Array:
  """``psum`` over ``axes``; ``value`` itself for none."""
  return jax.lax.psum(value, axes) if axes else value


def nan_pmax(value: jax.Array, axes: tuple[str, ...]) -> jax.Array:
  """The ``pmax`` of a float scalar over ``axes``, NaN if any device's is
  (:func:`nan_max`'s semantics across devices)."""
  if not axes:
    return value
  nan = jax.lax.pmax(jnp.isnan(value).astype(FLOAT32), axes) > 0
  largest = jax.lax.pmax(jnp.where(jnp.isnan(value), -jnp.inf, value), axes)
  return jnp.where(nan, jnp.nan, largest)


def _varying(x: jax.Array) -> frozenset[str] | None:
  """The ``shard_map`` axes ``x`` varies over (``check_vma``), or None when
  that is not tracked."""
  manual = getattr(jax.typeof(x), "manual_axis_type", None)
  varying = getattr(manual, "varying", None)
  return None if varying is None else frozenset(varying)


def varying_like(value: jax.Array, x: jax.Array) -> jax.Array:
  """``value`` typed as varying over the ``shard_map`` axes that ``x`` varies
  over (``check_vma``), so a ``lax.cond`` branch that does not read ``x`` can
  return it beside one that does; ``value`` itself elsewhere."""
  axes = tuple(sorted(_varying(x) or ()))
  return jax.lax.pcast(value, axes, to="varying") if axes else value


def over_devices(col: Collective | None, value: jax.Array, op: str = "sum") -> jax.Array:
  """A per-device scalar (a micro-batch weight, a flag) reduced over the
  axes of ``col`` that it varies over (``op`` one of ``"sum"``, ``"mean"``,
  ``"max"``, ``"min"``): along an axis where it is the same on every device it is one
  value, not several (a weight of a batch split over ``data`` only is summed
  over ``data``). Without ``check_vma`` every axis of ``col`` counts.
  ``value`` itself outside ``shard_map``."""
  if col is None:
    return value
  value = jnp.asarray(value)
  varying = _varying(value)
  axes = tuple(a for a in col.axis_names if varying is None or a in varying)
  if not axes:
    return value
  reduce = {"sum": jax.lax.psum, "mean": jax.lax.pmean, "max": jax.lax.pmax, "min": jax.lax.pmin}[
    op
  ]
  return reduce(value, axes)


# --------------------------------------- leaf norms, scales, checks, the cond


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


def nan_max(values: jax.Array, empty: float = 0.0) -> jax.Array:
  """The largest entry of a small float array, NaN if any entry is NaN, and
  ``empty`` for no entries: the same value on every topology.

  XLA:CPU's vectorized max reduction can drop a NaN, depending on the array's
  length and on how it is split across devices (one process gave 1.63 where
  two gave NaN), so NaN is checked for on its own. Meant for a statistic's
  few entries (one per leaf or per unit), not for a gradient-sized array.
  """
  values = jnp.asarray(values)
  if values.size == 0:
    return jnp.asarray(empty, values.dtype)
  return jnp.where(jnp.any(jnp.isnan(values)), jnp.nan, jnp.max(values))


def size(tree: Any, col: Collective | None = None) -> int:
  """The number of entries over all floating leaves (a Python int); with
  ``col``, of the whole leaves that ``shard_map``'s blocks make up."""
  if col is None:
    return sum(int(x.size) for x in float_leaves(tree))
  return sum(
    int(x.size) * math.prod(jax.lax.axis_size(a) for a in split.axes)
    for x, split in zip(float_leaves(tree), leaf_splits(col, tree, floats_only=True))
  )


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


def copies_apart(scale: jax.Array, count: int) -> list[jax.Array]:
  """``count`` copies of the float32 scalar ``scale`` that XLA cannot merge
  (one ``optimization_barrier`` over them all), one per leaf of a scaled
  tree that is only reduced. XLA:CPU turns the broadcasts of one scalar to
  leaves of one shape into one array that it writes out and every leaf's
  reduction then reads back: the norm of a scaled tree of ten equal leaves
  costs 1.05 times the floor that way, 0.5 with a copy per leaf (measured).
  """
  if count == 0:
    return []
  return list(jax.lax.optimization_barrier([jnp.asarray(scale, FLOAT32)] * count))


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
  optional: bool = False,
) -> None:
  """Raises ``ValueError`` naming ``name`` unless ``value`` lies in the range.

  The range is ``[low, high]``; ``low_open`` / ``high_open`` exclude an end.
  The error says the allowed range and the value received. ``None`` passes
  only when ``optional``; strings and booleans are not numbers (``float("1")``
  would accept the first).
  """
  if value is None and optional:
    return
  if not is_concrete(value):
    return
  if value is None or isinstance(value, (str, bytes, bool)):
    raise ValueError(f"{name} must be a real number, got {value!r}.")
  try:
    v = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a real number, got {value!r}.") from None
  below = v <= low if low_open else v < low
  above = v >= high if high_open else v > high
  if math.isnan(v) or below or above:
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    raise ValueError(f"{name} must be in {left}{low}, {high}{right}, got {value!r}.")


def check_int(name: str, value: Any, *, low: int = 0) -> None:
  """Raises ``ValueError`` naming ``name`` unless ``value`` is an int >= low."""
  integer_array = hasattr(value, "dtype") and jnp.issubdtype(value.dtype, jnp.integer)
  if (isinstance(value, bool) or not isinstance(value, int)) and (
    is_concrete(value) and not integer_array
  ):
    raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
  if is_concrete(value) and int(value) < low:
    raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")


def check_transform(name: str, inner: Any) -> None:
  """Raises ``ValueError`` unless ``inner`` is an optax transformation."""
  if not (callable(getattr(inner, "init", None)) and callable(getattr(inner, "update", None))):
    raise ValueError(
      f"{name} must be an optax.GradientTransformation (e.g. optax.adam(1e-3)), got {inner!r}."
    )


def require_params(name: str, params: Any) -> None:
  """Raises the contract's ``ValueError`` when a transform needs params."""
  if params is None:
    raise ValueError(f"{name} needs the parameters: call update(grads, state, params).")


INT32_MAX = 2**31 - 1


def count_if(count: jax.Array, cond: jax.Array) -> jax.Array:
  """``count + 1`` where ``cond``, saturating at 2**31-1 (never negative)."""
  return jnp.where(cond, optax.safe_increment(count), count)


def cycle_count(count: jax.Array, period: jax.Array | int) -> jax.Array:
  """The next value of an int32 count that drives something periodic.

  ``count + 1`` below 2**31-1; at 2**31-1 it steps back by ``period - 1``
  instead, so the count stays within ``period`` of the int32 maximum, never
  wraps negative, and ``count % period`` keeps cycling (a ring buffer keeps
  turning, a check every ``period`` steps keeps running). ``period`` is a
  positive int or int32 scalar, at most 2**31-1.
  """
  count = jnp.asarray(count, jnp.int32)
  period = jnp.asarray(period, jnp.int32)
  return jnp.where(count < INT32_MAX, count + 1, count - (period - 1))
