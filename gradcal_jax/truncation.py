"""Top-k gradient truncation with error feedback: ``truncate_top_k``."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradcal_jax import _stats, _tree

FLOAT32 = jnp.float32
INT32 = jnp.int32
UINT32 = jnp.uint32


@_stats.register_state("truncate_top_k", fields=("kept_fraction", "dropped_norm"))
class TruncateTopKState(NamedTuple):
  """State of :func:`truncate_top_k`.

  Attributes:
    kept_fraction: float32, the fraction of gradient entries emitted at the
      last step: sum over leaves of ``ceil(fraction * size)`` over the total
      number of entries.
    dropped_norm: float32, the L2 norm of what was not emitted at the last
      step (with error feedback, the norm of the residual carried over).
    residual: with ``error_feedback``, the float32 part of past gradients not
      yet emitted, shaped like the gradient (integer leaves are kept as they
      are and never read); ``None`` without error feedback.
  """
  kept_fraction: jax.Array
  dropped_norm: jax.Array
  residual: Any


def _keep_count(fraction: Any, size: int) -> Any:
  """``ceil(fraction * size)`` in ``[1, size]`` (0 for an empty leaf)."""
  if size == 0:
    return 0
  if not isinstance(fraction, jax.core.Tracer):
    x = float(fraction) * size
    # The guard absorbs the rounding of `fraction * size` (0.1 * 30 is
    # 3.0000000000000004 in floating point, which must give 3, not 4).
    return min(size, max(1, math.ceil(x - 1e-9 * x)))
  x = jnp.asarray(fraction, FLOAT32) * size
  # Float32 rounding of a traced fraction (0.1 is 0.100000001) needs a
  # wider guard.
  return jnp.clip(jnp.ceil(x * (1.0 - 1e-6)), 1, size).astype(INT32)


def _magnitude_bits(x: jax.Array) -> jax.Array:
  # For non-negative floats the bit pattern read as an unsigned integer is
  # ordered like the value, and NaN sorts above inf: the search runs on
  # integers and a NaN entry counts as the largest, so it is always emitted.
  return jax.lax.bitcast_convert_type(jnp.abs(x), UINT32)


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
  # The row-major position of every entry, built from per-axis iotas so a
  # sharded leaf is never reshaped (a reshape could move data between devices).
  index = jnp.zeros(shape, INT32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(INT32, shape, axis) * stride
    stride *= shape[axis]
  return index


def _count(mask: jax.Array) -> jax.Array:
  return jnp.sum(mask, dtype=INT32)


# Jitted so that an eager caller compiles the two search loops once per set of
# leaf shapes rather than on every call; under an outer jit it is inlined.
@jax.jit
def _thresholds(xs: list[jax.Array], ks: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per leaf, the k-th largest magnitude ``t`` and the tie cut-off ``j``.

  Leaf ``i`` keeps the entries with magnitude above ``t[i]``, and those equal
  to it whose flat index is below ``j[i]``: exactly ``ks[i]`` entries.
  Only scalar counts are reduced over each leaf, never a sort or a gather.
  """
  sizes = jnp.array([x.size for x in xs], INT32)
  big = jnp.uint32(2**31)  # above every |x| bit pattern, NaN included

  # Bisection on the bit patterns: count(bits >= lo) >= k > count(bits >= hi).
  # It stops early once count(bits >= lo) == k: that threshold has no ties.
  def value_done(lo, hi, count_lo):
    return (count_lo == ks) | (hi - lo <= 1)

  def value_step(carry):
    lo, hi, count_lo, count_hi = carry
    mid = lo + (hi - lo) // 2
    count_mid = jnp.stack([_count(_magnitude_bits(x) >= mid[i])
                           for i, x in enumerate(xs)])
    active = ~value_done(lo, hi, count_lo)
    up = active & (count_mid >= ks)
    down = active & (count_mid < ks)
    return (jnp.where(up, mid, lo), jnp.where(down, mid, hi),
            jnp.where(up, count_mid, count_lo), jnp.where(down, count_mid, count_hi))

  n = len(xs)
  lo, hi, count_lo, count_hi = jax.lax.while_loop(
      lambda c: ~jnp.all(value_done(c[0], c[1], c[2])), value_step,
      (jnp.zeros(n, UINT32), jnp.full(n, big, UINT32), sizes,
       jnp.zeros(n, INT32)))

  # Ties at the threshold: keep the first `need` of them in row-major order,
  # the cut-off found by a second bisection on the flat index. Zero ties are
  # left alone: keeping more zeros emits the same values.
  exact = count_lo == ks
  need = ks - count_hi
  ties = ~exact & (count_lo - count_hi > need) & (lo > 0)

  def cutoffs(_):
    # count(index < j_lo) < need <= count(index < j_hi) among the ties.
    def step(carry):
      j_lo, j_hi = carry
      mid = j_lo + (j_hi - j_lo) // 2
      counts = jnp.stack([
          _count((_magnitude_bits(x) == lo[i]) & (_flat_index(x.shape) < mid[i]))
          for i, x in enumerate(xs)])
      active = j_hi - j_lo > 1
      enough = counts >= need
      return (jnp.where(active & ~enough, mid, j_lo),
              jnp.where(active & enough, mid, j_hi))

    start = (jnp.where(ties, 0, sizes - 1), sizes)
    return jax.lax.while_loop(
        lambda c: jnp.any(c[1] - c[0] > 1), step, start)[1]

  cut = jax.lax.cond(jnp.any(ties), cutoffs, lambda _: sizes, None)
  return lo, cut


