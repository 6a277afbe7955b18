"""Loss-spike methods of large-model training: AdaGC, SPAM and update-RMS clipping.

Each bounds what one bad gradient can do to the optimizer: AdaGC clips every
tensor against the history of its own clipped norms, SPAM clips single
entries against Adam's second moment and resets the moments periodically,
and update-RMS clipping (StableAdamW) scales a tensor's step down when its
gradient is large against the second moment that normalizes it. Every norm
and moment is float32 whatever the gradient's dtype, and a non-finite entry
is never clipped into a plausible value: it stays visible in the output.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradcal_jax import _norms, _stats, _tree

FLOAT32 = jnp.float32
INT32 = jnp.int32


def _whole(col: _tree.Collective | None, tree: Any, values: Any) -> Any:
  """Per-leaf block scalars (a tree like ``tree``) summed over the devices
  that hold each leaf's blocks inside ``shard_map``; ``values`` outside."""
  if col is None:
    return values
  flat, treedef = jax.tree.flatten(values)
  return jax.tree.unflatten(treedef, _tree.per_leaf(col, flat, _tree.leaf_splits(col, tree)))


def _sizes(col: _tree.Collective | None, tree: Any) -> list[int]:
  """Each leaf's number of entries (of the whole leaf inside ``shard_map``)."""
  leaves = jax.tree.leaves(tree)
  if col is None:
    return [int(x.size) for x in leaves]
  return [
    int(x.size) * math.prod(jax.lax.axis_size(a) for a in split.axes)
    for x, split in zip(leaves, _tree.leaf_splits(col, tree))
  ]


def _num_scaled(scales: Any, updates: Any) -> jax.Array:
  """int32: how many floating leaves of ``updates`` have a scale below 1."""
  return sum(
    (
      (s < 1.0).astype(INT32)
      for s, x in zip(jax.tree.leaves(scales), jax.tree.leaves(updates))
      if _tree.is_float(x)
    ),
    jnp.zeros((), INT32),
  )


# ------------------------------------------------------------------- AdaGC


@_stats.register_state("adagc", fields=("norm", "num_clipped"))
class AdaGCState(NamedTuple):
  """State of :func:`adagc`.

  Attributes:
    gamma: a pytree shaped like the gradient of float32 scalars, each
      tensor's threshold base :math:`\\gamma_i` (``+inf`` before its first
      finite norm).
    count: int32, updates seen (saturates at 2**31-1).
    norm: float32 global L2 norm of the last gradient, before clipping.
    num_clipped: int32, tensors scaled down at the last update.
  """

  gamma: Any
  count: jax.Array  # type: ignore[assignment]  # optax's name; shadows tuple.count
  norm: jax.Array
  num_clipped: jax.Array


