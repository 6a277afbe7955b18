"""Sending :func:`gradcal_jax.stats` to a logger from inside a jitted step.

Reading statistics on the host after every step (``float(stats[...])``) makes
the host wait for the device each step. :func:`log_stats` instead runs inside
the compiled step and hands the statistics to a Python ``write`` function
through ``jax.debug.callback`` on every ``every``-th step only: the other
steps run a ``lax.cond`` branch that does nothing, so the step is not held
for the host. ``write(step, values)`` receives NumPy values and can forward
them to any logger (TensorBoard's ``SummaryWriter.add_scalar``, CLU's
``metric_writers``, Weights & Biases, ``print``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradcal_jax import _control, _tree
from gradcal_jax.monitoring import stats


def log_stats(
  opt_state: Any,
  step: Any,
  write: Callable[[int, dict[str, np.ndarray]], None],
  *,
  every: int = 1,
  include: str | Sequence[str] | None = None,
  per_leaf: str = "all",
) -> None:
  """Calls ``write(step, stats(opt_state))`` on every ``every``-th step, from jit.

  Call it inside the jitted training step, after the update; it returns
  nothing and changes nothing. On steps with ``step % every == 0`` it calls
  ``write(int(step), {key: numpy value})`` on the host through
  ``jax.debug.callback``; other steps take the empty branch of a
  ``lax.cond``. Callbacks are asynchronous: call ``jax.effects_barrier()``
  before reading what ``write`` stored (at the end of training, say).

  Args:
    opt_state: the optax state after the update (or an ``nnx.Optimizer``).
    step: the step number, an int or int32 scalar (traced under jit).
    write: called on the host with the step and the statistics.
    every: log every this many steps (>= 1).
    include: passed to :func:`gradcal_jax.stats` (key patterns).
    per_leaf: passed to :func:`gradcal_jax.stats` (``"all"``, ``"summary"``
      or ``"none"``).

  Raises:
    ValueError: for a bad ``every``, or when :func:`gradcal_jax.stats` does.

  Example:
    >>> import jax, jax.numpy as jnp, optax, gradcal_jax as gc
    >>> tx = optax.chain(gc.clip_by_global_norm(1.0), optax.sgd(0.1))
    >>> logged = []
    >>> write = lambda s, v: logged.append((s, float(v["clip_by_global_norm/norm"])))
    >>> @jax.jit
    ... def step(i, params, state):
    ...   updates, state = tx.update({"w": jnp.array([3.0, 4.0])}, state)
    ...   gc.log_stats(state, i, write, every=2)
    ...   return optax.apply_updates(params, updates), state
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> for i in range(4):
    ...   params, state = step(i, params, state)
    >>> jax.effects_barrier()
    >>> logged
    [(0, 5.0), (2, 5.0)]
  """
  _tree.check_int("every", every, low=1)
  values = stats(opt_state, include=include, per_leaf=per_leaf)
  # The keys travel as Python constants and the values as a list: a dict
  # passed through the callback would come back with its keys sorted.
  keys = list(values)

  def emit(step: Any, arrays: list[Any]) -> None:
    write(int(step), {k: np.asarray(v) for k, v in zip(keys, arrays)})

  def run() -> None:
    jax.debug.callback(emit, step, [values[k] for k in keys])

  _control.cond(jnp.asarray(step) % every == 0, run, lambda: None)