def truncate_top_k(
    fraction: float,
    *,
    error_feedback: bool = True,
) -> optax.GradientTransformation:
  r"""Keeps the largest ``fraction`` of each leaf's entries and zeroes the rest.

  For each floating leaf of ``n`` entries, with :math:`x = g + r` (the gradient
  plus the residual :math:`r` when ``error_feedback``, else :math:`x = g`), the
  :math:`k = \lceil \mathrm{fraction} \cdot n \rceil` entries of largest
  :math:`|x|` are emitted and the others are zero. With error feedback the part
  not emitted is kept, in float32, and added to the next gradient:

  .. math::
    u_t = \mathrm{top}_k(g_t + r_{t-1}), \qquad r_t = g_t + r_{t-1} - u_t,

  so nothing is lost over time: :math:`\sum_t u_t + r_T = \sum_t g_t` (exactly,
  up to float32 rounding; the rounding of a low-precision output is carried in
  the residual too).

  Selection is exact and sort-free: the k-th largest magnitude is found by
  bisection on the float32 bit patterns of :math:`|x|` (at most 31 passes
  counting the entries above a candidate, stopping early once exactly k are
  above), so each pass reduces a leaf to one integer: a sharded leaf is never
  gathered (``lax.top_k`` would need the whole leaf on one device). Ties at
  the threshold are broken towards the lower row-major index, found by a
  second bisection that runs only when such ties exist, so exactly k entries
  are emitted (when fewer than k entries are non-zero the extra kept entries
  are zeros, which emit the same values). A NaN entry counts as the largest
  and is emitted, so it stays visible.

  Args:
    fraction: the fraction of each leaf's entries to keep, in (0, 1].
    error_feedback: whether to carry what is dropped into the next step
      (Stich et al.); without it the dropped part is lost.

  Returns:
    An ``optax.GradientTransformation`` whose state is a
    :class:`TruncateTopKState`.

  Example:
    >>> import jax.numpy as jnp, gradcal_jax as gc
    >>> tx = gc.truncate_top_k(0.5)
    >>> grads = {"w": jnp.array([1.0, -4.0, 2.0, 3.0])}
    >>> u, state = tx.update(grads, tx.init(grads))
    >>> u["w"].tolist(), state.residual["w"].tolist()
    ([0.0, -4.0, 0.0, 3.0], [1.0, 0.0, 2.0, 0.0])

  References:
    Aji & Heafield, `Sparse Communication for Distributed Gradient Descent
    <https://arxiv.org/abs/1704.05021>`_, 2017; Stich, Cordonnier & Jaggi,
    `Sparsified SGD with Memory <https://arxiv.org/abs/1809.07599>`_, 2018.
  """
  _tree.check_number("fraction", fraction, low=0.0, high=1.0, low_open=True)

  def init_fn(params: Any) -> TruncateTopKState:
    residual = None
    if error_feedback:
      residual = _tree.map_float(lambda x: jnp.zeros(x.shape, FLOAT32), params)
    return TruncateTopKState(
        kept_fraction=jnp.zeros((), FLOAT32), dropped_norm=jnp.zeros((), FLOAT32),
        residual=residual)

  def update_fn(updates: Any, state: TruncateTopKState, params: Any = None
                ) -> tuple[Any, TruncateTopKState]:
    del params
    if error_feedback:
      xs_tree = _tree.map_float(lambda g, r: g.astype(FLOAT32) + r,
                                updates, state.residual)
    else:
      xs_tree = _tree.map_float(lambda g: g.astype(FLOAT32), updates)
    xs = _tree.float_leaves(xs_tree)
    if not xs:
      return updates, state._replace(
          kept_fraction=jnp.zeros((), FLOAT32), dropped_norm=jnp.zeros((), FLOAT32))
    ks_list = [_keep_count(fraction, x.size) for x in xs]
    ks = jnp.stack([jnp.asarray(k, INT32) for k in ks_list])
    lo, cut = _thresholds(xs, ks)

    leaves, treedef = jax.tree.flatten(updates)
    x_leaves = jax.tree.leaves(xs_tree)
    outs, dropped = [], []
    i = 0
    for g, x in zip(leaves, x_leaves):
      if not _tree.is_float(g):
        outs.append(g)
        dropped.append(x)
        continue
      bits = _magnitude_bits(x)
      keep = (bits > lo[i]) | ((bits == lo[i]) & (_flat_index(x.shape) < cut[i]))
      out = jnp.where(keep, x, 0.0).astype(g.dtype)
      # A kept entry leaves behind only the rounding of a low-precision
      # output, which must be finite: an inf is emitted once, not carried.
      rounding = x - out.astype(FLOAT32)
      rounding = jnp.where(jnp.isfinite(rounding), rounding, 0.0)
      outs.append(out)
      dropped.append(jnp.where(keep, rounding, x))
      i += 1
    dropped_tree = jax.tree.unflatten(treedef, dropped)
    residual = None
    if error_feedback:
      residual = jax.tree.map(lambda d, r: d if _tree.is_float(d) else r,
                              dropped_tree, state.residual)
    total = sum(x.size for x in xs)
    kept = sum(jnp.asarray(k, FLOAT32) for k in ks_list) / max(total, 1)
    return jax.tree.unflatten(treedef, outs), TruncateTopKState(
        kept_fraction=jnp.asarray(kept, FLOAT32),
        dropped_norm=_tree.global_norm(dropped_tree),
        residual=residual)

  return optax.GradientTransformation(init_fn, update_fn)
