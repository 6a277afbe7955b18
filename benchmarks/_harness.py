"""Timing helpers shared by the benchmark files (not part of the library).

Every row times a jitted update after warm-up, blocks on its results, takes the
median of repeats, and is compared with a reference and with the memory-bound
floor (reading and writing the same gradient once), all measured in the same
process in alternation, round after round, so that load changes on the machine
hit all three alike.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

LEAVES = 100


@dataclasses.dataclass(frozen=True)
class Row:
  """One line of the table: our time, the reference's, and the floor (seconds)."""
  transform: str
  size: int
  ours: float
  reference_name: str
  reference: float
  floor: float
  note: str = ""
  # XLA's bytes accessed over the floor's (deterministic), ours and the
  # reference's; None where a row times more than one update.
  traffic: float | None = None
  reference_traffic: float | None = None

  @property
  def ratio(self) -> float:
    return self.ours / self.reference

  @property
  def floor_ratio(self) -> float:
    return self.ours / self.floor


def make_tree(total: int, leaves: int = LEAVES, dtype: Any = jnp.float32,
              seed: int = 0) -> dict[str, jax.Array]:
  """A pytree of ``leaves`` leaves totalling about ``total`` entries.

  Shaped like a model: most leaves are 2-D kernels (in, out), every fourth is
  a bias vector, sizes vary by a factor of a few around the mean.
  """
  rng = np.random.default_rng(seed)
  weights = rng.uniform(0.5, 2.0, leaves)
  sizes = np.maximum(1, (weights / weights.sum() * total).astype(int))
  tree = {}
  for i, n in enumerate(sizes):
    if i % 4 == 3:
      shape = (int(n),)
    else:
      out = 128
      shape = (max(1, int(n) // out), out)
    tree[f"layer_{i:03d}"] = jnp.asarray(
        rng.standard_normal(shape, dtype=np.float32), dtype)
  return tree


def entries(tree: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))


def time_interleaved(calls: list[Callable[[], Any]], rounds: int = 15,
                     warmup: int = 3) -> list[float]:
  """Median wall times (s) of several calls, measured in alternation.

  Each round runs every call once, so a change in machine load during the
  measurement hits all of them alike and their ratios stay meaningful.
  """
  for call in calls:
    for _ in range(warmup):
      jax.block_until_ready(call())
  times: list[list[float]] = [[] for _ in calls]
  for _ in range(rounds):
    for call, bucket in zip(calls, times):
      start = time.perf_counter()
      jax.block_until_ready(call())
      bucket.append(time.perf_counter() - start)
  return [statistics.median(t) for t in times]


def update_call(tx: optax.GradientTransformation, grads: Any,
                params: Any = None, state: Any = None,
                **extra: Any) -> Callable[[], Any]:
  """A call of the jitted ``tx.update`` (from its initial state by default)."""
  if state is None:
    state = tx.init(params if params is not None else grads)
  update = jax.jit(tx.update)
  return lambda: update(grads, state, params, **extra)


def train_step(tx: optax.GradientTransformation) -> Callable[..., Any]:
  """A jitted training step ``(params, grads, state) -> (params, state)`` that
  applies ``tx``'s updates and donates params and state, as training does."""
  def step(params, grads, state):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return jax.jit(step, donate_argnums=(0, 2))


def train_step_call(tx: optax.GradientTransformation, grads: Any,
                    steps: int = 1) -> Callable[[], Any]:
  """``steps`` calls of :func:`train_step`, the state carried from call to
  call (a donated buffer cannot be reused)."""
  step = train_step(tx)
  carry = {"params": jax.tree.map(jnp.copy, grads),
           "state": jax.tree.map(jnp.copy, tx.init(grads))}

  def call():
    for _ in range(steps):
      carry["params"], carry["state"] = step(carry["params"], grads, carry["state"])
    return carry["params"]
  return call


def floor_call(tree: Any) -> Callable[[], Any]:
  """The memory-bound floor: read every entry once and write it once."""
  negate = jax.jit(lambda t: jax.tree.map(jnp.negative, t))
  return lambda: negate(tree)


def time_floor(tree: Any, repeats: int = 15) -> float:
  """The memory-bound floor: read every entry once and write it once."""
  return time_interleaved([floor_call(tree)], rounds=repeats)[0]


def bytes_accessed(fn: Callable[..., Any], *args: Any) -> float:
  """XLA's count of the bytes the compiled ``fn(*args)`` reads and writes:
  deterministic, unlike a time."""
  return float(jax.jit(fn).lower(*args).compile().cost_analysis()["bytes accessed"])


def traffic(tx: optax.GradientTransformation, grads: Any, params: Any = None,
            state: Any = None) -> float:
  """Bytes accessed by ``tx.update`` over the floor's (reading and writing
  ``grads`` once)."""
  state = tx.init(params if params is not None else grads) if state is None else state
  floor = bytes_accessed(lambda t: jax.tree.map(jnp.negative, t), grads)
  return bytes_accessed(tx.update, grads, state, params) / floor


def step_traffic(tx: optax.GradientTransformation, grads: Any) -> float:
  """Bytes accessed by :func:`train_step` (params and state donated) over the
  floor's: the figure a training loop pays."""
  floor = bytes_accessed(lambda t: jax.tree.map(jnp.negative, t), grads)
  compiled = train_step(tx).lower(grads, grads, tx.init(grads)).compile()
  return float(compiled.cost_analysis()["bytes accessed"]) / floor


def compare(name: str, tx: optax.GradientTransformation, reference_name: str,
            reference: optax.GradientTransformation, grads: Any,
            params: Any = None, floor: float | None = None,
            note: str = "", rounds: int = 21) -> Row:
  """Times ``tx``, ``reference`` and the floor, interleaved, and returns a Row."""
  calls = [update_call(tx, grads, params), update_call(reference, grads, params)]
  if floor is None:
    calls.append(floor_call(grads))
  times = time_interleaved(calls, rounds=rounds)
  return Row(name, entries(grads), times[0], reference_name, times[1],
             times[2] if floor is None else floor, note,
             traffic(tx, grads, params), traffic(reference, grads, params))


def guard_rows(name: str, ours: optax.GradientTransformation, grads: Any,
               bad: float, ran: str, held: str, note: str = "") -> list[Row]:
  """Rows for a guard around ``optax.adam(1e-3)`` (``ours``), each against
  plain Adam: a step where Adam runs (``ran``), one where a ``bad`` entry
  makes the guard hold Adam (``held``), and a donated training step."""
  adam = optax.adam(1e-3)
  bad_grads = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(bad), grads)
  good, held_time, reference, floor = time_interleaved([
      update_call(ours, grads, grads),
      update_call(ours, bad_grads, grads),
      update_call(adam, grads, grads),
      floor_call(grads),
  ], rounds=21)
  ours_step, adam_step = time_interleaved(
      [train_step_call(ours, grads), train_step_call(adam, grads)], rounds=21)
  n = entries(grads)
  return [
      Row(f"{name} {ran}", n, good, "adam", reference, floor, note,
          traffic(ours, grads, grads), traffic(adam, grads, grads)),
      Row(f"{name} {held}", n, held_time, "adam", reference, floor,
          f"{bad} step: zeros out, Adam state passed through"),
      Row(f"{name} donated train step", n, ours_step, "adam train step",
          adam_step, floor, "params and state donated; updates applied",
          step_traffic(ours, grads), step_traffic(adam, grads)),
  ]


def table(rows: list[Row]) -> str:
  """A Markdown table of ``rows`` (times in milliseconds)."""
  lines = [
      "| transform | entries | ours (ms) | reference | ref (ms) | ratio |"
      " floor (ms) | ours / floor | bytes / floor, ours | bytes / floor, ref |"
      " note |",
      "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|",
  ]
  fmt = lambda x: "" if x is None else f"{x:.2f}"
  for r in rows:
    lines.append(
        f"| {r.transform} | {r.size:,} | {r.ours * 1e3:.3f} | "
        f"{r.reference_name} | {r.reference * 1e3:.3f} | {r.ratio:.2f} | "
        f"{r.floor * 1e3:.3f} | {r.floor_ratio:.2f} | {fmt(r.traffic)} | "
        f"{fmt(r.reference_traffic)} | {r.note} |")
  return "\n".join(lines)