def adagc(
  lambda_abs: float = 1.0,
  lambda_rel: float = 1.05,
  beta: float = 0.98,
  warmup_steps: int = 100,
  *,
  axis_name: Any = None,
  partition: Any = None,
) -> optax.GradientTransformation:
  r"""Adaptive per-tensor gradient clipping against an EMA of clipped norms (AdaGC).

  During the first ``warmup_steps`` updates the whole gradient is clipped to
  the global norm :math:`\lambda_{abs}` and each tensor's :math:`\gamma_i`
  tracks the running minimum of its clipped norm; afterwards each tensor is
  clipped against its own history:

  .. math::
    h_i = \begin{cases}
      \min\left(1, \lambda_{abs} / \lVert g \rVert\right) & \text{warm-up} \\
      \min\left(1, \lambda_{rel}\,\gamma_i / \lVert g_i \rVert\right)
        & \text{after}
    \end{cases}, \qquad \hat g_i = h_i\, g_i, \\
    \gamma_i \leftarrow \begin{cases}
      \min(\gamma_i, \lVert \hat g_i \rVert) & \text{warm-up} \\
      \beta\,\gamma_i + (1 - \beta) \lVert \hat g_i \rVert & \text{after}
    \end{cases}

  with :math:`\gamma_i = +\infty` before the first update. The paper's
  defaults: :math:`\lambda_{abs} = 1`, :math:`\lambda_{rel} = 1.05`,
  :math:`\beta = 0.98`, 100 warm-up steps. It is optimizer-agnostic: chain it
  before ``optax.adamw``. A tensor with a non-finite norm is left unscaled
  and its :math:`\gamma_i` unchanged. As in the paper, a tensor whose
  gradient is exactly zero at some warm-up step gets :math:`\gamma_i = 0`
  and every later gradient of it is clipped to zero.

  Args:
    lambda_abs: the global norm bound during warm-up; >= 0.
    lambda_rel: the relative bound, a multiple of :math:`\gamma_i`; >= 0.
    beta: EMA decay of :math:`\gamma_i`, in [0, 1).
    warmup_steps: updates clipped globally before per-tensor clipping
      starts; an integer >= 1 (the first update sets every :math:`\gamma_i`).

    axis_name: inside ``shard_map``, the mesh axis name (or tuple of names)
      the gradient is split over: statistics are reduced over it with scalar
      ``psum`` calls, so the result equals the jit/SPMD one. ``None`` outside.
    partition: with ``axis_name``, the gradient's pytree of ``PartitionSpec``
      (``shard_map``'s ``in_specs``) so that replicated leaves count once;
      ``None``: every floating leaf is split over ``axis_name``.

  Returns:
    An ``optax.GradientTransformation`` whose state is an :class:`AdaGCState`.

  Example:
    >>> import jax.numpy as jnp, gradcal_jax as gc
    >>> tx = gc.adagc(warmup_steps=1)
    >>> state = tx.init({"a": jnp.zeros(2), "b": jnp.zeros(1)})
    >>> for g in (0.5, 0.5, 5.0):
    ...   u, state = tx.update({"a": jnp.array([g, 0.0]), "b": jnp.array([0.1])}, state)
    >>> u["a"].tolist(), int(state.num_clipped)
    ([0.5249999761581421, 0.0], 1)

  References:
    Wang et al., `AdaGC: Enhancing LLM Pretraining Stability via Adaptive
    Gradient Clipping <https://arxiv.org/abs/2502.11034>`_, 2025.
  """
  _tree.check_number("lambda_abs", lambda_abs, low=0.0)
  _tree.check_number("lambda_rel", lambda_rel, low=0.0)
  _tree.check_number("beta", beta, low=0.0, high=1.0, high_open=True)
  _tree.check_int("warmup_steps", warmup_steps, low=1)

  col = _tree.collective("adagc", axis_name, partition)

  def init_fn(params: Any) -> AdaGCState:
    return AdaGCState(
      gamma=jax.tree.map(lambda _: jnp.full((), jnp.inf, FLOAT32), params),
      count=jnp.zeros((), INT32),
      norm=jnp.zeros((), FLOAT32),
      num_clipped=jnp.zeros((), INT32),
    )

  def update_fn(updates: Any, state: AdaGCState, params: Any = None) -> tuple[Any, AdaGCState]:
    del params
    norms = _norms.leaf_norms(updates, col)
    norm = _norms.combine_norms(jax.tree.leaves(norms))
    warm = state.count < warmup_steps
    global_scale = _tree.clip_scale(norm, lambda_abs)

    def leaf_scale(n: jax.Array, gamma: jax.Array) -> jax.Array:
      return jnp.where(warm, global_scale, _tree.clip_scale(n, lambda_rel * gamma))

    scales = jax.tree.map(leaf_scale, norms, state.gamma)

    def new_gamma(n: jax.Array, scale: jax.Array, gamma: jax.Array) -> jax.Array:
      clipped = scale * n
      moved = jnp.where(warm, jnp.minimum(gamma, clipped), beta * gamma + (1.0 - beta) * clipped)
      return jnp.where(jnp.isfinite(clipped), moved, gamma).astype(FLOAT32)

    return _tree.map_float(_tree.scale_leaf, updates, scales), AdaGCState(
      gamma=jax.tree.map(new_gamma, norms, scales, state.gamma),
      count=optax.safe_increment(state.count),
      norm=norm,
      num_clipped=_num_scaled(scales, updates),
    )

  return optax.GradientTransformation(init_fn, update_fn)


# -------------------------------------------------------------------- SPAM


