"""Chunk planning: which same-shaped leaves one traced body checks together."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradcal_jax.checking._numerics import _OFFSETS

# Same-shaped leaves checked by one traced body: at most _CHUNK (a larger
# chunk batches more of objective at every point, a smaller one compiles objective more
# times), and few enough that the points hold at most _CHUNK_ENTRIES entries.
_CHUNK = 4
_CHUNK_ENTRIES = 2**24


def _chunks(members: list[int], size: int, points: int) -> list[list[int]]:
  """``members`` cut into consecutive runs of at most ``_CHUNK`` leaves, fewer
  when ``points`` copies of each would exceed ``_CHUNK_ENTRIES``."""
  room = max(1, min(_CHUNK, _CHUNK_ENTRIES // max(points * size, 1)))
  return [members[a : a + room] for a in range(0, len(members), room)]


def _chunk_plan(leaves: list[Any], checked: list[int], num_directions: int) -> list[list[int]]:
  """The checked leaves (as positions in ``checked``) cut into chunks.

  Leaves of one shape and dtype (the layers of a deep model) are cut, in tree
  order, into chunks of at most ``_CHUNK``; the members of a chunk share one
  traced body run by ``lax.map`` with the member's index as data, so the
  compiled check grows with the number of chunks, not with leaves times the
  size of the function. Whole groups in one body would batch every layer of a
  deep model at every point, and one body per leaf would compile the function
  once per leaf. The chunks are small enough that ``4 * directions`` copies
  of one stay within ``_CHUNK_ENTRIES`` entries.
  """
  groups: dict[tuple[Any, ...], list[int]] = {}
  for n, i in enumerate(checked):
    groups.setdefault((leaves[i].shape, jnp.dtype(leaves[i].dtype)), []).append(n)
  points = len(_OFFSETS) * num_directions
  return [
    chunk
    for members in groups.values()
    for chunk in _chunks(members, leaves[checked[members[0]]].size, points)
  ]


def _run_chunks(
  chunks: list[list[int]],
  checked: list[int],
  key: jax.Array,
  run_chunk: Callable[[list[int], list[int], jax.Array], Any],
  check_dtype: Any,
) -> Any:
  """``run_chunk(members, idx, chunk_key)`` for every chunk, its per-member
  results cast to ``check_dtype`` (flags stay bool), concatenated and put back in
  ``checked`` order. ``idx`` are the members' indices among all leaves; each
  chunk has its own key, so the directions of a leaf do not depend on how the
  other chunks are checked."""
  parts, order = [], []
  for number, members in enumerate(chunks):
    part = run_chunk(members, [checked[n] for n in members], jax.random.fold_in(key, number))
    parts.append(jax.tree.map(lambda a: a if a.dtype == jnp.bool_ else a.astype(check_dtype), part))
    order += members
  position = np.argsort(np.asarray(order))
  return jax.tree.map(lambda *a: jnp.concatenate(a)[position], *parts)
