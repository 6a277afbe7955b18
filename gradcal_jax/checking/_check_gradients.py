"""check_gradients: every leaf of a function's input checked, for tests."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradcal_jax import _stats, _tree
from gradcal_jax.checking._chunks import _chunk_plan, _run_chunks
from gradcal_jax.checking._directions import (
  _directions,
  _draw,
  _perturbed,
  _replaced,
  _select_member,
)
from gradcal_jax.checking._numerics import (
  VERDICTS,
  _default_rtol,
  _eps,
  _finite_differences,
  _gradient_terms,
  _judge,
  _Measured,
  _rms,
  _step,
)
from gradcal_jax.checking._report import GradientCheckReport, GradientCheckRow

FLOAT32 = jnp.float32


def _is_custom_vjp_error(e: Exception) -> bool:
  return isinstance(e, TypeError) and "custom_vjp" in str(e)


def _measure_leaves(
  objective: Callable[[Any], jax.Array],
  leaves: list[Any],
  treedef: Any,
  grads: list[Any],
  checked: list[int],
  key: jax.Array,
  num_directions: int,
  eps: list[float],
  fallback: jax.Array,
  f0: jax.Array,
  check_dtype: Any,
) -> tuple[_Measured, list[bool]]:
  """Measures every checked leaf for :func:`check_gradients`, stacked in
  ``checked`` order, and says which had a forward leg.

  Chunks as in :func:`_chunk_plan`. Under ``jax.vmap`` over the evaluation
  points only the chunk's members are batched: what ``objective`` computes before
  them (the layers below, when the tree lists layers in order) is evaluated
  once per member, not once per point, and no other parameter is copied; the
  forward-mode products come from one ``jax.linearize`` per chunk, so only
  their tangents are computed per member.
  """
  has_forward = [False] * len(checked)

  def body(
    idx: list[int],
    leaf_eps: float,
    k: jax.Array,
    chunk_key: jax.Array,
    linear: Callable[..., jax.Array] | None,
  ) -> _Measured:
    leaf = _select_member(k, [leaves[i] for i in idx])
    dtype = jnp.promote_types(leaf.dtype, check_dtype)
    v = _directions(chunk_key, k, num_directions, leaf, check_dtype, dtype)
    t = _step(leaf, fallback.astype(dtype), dtype, leaf_eps)
    forward = None
    if linear is not None:
      forward = jax.vmap(
        lambda d: linear(
          *[
            jnp.where(k == j, d.astype(leaf.dtype), jnp.zeros_like(leaves[i]))
            for j, i in enumerate(idx)
          ]
        )
      )(v).astype(dtype)
    f = _finite_differences(
      _perturbed(objective, leaves, treedef, idx, k), leaf, v, t, dtype, batched=True
    )
    reverse, typical, finite = _gradient_terms(_select_member(k, [grads[i] for i in idx]), v, dtype)
    return _Measured(
      reverse=reverse,
      forward=jnp.full_like(reverse, jnp.nan) if forward is None else forward,
      f0=f0.astype(dtype),
      f=f,
      step=t,
      typical=typical,
      finite=finite,
    )

  def run(idx: list[int], leaf_eps: float, chunk_key: jax.Array, with_forward: bool) -> _Measured:
    linear = None
    if with_forward:
      # One linearization per chunk: the forward pass it needs is shared by
      # the members, and only the tangents are computed per member.
      _, linear = jax.linearize(
        lambda *ys: objective(_replaced(leaves, treedef, idx, ys)), *[leaves[i] for i in idx]
      )
    return jax.lax.map(lambda k: body(idx, leaf_eps, k, chunk_key, linear), jnp.arange(len(idx)))

  def run_chunk(members: list[int], idx: list[int], chunk_key: jax.Array) -> _Measured:
    try:
      measured, ok = run(idx, eps[members[0]], chunk_key, True), True
    except TypeError as e:  # jax.jvp refuses custom_vjp functions
      if not _is_custom_vjp_error(e):
        raise
      measured, ok = run(idx, eps[members[0]], chunk_key, False), False
    for n in members:
      has_forward[n] = ok
    return measured

  chunks = _chunk_plan(leaves, checked, num_directions)
  return _run_chunks(chunks, checked, key, run_chunk, check_dtype), has_forward


def _is_static(x: Any) -> bool:
  return not isinstance(x, (jax.Array, np.ndarray, np.generic))


def _projected(
  call: Callable[[Any], Any], cotangents: list[jax.Array] | None, dtype: Any
) -> Callable[[Any], jax.Array]:
  """``x -> <u, call(x)>`` for random cotangents ``u``; ``call`` in ``dtype``
  when the output is a scalar (``cotangents`` None)."""
  if cotangents is None:
    return lambda y: call(y).astype(dtype)

  def objective(y: Any) -> jax.Array:
    outs = _tree.float_leaves(call(y))
    return _tree.add_up([jnp.sum(u * o.astype(u.dtype)) for u, o in zip(cotangents, outs)])

  return objective


# Dtypes a function may round its values to internally, coarsest first.
_ROUNDINGS = ("bfloat16", "float16", "float32")
# The relative offset of the point where outputs are tested for rounding: not
# a short binary fraction, so a full-precision function's values there are not
# numbers of a coarser dtype.
_PROBE = 1.0 / 3000.0


def _representable(values: list[jax.Array], dtype: Any) -> jax.Array:
  """True when every finite value is exactly a ``dtype`` number."""
  same = [jnp.all(~jnp.isfinite(v) | (v.astype(dtype).astype(v.dtype) == v)) for v in values]
  return jnp.all(jnp.stack(same))


@jax.jit(
  static_argnames=("fn", "argnums", "num_directions", "precision", "rtol", "spec", "rounded_to")
)
def _check(
  dynamic: list[jax.Array],
  key: jax.Array,
  *,
  fn: Callable[..., Any],
  argnums: int,
  num_directions: int,
  precision: str,
  rtol: float | None,
  spec: tuple[Any, ...],
  rounded_to: str | None = None,
) -> dict[str, jax.Array]:
  """The whole check as one compiled function of the arrays and the key.

  ``rounded_to`` names a dtype the function's values were found rounded to
  (see :func:`check_gradients`): it then sets the tolerance and the rounding
  floor where the outputs' declared dtype is finer. The result's
  ``"rounded"`` says, for each of ``_ROUNDINGS``, whether every value the
  check computed is a number of that dtype.
  """
  treedef, static, positions = spec
  flat = list(static)
  for pos, value in zip(positions, dynamic):
    flat[pos] = value
  args = list(jax.tree.unflatten(treedef, flat))
  check_dtype = jnp.float64 if precision == "float64" else FLOAT32

  def eval_dtype(dtype: Any) -> Any:
    return jnp.promote_types(dtype, check_dtype)

  args = [
    _tree.map_float(lambda a: a.astype(eval_dtype(a.dtype)), a) if precision == "float64" else a
    for a in args
  ]
  x = args[argnums]

  def call(y: Any) -> Any:
    return fn(*args[:argnums], y, *args[argnums + 1 :])

  out = jax.eval_shape(call, x)
  out_leaves = _tree.float_leaves(out)
  if not out_leaves:
    raise ValueError("fn must return a floating array or a pytree with one.")
  # The outputs' own dtype limits how precisely finite differences see them.
  out_eps = max(_eps(o.dtype) for o in out_leaves)
  scalar = len(jax.tree.leaves(out)) == 1 and out_leaves[0].shape == ()
  leaves, treedef_x = jax.tree.flatten(x)
  checked = [i for i, leaf in enumerate(leaves) if _tree.is_float(leaf) and leaf.size]
  out_shapes = [] if scalar else [o.shape for o in out_leaves]
  out_key, dir_key = jax.random.split(key)
  cotangents = [
    u.astype(eval_dtype(o.dtype))
    for u, o in zip(_draw(out_key, out_shapes, check_dtype), out_leaves)
  ]
  objective = _projected(call, None if scalar else cotangents, eval_dtype(out_leaves[0].dtype))
  f0, grads = jax.value_and_grad(objective, allow_int=True)(x)
  grads = _tree.flatten_up_to(treedef_x, grads)
  fallback = _rms([leaves[i] for i in checked], check_dtype)

  if not checked:
    return {}
  # The coarser of the leaf's and the outputs' dtypes sets step and tolerance.
  eps = [max(_eps(leaves[i].dtype), out_eps) for i in checked]
  # Values found rounded to a coarser dtype set the tolerance and the rounding
  # floor, not the step: one sized for that dtype would be far longer than the
  # scale on which the function varies (sin at 1000 with a step of 41).
  rounding = _eps(rounded_to) if rounded_to else 0.0
  rtols = [_default_rtol(max(e, rounding)) if rtol is None else rtol for e in eps]
  value_eps = [max(out_eps, rounding, _eps(eval_dtype(leaves[i].dtype))) for i in checked]
  m, has_forward = _measure_leaves(
    objective,
    leaves,
    treedef_x,
    grads,
    checked,
    dir_key,
    num_directions,
    eps,
    fallback,
    f0,
    check_dtype,
  )
  check = _judge(
    m,
    jnp.asarray(has_forward),
    jnp.asarray(rtols, check_dtype),
    jnp.asarray(value_eps, check_dtype),
  )
  # Is every value a number of a coarser dtype? The outputs at x and at a
  # point off every dyadic grid, and for a scalar output the check's values
  # (a projected output mixes in the float64 cotangent).
  probe = _tree.map_float(
    lambda a: (a * (1 + _PROBE) + _PROBE * fallback.astype(a.dtype)).astype(a.dtype), x
  )
  values = _tree.float_leaves(call(x)) + _tree.float_leaves(call(probe))
  if scalar:
    values += [f0, m.f]
  rounded = jnp.stack([_representable(values, d) for d in _ROUNDINGS])
  return {
    **check._asdict(),
    "has_forward": jnp.asarray(has_forward),
    "rtol": jnp.asarray(rtols, check_dtype),
    "rounded": rounded,
    "value_eps": jnp.asarray(value_eps, check_dtype),
  }


def check_gradients(
  fn: Callable[..., Any],
  *args: Any,
  argnums: int = 0,
  key: jax.Array | None = None,
  num_directions: int = 2,
  precision: str = "float64",
  rtol: float | None = None,
) -> GradientCheckReport:
  """Checks the gradient of ``fn`` with respect to ``args[argnums]``, leaf by leaf.

  For every floating leaf of ``args[argnums]`` (any pytree: dicts, lists, a
  Flax NNX ``State``), ``num_directions`` random unit directions supported on
  that leaf alone are drawn, and the reverse-mode, forward-mode and
  extrapolated finite-difference directional derivatives are compared (see the
  module docstring for the step, the error scale and the verdicts). A
  non-scalar output is projected on a random cotangent. ``jax.jvp`` refuses
  ``custom_vjp`` functions: their forward leg is reported as skipped and the
  reverse leg is still checked against finite differences. Consecutive leaves
  of the same shape and dtype are checked in chunks of up to four by one
  compiled loop body, so they share that fate: when one of them reaches a
  ``custom_vjp``, all show it skipped.

  A function may compute in a coarser dtype than it returns
  (``jnp.sin(x.astype(jnp.float32)).astype(x.dtype)``, checked in float64).
  When every value the check computed (and the outputs at ``x`` and at one
  point off every short binary fraction) is a number of bfloat16, float16 or
  float32, coarser than the outputs' dtype, the check runs again with that
  dtype's tolerance and rounding floor and the report says
  ``rounded_to``. Rounding followed by wider arithmetic (a float64 sum of
  float32 terms) leaves values of no coarser dtype and is not recognised:
  check such a function with ``precision="input"`` and inputs of the dtype
  it computes in.

  The check is compiled once per function, argument shapes and settings, with
  the key as an argument: calling it again with another key reuses it. Cost,
  in evaluations of ``fn``: one value and gradient; per leaf
  ``4 * num_directions`` values in one ``jax.vmap``-ed call and
  ``num_directions`` forward-mode products; and one forward pass per chunk
  for ``jax.linearize``. That is at most
  ``1 + leaves * (5 * num_directions + 1)``, ``O(leaves * directions)``, never
  ``O(parameters)``; only the part of ``fn`` that depends on the perturbed
  leaf is batched over the points.

  Args:
    fn: the function; it returns an array or a pytree of arrays. It must be
      traceable (``jax.jit`` and ``jax.vmap`` apply to it).
    *args: its arguments. Array leaves are traced; other leaves (Python numbers,
      strings) are held static and must be hashable.
    argnums: which argument is checked.
    key: a PRNG key for the directions and the output cotangent; default
      ``jax.random.key(0)``.
    num_directions: random directions per leaf (>= 1).
    precision: ``"float64"`` evaluates everything in float64 (bfloat16 or
      float32 inputs are cast up) inside a scoped ``jax.enable_x64``, leaving
      the caller's setting as it was; ``"input"`` keeps the inputs' dtypes and
      sets step and tolerance from them.
    rtol: the relative error allowed; default ``eps ** (1/3)`` of the coarser
      of the leaf's and the output's dtype (6e-6 in float64, 5e-3 in float32).

  Returns:
    A :class:`GradientCheckReport`; ``report.raise_if_failed()`` turns a
    ``mismatch`` or ``nonfinite`` leaf into a :class:`GradientCheckError`.

  Raises:
    ValueError: for a bad ``argnums``, ``num_directions``, ``precision`` or
      ``rtol``.

  Example:
    >>> import jax, jax.numpy as jnp, gradcal_jax as gc
    >>> @jax.custom_vjp
    ... def square(x):
    ...   return x ** 2
    >>> square.defvjp(lambda x: (x ** 2, x), lambda x, g: (x * g,))  # bug: not 2 x g
    >>> params = {"w": jnp.arange(1.0, 4.0), "b": jnp.ones(2)}
    >>> report = gc.check_gradients(
    ...     lambda p: jnp.sum(square(p["w"])) + jnp.sum(jnp.sin(p["b"])), params)
    >>> report.ok, report.verdicts()
    (False, {'b': 'ok', 'w': 'mismatch'})

  References:
    Richardson, "The deferred approach to the limit" (1927).
    JAX issues 641 and 7742 on fixed steps in ``jax.test_util.check_grads``.
  """
  if isinstance(argnums, bool) or not isinstance(argnums, int) or not (0 <= argnums < len(args)):
    raise ValueError(
      f"argnums must be an integer in [0, {len(args) - 1}] (the index of the "
      f"checked argument among {len(args)}), got {argnums!r}."
    )
  _tree.check_int("num_directions", num_directions, low=1)
  if precision not in ("float64", "input"):
    raise ValueError(f'precision must be "float64" or "input", got {precision!r}.')
  _tree.check_number("rtol", rtol, low=0.0, low_open=True, optional=True)
  key = jax.random.key(0) if key is None else key
  flat, treedef = jax.tree.flatten(list(args))
  positions = tuple(i for i, leaf in enumerate(flat) if not _is_static(leaf))
  static = tuple(None if i in positions else leaf for i, leaf in enumerate(flat))
  checked = [
    (_stats.leaf_path(path), int(leaf.size))
    for path, leaf in jax.tree_util.tree_flatten_with_path(args[argnums])[0]
    if _tree.is_float(leaf) and leaf.size
  ]
  settings = dict(
    fn=fn,
    argnums=argnums,
    num_directions=int(num_directions),
    precision=precision,
    rtol=None if rtol is None else float(rtol),
    spec=(treedef, static, positions),
  )
  dynamic = [flat[i] for i in positions]
  # Only switches x64 on for the check: `enable_x64(False)` would switch off
  # a caller's x64.
  scope = jax.enable_x64(True) if precision == "float64" else contextlib.nullcontext()
  with scope:
    results = jax.device_get(_check(dynamic, key, **settings))
    rounded_to = _found_rounding(results)
    if rounded_to is not None:
      results = jax.device_get(_check(dynamic, key, rounded_to=rounded_to, **settings))
  rows = tuple(
    GradientCheckRow(
      path=path,
      size=size,
      error=float(results["error"][n]),
      reverse=float(results["reverse"][n]),
      forward=float(results["forward"][n]) if results["has_forward"][n] else None,
      finite_difference=float(results["finite_difference"][n]),
      uncertainty=float(results["uncertainty"][n]),
      rtol=float(results["rtol"][n]),
      verdict=VERDICTS[int(results["verdict"][n])],
    )
    for n, (path, size) in enumerate(checked)
  )
  return GradientCheckReport(
    rows=rows, precision=precision, num_directions=int(num_directions), rounded_to=rounded_to
  )


def _found_rounding(results: dict[str, Any]) -> str | None:
  """The coarsest dtype every computed value belongs to, when it is coarser
  than the precision the check assumed for the values; else None."""
  assumed = float(np.max(results["value_eps"]))
  for name, rounded in zip(_ROUNDINGS, results["rounded"]):
    if bool(rounded) and _eps(name) > assumed:
      return name
  return None
