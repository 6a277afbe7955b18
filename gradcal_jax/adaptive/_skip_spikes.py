"""skip_spikes: skip a step whose gradient norm (or loss) is a spike or non-finite."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradcal_jax import _control, _norms, _stats, _tree
from gradcal_jax.adaptive._ring import filled, record

FLOAT32 = jnp.float32
INT32 = jnp.int32


@_stats.register_state(
  "skip_spikes", fields=("norm", "threshold", "num_skipped", "num_nonfinite", "skipped")
)
class SkipSpikesState(NamedTuple):
  """State of :func:`skip_spikes`.

  Attributes:
    inner_state: the wrapped transform's state, untouched on skipped steps.
    norms: float32 ring buffer of the last ``window`` accepted global norms.
    norm_count: int32, how many norms were accepted; from 2**31-1 on it stays
      within ``window`` of it (never negative) and the ring keeps turning.
    losses: float32 ring buffer of the last ``window`` accepted losses.
    loss_count: int32, how many losses were accepted (cycles near 2**31-1
      as ``norm_count`` does).
    norm: float32 global norm of the last gradient.
    threshold: float32 ``mean + sigma * std`` of the norm buffer at the last
      step (it only skips once ``min_history`` norms were accepted).
    skipped: int32, 1 if the last step was skipped, else 0.
    num_skipped: int32, total skipped steps.
    num_nonfinite: int32, steps skipped for a non-finite gradient norm or loss.
  """

  # On accepted steps: the wrapped transform and the history.
  inner_state: Any
  norms: jax.Array
  norm_count: jax.Array
  losses: jax.Array
  loss_count: jax.Array
  # Every step: what the last step measured and decided.
  norm: jax.Array
  threshold: jax.Array
  skipped: jax.Array
  # On skipped steps: the running totals.
  num_skipped: jax.Array
  num_nonfinite: jax.Array


def _threshold(buffer: jax.Array, count: jax.Array, sigma: float) -> jax.Array:
  """``mean + sigma * std`` (population std) of the filled ring entries."""
  valid, n = filled(buffer, count)
  n = jnp.maximum(n, 1).astype(FLOAT32)
  mean = jnp.sum(jnp.where(valid, buffer, 0.0)) / n
  variance = jnp.sum(jnp.where(valid, (buffer - mean) ** 2, 0.0)) / n
  return mean + sigma * _norms.safe_sqrt(variance)


class SkipDecision(NamedTuple):
  """What :func:`skip_spikes` decided about a step before ``inner`` runs.

  Attributes:
    skip: bool, the step is skipped (a spike, or a non-finite norm or loss).
    nonfinite: bool, the norm or the loss is not finite.
    norm: float32 global norm of the gradient the step judged.
    threshold: float32 spike threshold of the norm buffer (``_threshold``).
    loss: the float32 loss (averaged over devices inside ``shard_map``), or
      ``None`` when ``update`` was given none.
  """

  skip: jax.Array
  nonfinite: jax.Array
  norm: jax.Array
  threshold: jax.Array
  loss: jax.Array | None


def judge_step(
  state: SkipSpikesState,
  norm: jax.Array,
  loss: Any,
  *,
  sigma: float,
  min_history: int,
  col: _tree.Collective | None,
) -> SkipDecision:
  """Whether :func:`skip_spikes` skips a step of gradient norm ``norm`` (and
  loss ``loss``, or ``None``), judged against the buffers in ``state``.
  Shared with :func:`gradcal_jax.guard`, which measures the norm itself."""
  threshold = _threshold(state.norms, state.norm_count, sigma)
  nonfinite = ~jnp.isfinite(norm)
  spike = (state.norm_count >= min_history) & (norm > threshold)
  if loss is not None:
    loss = jnp.asarray(loss, FLOAT32)
    if loss.shape != ():
      raise ValueError(
        f"skip_spikes: loss= must be a scalar (the mean loss of the batch), got shape "
        f"{loss.shape}; reduce it first, e.g. loss=jnp.mean(per_example_losses)."
      )
    loss = _tree.over_devices(col, loss, op="mean")
    loss_threshold = _threshold(state.losses, state.loss_count, sigma)
    nonfinite = nonfinite | ~jnp.isfinite(loss)
    spike = spike | ((state.loss_count >= min_history) & (loss > loss_threshold))
  return SkipDecision(nonfinite | spike, nonfinite, norm, threshold, loss)


def advance(state: SkipSpikesState, decision: SkipDecision, inner_state: Any) -> SkipSpikesState:
  """The :class:`SkipSpikesState` after a step judged ``decision``: an accepted
  norm (and loss) enters its ring buffer, the counts move, ``inner_state`` is
  the wrapped transform's (held on a skipped step)."""
  accept = ~decision.skip
  norms, norm_count = record(state.norms, state.norm_count, decision.norm, accept)
  losses, loss_count = state.losses, state.loss_count
  if decision.loss is not None:
    losses, loss_count = record(losses, loss_count, decision.loss, accept)
  return SkipSpikesState(
    inner_state=inner_state,
    norms=norms,
    norm_count=norm_count,
    losses=losses,
    loss_count=loss_count,
    norm=decision.norm,
    threshold=decision.threshold,
    num_skipped=_tree.count_if(state.num_skipped, decision.skip),
    num_nonfinite=_tree.count_if(state.num_nonfinite, decision.nonfinite),
    skipped=decision.skip.astype(INT32),
  )


