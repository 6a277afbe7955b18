"""Gradient checking: reverse mode and ``jax.jvp`` against finite differences.

A wrong gradient (a bad ``custom_vjp``, a misplaced ``stop_gradient``, a
broadcasting slip) trains silently and badly. :func:`check_gradients` is the
tool for tests: it checks every leaf of a pytree separately, so a failure names
the parameter that is wrong, and tells a real mismatch from finite differences
that could not be trusted. :func:`gradient_check` is the same comparison as an
optax transform that checks the training gradient every ``every_k`` steps.

For one leaf :math:`x_i` and a random unit direction :math:`v` supported on it,
three estimates of the directional derivative :math:`\\partial_v f` are
compared: reverse mode :math:`\\langle g_i, v\\rangle` (``jax.vjp``), forward
mode (``jax.jvp``), and central differences with Richardson extrapolation,

.. math::
  D(t) = \\frac{f(x + t v) - f(x - t v)}{2t}, \\qquad
  \\hat d = \\frac{4 D(t/2) - D(t)}{3}, \\qquad
  t = \\epsilon^{1/5} \\, \\lVert x_i \\rVert,

so the step follows the leaf's magnitude and dtype (``jax.test_util`` uses a
fixed absolute step, which vanishes below float32's spacing at
:math:`|x| \\sim 10^5`). Errors are relative to
:math:`s = \\max(\\lVert g_i \\rVert / \\sqrt{n_i}, |\\hat d|)`, the size of a
typical directional derivative, which does not blow up when one happens to be
near zero. The finite-difference uncertainty :math:`u` is
:math:`|D(t) - D(t/2)|` plus the fourth difference
:math:`|\\Delta^4 f| / t` (noise, or a kink such as relu at 0, where the
one-sided slopes disagree at every step) plus the rounding floor
:math:`16 \\epsilon |f| / t`. A leaf is ``ok`` when every error is within
``rtol``, ``mismatch`` when an error exceeds both ``rtol`` and
:math:`3u / s`, ``unreliable`` when only the uncertainty could explain it, and
``nonfinite`` when a value is NaN or infinite.

References:
  Richardson, "The deferred approach to the limit" (1927).
  Moré and Wild, "Estimating computational noise" (SIAM J. Sci. Comput., 2011).
  JAX issues 641 and 7742 (fixed finite-difference steps in ``jax.test_util``).
  Wellons, "Prospecting for hash functions" (2018): the ``lowbias32`` integer
  hash behind the random directions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradcal_jax import _stats, _tree

FLOAT32 = jnp.float32

VERDICTS = ("ok", "mismatch", "unreliable", "nonfinite")
_OK, _MISMATCH, _UNRELIABLE, _NONFINITE = range(4)
# Finite-difference offsets, in units of the step t: f(x + a t v) for a in these.
_OFFSETS = (-1.0, -0.5, 0.5, 1.0)
# How many uncertainties a disagreement must exceed to be called a mismatch.
_TRUST = 3.0
_NOISE_FLOOR = 16.0
# Same-shaped leaves checked by one traced body: at most _CHUNK (a larger
# chunk batches more of phi at every point, a smaller one compiles phi more
# times), and few enough that the points hold at most _CHUNK_ENTRIES entries.
_CHUNK = 4
_CHUNK_ENTRIES = 2**24


def _eps(dtype: Any) -> float:
  return float(jnp.finfo(dtype).eps)


def _default_rtol(eps: float) -> float:
  # eps**(1/3): 6e-6 in float64, 5e-3 in float32, 0.2 in bfloat16; far above
  # the Richardson estimate's error, far below a wrong gradient's (O(1)).
  return eps ** (1.0 / 3.0)


class _Measured(NamedTuple):
  """What is measured on one leaf (stacked over leaves before judging)."""

  reverse: jax.Array  # (directions,) <g_i, v>
  forward: jax.Array  # (directions,) jvp, NaN when skipped
  f0: jax.Array  # () value at the centre
  f: jax.Array  # (directions, len(_OFFSETS)) values at x + a t v
  step: jax.Array  # () t
  typical: jax.Array  # () ||g_i|| / sqrt(n_i): a typical |<g_i, v>|
  finite: jax.Array  # () bool: g_i has no NaN or inf


class _LeafCheck(NamedTuple):
  """The comparison for each leaf, at its worst direction (one entry per leaf)."""

  error: jax.Array
  reverse: jax.Array
  forward: jax.Array
  finite_difference: jax.Array
  uncertainty: jax.Array
  verdict: jax.Array


def _draw(key: jax.Array, shapes: list[tuple[int, ...]], dtype: Any) -> list[jax.Array]:
  """One array of uniform entries in [-1, 1] per shape, from a single draw.

  Uniform rather than normal: XLA fuses the generator's tail into every
  consumer of every slice, and the normal's inverse error function made that
  tail, and the compile time of a check with many outputs, large.
  """
  sizes = [math.prod(shape) for shape in shapes]
  flat = jax.random.uniform(key, (sum(sizes),), dtype, -1.0, 1.0)
  bounds = np.cumsum([0, *sizes])
  return [flat[a:b].reshape(shape) for a, b, shape in zip(bounds[:-1], bounds[1:], shapes)]


def _unit(v: jax.Array) -> jax.Array:
  """Each ``v[d]`` scaled to unit L2 norm: the directions of one leaf."""
  axes = tuple(range(1, v.ndim))
  return v / jnp.sqrt(jnp.sum(v * v, axis=axes, keepdims=True))


def _step(leaf: jax.Array, fallback_rms: jax.Array, dtype: Any, eps: float) -> jax.Array:
  """``eps**(1/5) * ||leaf||`` (a zero leaf uses the fallback entry size)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(leaf.astype(dtype))))
  norm = jnp.where(norm > 0, norm, fallback_rms * math.sqrt(leaf.size))
  # eps**(1/5) balances the O(t**4) truncation of the extrapolated difference
  # against its O(eps / t) rounding.
  return (eps**0.2) * norm


