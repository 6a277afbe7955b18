"""Dynamic loss scaling for float16 training: ``dynamic_loss_scale`` and ``loss_scale``.

float16 keeps 10 mantissa bits over exponents down to about ``6e-8``: the
small gradients of a deep network's backward pass (``1e-8`` and below is
common) round to zero. Multiplying the loss by a large scale :math:`S` before
differentiating shifts every gradient into float16's range; the optimizer
then divides by :math:`S` in float32. Too large a scale overflows to ``inf``,
so the scale is adapted: halved on overflow, the step skipped, and grown again
after a run of good steps. JAX and optax ship no such scaler; this one follows
the dynamic scalers of Keras and DeepSpeed.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradcal_jax import _control, _stats, _tree

FLOAT32 = jnp.float32
INT32 = jnp.int32
_FLOAT32_MAX = float(jnp.finfo(jnp.float32).max)


@_stats.register_state(
  "dynamic_loss_scale", fields=("scale", "good_steps", "num_skipped", "skipped")
)
class DynamicLossScaleState(NamedTuple):
  """State of :func:`dynamic_loss_scale`.

  Attributes:
    scale: float32, the scale to multiply the *next* loss by (read it with
      :func:`loss_scale`); the last update already adapted it.
    good_steps: int32, consecutive finite steps since the scale last changed,
      in ``[0, growth_interval)``.
    num_skipped: int32, total steps skipped for a non-finite gradient
      (saturates at 2**31-1).
    skipped: int32, 1 if the last step was skipped, else 0.
    inner_state: the wrapped transform's state, untouched on skipped steps.
  """

  scale: jax.Array
  good_steps: jax.Array
  num_skipped: jax.Array
  skipped: jax.Array
  inner_state: Any


def _check_scales(initial_scale: Any, min_scale: Any, max_scale: Any) -> None:
  _tree.check_number("initial_scale", initial_scale, low=0.0, low_open=True)
  _tree.check_number("min_scale", min_scale, low=0.0, low_open=True)
  _tree.check_number("max_scale", max_scale, low=0.0, high=_FLOAT32_MAX, low_open=True)
  values = (initial_scale, min_scale, max_scale)
  if not all(v is not None and _tree.is_concrete(v) for v in values):
    return
  low, high = float(min_scale), float(max_scale)
  if low > high:
    raise ValueError(
      "min_scale must not exceed max_scale, got "
      f"min_scale={min_scale!r} and max_scale={max_scale!r}."
    )
  if not low <= float(initial_scale) <= high:
    raise ValueError(
      f"initial_scale must be in [min_scale, max_scale] = [{low}, {high}], got {initial_scale!r}."
    )


def dynamic_loss_scale(
  inner: optax.GradientTransformation,
  *,
  initial_scale: float = 2.0**15,
  growth_interval: int = 2000,
  growth_factor: float = 2.0,
  backoff_factor: float = 0.5,
  min_scale: float = 1.0,
  max_scale: float = 2.0**24,
  axis_name: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Dynamic loss scaling around ``inner``, for float16 training.

  The loss function multiplies the loss by the current scale :math:`S`
  (``gc.loss_scale(opt_state)``), so ``update`` receives
  :math:`\tilde g = \nabla (S \cdot L)`. It unscales in float32,

  .. math::
    g = \tilde g / S,

  returned in each leaf's own dtype. If any entry of :math:`g` is NaN or
  infinite (an overflow of the scaled backward pass, or of the unscaling), the
  step is skipped: the updates are zeros, ``inner`` does not run (it sits in a
  ``lax.cond``, so its state is left exactly as it was), and

  .. math::
    S \leftarrow \max(S \cdot \beta_{\mathrm{backoff}}, S_{\min}),
    \qquad n_{\mathrm{good}} \leftarrow 0.

  Otherwise ``inner`` runs on :math:`g`, :math:`n_{\mathrm{good}}` grows by
  one, and after ``growth_interval`` consecutive good steps
  :math:`S \leftarrow \min(S \cdot \gamma, S_{\max})` and
  :math:`n_{\mathrm{good}} \leftarrow 0`. These are the semantics of Keras'
  ``LossScaleOptimizer`` and DeepSpeed's ``DynamicLossScaler`` (without its
  hysteresis). Keyword arguments of ``update`` (``loss=``, ``value_fn=``,
  ``weight=``) go to ``inner`` unchanged: give them the *unscaled* loss.

  Place it outermost, around everything that reads gradient magnitudes
  (``optax.chain(gc.monitor(), gc.zclip(), optax.adam(...))``): they then see
  unscaled gradients, and a scale change never looks like a spike. Around
  gradient accumulation, put it inside: ``gc.accumulate(dynamic_loss_scale(
  inner), every_k)`` averages the scaled micro-batch gradients (the scale
  only changes at a boundary), and a non-finite micro-batch makes the mean
  non-finite, so the whole boundary step is skipped and the scale backs off.

  Keep the params (and so the gradients) in float32 and compute in float16
  inside the model: the unscaled gradient keeps its dtype, and a float16
  gradient divided by :math:`S` underflows again. Compute the loss itself in
  float32 before scaling (``2 * 32768`` is already past float16's 65504).

  The finiteness test is one reduction over the gradient, fused with the
  unscaling it checks; under sharding it communicates one scalar per leaf.

  Args:
    inner: the transform to run on unscaled gradients, e.g. ``optax.adam(1e-3)``.
    initial_scale: the first scale, in ``[min_scale, max_scale]``; > 0.
    growth_interval: consecutive finite steps before the scale grows; an
      integer >= 1.
    growth_factor: what the scale is multiplied by when it grows; > 1.
    backoff_factor: what the scale is multiplied by on overflow, in (0, 1).
    min_scale: the scale never drops below this; > 0.
    max_scale: the scale never grows above this; in ``[min_scale, 3.4e38]``.
    axis_name: inside ``shard_map``, the mesh axis name (or tuple of names)
      the gradient is split over: the finiteness flag is reduced over it
      (one scalar ``pmin``), so every device skips the same steps and the
      scale stays the same everywhere. ``None`` outside.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`DynamicLossScaleState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, gradcal_jax as gc
    >>> tx = gc.dynamic_loss_scale(optax.sgd(1.0), initial_scale=8.0,
    ...                            growth_interval=2)
    >>> params = {"w": jnp.ones(2)}
    >>> state = tx.init(params)
    >>> loss = lambda p: jnp.sum(p["w"] ** 2)
    >>> scaled_grads = jax.grad(lambda p: gc.loss_scale(state) * loss(p))(params)
    >>> updates, state = tx.update(scaled_grads, state)
    >>> updates["w"].tolist(), float(gc.loss_scale(state))
    ([-2.0, -2.0], 8.0)
    >>> updates, state = tx.update({"w": jnp.array([jnp.inf, 0.0])}, state)
    >>> updates["w"].tolist(), float(gc.loss_scale(state)), int(state.num_skipped)
    ([0.0, 0.0], 4.0, 1)

  References:
    Micikevicius et al., `Mixed Precision Training
    <https://arxiv.org/abs/1710.03740>`_, ICLR 2018; Keras'
    ``keras.optimizers.LossScaleOptimizer``; DeepSpeed's
    ``deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler``.
  """
  _check_scales(initial_scale, min_scale, max_scale)
  _tree.check_int("growth_interval", growth_interval, low=1)
  _tree.check_number("growth_factor", growth_factor, low=1.0, low_open=True)
  _tree.check_number(
    "backoff_factor", backoff_factor, low=0.0, high=1.0, low_open=True, high_open=True
  )
  _tree.check_transform("inner", inner)
  inner = optax.with_extra_args_support(inner)
  col = _tree.collective("dynamic_loss_scale", axis_name)
  # Below a scale of 1, unscaling can overflow a finite entry.
  may_shrink = not (_tree.is_concrete(min_scale) and float(min_scale) >= 1.0)

  def init_fn(params: Any) -> DynamicLossScaleState:
    return DynamicLossScaleState(
      scale=jnp.asarray(initial_scale, FLOAT32),
      good_steps=jnp.zeros((), INT32),
      num_skipped=jnp.zeros((), INT32),
      skipped=jnp.zeros((), INT32),
      inner_state=inner.init(params),
    )

  def update_fn(
    updates: Any, state: DynamicLossScaleState, params: Any = None, **extra_args: Any
  ) -> tuple[Any, DynamicLossScaleState]:
    scale = state.scale

    def unscale_leaf(g: jax.Array, dtype: Any) -> jax.Array:
      return (g.astype(FLOAT32) * (1.0 / scale)).astype(dtype)

    def unscale(tree: Any) -> Any:
      return _tree.map_float(lambda g: unscale_leaf(g, g.dtype), tree)

    # The scaled gradient goes into the cond and is unscaled inside, where
    # the multiplication fuses into inner's first reads. The check reads the
    # scaled gradient itself: with S >= 1 unscaling only shrinks entries, so
    # they are finite together. A broadcast of the scale in the check is
    # shared by same-shaped leaves and written out in full (measured).
    finite = _tree.all_finite(updates)
    if may_shrink:
      # NaNs are caught above (a max may drop them on XLA:CPU).
      finite = finite & _tree.all_finite(
        _tree.map_float(lambda g: unscale_leaf(jnp.max(jnp.abs(g), initial=0), g.dtype), updates)
      )
    if col is not None:
      finite = _tree.over_devices(col, finite.astype(INT32), op="min") > 0
    new_updates, inner_state = _control.run_or_hold(
      finite,
      lambda u, s, p: inner.update(unscale(u), s, p, **extra_args),
      updates,
      state.inner_state,
      params,
    )

    good_steps = jnp.where(finite, state.good_steps + 1, 0)
    grow = good_steps >= growth_interval
    grown = jnp.where(grow, jnp.minimum(scale * growth_factor, max_scale), scale)
    backed_off = jnp.maximum(scale * backoff_factor, min_scale)
    return new_updates, DynamicLossScaleState(
      scale=jnp.where(finite, grown, backed_off).astype(FLOAT32),
      good_steps=jnp.where(grow, 0, good_steps).astype(INT32),
      num_skipped=_tree.count_if(state.num_skipped, ~finite),
      skipped=(~finite).astype(INT32),
      inner_state=inner_state,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def loss_scale(opt_state: Any) -> jax.Array:
  """The current scale of the :func:`dynamic_loss_scale` inside ``opt_state``.

  Finds the state anywhere in a nested optax state (``optax.chain``,
  ``accumulate``, ``inject_hyperparams``, a Flax ``nnx.Optimizer``'s
  ``opt_state``); multiply the loss by it before differentiating.

  Args:
    opt_state: an optimizer state holding exactly one dynamic loss scale.

  Returns:
    The float32 scalar scale (a traced value under ``jax.jit``).

  Raises:
    ValueError: when ``opt_state`` holds no dynamic loss scale, or several.

  Example:
    >>> import optax, jax.numpy as jnp, gradcal_jax as gc
    >>> tx = optax.chain(gc.clip_by_global_norm(1.0),
    ...                  gc.dynamic_loss_scale(optax.adam(1e-3)))
    >>> float(gc.loss_scale(tx.init({"w": jnp.zeros(3)})))
    32768.0
  """
  found = [
    state
    for _, _, state in _stats.named_states(opt_state)
    if isinstance(state, DynamicLossScaleState)
  ]
  if len(found) != 1:
    raise ValueError(
      f"loss_scale needs an optimizer state holding exactly one "
      f"gc.dynamic_loss_scale(...) state, found {len(found)}: build the "
      f"optimizer with gc.dynamic_loss_scale(inner) and pass its state."
    )
  return found[0].scale
