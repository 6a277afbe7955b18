"""Exact, weighted gradient accumulation over micro-batches: ``accumulate``."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradcal_jax import _control, _norms, _stats, _tree

FLOAT32 = jnp.float32
INT32 = jnp.int32


@_stats.register_state(
  "accumulate",
  fields=("micro_step", "inner_steps", "weight", "empty_steps", "invalid_weights", "noise_scale"),
)
class AccumulateState(NamedTuple):
  r"""State of :func:`accumulate`.

  Fields change at every micro-batch (``micro_step``, ``weight``,
  ``scaled_weight``, ``square_sum``, ``positive``, ``invalid_weights``,
  ``accumulator``), at a boundary (``inner_steps``, ``empty_steps``, the
  noise-scale moving averages and ``noise_scale``, ``inner_state``).

  Attributes:
    micro_step: int32, micro-batches accumulated since the last boundary, in
      ``[0, every_k)``; 0 right after a boundary.
    weight: float32, the total weight accumulated since the last boundary
      (``scaled_weight`` scaled back); ``inf`` once it passes float32's
      largest value (the mean stays exact: it is computed from
      ``scaled_weight``).
    scaled_weight: float32, ``weight`` times :math:`2^{-m}`, :math:`2^m` the
      smallest power of two >= ``every_k``: a sum of ``every_k`` finite
      weights that cannot overflow, from which each micro-batch's share
      :math:`w_i / W_i` is taken (exactly the share computed from
      ``weight``: the scaling is by a power of two).
    accumulator: the weighted mean of the cycle's gradients so far, shaped
      like the gradient, in ``accumulator_dtype`` (integer leaves are kept
      as they are and never read). While ``weight`` is 0 (right after a
      boundary) it still holds the last cycle's mean and is not read: the
      next micro-batch of positive weight overwrites it.
    square_sum: float32, :math:`\sum_i w_i \lVert g_i \rVert^2` over the
      cycle's micro-batches so far (for the noise scale).
    positive: int32, the cycle's micro-batches of positive weight so far.
    invalid_weights: int32, micro-batches whose traced weight was negative or
      not finite; each was ignored as if its weight were zero.
    inner_state: the inner transform's state; it changes at a boundary only.
    inner_steps: int32, how many times the inner transform has run.
    empty_steps: int32, boundaries whose total weight was zero: the inner
      transform did not run and the updates were zeros. Non-zero means the
      caller passed only zero weights over a whole cycle, an error to look at.
    noise_trace: float32 moving average of the estimated
      :math:`\operatorname{tr}\Sigma` (per unit of weight).
    noise_signal: float32 moving average of the estimated
      :math:`\lVert G \rVert^2`.
    noise_scale: float32, the simple noise scale
      :math:`B_{simple} = \mathrm{noise\_trace} / \mathrm{noise\_signal}`,
      in units of weight (examples or tokens when ``weight=`` counts them,
      micro-batches without ``weight=``); 0 before the first estimate,
      ``inf`` while the signal estimate is not positive.
  """

  # Every micro-batch: the cycle so far.
  micro_step: jax.Array
  weight: jax.Array
  scaled_weight: jax.Array
  accumulator: Any
  square_sum: jax.Array
  positive: jax.Array
  invalid_weights: jax.Array
  # At a boundary: the inner transform, and what the boundaries did.
  inner_state: Any
  inner_steps: jax.Array
  empty_steps: jax.Array
  # At a boundary: the noise-scale estimates.
  noise_trace: jax.Array
  noise_signal: jax.Array
  noise_scale: jax.Array


def _noise_estimates(
  square_sum: jax.Array, positive: jax.Array, total: jax.Array, mean_square: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  r"""Unbiased ``(tr Sigma, |G|^2, valid)`` from one cycle (McCandlish et al.
  2018, appendix A.1, for micro-batches of sizes :math:`w_i`).

  With :math:`E\lVert g_i\rVert^2 = \lVert G\rVert^2 + \operatorname{tr}
  \Sigma / w_i` and :math:`E\lVert \bar g\rVert^2 = \lVert G\rVert^2 +
  \operatorname{tr}\Sigma / W` for the weighted mean over :math:`W = \sum
  w_i`, :math:`\sum_i w_i \lVert g_i\rVert^2 - W \lVert\bar g\rVert^2`
  has expectation :math:`(k - 1) \operatorname{tr}\Sigma` over :math:`k`
  micro-batches; equal sizes give the paper's :math:`B_{small}`,
  :math:`B_{big}` estimators.
  """
  k = positive.astype(FLOAT32)
  trace = (square_sum - total * mean_square) / jnp.maximum(k - 1.0, 1.0)
  signal = mean_square - trace / jnp.where(total > 0, total, 1.0)
  valid = (positive >= 2) & jnp.isfinite(trace) & jnp.isfinite(signal)
  return trace, signal, valid


def accumulate(
  inner: optax.GradientTransformation,
  every_k: int,
  *,
  accumulator_dtype: Any = jnp.float32,
  noise_decay: float = 0.9,
  axis_name: Any = None,
  partition: Any = None,
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

  Gradient noise scale: every boundary also estimates the simple noise scale
  of McCandlish et al. (2018), :math:`B_{simple} = \operatorname{tr}\Sigma /
  \lVert G \rVert^2`, from the micro-batch gradients (their squared norms,
  taken in the pass that accumulates them, and that of their mean: no extra
  pass over the gradient), as moving averages of the two estimates with decay
  ``noise_decay`` whose ratio is ``stats(...)["accumulate/noise_scale"]``. It
  estimates the critical batch size: training at batches well below it is
  limited by gradient noise (doubling the batch nearly halves the steps
  needed), well above it is wasteful (doubling the batch barely helps). It
  is in units of ``weight`` (pass the number of examples or tokens) and needs
  at least two micro-batches of positive weight per cycle. Each estimate is
  noisy and can be negative; the averages smooth it, so read it after a few
  dozen boundaries.

  Args:
    inner: the transform to run on the accumulated gradient, e.g.
      ``optax.chain(gc.clip_by_global_norm(1.0), optax.adam(1e-3))``.
    every_k: micro-batches per inner step; an integer >= 1 (1 runs ``inner``
      on every call, with weights ignored except for the zero-weight checks).
    accumulator_dtype: dtype of the accumulation buffer (float32 by default;
      ``jnp.bfloat16`` halves its memory at some precision cost).
    noise_decay: decay of the noise-scale moving averages, in [0, 1).
    axis_name: inside ``shard_map``, the mesh axis name (or tuple of names)
      the gradient is split over. A ``weight=`` is then each device's share
      of the micro-batch (its own token count, say): the micro-batch's weight
      is their ``psum``, so every device normalises alike; each device passes
      its block of the micro-batch's gradient. The noise-scale norms are
      reduced with scalar ``psum`` calls. ``None`` outside.
    partition: with ``axis_name``, the gradient's pytree of ``PartitionSpec``
      (``shard_map``'s ``in_specs``) so that replicated leaves count once in
      the norms; ``None``: every floating leaf is split over ``axis_name``.

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
    McCandlish et al., `An Empirical Model of Large-Batch Training
    <https://arxiv.org/abs/1812.06162>`_, 2018 (the noise scale);
    optax's ``MultiSteps``; the gradient-accumulation loss-normalisation fix of
    Hugging Face transformers (`Fixing Gradient Accumulation
    <https://huggingface.co/blog/gradient_accumulation>`_, 2024).
  """
  _tree.check_int("every_k", every_k, low=1)
  _tree.check_number("noise_decay", noise_decay, low=0.0, high=1.0, high_open=True)
  _tree.check_transform("inner", inner)
  inner = optax.with_extra_args_support(inner)
  col = _tree.collective("accumulate", axis_name, partition)
  # 2**-m with 2**m >= every_k: every_k scaled weights sum below float32's
  # largest value (a weight below 1.2e-38 * 2**m then counts as zero). From
  # frexp (exact, and every_k may be traced under optax.inject_hyperparams).
  mantissa, exponent = jnp.frexp(jnp.asarray(every_k, FLOAT32))
  weight_scale = jnp.ldexp(jnp.float32(1.0), jnp.where(mantissa == 0.5, 1, 0) - exponent)

  def init_fn(params: Any) -> AccumulateState:
    # One array per field: a state whose fields share a buffer cannot be
    # donated.
    count = lambda: jnp.zeros((), INT32)
    zero = lambda: jnp.zeros((), FLOAT32)
    return AccumulateState(
      micro_step=count(),
      inner_steps=count(),
      weight=zero(),
      scaled_weight=zero(),
      empty_steps=count(),
      invalid_weights=count(),
      accumulator=_tree.map_float(lambda x: jnp.zeros_like(x, dtype=accumulator_dtype), params),
      inner_state=inner.init(params),
      square_sum=zero(),
      positive=count(),
      noise_trace=zero(),
      noise_signal=zero(),
      noise_scale=zero(),
    )

  def update_fn(
    updates: Any,
    state: AccumulateState,
    params: Any = None,
    *,
    weight: Any = None,
    **extra_args: Any,
  ) -> tuple[Any, AccumulateState]:
    shared = weight is not None and col is not None
    if weight is None:
      weight = 1.0
    else:
      _tree.check_number("weight", weight, low=0.0)
    weight = jnp.asarray(weight, FLOAT32)
    valid = jnp.isfinite(weight) & (weight >= 0)
    if shared:
      # Each device's share, summed: invalid anywhere is invalid everywhere.
      valid = _tree.over_devices(col, valid.astype(INT32), op="min") > 0
      weight = _tree.over_devices(col, jnp.where(valid, weight, 0.0))
    weight = jnp.where(valid, weight, 0.0)
    # The share of this micro-batch in the running mean, from totals scaled
    # so that they cannot overflow (3e38 + 3e38 gives shares 1 and 1/2); 0
    # skips it, so a zero-weight micro-batch never reads its (possibly NaN)
    # gradient.
    scaled = weight * weight_scale
    scaled_total = state.scaled_weight + scaled
    share = jnp.where(
      scaled_total > 0, scaled / jnp.where(scaled_total > 0, scaled_total, 1.0), 0.0
    )
    # The true total, exactly (a power of two), inf past float32's range.
    total = scaled_total / weight_scale
    boundary = state.micro_step + 1 >= every_k
    run_inner = boundary & (scaled_total > 0)

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
      lambda g, acc: add(g, acc) if _tree.is_float(g) else acc, updates, state.accumulator
    )

    def run(accumulator: Any, inner_state: Any, params: Any) -> tuple[Any, Any]:
      mean = jax.tree.map(
        lambda g, acc: acc.astype(g.dtype) if _tree.is_float(g) else g, updates, accumulator
      )
      return inner.update(mean, inner_state, params, **extra_args)

    # Between boundaries, and at a boundary with nothing accumulated, the
    # inner state is held.
    new_updates, inner_state = _control.run_or_hold(
      run_inner, run, accumulator, state.inner_state, params
    )

    # Noise scale: this micro-batch's squared norm (read with the gradient it
    # accumulates) and, at a boundary, that of the mean.
    square = _norms.total_sum_of_squares(updates, col)
    square_sum = state.square_sum + jnp.where(share > 0, weight * square, 0.0)
    positive = state.positive + (share > 0).astype(INT32)
    # XLA:CPU fuses no reduction with an elementwise output, so each norm is
    # a read of its own: the mean's is taken at a boundary only.
    means = [
      acc
      for g, acc in zip(jax.tree.leaves(updates), jax.tree.leaves(accumulator))
      if _tree.is_float(g)
    ]

    def means_square(xs: list[jax.Array]) -> jax.Array:
      if col is None:
        return _norms.total_sum_of_squares(xs)
      return _tree.sum_over_leaves(
        col,
        [_norms.sum_of_squares(x) for x in xs],
        _tree.leaf_splits(col, updates, floats_only=True),
      )

    mean_square = _control.cond(
      boundary & (positive >= 2), means_square, lambda xs: jnp.zeros((), FLOAT32), means
    )
    trace, signal, estimated = _noise_estimates(square_sum, positive, total, mean_square)
    estimated = boundary & estimated
    noise_trace = jnp.where(
      estimated, noise_decay * state.noise_trace + (1.0 - noise_decay) * trace, state.noise_trace
    )
    noise_signal = jnp.where(
      estimated, noise_decay * state.noise_signal + (1.0 - noise_decay) * signal, state.noise_signal
    )
    noise_scale = jnp.where(
      noise_signal > 0,
      noise_trace / jnp.where(noise_signal > 0, noise_signal, 1.0),
      jnp.where(noise_trace > 0, jnp.inf, 0.0),
    )
    return new_updates, AccumulateState(
      micro_step=jnp.where(boundary, 0, state.micro_step + 1).astype(INT32),
      inner_steps=_tree.count_if(state.inner_steps, run_inner),
      weight=jnp.where(boundary, 0.0, total).astype(FLOAT32),
      scaled_weight=jnp.where(boundary, 0.0, scaled_total).astype(FLOAT32),
      empty_steps=_tree.count_if(state.empty_steps, boundary & ~run_inner),
      invalid_weights=_tree.count_if(state.invalid_weights, ~valid),
      accumulator=accumulator,
      inner_state=inner_state,
      square_sum=jnp.where(boundary, 0.0, square_sum).astype(FLOAT32),
      positive=jnp.where(boundary, 0, positive).astype(INT32),
      noise_trace=noise_trace.astype(FLOAT32),
      noise_signal=noise_signal.astype(FLOAT32),
      noise_scale=noise_scale.astype(FLOAT32),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
