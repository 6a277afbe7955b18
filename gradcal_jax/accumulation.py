"""Exact, weighted gradient accumulation over micro-batches: ``accumulate``."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradcal_jax import _stats, _tree

FLOAT32 = jnp.float32
INT32 = jnp.int32


@_stats.register_state(
    "accumulate",
    fields=("micro_step", "inner_steps", "weight", "empty_steps",
            "invalid_weights"))
class AccumulateState(NamedTuple):
  """State of :func:`accumulate`.

  Attributes:
    micro_step: int32, micro-batches accumulated since the last boundary, in
      ``[0, every_k)``; 0 right after a boundary.
    inner_steps: int32, how many times the inner transform has run.
    weight: float32, the total weight accumulated since the last boundary.
    empty_steps: int32, boundaries whose total weight was zero: the inner
      transform did not run and the updates were zeros. Non-zero means the
      caller passed only zero weights over a whole cycle, an error to look at.
    invalid_weights: int32, micro-batches whose traced weight was negative or
      not finite; each was ignored as if its weight were zero.
    accumulator: the weighted mean of the cycle's gradients so far, shaped
      like the gradient, in ``accumulator_dtype`` (integer leaves are kept
      as they are and never read). While ``weight`` is 0 (right after a
      boundary) it still holds the last cycle's mean and is not read: the
      next micro-batch of positive weight overwrites it.
    inner_state: the inner transform's state.
  """
  micro_step: jax.Array
  inner_steps: jax.Array
  weight: jax.Array
  empty_steps: jax.Array
  invalid_weights: jax.Array
  accumulator: Any
  inner_state: Any


def accumulate(
    inner: optax.GradientTransformation,
    every_k: int,
    *,
    accumulator_dtype: Any = jnp.float32,
) -> optax.GradientTransformationExtraArgs:
  r"""Accumulates ``every_k`` weighted micro-batch gradients, then runs ``inner``.

  Call ``update`` once per micro-batch :math:`i` with its gradient
  :math:`g_i` and, optionally, its weight :math:`w_i \ge 0` (a scalar, usually
  the micro-batch's number of tokens or examples). On every ``every_k``-th call
  the inner transform receives

  .. math::
    \bar g = \frac{\sum_i w_i g_i}{\sum_i w_i}

  (the plain mean when no ``weight`` is given: every :math:`w_i = 1`) and its
  updates are returned; the other calls return zeros in each leaf's dtype and
  leave the inner state untouched. With :math:`g_i` the gradient of the mean
  loss over the :math:`n_i` tokens of micro-batch :math:`i` and ``weight=n_i``,
  :math:`\bar g` is exactly the gradient of the mean loss over all tokens, even
  when micro-batches differ in size; ``optax.MultiSteps`` averages micro-batches
  equally and so over-weights the tokens of small ones.

  The inner transform sits in a ``lax.cond``: it runs only on the boundary
  call, so its cost is paid once per ``every_k`` calls (``optax.MultiSteps``
  runs it on every call and discards the result). Extra keyword arguments of
  ``update`` are passed to it on that call. A single buffer holds the running
  weighted mean, :math:`a \leftarrow a + \frac{w_i}{W_i}(g_i - a)` with
  :math:`W_i = \sum_{j \le i} w_j`, so it stays on the gradient's scale whatever
  the weights.

  Weights: a concrete negative or non-finite weight raises ``ValueError``. A
  traced one (under ``jax.jit``) cannot be checked when called: a negative or
  non-finite traced weight is treated as zero and counted in the state's
  ``invalid_weights``. A micro-batch of weight zero is ignored entirely (its
  gradient is not read, so the NaN gradient of an all-padding micro-batch does
  no harm). A boundary whose total weight is zero emits zero updates, does not
  run the inner transform and increments ``empty_steps``: never NaN.

  Args:
    inner: the transform to run on the accumulated gradient, e.g.
      ``optax.chain(gc.clip_by_global_norm(1.0), optax.adam(1e-3))``.
    every_k: micro-batches per inner step; an integer >= 1 (1 runs ``inner``
      on every call, with weights ignored except for the zero-weight checks).
    accumulator_dtype: dtype of the accumulation buffer (float32 by default;
      ``jnp.bfloat16`` halves its memory at some precision cost).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`AccumulateState`; its ``update`` is
    ``update(grads, state, params=None, *, weight=None, **extra)``.

  Example:
    >>> import jax.numpy as jnp, optax, gradcal_jax as gc
    >>> tx = gc.accumulate(optax.sgd(1.0), every_k=2)
    >>> state = tx.init({"w": jnp.zeros(1)})
    >>> u, state = tx.update({"w": jnp.array([1.0])}, state, weight=3.0)
    >>> u["w"].tolist()
    [0.0]
    >>> u, state = tx.update({"w": jnp.array([5.0])}, state, weight=1.0)
    >>> u["w"].tolist(), int(state.inner_steps)
    ([-2.0], 1)

  References:
    optax's ``MultiSteps``; the gradient-accumulation loss-normalisation fix of
    Hugging Face transformers (`Fixing Gradient Accumulation
    <https://huggingface.co/blog/gradient_accumulation>`_, 2024).
  """
  _tree.check_int("every_k", every_k, low=1)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params: Any) -> AccumulateState:
    count = jnp.zeros((), INT32)
    return AccumulateState(
        micro_step=count, inner_steps=count, weight=jnp.zeros((), FLOAT32),
        empty_steps=count, invalid_weights=count,
        accumulator=_tree.map_float(
            lambda x: jnp.zeros(x.shape, accumulator_dtype), params),
        inner_state=inner.init(params))

  def update_fn(updates: Any, state: AccumulateState, params: Any = None, *,
                weight: Any = None, **extra_args: Any
                ) -> tuple[Any, AccumulateState]:
    if weight is None:
      weight = 1.0
    else:
      _tree.check_number("weight", weight, low=0.0)
    weight = jnp.asarray(weight, FLOAT32)
    valid = jnp.isfinite(weight) & (weight >= 0)
    weight = jnp.where(valid, weight, 0.0)
    total = state.weight + weight
    # The share of this micro-batch in the running mean; 0 skips it, so a
    # zero-weight micro-batch never reads its (possibly NaN) gradient.
    share = jnp.where(total > 0, weight / jnp.where(total > 0, total, 1.0), 0.0)
    boundary = state.micro_step + 1 >= every_k
    run_inner = boundary & (total > 0)

    def add(g, acc):
      # The running mean including this micro-batch. The first micro-batch of
      # a cycle (share 1) overwrites whatever the buffer still holds from the
      # last one, so the buffer is never reset to zeros at a boundary.
      g32, acc32 = g.astype(FLOAT32), acc.astype(FLOAT32)
      new = jnp.where(share > 0, acc32 + share * (g32 - acc32), acc32)
      return jnp.where(share >= 1, g32, new).astype(acc.dtype)

    # Always written: between boundaries it is the new state, at a boundary
    # it is the mean handed to `inner` (read once per fusion, instead of the
    # gradient and the old buffer both).
    accumulator = jax.tree.map(
        lambda g, acc: add(g, acc) if _tree.is_float(g) else acc,
        updates, state.accumulator)

    def run(accumulator: Any, inner_state: Any, params: Any) -> tuple[Any, Any]:
      mean = jax.tree.map(
          lambda g, acc: acc.astype(g.dtype) if _tree.is_float(g) else g,
          updates, accumulator)
      return inner.update(mean, inner_state, params, **extra_args)

    # Between boundaries, and at a boundary with nothing accumulated, the
    # inner state is held.
    new_updates, inner_state = _tree.run_or_hold(
        run_inner, run, accumulator, state.inner_state, params)
    return new_updates, AccumulateState(
        micro_step=jnp.where(boundary, 0, state.micro_step + 1).astype(INT32),
        inner_steps=jnp.where(run_inner, optax.safe_increment(state.inner_steps),
                              state.inner_steps),
        weight=jnp.where(boundary, 0.0, total).astype(FLOAT32),
        empty_steps=jnp.where(boundary & ~run_inner,
                              optax.safe_increment(state.empty_steps),
                              state.empty_steps),
        invalid_weights=jnp.where(valid, state.invalid_weights,
                                  optax.safe_increment(state.invalid_weights)),
        accumulator=accumulator,
        inner_state=inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
