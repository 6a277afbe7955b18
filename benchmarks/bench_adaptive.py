"""Benchmark rows for the adaptive family: autoclip, zclip, skip_spikes.

``autoclip`` and ``zclip`` read the gradient once for the norm and once to
scale it, like ``optax.clip_by_global_norm``; on top of that autoclip sorts its
1000-long history (a few microseconds) and zclip updates a few scalars.
``skip_spikes(adam)`` is timed on an accepted step (Adam runs inside a
``lax.cond``) against plain Adam, and on a skipped step (a NaN gradient: only
the zero updates are written) in a row of its own.
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
    clip = optax.clip_by_global_norm(1.0)
    out.append(_harness.compare(
        "autoclip", gc.autoclip(10.0, 1000), "clip_by_global_norm", clip, grads,
        note="percentile=10, history=1000"))
    out.append(_harness.compare(
        "zclip", gc.zclip(), "clip_by_global_norm", clip, grads))
    adam = optax.adam(1e-3)
    ours = gc.skip_spikes(optax.adam(1e-3))
    nan_grads = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), grads)
    accepted, skipped, reference, floor = _harness.time_interleaved([
        _harness.update_call(ours, grads, grads),
        _harness.update_call(ours, nan_grads, grads),
        _harness.update_call(adam, grads, grads),
        _harness.floor_call(grads),
    ], rounds=21)
    entries = _harness.entries(grads)
    out.append(_harness.Row("skip_spikes(adam) accepted", entries, accepted,
                            "adam", reference, floor))
    out.append(_harness.Row(
        "skip_spikes(adam) skipped", entries, skipped, "adam", reference, floor,
        "NaN step: zeros out, Adam state passed through"))
    ours_step, adam_step = _harness.time_interleaved([
        _harness.train_step_call(ours, grads),
        _harness.train_step_call(adam, grads),
    ], rounds=21)
    out.append(_harness.Row(
        "skip_spikes(adam) donated train step", entries, ours_step,
        "adam train step", adam_step, floor,
        "params and state donated; updates applied"))
  return out


if __name__ == "__main__":
  print(_harness.table(rows([1_000_000, 10_000_000])))