@_stats.register_state("spam", fields=("num_clipped", "warmup_factor"))
class SpamState(NamedTuple):
  """State of :func:`spam`.

  Attributes:
    count: int32, updates seen; it sets the bias correction and is never
      reset. From 2**31-1 on it stays within ``interval`` of it (never
      negative), so the resets keep their period.
    mu: float32 first moment, shaped like the gradient (integer leaves kept
      as they are).
    nu: float32 second moment, likewise.
    num_clipped: int32, entries clipped as spikes at the last update
      (non-finite entries are never clipped, so never counted).
    warmup_factor: float32, the learning-rate factor of the last update
      (below 1 during the cosine warm-up after a reset).
  """

  count: jax.Array  # type: ignore[assignment]  # optax's name; shadows tuple.count
  mu: Any
  nu: Any
  num_clipped: jax.Array
  warmup_factor: jax.Array


def _spam_core(
  learning_rate: optax.ScalarOrSchedule,
  b1: float,
  b2: float,
  eps: float,
  theta: float,
  interval: int,
  warmup_steps: int,
  clip_delay: int,
  weight_decay: float,
  col: _tree.Collective | None,
) -> optax.GradientTransformation:
  """SPAM's whole step: Adam with its clipping, resets and warm-up, decay."""
  decays = not (_tree.is_concrete(weight_decay) and float(weight_decay) == 0.0)

  def init_fn(params: Any) -> SpamState:
    def zeros(x: jax.Array) -> jax.Array:
      # Shaped and sharded like the param (jnp.zeros(x.shape) would sit on
      # one device), as optax.adam's moments are.
      return jnp.zeros_like(x, dtype=FLOAT32)

    return SpamState(
      count=jnp.zeros((), INT32),
      mu=_tree.map_float(zeros, params),
      nu=_tree.map_float(zeros, params),
      num_clipped=jnp.zeros((), INT32),
      warmup_factor=jnp.ones((), FLOAT32),
    )

  def update_fn(updates: Any, state: SpamState, params: Any = None) -> tuple[Any, SpamState]:
    if decays:
      _tree.require_params("spam with weight_decay", params)
    # Step s (0-based) = state.count. As in the authors' code: the moments
    # reset at the steps s with (s + 1) % interval == 0; spikes are clipped
    # once (s + 1) % interval >= clip_delay; the warm-up counter c is
    # (s + 1) % interval from the first reset on.
    step = _tree.cycle_count(state.count, interval)
    reset = step % interval == 0
    clip = (step >= clip_delay) & (step % interval >= clip_delay)
    since = (step % interval).astype(FLOAT32)
    warming = (step >= interval) & (since < warmup_steps)
    cosine = 0.99 * 0.5 * (1.0 + jnp.cos(math.pi * since / (warmup_steps + 1)))
    factor = jnp.where(warming, 1.0 - cosine, 1.0).astype(FLOAT32)
    t = step.astype(FLOAT32)
    correction = jnp.sqrt(1.0 - b2**t) / (1.0 - b1**t)
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    grads, treedef = jax.tree.flatten(updates)
    weights = _tree.flatten_up_to(treedef, params) if decays else [None] * len(grads)
    out: list[Any] = []
    mus: list[Any] = []
    nus: list[Any] = []
    counts: list[jax.Array] = []
    counted: list[jax.Array] = []
    for g, mu, nu, w in zip(
      grads, _tree.flatten_up_to(treedef, state.mu), _tree.flatten_up_to(treedef, state.nu), weights
    ):
      if not _tree.is_float(g):
        out.append(g)
        mus.append(mu)
        nus.append(nu)
        continue
      g32 = g.astype(FLOAT32)
      mu = jnp.where(reset, 0.0, mu)
      nu = jnp.where(reset, 0.0, nu)
      # Finite entries only: an inf is never clipped into a plausible value.
      spike = clip & jnp.isfinite(g32) & (g32 * g32 > theta * nu)
      counts.append(jnp.sum(spike, dtype=INT32))
      counted.append(g)
      g32 = jnp.where(spike, jnp.sign(g32) * jnp.sqrt(theta * nu), g32)
      mus.append(b1 * mu + (1.0 - b1) * g32)
      nus.append(b2 * nu + (1.0 - b2) * g32 * g32)
      step_dir = (factor * correction) * mus[-1] / (jnp.sqrt(nus[-1]) + eps)
      if decays:
        step_dir = step_dir + weight_decay * w.astype(FLOAT32)
      out.append((-lr * step_dir).astype(g.dtype))
    return jax.tree.unflatten(treedef, out), SpamState(
      count=step,
      mu=jax.tree.unflatten(treedef, mus),
      nu=jax.tree.unflatten(treedef, nus),
      num_clipped=sum(counts, jnp.zeros((), INT32))
      if col is None or not counts
      else _tree.sum_over_leaves(col, counts, _tree.leaf_splits(col, updates, True)),
      warmup_factor=factor,
    )

  return optax.GradientTransformation(init_fn, update_fn)


