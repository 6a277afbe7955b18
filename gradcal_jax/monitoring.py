"""Gradient-health monitoring: ``monitor``, and ``stats`` / ``report`` to read it."""

from __future__ import annotations

from typing import Any

import jax

from gradcal_jax import _stats


def stats(opt_state: Any) -> dict[str, jax.Array]:
  """Every statistic of every gradcal state inside ``opt_state``, for a logger.

  Walks any nested optax state (``optax.chain``, ``optax.masked``,
  ``optax.inject_hyperparams``, ``optax.MultiSteps``, gradcal wrappers, a Flax
  NNX optimizer's ``opt_state``) and returns a flat dict of float32 / int32
  arrays with stable keys ``"<transform>/<field>"``. A transform used twice
  gets distinct keys (``clip_by_global_norm/norm``, ``clip_by_global_norm_1/norm``);
  a per-layer field gives one key per layer (``monitor/leaf_norms/dense/kernel``).

  Args:
    opt_state: an optax state, or anything containing one.

  Returns:
    ``dict[str, jax.Array]`` of scalars, in a stable order.

  Example:
    >>> import jax.numpy as jnp, optax, gradcal_jax as gc
    >>> tx = optax.chain(gc.clip_by_global_norm(1.0), optax.sgd(0.1))
    >>> grads = {"w": jnp.array([3.0, 4.0])}
    >>> _, state = tx.update(grads, tx.init(grads))
    >>> float(gc.stats(state)["clip_by_global_norm/norm"])
    5.0
  """
  return _stats.collect(opt_state)
