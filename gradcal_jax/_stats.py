"""Private registry of gradcal state types, and the walk that reads their statistics.

Every gradcal state NamedTuple is declared with :func:`register_state`, naming the
transform and the fields a user would log. :func:`collect` walks any nested optax
state (``optax.chain`` tuples, ``masked``, ``inject_hyperparams``, ``MultiSteps``,
our wrappers, dicts, Flax NNX optimizer variables) and returns those fields as a
flat ``dict`` with stable keys ``"<transform>/<field>"``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import jax
import jax.numpy as jnp

_T = TypeVar("_T")

# state type -> (transform name, fields exported as statistics)
_REGISTRY: dict[type, tuple[str, tuple[str, ...]]] = {}


def register_state(name: str, fields: tuple[str, ...]) -> Callable[[_T], _T]:
  """Class decorator: ``fields`` of this state are the statistics of ``name``.

  A field may hold a scalar or a pytree of scalars (for example one norm per
  layer); the latter is exported one key per leaf, ``"<name>/<field>/<path>"``.
  Fields not listed (buffers, inner states) are not exported, but gradcal states
  nested inside them are still found.
  """

  def decorate(cls: _T) -> _T:
    missing = set(fields) - set(cls._fields)  # type: ignore[attr-defined]
    if missing:
      raise TypeError(f"{cls!r} has no fields {sorted(missing)}")
    _REGISTRY[cls] = (name, tuple(fields))  # type: ignore[index]
    return cls

  return decorate


def _unwrap(x: Any) -> Any:
  # A Flax NNX optimizer keeps its optax state in Variables; read their values.
  # flax is not imported for this: without flax.nnx loaded, nothing is one.
  nnx = sys.modules.get("flax.nnx")
  if nnx is not None and isinstance(x, nnx.Variable):
    return x.get_value()
  return x


def path_str(path: tuple[Any, ...]) -> str:
  """``"layers/0/kernel"`` for a ``jax.tree_util`` key path."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def leaf_path(path: tuple[Any, ...]) -> str:
  """:func:`path_str` without the final ``.value`` of a Flax NNX Variable.

  An NNX ``State`` ends every leaf's path with its Variable's ``value``; a
  final ``value`` key is dropped when it is that attribute, or when a parent
  path remains (a lone dict key ``"value"`` stays).
  """
  if path:
    last = path[-1]
    name = getattr(last, "name", getattr(last, "key", None))
    if name == "value" and (len(path) > 1 or isinstance(last, jax.tree_util.GetAttrKey)):
      path = path[:-1]
  return path_str(path)


def _is_node(x: Any) -> bool:
  return isinstance(x, (tuple, list, dict)) or (hasattr(x, "items") and callable(x.items))


def _children(x: Any) -> Iterator[Any]:
  if isinstance(x, (tuple, list)):
    yield from x
  elif _is_node(x):
    yield from (v for _, v in sorted(x.items(), key=lambda kv: str(kv[0])))


def _walk(state: Any) -> Iterator[tuple[str, tuple[str, ...], Any]]:
  if type(state) in _REGISTRY:
    name, fields = _REGISTRY[type(state)]
    yield name, fields, state
  if _is_node(state):
    for child in _children(state):
      yield from _walk(child)


def named_states(opt_state: Any) -> Iterator[tuple[str, tuple[str, ...], Any]]:
  """``(prefix, fields, state)`` for every registered state inside, in order.

  ``prefix`` is the transform's name, with ``_1``, ``_2``... for repeats;
  Flax NNX Variables in ``state`` are replaced by their values.
  """
  seen: dict[str, int] = {}
  for name, fields, state in _walk(opt_state):
    count = seen.get(name, 0)
    seen[name] = count + 1
    prefix = name if count == 0 else f"{name}_{count}"
    state = jax.tree.map(_unwrap, state, is_leaf=lambda x: _unwrap(x) is not x)
    yield prefix, fields, state


PER_LEAF = ("all", "summary", "none")


def collect(opt_state: Any, per_leaf: str = "all") -> dict[str, jax.Array]:
  """Flat ``{"<transform>/<field>": array}`` of every registered state inside.

  Keys are stable: the walk follows the state's own order, and a transform
  that appears again gets a suffix (``clip_by_global_norm_1/norm``). A field
  holding one value per leaf gives ``"<transform>/<field>/<path>"`` keys
  (``per_leaf="all"``), its ``.../max`` and ``.../min`` over leaves
  (``"summary"``, NaN if any leaf's is) or nothing (``"none"``).
  """
  out: dict[str, jax.Array] = {}
  for prefix, fields, state in named_states(opt_state):
    for field in fields:
      key = f"{prefix}/{field}"
      flat = jax.tree_util.tree_flatten_with_path(getattr(state, field))[0]
      if len(flat) == 1 and not flat[0][0]:
        out[key] = flat[0][1]
      elif per_leaf == "all":
        out.update({f"{key}/{path_str(path)}": leaf for path, leaf in flat})
      elif per_leaf == "summary" and flat:
        leaves = [jnp.asarray(leaf) for _, leaf in flat]
        out[f"{key}/max"] = jnp.max(jnp.stack([jnp.max(x) for x in leaves]))
        out[f"{key}/min"] = jnp.min(jnp.stack([jnp.min(x) for x in leaves]))
  return out
