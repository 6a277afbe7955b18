"""Benchmark rows for ``truncate_top_k(0.01)``, against a ``lax.top_k`` mask.

The reference selects each leaf's top 1% with ``jax.lax.top_k`` on the
flattened magnitudes and scatters a mask (no error feedback). It is what one
would write first, but on a sharded leaf it needs the whole leaf on one device;
ours finds the threshold with scalar counts only: one pass of max and sum of
squares, then counting passes whose candidates interpolate the count (about 10
on these Gaussian leaves, never more than 34), plus a bisection on the index
(up to 31 passes) only when ties sit at the threshold.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

import _harness
import gradcal_jax as gc

FRACTION = 0.01


def _lax_top_k(fraction: float) -> optax.GradientTransformation:
  def top_k(x: jax.Array) -> jax.Array:
    flat = jnp.abs(x).ravel()
    _, index = jax.lax.top_k(flat, math.ceil(fraction * flat.size))
    keep = jnp.zeros(flat.shape, bool).at[index].set(True).reshape(x.shape)
    return jnp.where(keep, x, 0)

  def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
    del params
    return jax.tree.map(top_k, updates), state

  return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


def rows(sizes: list[int]) -> list[_harness.Row]:
  out = []
  for size in sizes:
    grads = _harness.make_tree(size)
    for error_feedback in (True, False):
      out.append(_harness.compare(
          f"truncate_top_k({FRACTION}, error_feedback={error_feedback})",
          gc.truncate_top_k(FRACTION, error_feedback=error_feedback),
          "lax.top_k mask", _lax_top_k(FRACTION), grads,
          note="exact k, ties to the lower index; no gather when sharded"))
  return out
