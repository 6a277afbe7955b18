"""Benchmark rows for the clipping family, each against its optax equivalent.

``clip_by_global_norm`` reads the gradient once for the norm and once more to
scale it, like optax's, and also records the norm and scale. ``clip_by_value``
also reads the gradient for its statistics; ``adaptive_grad_clip`` must read
the params as well; ``centralize`` reads each leaf for its means first.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import _harness
import gradcal_jax as gc


def rows(sizes: list[int]) -> list[_harness.Row]:
  out = []
  for size in sizes:
    grads = _harness.make_tree(size)
    params = jax.tree.map(lambda g: jnp.flip(g, axis=0) * 3.0, grads)
    out.append(_harness.compare(
        "clip_by_global_norm", gc.clip_by_global_norm(1.0),
        "optax.clip_by_global_norm", optax.clip_by_global_norm(1.0), grads,
        note="also records norm and scale"))
    out.append(_harness.compare(
        "clip_by_value", gc.clip_by_value(0.5), "optax.clip", optax.clip(0.5),
        grads, note="also records norm and clipped fraction"))
    out.append(_harness.compare(
        "adaptive_grad_clip", gc.adaptive_grad_clip(0.01),
        "optax.adaptive_grad_clip", optax.adaptive_grad_clip(0.01), grads,
        params=params, note="reads params too"))
    out.append(_harness.compare(
        "centralize", gc.centralize(), "optax.centralize", optax.centralize(),
        grads, note="means over Flax's unit axes"))
  return out
