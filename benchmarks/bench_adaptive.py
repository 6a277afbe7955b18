"""Benchmark rows for the adaptive family: autoclip, zclip, skip_spikes.

``autoclip`` and ``zclip`` read the gradient once for the norm and once to
scale it, like ``optax.clip_by_global_norm``; on top of that autoclip sorts its
1000-long history (a few microseconds) and zclip updates a few scalars.
``skip_spikes(adam)`` is timed on an accepted step (Adam runs inside a
``lax.cond``) against plain Adam, and on a skipped step (a NaN gradient: only
the zero updates are written) in a row of its own. The safety stack
``chain(monitor, zclip, skip_spikes(adam))`` and the same stack as one
transform, ``guard(adam)``, are set against optax's usual
``chain(clip_by_global_norm, adam)``, alone and in a donated training step.
"""

from __future__ import annotations

import optax

import _harness
import gradcal_jax as gc


def rows(sizes: list[int]) -> list[_harness.Row]:
  out = []
  for size in sizes:
    grads = _harness.make_tree(size)
    clip = optax.clip_by_global_norm(1.0)
    out.append(_harness.compare(
        "autoclip", gc.autoclip(10.0, 1000), "clip_by_global_norm", clip, grads,
        note="percentile=10, history=1000"))
    out.append(_harness.compare(
        "zclip", gc.zclip(), "clip_by_global_norm", clip, grads))
    out.extend(_harness.guard_rows(
        "skip_spikes(adam)", gc.skip_spikes(optax.adam(1e-3)), grads, float("nan"),
        "accepted", "skipped"))
    out.extend(_stack_rows(
        "chain(monitor, zclip, skip_spikes(adam))",
        optax.chain(gc.monitor(), gc.zclip(), gc.skip_spikes(optax.adam(1e-3))), grads))
    out.extend(_stack_rows("guard(adam)", gc.guard(optax.adam(1e-3)), grads))
  return out


def _stack_rows(name: str, stack: optax.GradientTransformation, grads) -> list[_harness.Row]:
  ref_name = "chain(clip_by_global_norm, adam)"
  ref = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
  update_row = _harness.compare(name, stack, ref_name, ref, grads,
                                note="the safety stack, one update")
  ours, theirs = _harness.time_interleaved(
      [_harness.train_step_call(stack, grads), _harness.train_step_call(ref, grads)],
      rounds=21)
  step_row = _harness.Row(
      f"{name} donated train step", _harness.entries(grads), ours,
      f"{ref_name} train step", theirs, update_row.floor,
      "params and state donated; updates applied",
      _harness.step_traffic(stack, grads), _harness.step_traffic(ref, grads))
  return [update_row, step_row]


if __name__ == "__main__":
  print(_harness.table(rows([1_000_000, 10_000_000])))