def _rms(leaves: list[jax.Array], dtype: Any) -> jax.Array:
  """Root mean square entry over ``leaves``, or 1 when all are zero."""
  total = sum(jnp.sum(jnp.square(x.astype(dtype))) for x in leaves)
  rms = jnp.sqrt(total / max(sum(x.size for x in leaves), 1))
  return jnp.where(rms > 0, rms, jnp.ones((), dtype))


def _finite_differences(
  phi: Callable[[jax.Array], jax.Array],
  leaf: jax.Array,
  v: jax.Array,
  t: jax.Array,
  dtype: Any,
  batched: bool,
) -> jax.Array:
  """``phi`` at ``x + a t v`` for every offset ``a`` and direction.

  Returns an array of shape ``(directions, len(_OFFSETS))``; the centre value
  is the same for every leaf and is evaluated once, by the caller.
  """
  offsets = jnp.asarray(_OFFSETS, dtype) * t
  if not batched:
    # Each point is made inside the loop body: one leaf-sized point at a time.
    def at(a_d: tuple[jax.Array, jax.Array]) -> jax.Array:
      a, d = a_d
      return phi((leaf.astype(dtype) + a * v[d]).astype(leaf.dtype)).astype(dtype)

    directions = v.shape[0]
    values = jax.lax.map(
      at, (jnp.tile(offsets, directions), jnp.repeat(jnp.arange(directions), len(_OFFSETS)))
    )
    return values.reshape(directions, len(_OFFSETS))
  ones = (1,) * leaf.ndim
  points = leaf.astype(dtype)[None, None] + offsets.reshape((1, len(_OFFSETS), *ones)) * v[:, None]
  points = points.reshape((-1, *leaf.shape)).astype(leaf.dtype)
  values = jax.vmap(phi)(points).astype(dtype)
  return values.reshape(v.shape[0], len(_OFFSETS))