def skip_spikes(
  inner: optax.GradientTransformation,
  sigma: float = 6.0,
  window: int = 128,
  min_history: int = 64,
  *,
  axis_name: Any = None,
  partition: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Skips steps whose gradient norm (or loss) is a spike or non-finite.

  Keeps the last ``window`` accepted global gradient norms. Once at least
  ``min_history`` were accepted, a step whose norm :math:`g` satisfies

  .. math::
    g > \bar g + \sigma \cdot \mathrm{std}(g)

  over that buffer (the current norm excluded, population std) is skipped, as
  is any step whose norm is not finite. A skipped step returns zero updates,
  leaves ``inner``'s state exactly as it was (``inner`` does not run: it sits
  in a ``lax.cond``) and does not enter the buffer. With ``loss=`` given to
  ``update``, the scalar loss is checked the same way against a buffer of its
  own. Other keyword arguments are passed on to ``inner``.

  Args:
    inner: the transform to guard, for example ``optax.adam(1e-3)``.
    sigma: how many standard deviations above the mean is a spike; > 0.
    window: length of the history buffers; an integer >= 1.
    min_history: accepted steps needed before spikes are skipped, in
      [1, window]. Non-finite steps are always skipped.
    axis_name: inside ``shard_map``, the mesh axis name (or tuple of names)
      the gradient is split over: statistics are reduced over it with scalar
      ``psum`` calls, so the result equals the jit/SPMD one. ``None`` outside.
    partition: with ``axis_name``, the gradient's pytree of ``PartitionSpec``
      (``shard_map``'s ``in_specs``) so that replicated leaves count once;
      ``None``: every floating leaf is split over ``axis_name``.
      Inside ``shard_map`` a ``loss=`` that differs between devices is
      averaged over the axes it varies on (per-device losses of equal
      batches become the global one); a global loss stays as it is.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`SkipSpikesState`; its ``update`` takes an optional ``loss=``.

  Example:
    >>> import jax.numpy as jnp, optax, gradcal_jax as gc
    >>> tx = gc.skip_spikes(optax.sgd(1.0), window=4, min_history=2)
    >>> state = tx.init({"w": jnp.zeros(1)})
    >>> for g in (1.0, 1.1, 0.9, 100.0, jnp.nan):
    ...   updates, state = tx.update({"w": jnp.array([g])}, state)
    >>> int(state.num_skipped), int(state.num_nonfinite), updates["w"].tolist()
    (2, 1, [0.0])

  References:
    Groeneveld et al., `OLMo: Accelerating the Science of Language Models
    <https://arxiv.org/abs/2402.00838>`_ (OLMo-core's ``SkipStepOptimizer``);
    Levanter's skip-step optimizer (https://github.com/stanford-crfm/levanter).
  """
  _tree.check_number("sigma", sigma, low=0.0, low_open=True)
  _tree.check_int("window", window, low=1)
  _tree.check_int("min_history", min_history, low=1)
  _tree.check_number("min_history", min_history, low=1, high=window)
  _tree.check_transform("inner", inner)
  inner = optax.with_extra_args_support(inner)
  col = _tree.collective("skip_spikes", axis_name, partition)

  def init_fn(params: Any) -> SkipSpikesState:
    # One array per field: fields sharing a buffer cannot be donated.
    zero = lambda: jnp.zeros((), FLOAT32)
    count = lambda: jnp.zeros((), INT32)
    return SkipSpikesState(
      inner_state=inner.init(params),
      norms=jnp.zeros((window,), FLOAT32),
      norm_count=count(),
      losses=jnp.zeros((window,), FLOAT32),
      loss_count=count(),
      norm=zero(),
      threshold=zero(),
      num_skipped=count(),
      num_nonfinite=count(),
      skipped=count(),
    )

  def update_fn(
    updates: Any, state: SkipSpikesState, params: Any = None, **extra_args: Any
  ) -> tuple[Any, SkipSpikesState]:
    loss = extra_args.pop("loss", None)
    decision = judge_step(
      state, _norms.global_norm(updates, col), loss, sigma=sigma, min_history=min_history, col=col
    )
    new_updates, inner_state = _control.run_or_hold(
      ~decision.skip,
      lambda u, s, p: inner.update(u, s, p, **extra_args),
      updates,
      state.inner_state,
      params,
    )
    return new_updates, advance(state, decision, inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
