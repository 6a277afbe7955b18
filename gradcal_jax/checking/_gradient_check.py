"""gradient_check: the training gradient checked every every_k steps, as a transform."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradcal_jax import _control, _stats, _tree
from gradcal_jax.checking._chunks import _chunk_plan, _run_chunks
from gradcal_jax.checking._directions import _directions, _perturbed, _select_member
from gradcal_jax.checking._numerics import (
  _OFFSETS,
  SEVERITIES,
  Verdict,
  _default_rtol,
  _eps,
  _finite_differences,
  _gradient_terms,
  _judge,
  _Measured,
  _rms,
  _step,
)

FLOAT32 = jnp.float32


_NNX_HINT = (
  "gradient_check's value_fn {what}. It is evaluated many times inside the "
  "optimizer's update (under jit, vmap and lax.cond), so it must be a pure "
  "function of the params it is given: build it with "
  "gc.nnx_value_fn(loss_fn, model, *batch) before taking the gradient, which "
  "evaluates a copy of the model with those params and the model's RNG counts "
  "and batch statistics as the gradient saw them."
)


def _value_shape(value_fn: Callable[[Any], jax.Array], params: Any) -> Any:
  """``jax.eval_shape(value_fn, params)``, with our message for the two ways a
  value function written over a live Flax model fails."""
  try:
    return jax.eval_shape(value_fn, params)
  except Exception as e:
    if type(e).__name__ == "TraceContextError":
      raise ValueError(
        _NNX_HINT.format(
          what="mutates a Flax model from outside its trace (Dropout's "
          "RNG or BatchNorm's statistics in train mode)"
        )
      ) from e
    if "no rngs" in str(e) or "rngs argument" in str(e):
      raise ValueError(
        _NNX_HINT.format(what="runs a Dropout in train mode without its RNG state")
      ) from e
    raise


def _check_in_step(
  checking: jax.Array,
  updates: Any,
  grads: list[Any],
  leaves: list[Any],
  treedef: Any,
  checked: list[int],
  value_fn: Callable[[Any], jax.Array],
  base_key: jax.Array,
  count: jax.Array,
  num_directions: int,
  rtol: float | None,
) -> tuple[_StepCheck, Any]:
  """:func:`gradient_check`'s comparison, under two ``lax.cond`` on ``checking``.

  Returns a :class:`_StepCheck` (no error, leaf -1 when not checking) and
  ``updates``, unchanged bit for bit.

  The check is split where its inputs are: the first half evaluates
  ``value_fn`` at the perturbed params (it reads params and the batch), the
  second compares with the gradient (it reads the gradient and the first
  half's few numbers). One conditional reading both has to wait for the whole
  backward pass, and in a training step that updates params in place
  (donated) XLA then copies every param on every step to keep the old values
  for it (off steps of a 0.9M-parameter MLP at batch 64 on CPU: 12-17% over
  the plain step, 5-9% split). The first half depends on nothing the step
  computes; ``updates`` pass through a select on its result that always keeps
  them, so XLA runs it before anything that uses them. The second half holds
  nothing back. It draws the directions again from the same keys (they
  depend on the key and the leaf's shape alone) rather than receive
  leaf-sized arrays from the first. The points are evaluated one after the
  other (``lax.map``), not batched, because XLA allocates a branch's
  temporaries with the step's on every step, checking or not. The key,
  ``fold_in(base_key, count)``, is derived inside each branch: an off step
  computes nothing but the predicate.
  """
  chunks = _chunk_plan(leaves, checked, num_directions)
  # value_fn is evaluated at params cast up to float32 (a no-op for float32
  # params): in bfloat16 or float16 the perturbed points and the loss would
  # round at the finite differences' own scale, and a correct gradient could
  # look wrong. The dtype of the loss there, at least float16, and float32
  # set the steps; the params' and gradients' own dtypes set the tolerance,
  # since the gradient was computed and rounded in them.
  float32_leaves = [
    x.astype(jnp.promote_types(x.dtype, FLOAT32)) if _tree.is_float(x) else x for x in leaves
  ]
  loss = _value_shape(value_fn, jax.tree.unflatten(treedef, float32_leaves))
  out_eps = _eps(jnp.promote_types(loss.dtype, jnp.float16))
  step_eps = [max(_eps(float32_leaves[i].dtype), out_eps) for i in checked]
  grad_eps = [
    max(_eps(leaves[i].dtype), _eps(grads[i].dtype), e) for i, e in zip(checked, step_eps)
  ]
  rtols = jnp.asarray([_default_rtol(e) if rtol is None else rtol for e in grad_eps], FLOAT32)
  value_eps = jnp.asarray([max(out_eps, _eps(float32_leaves[i].dtype)) for i in checked], FLOAT32)

  # A gradient computed in bfloat16 or float16 carries its own rounding (a
  # bias's sum over the batch cancels: seen 60% off the float32 gradient in
  # a correct model). It is measured, as the difference of value_fn's own
  # reverse-mode gradients in the params' dtype and in float32 along each
  # direction, and counted in the uncertainty, so it reads as unreliable
  # rather than a mismatch. A planted bug is in both and cancels out.
  narrow = any(float32_leaves[i].dtype != leaves[i].dtype for i in checked)

  def evaluate() -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    fallback = _rms([float32_leaves[i] for i in checked], FLOAT32)
    if narrow:
      grad_fn = jax.value_and_grad(value_fn, allow_int=True)
      f0, float32_grads = grad_fn(jax.tree.unflatten(treedef, float32_leaves))
      own_grads = _tree.flatten_up_to(treedef, grad_fn(jax.tree.unflatten(treedef, leaves))[1])
      float32_grads = _tree.flatten_up_to(treedef, float32_grads)
    else:
      f0 = value_fn(jax.tree.unflatten(treedef, float32_leaves))

    def run_chunk(members: list[int], idx: list[int], chunk_key: jax.Array) -> Any:
      def member(k: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        leaf = _select_member(k, [float32_leaves[i] for i in idx])
        dtype = leaf.dtype
        v = _directions(chunk_key, k, num_directions, leaf, FLOAT32, dtype)
        t = _step(leaf, fallback.astype(dtype), dtype, step_eps[members[0]])
        f = _finite_differences(
          _perturbed(value_fn, float32_leaves, treedef, idx, k), leaf, v, t, dtype, batched=False
        )
        rounding = jnp.zeros(num_directions, dtype)
        if narrow:
          own, in_float32 = (
            _gradient_terms(_select_member(k, [g[i] for i in idx]), v, dtype)[0]
            for g in (own_grads, float32_grads)
          )
          rounding = jnp.abs(own - in_float32)
        return f, t, rounding

      return jax.lax.map(member, jnp.arange(len(idx)))

    f, t, rounding = _run_chunks(
      chunks, checked, jax.random.fold_in(base_key, count), run_chunk, FLOAT32
    )
    return f, t, f0.astype(FLOAT32), rounding

  def no_values() -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    return (
      jnp.zeros((len(checked), num_directions, len(_OFFSETS)), FLOAT32),
      jnp.zeros(len(checked), FLOAT32),
      jnp.zeros((), FLOAT32),
      jnp.zeros((len(checked), num_directions), FLOAT32),
    )

  f, t, f0, rounding = _control.cond(checking, evaluate, no_values)
  # Steps are norms, never negative (zero when not checking, NaN compares
  # false), so every update is selected as it is, bit for bit; XLA, which
  # cannot know that, runs the first half before the updates are used.
  never = t[0] < 0
  updates = jax.tree.map(
    lambda u: jnp.where(never, jnp.zeros_like(u), u) if _tree.is_float(u) else u, updates
  )

  def compare() -> _StepCheck:
    def run_chunk(members: list[int], idx: list[int], chunk_key: jax.Array) -> Any:
      del members
      dtype = jnp.promote_types(leaves[idx[0]].dtype, FLOAT32)

      def member(k: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        v = _directions(chunk_key, k, num_directions, leaves[idx[0]], FLOAT32, dtype)
        return _gradient_terms(_select_member(k, [grads[i] for i in idx]), v, dtype)

      return jax.lax.map(member, jnp.arange(len(idx)))

    reverse, typical, finite = _run_chunks(
      chunks, checked, jax.random.fold_in(base_key, count), run_chunk, FLOAT32
    )
    m = _Measured(
      reverse=reverse,
      forward=jnp.full_like(reverse, jnp.nan),
      f0=jnp.broadcast_to(f0, t.shape),
      f=f,
      step=t,
      typical=typical,
      finite=finite,
    )
    result = _judge(
      m, jnp.zeros(len(checked), jnp.bool_), rtols, value_eps, jnp.max(rounding, axis=1)
    )
    # Errors of unreliable leaves say nothing about the gradient.
    errors = jnp.where(result.verdict != int(Verdict.UNRELIABLE), result.error, 0.0)
    errors = errors.astype(FLOAT32)
    worst = jnp.argmax(errors)
    severity = jnp.asarray(SEVERITIES, jnp.int32)[result.verdict]
    return _StepCheck(
      error=errors[worst],
      leaf=jnp.asarray(checked, jnp.int32)[worst],
      severity=jnp.max(severity),
    )

  return _control.cond(checking, compare, _no_check_result), updates


class _StepCheck(NamedTuple):
  """What :func:`_check_in_step` found at one step."""

  error: jax.Array  # float32, the worst relative error of a reliable leaf
  leaf: jax.Array  # int32, that leaf's index among the leaves; -1 if none checked
  severity: jax.Array  # int32, the worst Verdict.severity of the step


def _no_check_result() -> _StepCheck:
  """:func:`_check_in_step`'s result when nothing is checked: no error, no leaf."""
  return _StepCheck(
    error=jnp.zeros((), FLOAT32), leaf=jnp.asarray(-1, jnp.int32), severity=jnp.zeros((), jnp.int32)
  )


@_stats.register_state(
  "gradient_check", fields=("steps_checked", "failures", "unreliable", "worst_error", "worst_leaf")
)
class GradientCheckState(NamedTuple):
  """State of :func:`gradient_check`.

  Attributes:
    count: int32 number of updates seen; from 2**31-1 on it stays within
      ``every_k`` of it (never negative), so checks go on every ``every_k``
      updates (with the directions of the last check before it: the key is
      folded with the count).
    steps_checked: int32 number of updates whose gradient was checked
      (saturates at 2**31-1, as do the next two).
    failures: int32 number of checked updates where some leaf was ``mismatch``
      or ``nonfinite``.
    unreliable: int32 number of checked updates without a failure where some
      leaf's finite differences were ``unreliable``.
    worst_error: float32 largest relative error seen so far among leaves whose
      finite differences were reliable (``inf`` for a non-finite check).
    worst_leaf: int32 index, in ``jax.tree.leaves(params)`` order, of the leaf
      with ``worst_error`` (-1 before any check).
  """

  count: jax.Array  # type: ignore[assignment]  # optax's name; shadows tuple.count
  steps_checked: jax.Array
  failures: jax.Array
  unreliable: jax.Array
  worst_error: jax.Array
  worst_leaf: jax.Array


def gradient_check(
  every_k: int = 100,
  num_directions: int = 1,
  key: jax.Array | None = None,
  rtol: float | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Checks the training gradient against finite differences every ``every_k`` steps.

  Put it first in a chain; it passes the gradient through unchanged. On steps
  ``0, every_k, 2 every_k, ...`` it draws ``num_directions`` random unit
  directions :math:`v` per floating leaf of ``params`` and compares the
  incoming gradient's :math:`\\langle g_i, v\\rangle` with extrapolated central
  differences of ``value_fn`` at ``params`` (the same estimate, uncertainty and
  verdicts as :func:`check_gradients`, in at least float32). Other steps run
  the empty branch of a ``lax.cond``.

  A check costs one evaluation of ``value_fn`` plus ``4 * num_directions`` per
  leaf, so keep ``every_k`` large for big models. They run one after the other
  (``lax.map``), not batched: the check branch's temporaries are those of one
  evaluation of ``value_fn``, and since XLA allocates them with the training
  step's on every step, a batched check would make every step, checking or
  not, heavier in memory and slower. The evaluations and the comparison with
  the gradient are two conditionals: the first reads only params and the
  batch, and runs before the rest of the chain uses the updates, so a training
  step that donates params (updating them in place) copies none of them for
  the check.

  Params narrower than float32 (bfloat16, float16): ``value_fn`` is evaluated
  at the params cast to float32, so the finite differences are not rounded to
  the params' 8 or 11 bits, and the tolerance is that of the params' dtype
  (0.2 in bfloat16, 0.1 in float16). A gradient computed in such a dtype is
  itself rounded, at times far beyond that tolerance (a bias whose sum over
  the batch cancels), so a check step also takes ``value_fn``'s gradient in
  the params' dtype and in float32 and counts their difference along each
  direction in the uncertainty: where it explains the disagreement the leaf
  is ``unreliable``, not ``mismatch``, and a wrong gradient (wrong in both)
  is still caught. That costs two backward passes and their temporaries on
  check steps; float32 params pay none of it.

  Args:
    every_k: check every this many updates (>= 1).
    num_directions: random directions per leaf (>= 1). Under
      ``optax.inject_hyperparams`` list it (and ``key``) in ``static_args``.
    key: a PRNG key; the check at step ``n`` uses ``fold_in(key, n)``. Default
      ``jax.random.PRNGKey(0)``.
    rtol: relative error allowed; default ``eps ** (1/3)`` of the params'
      dtype (5e-3 in float32).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update(grads, state,
    params, *, value_fn)`` needs ``params`` and ``value_fn(params) -> loss``,
    the loss on the current batch (the convention of optax's line searches).

  Example:
    >>> import jax, jax.numpy as jnp, optax, gradcal_jax as gc
    >>> loss = lambda p: jnp.sum(p["w"] ** 2)
    >>> params = {"w": jnp.array([1.0, -2.0, 3.0])}
    >>> tx = optax.chain(gc.gradient_check(every_k=10), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> wrong = jax.tree.map(lambda g: 0.5 * g, jax.grad(loss)(params))
    >>> _, state = tx.update(wrong, state, params, value_fn=loss)
    >>> int(gc.stats(state)["gradient_check/failures"])
    1

  References:
    Richardson, "The deferred approach to the limit" (1927).
  """
  _tree.check_int("every_k", every_k, low=1)
  if isinstance(num_directions, jax.core.Tracer):
    raise ValueError(
      "num_directions sets a shape: keep it static, e.g. "
      "optax.inject_hyperparams(gradient_check, static_args=('num_directions',))."
    )
  _tree.check_int("num_directions", num_directions, low=1)
  _tree.check_number("rtol", rtol, low=0.0, low_open=True, optional=True)
  base_key = jax.random.PRNGKey(0) if key is None else key

  def init_fn(params: Any) -> GradientCheckState:
    del params
    # One array per field: fields sharing a buffer cannot be donated.
    zero = lambda: jnp.zeros((), jnp.int32)
    return GradientCheckState(
      count=zero(),
      steps_checked=zero(),
      failures=zero(),
      unreliable=zero(),
      worst_error=jnp.zeros((), FLOAT32),
      worst_leaf=jnp.full((), -1, jnp.int32),
    )

  def update_fn(
    updates: Any,
    state: GradientCheckState,
    params: Any = None,
    *,
    value_fn: Callable[[Any], jax.Array] | None = None,
    **extra_args: Any,
  ) -> tuple[Any, GradientCheckState]:
    del extra_args
    _tree.require_params("gradient_check", params)
    if value_fn is None:
      raise ValueError(
        "gradient_check needs the loss: call update(grads, state, params, "
        "value_fn=lambda p: loss(p, batch))."
      )
    checking = state.count % every_k == 0
    leaves, treedef = jax.tree.flatten(params)
    grad_leaves = _tree.flatten_up_to(treedef, updates)
    checked = [
      i
      for i, leaf in enumerate(leaves)
      if _tree.is_float(leaf) and leaf.size and _tree.is_float(grad_leaves[i])
    ]
    if checked:
      result, updates = _check_in_step(
        checking,
        updates,
        grad_leaves,
        leaves,
        treedef,
        checked,
        value_fn,
        base_key,
        state.count,
        int(num_directions),
        rtol,
      )
    else:
      result = _no_check_result()
    new_worst = result.error > state.worst_error
    failed = result.severity >= Verdict.MISMATCH.severity
    return updates, GradientCheckState(
      count=_tree.cycle_count(state.count, every_k),
      steps_checked=_tree.count_if(state.steps_checked, checking),
      failures=_tree.count_if(state.failures, failed),
      unreliable=_tree.count_if(state.unreliable, result.severity == Verdict.UNRELIABLE.severity),
      worst_error=jnp.where(new_worst, result.error, state.worst_error),
      worst_leaf=jnp.where(new_worst, result.leaf, state.worst_leaf),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
