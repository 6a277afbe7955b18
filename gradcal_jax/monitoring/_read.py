"""stats, report and leaf_paths: read what the transforms recorded."""

from __future__ import annotations

import fnmatch
import math
import sys
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax

from gradcal_jax import _stats
from gradcal_jax.monitoring._monitor import (
  EXPLODING_ABOVE,
  VANISHING_BELOW,
  MonitorState,
  check_thresholds,
  fresh_state,
  is_gradient,
  observe,
  thresholds,
)


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
  return observe(leaves, fresh_state(leaves, low, high), low, high)


def _report_grads(grads: Any, low: float, high: float) -> list[str]:
  leaves = [(p, x) for p, x in jax.tree_util.tree_flatten_with_path(grads)[0] if is_gradient(x)]
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
  check_thresholds(
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
