"""Gradient-health monitoring: ``monitor``, and ``stats`` / ``report`` to read it."""

from __future__ import annotations

import fnmatch
import math
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradcal_jax import _norms, _stats, _tree

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


def _check_thresholds(vanishing_below: Any, exploding_above: Any) -> None:
  _tree.check_number("vanishing_below", vanishing_below, low=0.0)
  _tree.check_number("exploding_above", exploding_above, low=0.0)
  concrete = _tree.is_concrete(vanishing_below) and _tree.is_concrete(exploding_above)
  if concrete and not float(vanishing_below) < float(exploding_above):
    raise ValueError(
      "vanishing_below must be smaller than exploding_above, got "
      f"vanishing_below={vanishing_below!r} and "
      f"exploding_above={exploding_above!r}."
    )


def _is_gradient(x: Any) -> bool:
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
  index = [i for i, x in enumerate(leaves) if _is_gradient(x)]
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
    nonfinite = _tree.cond(
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


def _fresh_state(params: Any, low: jax.Array, high: jax.Array) -> MonitorState:
  """:func:`monitor`'s state before any update: every statistic zero."""
  # One array per field: fields sharing a buffer cannot be donated.
  zero_f = lambda: jnp.zeros((), _tree.FLOAT32)
  zero_i = lambda: jnp.zeros((), jnp.int32)
  return MonitorState(
    count=zero_i(),
    norm=zero_f(),
    leaf_norms=jax.tree.map(lambda x: zero_f() if _is_gradient(x) else None, params),
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
  _check_thresholds(vanishing_below, exploding_above)
  col = _tree.collective("monitor", axis_name, partition)

  def init_fn(params: Any) -> MonitorState:
    return _fresh_state(params, *thresholds(vanishing_below, exploding_above))

  def update_fn(updates: Any, state: MonitorState, params: Any = None) -> tuple[Any, MonitorState]:
    del params
    new_state = observe(updates, state, *thresholds(vanishing_below, exploding_above), col)
    return updates, new_state

  return optax.GradientTransformation(init_fn, update_fn)


def _optax_state(x: Any, caller: str) -> Any:
  # A Flax NNX Optimizer (or anything holding `tx` and `opt_state`) is read
  # through its optax state; a model is refused (its params are not
  # gradients, and it holds no optimizer state).
  if hasattr(x, "tx") and hasattr(x, "opt_state"):
    return x.opt_state
  nnx = sys.modules.get("flax.nnx")
  if nnx is not None and isinstance(x, nnx.Module):
    raise ValueError(
      f"{caller}() got a Flax model ({type(x).__name__}), which holds parameters, not "
      f"gradients or optimizer state: pass the nnx.Optimizer or its opt_state"
      + (", or the gradients nnx.grad(loss_fn)(model)" if caller == "report" else "")
      + "."
    )
  return x


def stats(
  opt_state: Any, *, include: str | Sequence[str] | None = None, per_leaf: str = "all"
) -> dict[str, jax.Array]:
  """Every statistic of every gradcal state inside ``opt_state``, for a logger.

  Walks any nested optax state (``optax.chain``, ``optax.masked``,
  ``optax.inject_hyperparams``, ``optax.MultiSteps``, gradcal wrappers, a Flax
  NNX optimizer's ``opt_state``) and returns a flat dict of float32 / int32
  arrays with stable keys ``"<transform>/<field>"``. A transform used twice
  gets distinct keys (``clip_by_global_norm/norm``, ``clip_by_global_norm_1/norm``);
  a per-layer field gives one key per layer (``monitor/leaf_norms/dense/kernel``).
  It works inside ``jax.jit`` too, so a training step can return the dict.

  Args:
    opt_state: an optax state, anything containing one, or a Flax NNX
      ``Optimizer``.
    include: keep only the keys matching this shell-style pattern or any of
      these patterns (``fnmatch``: ``"*/norm"``, ``"monitor/*"``); default all.
    per_leaf: a field with one value per layer (``monitor/leaf_norms``,
      ``clip_by_layer_norm/norms``, ...) gives one key per layer (``"all"``),
      only its ``.../max`` and ``.../min`` over layers (``"summary"``; NaN if
      a layer's is NaN) or no key (``"none"``). Applied before ``include``.

  Returns:
    ``dict[str, jax.Array]`` of scalars, in a stable order: the order of the
    transforms in the state, then of their fields (the order of
    :func:`report`'s last section).

  Raises:
    ValueError: when ``opt_state`` holds no optimizer state at all
      (gradients, params, ``None``), is a Flax model, or ``per_leaf`` is not
      one of the three. An optax state without gradcal_jax transforms gives
      ``{}`` (a baseline in a loop over optimizers).

  Example:
    >>> import jax.numpy as jnp, optax, gradcal_jax as gc
    >>> tx = optax.chain(gc.clip_by_global_norm(1.0), optax.sgd(0.1))
    >>> grads = {"w": jnp.array([3.0, 4.0])}
    >>> _, state = tx.update(grads, tx.init(grads))
    >>> float(gc.stats(state)["clip_by_global_norm/norm"])
    5.0
  """
  tree = _optax_state(opt_state, "stats")
  if not _is_optimizer_state(tree):
    raise ValueError(
      "stats() found no optimizer state in what it was given "
      f"({type(opt_state).__name__}; gradients or params?): pass the optax state of "
      "a chain holding gradcal_jax transforms (monitor, a clipper, zclip, "
      "skip_spikes, ...), or the nnx.Optimizer holding it."
    )
  if per_leaf not in _stats.PER_LEAF:
    raise ValueError(f"per_leaf must be one of {_stats.PER_LEAF}, got {per_leaf!r}.")
  out = _stats.collect(tree, per_leaf)
  if include is None:
    return out
  patterns = [include] if isinstance(include, str) else list(include)
  return {k: v for k, v in out.items() if any(fnmatch.fnmatchcase(k, p) for p in patterns)}


# Severity of a row of the report: smaller sorts first.
_NONFINITE, _EXPLODING, _VANISHING, _OK = range(4)
_FLAGS = {_NONFINITE: "non-finite", _EXPLODING: "exploding", _VANISHING: "vanishing", _OK: "ok"}


def _rows(
  norms: list[tuple[str, str, float]], low: float, high: float
) -> list[tuple[str, str, float, str]]:
  """Sorts ``(path, shape, norm)`` worst first and adds the flag."""
  keyed = []
  for i, (path, shape, norm) in enumerate(norms):
    if not math.isfinite(norm):
      key = (_NONFINITE, 0.0, i)
    elif norm > high:
      key = (_EXPLODING, -norm / high if high > 0 else -math.inf, i)
    elif norm < low:
      key = (_VANISHING, -low / norm if norm > 0 else -math.inf, i)
    else:
      key = (_OK, 0.0, i)
    keyed.append((key, (path, shape, norm, _FLAGS[key[0]])))
  return [row for _, row in sorted(keyed, key=lambda kv: kv[0])]


def _table(title: str, summary: list[str], rows: list[tuple[str, str, float, str]]) -> list[str]:
  headers = ("layer", "shape", "norm", "flag")
  cells = [(p, s, f"{n:.3e}", f) for p, s, n, f in rows]
  show_shape = any(s for _, s, _, _ in rows)
  columns = [0, 1, 2, 3] if show_shape else [0, 2, 3]
  widths = {c: max([len(headers[c])] + [len(r[c]) for r in cells]) for c in columns}

  def line(values: tuple[str, ...]) -> str:
    parts = [values[c].rjust(widths[c]) if c == 2 else values[c].ljust(widths[c]) for c in columns]
    return "  ".join(parts).rstrip()

  out = [title, *summary, line(headers), line(tuple("-" * widths.get(c, 0) for c in range(4)))]
  out.extend(line(r) for r in cells)
  if not rows:
    out.append("(no floating-point leaves)")
  return out


def _counts_line(rows: list[tuple[str, str, float, str]]) -> str:
  counts = {flag: sum(r[3] == flag for r in rows) for flag in _FLAGS.values()}
  return "layers: " + ", ".join(f"{counts[f]} {f}" for f in _FLAGS.values())


@jax.jit
def _observe_once(leaves: list[jax.Array], low: jax.Array, high: jax.Array) -> MonitorState:
  """What :func:`monitor` records of ``leaves``, in one compiled call rather
  than a few eager operations per leaf."""
  return observe(leaves, _fresh_state(leaves, low, high), low, high)


def _report_grads(grads: Any, low: float, high: float) -> list[str]:
  leaves = [(p, x) for p, x in jax.tree_util.tree_flatten_with_path(grads)[0] if _is_gradient(x)]
  seen = jax.device_get(_observe_once([x for _, x in leaves], *thresholds(low, high)))
  norms = [
    (_stats.leaf_path(p), str(tuple(x.shape)), float(n))
    for (p, x), n in zip(leaves, seen.leaf_norms)
  ]
  rows = _rows(norms, low, high)
  summary = [
    f"global norm {float(seen.norm):.3e}, max |entry| {float(seen.max_abs):.3e}, "
    f"non-finite entries {int(seen.nonfinite)}",
    _counts_line(rows) + f" (vanishing < {low:.1e}, exploding > {high:.1e})",
  ]
  return _table("gradient", summary, rows)


def _report_monitor(
  prefix: str, state: MonitorState, low: float | None, high: float | None
) -> list[str]:
  low = float(state.vanishing_below) if low is None else low
  high = float(state.exploding_above) if high is None else high
  norms = [
    (_stats.leaf_path(p), "", float(n))
    for p, n in jax.tree_util.tree_flatten_with_path(state.leaf_norms)[0]
  ]
  rows = _rows(norms, low, high)
  summary = [
    f"step {int(state.count)}: global norm {float(state.norm):.3e}, "
    f"max |entry| {float(state.max_abs):.3e}, "
    f"non-finite entries {int(state.nonfinite)}",
    _counts_line(rows) + f" (vanishing < {low:.1e}, exploding > {high:.1e})",
  ]
  return _table(prefix, summary, rows)


def _is_optimizer_state(tree: Any) -> bool:
  """True when ``tree`` holds an optax or gradcal state rather than gradients."""

  def is_state(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")

  for x in jax.tree.leaves(tree, is_leaf=is_state):
    module = type(x).__module__
    if (
      is_state(x)
      and not isinstance(x, optax.MaskedNode)
      and (module.startswith(("optax", "gradcal_jax")))
    ):
      return True
  return False


def leaf_paths(tree: Any) -> list[str]:
  """Each leaf's path (``"dense/kernel"``), in ``jax.tree.leaves(tree)`` order.

  ``gradient_check/worst_leaf`` is an index in that order:
  ``gc.leaf_paths(params)[int(stats["gradient_check/worst_leaf"])]`` names the
  leaf (a Flax NNX Variable's ``.value`` is dropped from the path).

  Args:
    tree: the params (or any pytree of the same structure).

  Returns:
    One path string per leaf.

  Example:
    >>> import jax.numpy as jnp, gradcal_jax as gc
    >>> gc.leaf_paths({"dense": {"kernel": jnp.ones(2), "bias": jnp.ones(1)}})
    ['dense/bias', 'dense/kernel']
  """
  return [_stats.leaf_path(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def report(
  opt_state_or_grads: Any,
  *,
  vanishing_below: float | None = None,
  exploding_above: float | None = None,
  params: Any = None,
) -> str:
  """A table a person reads: each layer's gradient norm, worst layers first.

  Given an optax state (or a Flax NNX optimizer's ``opt_state``) that contains
  :func:`monitor` states, it prints one table per monitor from the per-layer
  norms it recorded at the last step. Given a gradient pytree (a dict, or the
  ``nnx.State`` that ``nnx.grad`` returns), it computes the norms itself and
  also shows each layer's shape. Each row is flagged ``non-finite`` (NaN or
  infinite norm), ``exploding`` (norm > ``exploding_above``), ``vanishing``
  (norm < ``vanishing_below``) or ``ok``; rows are sorted in that order, and
  within a flag the farthest from its threshold first. The statistics of the
  other gradcal states inside an optax state (clipping norms and scales, ...)
  follow in a last section, as :func:`stats` returns them.

  It reads concrete values: call it outside ``jax.jit``.

  Args:
    opt_state_or_grads: an optax state containing monitor states (or a Flax
      NNX ``Optimizer``), or gradients.
    vanishing_below: the vanishing threshold; default: each monitor's own, or
      1e-7 for gradients.
    exploding_above: the exploding threshold; default: each monitor's own, or
      1e3 for gradients.
    params: the params, optional: ``gradient_check/worst_leaf`` is then
      followed by the leaf's path (see :func:`leaf_paths`).

  Returns:
    The report as a multi-line string.

  Example:
    >>> import jax.numpy as jnp, gradcal_jax as gc
    >>> grads = {"a": jnp.zeros(3), "b": jnp.full((2, 2), 1e4)}
    >>> print(gc.report(grads))  # doctest: +NORMALIZE_WHITESPACE
    gradient
    global norm 2.000e+04, max |entry| 1.000e+04, non-finite entries 0
    layers: 0 non-finite, 1 exploding, 1 vanishing, 0 ok (vanishing < 1.0e-07, exploding > 1.0e+03)
    layer  shape   norm       flag
    -----  ------  ---------  ---------
    b      (2, 2)  2.000e+04  exploding
    a      (3,)    0.000e+00  vanishing
  """
  _check_thresholds(
    VANISHING_BELOW if vanishing_below is None else vanishing_below,
    EXPLODING_ABOVE if exploding_above is None else exploding_above,
  )
  tree = _optax_state(opt_state_or_grads, "report")
  if not _is_optimizer_state(tree):
    low = VANISHING_BELOW if vanishing_below is None else vanishing_below
    high = EXPLODING_ABOVE if exploding_above is None else exploding_above
    return "\n".join(_report_grads(tree, float(low), float(high)))

  sections: list[list[str]] = []
  monitors: set[str] = set()
  # The same walk and numbering as `stats`, so titles match its key prefixes.
  for prefix, _, state in _stats.named_states(tree):
    if isinstance(state, MonitorState):
      monitors.add(prefix)
      sections.append(_report_monitor(prefix, state, vanishing_below, exploding_above))
  if not sections:
    sections.append(
      [
        "no monitor in this state: add gradcal_jax.monitor() to "
        "the chain to see per-layer gradient norms"
      ]
    )
  paths = None if params is None else leaf_paths(params)

  def line(key: str, value: Any) -> str:
    text = f"{key} = {_format(value)}"
    if paths is not None and key.endswith("/worst_leaf") and 0 <= int(value) < len(paths):
      text += f" ({paths[int(value)]})"
    return text

  others = [
    line(key, value)
    for key, value in _stats.collect(tree).items()
    if key.split("/", 1)[0] not in monitors
  ]
  if others:
    sections.append(["other statistics", *others])
  return "\n\n".join("\n".join(s) for s in sections)


def _format(value: Any) -> str:
  value = np.asarray(value)
  if value.ndim:
    return str(value.tolist())
  if np.issubdtype(value.dtype, np.integer):
    return str(int(value))
  return f"{float(value):.4g}"
