"""Benchmark rows for ``accumulate`` against ``optax.MultiSteps``, both around Adam.

A non-boundary micro-step of ``accumulate`` only folds the gradient into its
buffer (Adam sits in a ``lax.cond`` and does not run), while ``MultiSteps``
runs Adam on every micro-step and discards the result; on the boundary step
both run Adam once. Neither update donates its state here, so a micro-step
of ours still writes the unchanged Adam moments to fresh output buffers (an
XLA output cannot alias an input that is not donated): it reads and writes
the gradient-sized buffers Adam would (gradient, accumulator, two moments),
minus Adam's arithmetic. The note gives the compiled memory (argument plus
temporary bytes, from ``memory_analysis``) of ours over ``MultiSteps``'s.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
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


def _memory(tx: Any, grads: Any, donate: bool = False) -> int:
  """Argument plus temporary bytes of the compiled update (outputs excluded).

  With ``donate``, of a training step that applies the updates to the params
  and donates params and state, as one runs it in practice (donating the
  state to ``tx.update`` alone lets JAX pair the donated buffers with outputs
  of the same shape in order, the updates first, which costs copies).
  """
  if not donate:
    compiled = jax.jit(tx.update).lower(grads, tx.init(grads)).compile()
  else:
    compiled = _harness.train_step(tx).lower(grads, grads, tx.init(grads)).compile()
  memory = compiled.memory_analysis()
  return memory.argument_size_in_bytes + memory.temp_size_in_bytes


def _donated_steps(ours: Any, ref: Any, grads: Any, cycles: int = 11
                   ) -> tuple[tuple[float, float], tuple[float, float]]:
  """Median (ours, ref) times of a micro-step and of a boundary step, each
  call timed inside a training step that donates params and state (the state
  is carried, so each call sits at its place in the cycle)."""
  steps = [_harness.train_step(ours), _harness.train_step(ref)]
  carry = [[jax.tree.map(jnp.copy, grads), jax.tree.map(jnp.copy, tx.init(grads))]
           for tx in (ours, ref)]
  times = [([], []), ([], [])]
  for cycle in range(cycles + 1):
    for which in (0, 1):
      for position in range(EVERY_K):
        start = time.perf_counter()
        carry[which] = list(steps[which](carry[which][0], grads, carry[which][1]))
        jax.block_until_ready(carry[which])
        if cycle:  # the first cycle compiles and warms up
          times[which][position == EVERY_K - 1].append(time.perf_counter() - start)
  micro = tuple(statistics.median(times[w][0]) for w in (0, 1))
  boundary = tuple(statistics.median(times[w][1]) for w in (0, 1))
  return micro, boundary


def rows(sizes: list[int]) -> list[_harness.Row]:
  out = []
  for size in sizes:
    grads = _harness.make_tree(size)
    ours = gc.accumulate(optax.adam(1e-3), every_k=EVERY_K)
    ref = optax.MultiSteps(optax.adam(1e-3), every_k_schedule=EVERY_K)
    mine, theirs = _memory(ours, grads), _memory(ref, grads)
    memory, excess = mine / theirs, mine - theirs
    donated = _memory(ours, grads, True) / _memory(ref, grads, True)
    note = (f"every_k={EVERY_K}; memory ours/MultiSteps {memory:.5f} "
            f"({excess:+,} bytes); donated train step {donated:.5f}")
    # Micro-steps from the initial state, boundaries from the state one call
    # before it; all four and the floor measured in alternation.
    micro_ours, micro_ref, bound_ours, bound_ref, floor = _harness.time_interleaved([
        _harness.update_call(ours, grads),
        _harness.update_call(ref, grads),
        _harness.update_call(ours, grads, state=_state_before_boundary(ours, grads)),
        _harness.update_call(ref, grads, state=_state_before_boundary(ref, grads)),
        _harness.floor_call(grads),
    ], rounds=21)
    entries = _harness.entries(grads)
    out.append(_harness.Row("accumulate(adam) micro-step", entries, micro_ours,
                            "MultiSteps(adam)", micro_ref, floor, note))
    out.append(_harness.Row("accumulate(adam) boundary", entries, bound_ours,
                            "MultiSteps(adam)", bound_ref, floor, note))
    micro, boundary = _donated_steps(ours, ref, grads)
    note_step = "inside a training step that donates params and state"
    out.append(_harness.Row("accumulate(adam) micro-step, donated step", entries,
                            micro[0], "MultiSteps(adam)", micro[1], floor, note_step))
    out.append(_harness.Row("accumulate(adam) boundary, donated step", entries,
                            boundary[0], "MultiSteps(adam)", boundary[1], floor,
                            note_step))
  return out
