"""Private control flow shared by the transforms: a ``lax.cond`` that runs
eagerly op by op, and the run-or-hold cond around an inner transform."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from gradcal_jax._tree import is_concrete


def cond(
  pred: Any, true_fn: Callable[..., Any], false_fn: Callable[..., Any], *operands: Any
) -> Any:
  """``jax.lax.cond(pred, true_fn, false_fn, *operands)``, which runs the picked
  branch op by op when nothing is traced (an eager call).

  An eager ``lax.cond`` traces both branches into new jaxprs and compiles them
  anew at every call (its cache keys on those jaxprs): 100 to 200 ms a step
  for a transform with a norm, where the rest of the step takes 1 ms. With a
  concrete ``pred`` and concrete operands the branch it picks is called
  directly, its outputs cast to the dtypes ``lax.cond`` gives, so eager and
  jitted steps still match. Under ``jit``, ``vmap`` or ``shard_map`` it is
  ``lax.cond``.
  """
  traced = [x for x in (pred, *jax.tree.leaves(operands)) if not is_concrete(x)]
  if traced:
    return jax.lax.cond(pred, true_fn, false_fn, *operands)
  shapes = jax.eval_shape(lambda *o: jax.lax.cond(pred, true_fn, false_fn, *o), *operands)
  out = (true_fn if bool(pred) else false_fn)(*operands)
  return jax.tree.map(lambda x, s: jnp.asarray(x, s.dtype), out, shapes)


def run_or_hold(
  run: jax.Array,
  update: Callable[[Any, Any, Any], tuple[Any, Any]],
  updates: Any,
  inner_state: Any,
  params: Any,
  when_held: Callable[[Any], jax.Array] | None = None,
) -> tuple[Any, ...]:
  """``update(updates, inner_state, params)`` when ``run``, else zeros and the
  inner state as it is, under one ``lax.cond``: the wrapped transform of a
  guard or an accumulator runs only on the steps that need it.

  The held branch computes nothing gradient-sized but the zero updates; the
  inner state passes through as is, so a training step that donates its
  state updates it in place with no copy (without donation, XLA copies it
  before the cond: an output may not alias an input that is not donated).
  Writing the held state out as a new value instead (``where(run, 0, leaf)``)
  moves that copy into the held branch, which XLA's count of an undonated
  update likes (``skip_spikes(adam)`` 5.0 times the floor instead of 7.0), but
  then XLA:CPU copies the state after the cond in a donated step (8.5 instead
  of 6.5; 1.64 instead of 1.22 times Adam's wall time), unless
  ``--xla_cpu_copy_insertion_use_region_analysis=true`` is set. Training
  donates, so the state passes through (measured, ``benchmarks/``). The cast is a no-op
  except where the inner state's own dtype changes on its first update
  (optax.adam's moments of an integer leaf). ``update`` is the true branch:
  in the other order XLA:CPU copies the inner state after the cond even when
  it is donated (measured).

  ``when_held(updates)``, if given, is a statistic wanted only on held steps
  (a count of non-finite entries, when a non-finite gradient is what holds):
  it is computed in the held branch alone, zeros of its shape come out of the
  other, and it is returned third. XLA's byte count takes a cond's larger
  branch, so work placed there is free beside the inner update.
  """
  extra = jax.eval_shape(when_held, updates) if when_held is not None else None

  def run_branch(operands: tuple[Any, Any, Any]) -> tuple[Any, ...]:
    out = update(*operands)
    return out if extra is None else (*out, jnp.zeros(extra.shape, extra.dtype))

  operands = (updates, inner_state, params)
  shapes, state_shapes = jax.eval_shape(update, *operands)

  def hold(operands: tuple[Any, Any, Any]) -> tuple[Any, ...]:
    out = (optax.tree.zeros_like(shapes), optax.tree.cast_like(operands[1], state_shapes))
    return out if when_held is None else (*out, when_held(operands[0]))

  return cond(run, run_branch, hold, operands)