def _gradient_terms(
  g_leaf: jax.Array, v: jax.Array, dtype: Any
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``<g_i, v>`` for each direction, ``||g_i|| / sqrt(n_i)`` (a typical
  ``|<g_i, v>|``) and whether ``g_i`` is finite, in ``dtype``."""
  g = g_leaf.astype(dtype)
  axes = tuple(range(1, v.ndim))
  return (
    jnp.sum(g[None] * v, axis=axes),
    jnp.sqrt(jnp.sum(g * g)) / math.sqrt(max(g.size, 1)),
    jnp.all(jnp.isfinite(g)),
  )


def _judge(
  m: _Measured,
  has_forward: jax.Array,
  rtol: jax.Array,
  value_eps: jax.Array,
  rounding: jax.Array | None = None,
) -> _LeafCheck:
  """Compares the three estimates of every leaf at once and gives verdicts.

  ``m`` holds each field stacked over leaves (leading axis); ``has_forward``,
  ``rtol``, ``value_eps`` and ``rounding`` (the gradient's own rounding error
  along the directions, in derivative units, added to the uncertainty) are
  per leaf.
  """
  t = m.step[:, None]
  fm1, fmh, fph, fp1 = (m.f[..., k] for k in range(len(_OFFSETS)))
  wide = (fp1 - fm1) / (2 * t)
  narrow = (fph - fmh) / t
  fd = (4 * narrow - wide) / 3
  f0 = m.f0[:, None]
  # The fourth difference is O(t**4) on a smooth function; at a kink it stays
  # O(t) times the jump in slope, and it samples the evaluation noise.
  kink = jnp.abs(fm1 - 4 * fmh + 6 * f0 - 4 * fph + fp1) / t
  size = jnp.maximum(jnp.abs(f0), jnp.max(jnp.abs(m.f), axis=-1))
  floor = _NOISE_FLOOR * value_eps[:, None] * size / t
  # One uncertainty per leaf: directions share the leaf's noise and curvature.
  spread = jnp.max(jnp.abs(narrow - wide) + kink + floor, axis=1)
  if rounding is not None:
    spread = spread + rounding

  # A leaf's forward leg counts where jax.jvp applied and gave a finite value:
  # within a chunk of same-shaped leaves, jvp also carries zero tangents
  # through the other members, where 0 * inf (sqrt at 0) can be NaN.
  has_forward = has_forward[:, None] & jnp.isfinite(m.forward)
  forward = jnp.where(has_forward, m.forward, 0.0)
  scale = jnp.maximum(
    jnp.maximum(m.typical, jnp.max(jnp.abs(fd), axis=1)), jnp.max(jnp.abs(forward), axis=1)
  )
  scale = jnp.maximum(scale, jnp.finfo(scale.dtype).tiny)[:, None]
  fd_error = jnp.abs(m.reverse - fd) / scale
  ad_error = jnp.where(has_forward, jnp.abs(forward - m.reverse) / scale, 0.0)
  uncertainty = spread / scale[:, 0]
  error = jnp.maximum(fd_error, ad_error)
  worst = jnp.argmax(error, axis=1)
  pick = lambda a: jnp.take_along_axis(a, worst[:, None], axis=1)[:, 0]

  finite = (
    m.finite
    & jnp.isfinite(m.f0)
    & jnp.all(jnp.isfinite(m.f) & jnp.isfinite(m.reverse[..., None]), axis=(1, 2))
  )
  rtol = rtol[:, None]
  disagree = fd_error > rtol
  mismatch = jnp.any(ad_error > rtol, axis=1) | jnp.any(
    disagree & (fd_error > _TRUST * uncertainty[:, None]), axis=1
  )
  verdict = jnp.where(
    ~finite,
    _NONFINITE,
    jnp.where(mismatch, _MISMATCH, jnp.where(jnp.any(disagree, axis=1), _UNRELIABLE, _OK)),
  )
  return _LeafCheck(
    error=jnp.where(finite, pick(error), jnp.inf),
    reverse=pick(m.reverse),
    forward=pick(m.forward),
    finite_difference=pick(fd),
    uncertainty=uncertainty,
    verdict=verdict.astype(jnp.int32),
  )


def _is_custom_vjp_error(e: Exception) -> bool:
  return isinstance(e, TypeError) and "custom_vjp" in str(e)


def _chunks(members: list[int], size: int, points: int) -> list[list[int]]:
  """``members`` cut into consecutive runs of at most ``_CHUNK`` leaves, fewer
  when ``points`` copies of each would exceed ``_CHUNK_ENTRIES``."""
  room = max(1, min(_CHUNK, _CHUNK_ENTRIES // max(points * size, 1)))
  return [members[a : a + room] for a in range(0, len(members), room)]


def _chunk_plan(leaves: list[Any], checked: list[int], num_directions: int) -> list[list[int]]:
  """The checked leaves (as positions in ``checked``) cut into chunks.

  Leaves of one shape and dtype (the layers of a deep model) are cut, in tree
  order, into chunks of at most ``_CHUNK``; the members of a chunk share one
  traced body run by ``lax.map`` with the member's index as data, so the
  compiled check grows with the number of chunks, not with leaves times the
  size of the function. Whole groups in one body would batch every layer of a
  deep model at every point, and one body per leaf would compile the function
  once per leaf. The chunks are small enough that ``4 * directions`` copies
  of one stay within ``_CHUNK_ENTRIES`` entries.
  """
  groups: dict[tuple[Any, ...], list[int]] = {}
  for n, i in enumerate(checked):
    groups.setdefault((leaves[i].shape, jnp.dtype(leaves[i].dtype)), []).append(n)
  points = len(_OFFSETS) * num_directions
  return [
    chunk
    for members in groups.values()
    for chunk in _chunks(members, leaves[checked[members[0]]].size, points)
  ]


def _over_chunks(
  chunks: list[list[int]],
  checked: list[int],
  key: jax.Array,
  run_chunk: Callable[[list[int], list[int], jax.Array], Any],
  wide: Any,
) -> Any:
  """``run_chunk(members, idx, chunk_key)`` for every chunk, its per-member
  results cast to ``wide`` (flags stay bool), concatenated and put back in
  ``checked`` order. ``idx`` are the members' indices among all leaves; each
  chunk has its own key, so the directions of a leaf do not depend on how the
  other chunks are checked."""
  parts, order = [], []
  for number, members in enumerate(chunks):
    part = run_chunk(members, [checked[n] for n in members], jax.random.fold_in(key, number))
    parts.append(jax.tree.map(lambda a: a if a.dtype == jnp.bool_ else a.astype(wide), part))
    order += members
  position = np.argsort(np.asarray(order))
  return jax.tree.map(lambda *a: jnp.concatenate(a)[position], *parts)


def _pick(k: jax.Array, xs: list[jax.Array]) -> jax.Array:
  """Member ``k`` of a chunk by a select per member, not by indexing a stack
  of the chunk's leaves (which copies all of them into the temporaries)."""
  out = xs[-1]
  for j in range(len(xs) - 2, -1, -1):
    out = jnp.where(k == j, xs[j], out)
  return out


def _replaced(leaves: list[Any], treedef: Any, idx: list[int], ys: Sequence[jax.Array]) -> Any:
  """The tree of ``leaves`` with ``leaves[idx[j]]`` replaced by ``ys[j]``."""
  new = list(leaves)
  for i, y in zip(idx, ys):
    new[i] = y
  return jax.tree.unflatten(treedef, new)


def _perturbed(
  phi: Callable[[Any], jax.Array], leaves: list[Any], treedef: Any, idx: list[int], k: jax.Array
) -> Callable[[jax.Array], jax.Array]:
  """``y -> phi(leaves with member k of the chunk idx replaced by y)``.

  A select per member, not a scatter into a stack: each stays one op fused
  next to its use under ``jax.vmap``."""
  return lambda y: phi(
    _replaced(leaves, treedef, idx, [jnp.where(k == j, y, leaves[i]) for j, i in enumerate(idx)])
  )


def _directions(
  chunk_key: jax.Array, k: jax.Array, num_directions: int, like: jax.Array, wide: Any, dtype: Any
) -> jax.Array:
  """Member ``k``'s ``num_directions`` unit directions, shaped like its leaf.

  Uniform entries in [-1, 1], normalized: a random direction whose law is
  continuous, so a bug never cancels out exactly (as random signs can). Each
  entry is a counter hash (``lowbias32``) of its index and a 32-bit seed drawn
  with ``jax.random`` from the member's key. Elementwise, the draw fuses into
  what uses it and a sharded leaf's entries are computed where its shards
  live. ``jax.random``'s threefry is a rolled loop on CPU that holds several
  leaf-sized buffers, and its ``rbg`` computes the whole leaf on every
  device; in :func:`gradient_check` those buffers are allocated with every
  training step's. The directions depend on the key and the leaf's shape
  alone, so they can be drawn again where only the gradient is at hand.
  """
  seed = jax.random.bits(jax.random.fold_in(chunk_key, k), (), jnp.uint32)
  shape = (num_directions, *like.shape)
  index, stride = jnp.zeros(shape, jnp.uint32), 1
  for axis in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride)
    stride = stride * shape[axis] % 2**32
  x = index * np.uint32(0x9E3779B9) + seed
  x = (x ^ (x >> 16)) * np.uint32(0x7FEB352D)
  x = (x ^ (x >> 15)) * np.uint32(0x846CA68B)
  x = x ^ (x >> 16)
  v = (x >> 8).astype(wide) * (2.0**-23) - 1.0
  return _unit(v.astype(dtype))


