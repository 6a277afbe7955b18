"""Benchmark rows for the monitoring family: ``monitor`` against ``optax.identity``.

``monitor`` reads the gradient (norms, largest entry) and returns it untouched.
Alone under ``jax.jit`` both it and ``optax.identity`` pay for copying the
gradient into fresh outputs; the second row shows its cost inside a chain,
where nothing is copied: ``chain(monitor, sgd)`` against ``sgd``.
"""

from __future__ import annotations

import optax

import _harness
import gradcal_jax as gc


def rows(sizes: list[int]) -> list[_harness.Row]:
  out = []
  for size in sizes:
    grads = _harness.make_tree(size)
    out.append(_harness.compare(
        "monitor", gc.monitor(), "optax.identity", optax.identity(), grads,
        note="global, per-leaf and max norms"))
    out.append(_harness.compare(
        "chain(monitor, sgd)", optax.chain(gc.monitor(), optax.sgd(0.1)),
        "optax.sgd", optax.sgd(0.1), grads,
        note="monitor inside a chain"))
  return out
