"""Ring buffers of past norms (or losses), shared by autoclip and skip_spikes."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gradcal_jax import _tree

INT32 = jnp.int32


def record(
  buffer: jax.Array, count: jax.Array, value: jax.Array, keep: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Writes ``value`` at the ring position of ``count`` when ``keep``.

  The count cycles near the int32 maximum instead of freezing there
  (:func:`_tree.cycle_count`), so the ring keeps turning past 2**31-1 records.
  """
  position = count % buffer.shape[0]
  buffer = jnp.where(keep, buffer.at[position].set(value), buffer)
  return buffer, jnp.where(keep, _tree.cycle_count(count, buffer.shape[0]), count)


def filled(buffer: jax.Array, count: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The mask of filled ring entries and how many there are (int32)."""
  n = jnp.minimum(count, buffer.shape[0]).astype(INT32)
  return jnp.arange(buffer.shape[0]) < n, n
