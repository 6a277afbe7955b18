"""Benchmark rows for dynamic loss scaling: ``dynamic_loss_scale(adam)`` vs adam.

The scaler reads the gradient once to test it for overflow, then runs Adam in
a ``lax.cond`` with the unscaling fused into Adam's own reads; a skipped step
writes the zero updates only. The note gives XLA's bytes accessed over the
floor (reading and writing the gradient once) for ours and for Adam alone.
"""

from __future__ import annotations

import optax

import _harness
import gradcal_jax as gc


def rows(sizes: list[int]) -> list[_harness.Row]:
  out = []
  for size in sizes:
    grads = _harness.make_tree(size)
    ours = gc.dynamic_loss_scale(optax.adam(1e-3))
    traffic = (f"bytes/floor ours {_harness.traffic(ours, grads, grads):.2f}, "
               f"adam {_harness.traffic(optax.adam(1e-3), grads, grads):.2f}")
    out.extend(_harness.guard_rows("dynamic_loss_scale(adam)", ours, grads,
                                   float("inf"), "good step", "overflow step",
                                   traffic))
  return out


if __name__ == "__main__":
  print(_harness.table(rows([1_000_000, 10_000_000])))
