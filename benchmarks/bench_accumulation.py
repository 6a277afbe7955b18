"""Benchmark rows for ``accumulate`` against ``optax.MultiSteps``, both around Adam.

A non-boundary micro-step of ``accumulate`` only folds the gradient into its
buffer (Adam sits in a ``lax.cond`` and does not run), while ``MultiSteps``
runs Adam on every micro-step and discards the result; on the boundary step
both run Adam once. The note gives the compiled memory (argument plus
temporary bytes, from ``memory_analysis``) of ours over ``MultiSteps``'s.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

import _harness
import gradcal_jax as gc

EVERY_K = 4


def _state_before_boundary(tx: Any, grads: Any) -> Any:
  state = tx.init(grads)
  update = jax.jit(tx.update)
  for _ in range(EVERY_K - 1):
    _, state = update(grads, state)
  return state


def _memory(tx: Any, grads: Any) -> int:
  memory = jax.jit(tx.update).lower(grads, tx.init(grads)).compile().memory_analysis()
  return memory.argument_size_in_bytes + memory.temp_size_in_bytes


def rows(sizes: list[int]) -> list[_harness.Row]:
  out = []
  for size in sizes:
    grads = _harness.make_tree(size)
    floor = _harness.time_floor(grads)
    ours = gc.accumulate(optax.adam(1e-3), every_k=EVERY_K)
    ref = optax.MultiSteps(optax.adam(1e-3), every_k_schedule=EVERY_K)
    memory = _memory(ours, grads) / _memory(ref, grads)
    note = f"every_k={EVERY_K}; memory ours/MultiSteps {memory:.4f}"
    out.append(_harness.compare(
        "accumulate(adam) micro-step", ours, "MultiSteps(adam)", ref, grads,
        floor=floor, note=note))
    timings = []
    for tx in (ours, ref):
      state = _state_before_boundary(tx, grads)
      timings.append(_harness.time_fn(jax.jit(tx.update), grads, state))
    out.append(_harness.Row(
        "accumulate(adam) boundary", _harness.entries(grads), timings[0],
        "MultiSteps(adam)", timings[1], floor, note))
  return out