def spam(
  learning_rate: optax.ScalarOrSchedule,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-6,
  theta: float = 5000.0,
  interval: int = 500,
  warmup_steps: int = 150,
  clip_delay: int = 20,
  weight_decay: float = 0.0,
  *,
  axis_name: Any = None,
  partition: Any = None,
) -> optax.GradientTransformation:
  r"""SPAM: Adam with spike-aware clipping and periodic momentum reset.

  Each entry whose squared gradient exceeds :math:`\theta` times Adam's
  second moment before this step is clipped to that bound, keeping its sign:

  .. math::
    g_j \leftarrow \operatorname{sign}(g_j)\sqrt{\theta\, v_j}
    \quad \text{where } g_j^2 > \theta\, v_j,

  then Adam runs as usual, :math:`m \leftarrow \beta_1 m + (1-\beta_1) g`,
  :math:`v \leftarrow \beta_2 v + (1-\beta_2) g^2`, step
  :math:`\eta_t \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}
  \frac{m}{\sqrt v + \epsilon}`. Every ``interval`` steps :math:`m` and
  :math:`v` are reset to zero (so a spike's trace in them is erased) and the
  learning rate warms up again over ``warmup_steps`` steps along a cosine,
  from 1% of its value: factor :math:`1 - 0.99 \cdot \frac{1 + \cos(\pi c /
  (N + 1))}{2}` at step :math:`c` after the reset. Clipping waits
  ``clip_delay`` steps after the start and after each reset, while
  :math:`v` is still near zero. Indices, bias correction (over all steps,
  not reset) and the warm-up follow the authors' code. Non-finite entries are
  not clipped (the authors' code turns an ``inf`` into a finite value): they
  stay visible. Weight decay is decoupled as in ``optax.adamw``
  (:math:`-\eta\lambda\theta` with the params before the step; the
  authors' code decays the params after it, a second-order difference) and,
  as there, not warmed up. One transform, not an optax chain: optax's
  ``scale_by_adam`` cannot clip against the moment before its update, and
  ``scale_by_learning_rate`` would turn integer leaves into floats; the
  learning-rate schedule is called with the step count, as optax does.

  Args:
    learning_rate: a float or an optax schedule.
    b1: decay of the first moment, in [0, 1).
    b2: decay of the second moment, in [0, 1).
    eps: added to :math:`\sqrt v`; >= 0.
    theta: the spike threshold :math:`\theta` on :math:`g^2 / v`; > 0.
    interval: steps between momentum resets :math:`\Delta T`; an integer >= 1.
    warmup_steps: steps of cosine warm-up after each reset :math:`N`; >= 0.
    clip_delay: steps after the start and after a reset before spikes are
      clipped; an integer >= 2 (below, the first gradient, against a zero
      second moment, is clipped to zero, and so is every one after it).
    weight_decay: decoupled weight decay; >= 0 (``update`` needs params unless
      it is 0, under ``optax.inject_hyperparams`` too).

    axis_name: inside ``shard_map``, the mesh axis name (or tuple of names)
      the gradient is split over: its count of clipped entries is reduced over it with scalar
      ``psum`` calls, so the result equals the jit/SPMD one. ``None`` outside.
    partition: with ``axis_name``, the gradient's pytree of ``PartitionSpec``
      (``shard_map``'s ``in_specs``) so that replicated leaves count once;
      ``None``: every floating leaf is split over ``axis_name``.

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`SpamState`.

  Example:
    >>> import jax.numpy as jnp, gradcal_jax as gc
    >>> tx = gc.spam(0.1)
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> for g in [1.0] * 30 + [1000.0]:
    ...   u, state = tx.update({"w": jnp.array([g, 1.0])}, state)
    >>> int(state.num_clipped), float(state.warmup_factor)
    (1, 1.0)

  References:
    Huang et al., `SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM
    Training <https://arxiv.org/abs/2501.06842>`_, ICLR 2025; code at
    https://github.com/TianjinYellow/SPAM-Optimizer.
  """
  _tree.check_number("b1", b1, low=0.0, high=1.0, high_open=True)
  _tree.check_number("b2", b2, low=0.0, high=1.0, high_open=True)
  _tree.check_number("eps", eps, low=0.0)
  _tree.check_number("theta", theta, low=0.0, low_open=True)
  _tree.check_int("interval", interval, low=1)
  _tree.check_int("warmup_steps", warmup_steps, low=0)
  _tree.check_int("clip_delay", clip_delay, low=2)
  _tree.check_number("weight_decay", weight_decay, low=0.0)
  return _spam_core(
    learning_rate,
    b1,
    b2,
    eps,
    theta,
    interval,
    warmup_steps,
    clip_delay,
    weight_decay,
    _tree.collective("spam", axis_name, partition),
  )


