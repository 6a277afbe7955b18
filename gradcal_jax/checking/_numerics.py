"""Numerics of a check: the stencil, the step, the tolerance, the verdicts."""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class Verdict(enum.IntEnum):
  """What a check found on one leaf: the code the traced check computes (the
  member's value), how bad it is (``severity``, the order the report lists
  rows in, worst first, and ``gradient_check`` keeps the worst of a step in)
  and what it means. The one place the four verdicts are defined."""

  severity: int
  meaning: str

  OK = 0, 0, "every error within rtol"
  MISMATCH = 1, 2, "an error beyond rtol and beyond what the uncertainty explains"
  UNRELIABLE = 2, 1, "an error beyond rtol that only the uncertainty could explain"
  NONFINITE = 3, 3, "a value or a derivative is NaN or infinite"

  def __new__(cls, code: int, severity: int, meaning: str) -> Verdict:
    member = int.__new__(cls, code)
    member._value_ = code
    member.severity = severity
    member.meaning = meaning
    return member

  @property
  def word(self) -> str:
    """The verdict as the report prints it: ``"ok"``, ``"mismatch"``, ..."""
    return self.name.lower()

  @classmethod
  def of(cls, word: str) -> Verdict:
    """The verdict a report row names."""
    return cls[word.upper()]


# The words in code order, and the severities indexed by code (for traced use).
VERDICTS = tuple(v.word for v in Verdict)
SEVERITIES = tuple(v.severity for v in Verdict)
# Finite-difference offsets, in units of the step t: f(x + a t v) for a in these.
_OFFSETS = (-1.0, -0.5, 0.5, 1.0)
# How many uncertainties a disagreement must exceed to be called a mismatch.
_TRUST = 3.0
_NOISE_FLOOR = 16.0


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
  objective: Callable[[jax.Array], jax.Array],
  leaf: jax.Array,
  v: jax.Array,
  t: jax.Array,
  dtype: Any,
  batched: bool,
) -> jax.Array:
  """``objective`` at ``x + a t v`` for every offset ``a`` and direction.

  Returns an array of shape ``(directions, len(_OFFSETS))``; the centre value
  is the same for every leaf and is evaluated once, by the caller.
  """
  offsets = jnp.asarray(_OFFSETS, dtype) * t
  if not batched:
    # Each point is made inside the loop body: one leaf-sized point at a time.
    def at(a_d: tuple[jax.Array, jax.Array]) -> jax.Array:
      a, d = a_d
      return objective((leaf.astype(dtype) + a * v[d]).astype(leaf.dtype)).astype(dtype)

    directions = v.shape[0]
    values = jax.lax.map(
      at, (jnp.tile(offsets, directions), jnp.repeat(jnp.arange(directions), len(_OFFSETS)))
    )
    return values.reshape(directions, len(_OFFSETS))
  ones = (1,) * leaf.ndim
  points = leaf.astype(dtype)[None, None] + offsets.reshape((1, len(_OFFSETS), *ones)) * v[:, None]
  points = points.reshape((-1, *leaf.shape)).astype(leaf.dtype)
  values = jax.vmap(objective)(points).astype(dtype)
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
  slope_t = (fp1 - fm1) / (2 * t)
  slope_half = (fph - fmh) / t
  fd = (4 * slope_half - slope_t) / 3
  f0 = m.f0[:, None]
  # The fourth difference is O(t**4) on a smooth function; at a kink it stays
  # O(t) times the jump in slope, and it samples the evaluation noise.
  kink = jnp.abs(fm1 - 4 * fmh + 6 * f0 - 4 * fph + fp1) / t
  size = jnp.maximum(jnp.abs(f0), jnp.max(jnp.abs(m.f), axis=-1))
  floor = _NOISE_FLOOR * value_eps[:, None] * size / t
  # One uncertainty per leaf: directions share the leaf's noise and curvature.
  spread = jnp.max(jnp.abs(slope_half - slope_t) + kink + floor, axis=1)
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
    int(Verdict.NONFINITE),
    jnp.where(
      mismatch,
      int(Verdict.MISMATCH),
      jnp.where(jnp.any(disagree, axis=1), int(Verdict.UNRELIABLE), int(Verdict.OK)),
    ),
  )
  return _LeafCheck(
    error=jnp.where(finite, pick(error), jnp.inf),
    reverse=pick(m.reverse),
    forward=pick(m.forward),
    finite_difference=pick(fd),
    uncertainty=uncertainty,
    verdict=verdict.astype(jnp.int32),
  )
