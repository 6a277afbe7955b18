"""Benchmark rows for dynamic loss scaling: ``dynamic_loss_scale(adam)`` vs adam.

The scaler reads the gradient once to test it for overflow, then runs Adam in
a ``lax.cond`` with the unscaling fused into Adam's own reads; a skipped step
writes the zero updates only. The note gives XLA's bytes accessed over the
floor (reading and writing the gradient once) for ours and for Adam alone
(bound: Adam's 4.5 plus the 0.5 of the check's read).
"""

from __future__ import annotations

import optax

import _harness
import gradcal_jax as gc


def rows(sizes: list[int]) -> list[_harness.Row]:
  out = []
  for size in sizes:
    grads = _harness.make_tree(size)
    out.extend(_harness.guard_rows(
        "dynamic_loss_scale(adam)", gc.dynamic_loss_scale(optax.adam(1e-3)), grads,
        float("inf"), "good step", "overflow step"))
  return out


if __name__ == "__main__":
  print(_harness.table(rows([1_000_000, 10_000_000])))