# --------------------------------------------------------- update RMS clip


@_stats.register_state("clip_update_rms", fields=("max_rms", "num_clipped"))
class ClipUpdateRMSState(NamedTuple):
  """State of :func:`clip_update_rms`.

  Attributes:
    inner_state: the wrapped transform's state (``optax.EmptyState()``
      without one).
    max_rms: float32, the largest per-tensor RMS at the last update; NaN
      when any tensor's RMS is NaN.
    num_clipped: int32, tensors scaled down at the last update.
  """

  inner_state: Any
  max_rms: jax.Array
  num_clipped: jax.Array


def _second_moment(state: Any) -> tuple[Any, jax.Array] | None:
  """``(nu, count)`` of the first state inside ``state`` with both fields
  (optax's ``ScaleByAdamState`` and its relatives), or None."""
  if hasattr(state, "_fields") and {"nu", "count"} <= set(state._fields):
    return state.nu, state.count
  if isinstance(state, (tuple, list)):
    for child in state:
      found = _second_moment(child)
      if found is not None:
        return found
  return None


def clip_update_rms(
  inner: optax.GradientTransformation | None = None,
  *,
  threshold: float = 1.0,
  b2: float = 0.999,
  eps: float = 1e-8,
  axis_name: Any = None,
  partition: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Scales each tensor's update down by its RMS: StableAdamW's update clipping.

  Around an Adam-like ``inner`` (``gc.clip_update_rms(optax.adamw(...))``),
  it is StableAdamW: with the gradient :math:`g_i` of tensor :math:`i` and
  ``inner``'s bias-corrected second moment :math:`\hat v_i` after this step,

  .. math::
    \mathrm{RMS}_i = \sqrt{\operatorname{mean}\left(
      g_i^2 / \max(\hat v_i, \epsilon^2)\right)}, \qquad
    u_i \leftarrow u_i / \max(1, \mathrm{RMS}_i / d),

  :math:`d` = ``threshold``, so a tensor whose gradient is large against the
  second moment that normalizes it takes a smaller step. It reads ``nu`` and
  ``count`` from ``inner``'s state (the first state holding both, as
  ``optax.scale_by_adam``'s does); ``b2`` must be ``inner``'s, for the bias
  correction. With no ``inner``, placed after an Adam-like transform
  (``optax.chain(optax.scale_by_adam(), gc.clip_update_rms())``), it sees
  only the update :math:`u_i`, so it uses :math:`\mathrm{RMS}_i =
  \sqrt{\operatorname{mean}(u_i^2)}`: Adafactor's update clipping, the same
  as StableAdamW's when ``b1=0`` (then :math:`u = g / \sqrt{\hat v}`) and a
  momentum-smoothed version of it otherwise. Neither form keeps a moment of
  its own: a second-moment buffer would add a float32 copy of the gradient
  to the optimizer state, which reading ``inner``'s avoids. A non-finite RMS
  leaves the tensor unscaled.

  Args:
    inner: an Adam-like transform whose state has ``nu`` and ``count``, or
      None to clip the incoming update by its own RMS.
    threshold: the RMS :math:`d` above which a tensor is scaled; > 0.
    b2: ``inner``'s second-moment decay, for the bias correction; in [0, 1).
    eps: floor :math:`\epsilon` of :math:`\sqrt{\hat v}`; > 0.

    axis_name: inside ``shard_map``, the mesh axis name (or tuple of names)
      the gradient is split over: each tensor's RMS is reduced over it with scalar
      ``psum`` calls, so the result equals the jit/SPMD one. ``None`` outside.
    partition: with ``axis_name``, the gradient's pytree of ``PartitionSpec``
      (``shard_map``'s ``in_specs``) so that replicated leaves count once;
      ``None``: every floating leaf is split over ``axis_name``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`ClipUpdateRMSState`.

  Example:
    >>> import jax.numpy as jnp, optax, gradcal_jax as gc
    >>> tx = optax.chain(optax.scale_by_adam(b1=0.0), gc.clip_update_rms())
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> for g in (1.0, 1.0, 30.0):
    ...   u, state = tx.update({"w": jnp.array([g, -g])}, state)
    >>> int(state[1].num_clipped), round(float(state[1].max_rms), 3)
    (1, 1.729)

  References:
    Wortsman et al., `Stable and low-precision training for large-scale
    vision-language models <https://arxiv.org/abs/2304.13013>`_, NeurIPS 2023;
    Shazeer and Stern, `Adafactor <https://arxiv.org/abs/1804.04235>`_, 2018.
  """
  _tree.check_number("threshold", threshold, low=0.0, low_open=True)
  _tree.check_number("b2", b2, low=0.0, high=1.0, high_open=True)
  _tree.check_number("eps", eps, low=0.0, low_open=True)
  if inner is not None:
    _tree.check_transform("inner", inner)
  wrapped = None if inner is None else optax.with_extra_args_support(inner)
  col = _tree.collective("clip_update_rms", axis_name, partition)

  def init_fn(params: Any) -> ClipUpdateRMSState:
    inner_state = optax.EmptyState() if wrapped is None else wrapped.init(params)
    if wrapped is not None and _second_moment(inner_state) is None:
      raise ValueError(
        "clip_update_rms(inner) needs an inner transform whose state holds "
        "a second moment `nu` and a `count` (optax.adam, optax.adamw, "
        "optax.scale_by_adam); for another transform chain "
        "gc.clip_update_rms() after it instead."
      )
    return ClipUpdateRMSState(
      inner_state=inner_state, max_rms=jnp.zeros((), FLOAT32), num_clipped=jnp.zeros((), INT32)
    )

  def update_fn(
    updates: Any, state: ClipUpdateRMSState, params: Any = None, **extra_args: Any
  ) -> tuple[Any, ClipUpdateRMSState]:
    sizes = jax.tree.unflatten(jax.tree.structure(updates), _sizes(col, updates))
    if wrapped is None:
      inner_state = state.inner_state
      rms = jax.tree.map(
        lambda r, n: r / math.sqrt(max(n, 1)), _norms.leaf_norms(updates, col), sizes
      )
      out = updates
    else:
      out, inner_state = wrapped.update(updates, state.inner_state, params, **extra_args)
      moment = _second_moment(inner_state)
      assert moment is not None  # init_fn refused an inner state without one
      nu, count = moment
      debias = 1.0 - b2 ** count.astype(FLOAT32)

      def leaf_ratio(g: jax.Array, v: jax.Array) -> jax.Array:
        if not _tree.is_float(g):
          return jnp.zeros((), FLOAT32)
        v_hat = jnp.maximum(v.astype(FLOAT32) / debias, eps**2)
        return jnp.sum(jnp.square(g.astype(FLOAT32)) / v_hat)

      ratios = _whole(col, updates, jax.tree.map(leaf_ratio, updates, nu))
      rms = jax.tree.map(lambda q, n: _norms.safe_sqrt(q / max(n, 1)), ratios, sizes)
    scales = jax.tree.map(
      lambda r: jnp.where(jnp.isfinite(r) & (r > threshold), threshold / r, 1.0).astype(FLOAT32),
      rms,
    )
    floats = [r for r, u in zip(jax.tree.leaves(rms), jax.tree.leaves(out)) if _tree.is_float(u)]
    max_rms = _tree.nan_max(jnp.stack(floats) if floats else jnp.zeros((0,), FLOAT32))
    return _tree.map_float(_tree.scale_leaf, out, scales), ClipUpdateRMSState(
      inner_state=inner_state, max_rms=max_rms.astype(FLOAT32), num_clipped=_num_scaled(scales, out)
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
