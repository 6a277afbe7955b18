"""Benchmark rows for dynamic loss scaling: ``dynamic_loss_scale(adam)`` vs adam.

The scaler reads the gradient once to test it for overflow, then runs Adam in
a ``lax.cond`` with the unscaling fused into Adam's own reads; a skipped step
writes the zero updates only. The note gives XLA's bytes accessed over the
floor (reading and writing the gradient once) for ours and for Adam alone.
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
    adam = optax.adam(1e-3)
    ours = gc.dynamic_loss_scale(optax.adam(1e-3))
    traffic = (f"bytes/floor ours {_harness.traffic(ours, grads, grads):.2f}, "
               f"adam {_harness.traffic(adam, grads, grads):.2f}")
    nan_grads = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.inf), grads)
    good, skipped, reference, floor = _harness.time_interleaved([
        _harness.update_call(ours, grads, grads),
        _harness.update_call(ours, nan_grads, grads),
        _harness.update_call(adam, grads, grads),
        _harness.floor_call(grads),
    ], rounds=21)
    entries = _harness.entries(grads)
    out.append(_harness.Row("dynamic_loss_scale(adam) good step", entries, good,
                            "adam", reference, floor, traffic))
    out.append(_harness.Row(
        "dynamic_loss_scale(adam) overflow step", entries, skipped, "adam",
        reference, floor, "inf step: zeros out, Adam state passed through"))
    ours_step, adam_step = _harness.time_interleaved([
        _harness.train_step_call(ours, grads),
        _harness.train_step_call(adam, grads),
    ], rounds=21)
    out.append(_harness.Row(
        "dynamic_loss_scale(adam) donated train step", entries, ours_step,
        "adam train step", adam_step, floor,
        "params and state donated; updates applied"))
  return out


if __name__ == "__main__":
  print(_harness.table(rows([1_000_000, 10_000_000])))