def _measure_leaves(
  phi: Callable[[Any], jax.Array],
  leaves: list[Any],
  treedef: Any,
  grads: list[Any],
  checked: list[int],
  key: jax.Array,
  num_directions: int,
  eps: list[float],
  fallback: jax.Array,
  f0: jax.Array,
  wide: Any,
) -> tuple[_Measured, list[bool]]:
  """Measures every checked leaf for :func:`check_gradients`, stacked in
  ``checked`` order, and says which had a forward leg.

  Chunks as in :func:`_chunk_plan`. Under ``jax.vmap`` over the evaluation
  points only the chunk's members are batched: what ``phi`` computes before
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
    leaf = _pick(k, [leaves[i] for i in idx])
    dtype = jnp.promote_types(leaf.dtype, wide)
    v = _directions(chunk_key, k, num_directions, leaf, wide, dtype)
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
      _perturbed(phi, leaves, treedef, idx, k), leaf, v, t, dtype, batched=True
    )
    reverse, typical, finite = _gradient_terms(_pick(k, [grads[i] for i in idx]), v, dtype)
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
        lambda *ys: phi(_replaced(leaves, treedef, idx, ys)), *[leaves[i] for i in idx]
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
  return _over_chunks(chunks, checked, key, run_chunk, wide), has_forward


# ------------------------------------------------------------ check_gradients


class GradCheckRow(NamedTuple):
  """One checked leaf of a :class:`GradCheckReport`.

  Attributes:
    path: the leaf's path in the checked argument, ``"layers/0/kernel"``.
    size: its number of entries.
    error: the worst relative error over its directions (see the module doc).
    reverse: reverse-mode directional derivative at that direction.
    forward: forward-mode one, or None when ``jax.jvp`` does not apply
      (a ``custom_vjp`` function).
    finite_difference: the extrapolated finite-difference one.
    uncertainty: the finite differences' estimated error, relative like
      ``error``.
    rtol: the tolerance the error was held to.
    verdict: ``"ok"``, ``"mismatch"``, ``"unreliable"`` or ``"nonfinite"``.
  """

  path: str
  size: int
  error: float
  reverse: float
  forward: float | None
  finite_difference: float
  uncertainty: float
  rtol: float
  verdict: str


class GradientCheckError(AssertionError):
  """Raised by :meth:`GradCheckReport.raise_if_failed` for a wrong gradient."""


def _fmt(x: float | None) -> str:
  return "skipped" if x is None else f"{x: .4e}"


@dataclasses.dataclass(frozen=True)
class GradCheckReport:
  """What :func:`check_gradients` found, one row per checked leaf.

  Attributes:
    rows: one :class:`GradCheckRow` per floating leaf, in tree order.
    precision: ``"float64"`` or ``"input"``.
    num_directions: directions drawn per leaf.
    rounded_to: the dtype the function's values were found rounded to
      (every value the check computed is a number of it, finer than the
      outputs' dtype claims: ``fn`` computes in it and casts back), which
      then set the tolerance and the rounding floor; None when not so.
  """

  rows: tuple[GradCheckRow, ...]
  precision: str
  num_directions: int
  rounded_to: str | None = None

  @property
  def ok(self) -> bool:
    """True when no leaf is ``mismatch`` or ``nonfinite``."""
    return not self.failures

  @property
  def failures(self) -> tuple[GradCheckRow, ...]:
    """The ``mismatch`` and ``nonfinite`` rows, worst first."""
    return tuple(r for r in self._sorted() if r.verdict in ("mismatch", "nonfinite"))

  def verdicts(self) -> dict[str, str]:
    """``{path: verdict}`` for every checked leaf."""
    return {r.path: r.verdict for r in self.rows}

  def _sorted(self) -> list[GradCheckRow]:
    rank = {"nonfinite": 0, "mismatch": 1, "unreliable": 2, "ok": 3}
    return sorted(self.rows, key=lambda r: (rank[r.verdict], -r.error))

  def __str__(self) -> str:
    counts = {v: sum(r.verdict == v for r in self.rows) for v in VERDICTS}
    head = (
      f"gradient check: {len(self.rows)} leaves, "
      + ", ".join(f"{counts[v]} {v}" for v in VERDICTS)
      + f" (precision {self.precision}, "
      + (f"values rounded to {self.rounded_to}, " if self.rounded_to else "")
      + f"{self.num_directions} directions)"
    )
    table = [
      (
        "leaf",
        "size",
        "verdict",
        "error",
        "rtol",
        "reverse",
        "forward",
        "finite diff",
        "fd uncert.",
      )
    ]
    for r in self._sorted():
      table.append(
        (
          r.path or "<root>",
          str(r.size),
          r.verdict,
          f"{r.error:.2e}",
          f"{r.rtol:.1e}",
          _fmt(r.reverse),
          _fmt(r.forward),
          _fmt(r.finite_difference),
          f"{r.uncertainty:.1e}",
        )
      )
    widths = [max(len(row[k]) for row in table) for k in range(len(table[0]))]
    lines = [head]
    for n, row in enumerate(table):
      lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
      if n == 0:
        lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)

  def raise_if_failed(self) -> None:
    """Raises :class:`GradientCheckError` naming every failing leaf."""
    if self.ok:
      return
    lines = [f"{len(self.failures)} of {len(self.rows)} leaves have a wrong gradient:"]
    for r in self.failures:
      lines.append(
        f"  {r.path or '<root>'} ({r.verdict}): relative error {r.error:.3e} > "
        f"rtol {r.rtol:.1e}; reverse {_fmt(r.reverse)}, forward {_fmt(r.forward)},"
        f" finite difference {_fmt(r.finite_difference)}"
        f" (uncertainty {r.uncertainty:.1e})"
      )
    lines += ["", str(self)]
    raise GradientCheckError("\n".join(lines))


def _is_static(x: Any) -> bool:
  return not isinstance(x, (jax.Array, np.ndarray, np.generic))


def _projected(
  call: Callable[[Any], Any], cotangents: list[jax.Array] | None, dtype: Any
) -> Callable[[Any], jax.Array]:
  """``x -> <u, call(x)>`` for random cotangents ``u``; ``call`` in ``dtype``
  when the output is a scalar (``cotangents`` None)."""
  if cotangents is None:
    return lambda y: call(y).astype(dtype)

  def phi(y: Any) -> jax.Array:
    outs = _tree.float_leaves(call(y))
    return _tree.add_up([jnp.sum(u * o.astype(u.dtype)) for u, o in zip(cotangents, outs)])

  return phi


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
  wide = jnp.float64 if precision == "float64" else FLOAT32

  def eval_dtype(dtype: Any) -> Any:
    return jnp.promote_types(dtype, wide)

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
    u.astype(eval_dtype(o.dtype)) for u, o in zip(_draw(out_key, out_shapes, wide), out_leaves)
  ]
  phi = _projected(call, None if scalar else cotangents, eval_dtype(out_leaves[0].dtype))
  f0, grads = jax.value_and_grad(phi, allow_int=True)(x)
  grads = _tree.flatten_up_to(treedef_x, grads)
  fallback = _rms([leaves[i] for i in checked], wide)

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
    phi, leaves, treedef_x, grads, checked, dir_key, num_directions, eps, fallback, f0, wide
  )
  check = _judge(
    m, jnp.asarray(has_forward), jnp.asarray(rtols, wide), jnp.asarray(value_eps, wide)
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
    "rtol": jnp.asarray(rtols, wide),
    "rounded": rounded,
    "value_eps": jnp.asarray(value_eps, wide),
  }


def check_gradients(
  fn: Callable[..., Any],
  *args: Any,
  argnums: int = 0,
  key: jax.Array | None = None,
  num_directions: int = 2,
  precision: str = "float64",
  rtol: float | None = None,
) -> GradCheckReport:
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
    A :class:`GradCheckReport`; ``report.raise_if_failed()`` turns a
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
    GradCheckRow(
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
  return GradCheckReport(
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


# ------------------------------------------------------------- gradient_check


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
) -> tuple[jax.Array, Any]:
  """:func:`gradient_check`'s comparison, under two ``lax.cond`` on ``checking``.

  Returns ``[worst reliable error, its leaf index, worst severity]`` (zeros
  and -1 when not checking) and ``updates``, unchanged bit for bit.

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
  wide_leaves = [
    x.astype(jnp.promote_types(x.dtype, FLOAT32)) if _tree.is_float(x) else x for x in leaves
  ]
  loss = _value_shape(value_fn, jax.tree.unflatten(treedef, wide_leaves))
  out_eps = _eps(jnp.promote_types(loss.dtype, jnp.float16))
  step_eps = [max(_eps(wide_leaves[i].dtype), out_eps) for i in checked]
  grad_eps = [
    max(_eps(leaves[i].dtype), _eps(grads[i].dtype), e) for i, e in zip(checked, step_eps)
  ]
  rtols = jnp.asarray([_default_rtol(e) if rtol is None else rtol for e in grad_eps], FLOAT32)
  value_eps = jnp.asarray([max(out_eps, _eps(wide_leaves[i].dtype)) for i in checked], FLOAT32)

  # A gradient computed in bfloat16 or float16 carries its own rounding (a
  # bias's sum over the batch cancels: seen 60% off the float32 gradient in
  # a correct model). It is measured, as the difference of value_fn's own
  # reverse-mode gradients in the params' dtype and in float32 along each
  # direction, and counted in the uncertainty, so it reads as unreliable
  # rather than a mismatch. A planted bug is in both and cancels out.
  narrow = any(wide_leaves[i].dtype != leaves[i].dtype for i in checked)

  def evaluate() -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    fallback = _rms([wide_leaves[i] for i in checked], FLOAT32)
    if narrow:
      grad_fn = jax.value_and_grad(value_fn, allow_int=True)
      f0, wide_grads = grad_fn(jax.tree.unflatten(treedef, wide_leaves))
      own_grads = _tree.flatten_up_to(treedef, grad_fn(jax.tree.unflatten(treedef, leaves))[1])
      wide_grads = _tree.flatten_up_to(treedef, wide_grads)
    else:
      f0 = value_fn(jax.tree.unflatten(treedef, wide_leaves))

    def run_chunk(members: list[int], idx: list[int], chunk_key: jax.Array) -> Any:
      def member(k: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        leaf = _pick(k, [wide_leaves[i] for i in idx])
        dtype = leaf.dtype
        v = _directions(chunk_key, k, num_directions, leaf, FLOAT32, dtype)
        t = _step(leaf, fallback.astype(dtype), dtype, step_eps[members[0]])
        f = _finite_differences(
          _perturbed(value_fn, wide_leaves, treedef, idx, k), leaf, v, t, dtype, batched=False
        )
        rounding = jnp.zeros(num_directions, dtype)
        if narrow:
          own, wide = (
            _gradient_terms(_pick(k, [g[i] for i in idx]), v, dtype)[0]
            for g in (own_grads, wide_grads)
          )
          rounding = jnp.abs(own - wide)
        return f, t, rounding

      return jax.lax.map(member, jnp.arange(len(idx)))

    f, t, rounding = _over_chunks(
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

  f, t, f0, rounding = _tree.cond(checking, evaluate, no_values)
  # Steps are norms, never negative (zero when not checking, NaN compares
  # false), so every update is selected as it is, bit for bit; XLA, which
  # cannot know that, runs the first half before the updates are used.
  never = t[0] < 0
  updates = jax.tree.map(
    lambda u: jnp.where(never, jnp.zeros_like(u), u) if _tree.is_float(u) else u, updates
  )

  def compare() -> jax.Array:
    def run_chunk(members: list[int], idx: list[int], chunk_key: jax.Array) -> Any:
      del members
      dtype = jnp.promote_types(leaves[idx[0]].dtype, FLOAT32)

      def member(k: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        v = _directions(chunk_key, k, num_directions, leaves[idx[0]], FLOAT32, dtype)
        return _gradient_terms(_pick(k, [grads[i] for i in idx]), v, dtype)

      return jax.lax.map(member, jnp.arange(len(idx)))

    reverse, typical, finite = _over_chunks(
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
    errors = jnp.where(result.verdict != _UNRELIABLE, result.error, 0.0).astype(FLOAT32)
    worst = jnp.argmax(errors)
    # Severity order: ok < unreliable < mismatch < nonfinite.
    severity = jnp.asarray([0, 2, 1, 3], jnp.int32)[result.verdict]
    return jnp.stack(
      [errors[worst], jnp.asarray(checked, FLOAT32)[worst], jnp.max(severity).astype(FLOAT32)]
    )

  return _tree.cond(checking, compare, _no_check_result), updates


def _no_check_result() -> jax.Array:
  """:func:`_check_in_step`'s result when nothing is checked: no error, no leaf."""
  return jnp.asarray([0.0, -1.0, 0.0], FLOAT32)


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
    error, leaf, severity = result[0], result[1].astype(jnp.int32), result[2]
    new_worst = error > state.worst_error
    return updates, GradientCheckState(
      count=_tree.cycle_count(state.count, every_k),
      steps_checked=_tree.count_if(state.steps_checked, checking),
      failures=_tree.count_if(state.failures, severity >= 2),
      unreliable=_tree.count_if(state.unreliable, severity == 1),
      worst_error=jnp.where(new_worst, error, state.worst_error),
      worst_leaf=jnp.where(new_worst, leaf, state.worst_leaf),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
