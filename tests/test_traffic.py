"""Memory traffic of every public transform, pinned: XLA's bytes accessed over the floor.

The floor is reading and writing the gradient once (``jax.tree.map(negative)``
over the same tree). XLA's count is deterministic, so each figure is held
here: a change that makes a transform move more memory fails this test, and
one that improves it should lower the pin. ``benchmarks/`` reports the same
figures beside optax's. The tree is 10 float32 leaves of 1000 x 100 entries.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradcal_jax as gc
from gradcal_jax import _norms
from gradcal_jax import _tree as gc_tree


def _half_square(params):
  return sum(0.5 * jnp.sum(jnp.square(x)) for x in jax.tree.leaves(params))


def _safety_stack():
  return optax.chain(gc.monitor(), gc.zclip(), gc.skip_spikes(optax.adam(1e-3)))


# name -> (transform factory, needs params, extra update kwargs, pinned figure
# as compiled, pinned figure of a step that needs no norm rescued).
# Bounds (one read for all statistics, plus the output's read and write):
# 1.5 for the clipping and adaptive transforms and monitor, 2.0 for AGC (it
# reads the params), Adam's own 4.5 plus 0.5 for a guard around it. monitor
# and clip_by_value are above theirs: XLA:CPU fuses no two reductions of one
# input into one pass, and the one-pass alternative, a variadic lax.reduce,
# either sums a leaf in sequence (1.6e-2 relative error on 10M entries) or,
# reduced row by row, sends vectors between devices when the rows' axis is
# sharded; a count of non-finite entries (a compare) is not fused into a
# reduction at all (1.5: the mask is written out). The guards pass their held
# inner state through the cond (``_control.run_or_hold``): free when the state
# is donated, as in training (pinned below), but an undonated update copies
# it first (Adam's two moments, 2.0). ``guard(adam)`` is the safety stack
# with ZClip's scale applied inside the cond, the clipped gradient's norm
# fused into one read (``global_norm(scale=)``) and monitor's count in the
# held branch: 8.0 where the chain moves 10.5.
# Every norm has a second branch that redoes its sum with the entries scaled
# (``_norms.rescued_norm``: no overflow above 1.8e19, no underflow below
# 1e-19). A step runs it only when a sum overflowed or is tiny, but XLA's
# count takes a cond's larger branch, so the compiled figure holds one more
# read per norm (0.5; AGC reads the gradient and the params again, 1.0). The
# second figure is measured with the redo traced out (``RESCUE_NORMS``): the
# traffic of every ordinary step. AGC's 2.02 (2.010 before) is its per-unit
# norms' square root with a derivative of 0 at 0 (``_norms.safe_sqrt``: two
# selects on the unit-sized arrays, 0.005 of the floor).
PINNED = {
    "monitor": (gc.monitor, False, {}, 4.00, 3.50),
    "clip_by_value": (lambda: gc.clip_by_value(0.5), False, {}, 3.60, 3.10),
    "clip_by_global_norm": (lambda: gc.clip_by_global_norm(1.0), False, {}, 2.00, 1.50),
    "clip_by_layer_norm": (lambda: gc.clip_by_layer_norm(1.0), False, {}, 2.00, 1.50),
    "adaptive_grad_clip": (lambda: gc.adaptive_grad_clip(0.01), True, {}, 3.02, 2.02),
    "centralize": (gc.centralize, False, {}, 1.50, 1.50),
    "clip_weights": (lambda: gc.clip_weights(0.5), True, {}, 3.50, 3.50),
    "autoclip": (gc.autoclip, False, {}, 2.01, 1.51),
    "zclip": (gc.zclip, False, {}, 2.00, 1.50),
    "skip_spikes(adam)": (lambda: gc.skip_spikes(optax.adam(1e-3)), False, {}, 7.51, 7.01),
    "accumulate(adam)": (lambda: gc.accumulate(optax.adam(1e-3), 4), False, {}, 9.00, 9.00),
    "truncate_top_k": (lambda: gc.truncate_top_k(0.1), False, {}, 9.51, 9.00),
    "dynamic_loss_scale(adam)": (lambda: gc.dynamic_loss_scale(optax.adam(1e-3)),
                                 False, {}, 7.01, 7.01),
    "adagc": (gc.adagc, False, {}, 2.00, 1.50),
    "spam": (lambda: gc.spam(1e-3), False, {}, 9.00, 9.00),
    "clip_update_rms": (gc.clip_update_rms, False, {}, 2.00, 1.50),
    "clip_update_rms(adam)": (lambda: gc.clip_update_rms(optax.adam(1e-3)), False, {},
                              8.05, 8.05),
    "gradient_check": (lambda: gc.gradient_check(every_k=10), True,
                       {"value_fn": _half_square}, 7.43, 7.43),
    "chain(monitor, zclip, skip_spikes(adam))": (_safety_stack, False, {}, 12.00, 10.50),
    "guard(adam)": (lambda: gc.guard(optax.adam(1e-3)), False, {}, 9.50, 8.00),
}


def _tree():
  rng = np.random.default_rng(0)
  return {f"layer_{i}": jnp.asarray(rng.standard_normal((1000, 100)), jnp.float32)
          for i in range(10)}


def _bytes(fn, *args) -> float:
  return float(jax.jit(fn).lower(*args).compile().cost_analysis()["bytes accessed"])


def traffic(make, needs_params, extra) -> float:
  tree = _tree()
  tx = make()
  params = tree if needs_params else None
  floor = _bytes(lambda t: jax.tree.map(jnp.negative, t), tree)
  return _bytes(lambda g, s, p: tx.update(g, s, p, **extra), tree, tx.init(tree),
                params) / floor


@pytest.fixture(params=["compiled", "no rescue"])
def rescue(request, monkeypatch):
  """Which figure a test pins: as compiled, or with the norms' redo branch
  traced out (the traffic of a step whose norms need no rescue)."""
  if request.param == "no rescue":
    monkeypatch.setattr(_norms, "RESCUE_NORMS", False)
  return request.param


@pytest.mark.parametrize("name", list(PINNED))
def test_traffic_does_not_grow(name, rescue):
  make, needs_params, extra, compiled, common = PINNED[name]
  pinned = compiled if rescue == "compiled" else common
  got = traffic(make, needs_params, extra)
  # The floor's own few scalars make figures a hair above round numbers.
  assert got <= pinned + 0.005, (
      f"{name} moves {got:.3f} x the floor ({rescue}), pinned at {pinned}")


def step_traffic(make) -> float:
  """Bytes of a training step that donates params and state, over the floor."""
  tree = _tree()
  tx = make()

  def step(params, grads, state):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  floor = _bytes(lambda t: jax.tree.map(jnp.negative, t), tree)
  compiled = jax.jit(step, donate_argnums=(0, 2)).lower(tree, tree, tx.init(tree)).compile()
  return float(compiled.cost_analysis()["bytes accessed"]) / floor


# Donated training steps: Adam's is 5.0 (the update fuses into the params'
# write). A guard adds its norm (0.5) and the updates written out of the cond
# and read back by ``apply_updates`` (1.0); the stack adds monitor's two
# reductions, zclip's clipped gradient written out for the cond and read back
# (1.0) and its norm. Figures as compiled, then with no norm rescued (above).
PINNED_STEP = {
    "adam": (lambda: optax.adam(1e-3), 5.00, 5.00),
    "skip_spikes(adam)": (lambda: gc.skip_spikes(optax.adam(1e-3)), 7.00, 6.50),
    "dynamic_loss_scale(adam)": (lambda: gc.dynamic_loss_scale(optax.adam(1e-3)),
                                 6.50, 6.50),
    "accumulate(adam)": (lambda: gc.accumulate(optax.adam(1e-3), 4), 8.50, 8.50),
    "chain(monitor, zclip, skip_spikes(adam))": (_safety_stack, 11.50, 10.00),
    "guard(adam)": (lambda: gc.guard(optax.adam(1e-3)), 9.00, 7.50),
    "chain(clip_by_global_norm, adam)": (
        lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)), 7.50, 7.50),
}


@pytest.mark.parametrize("name", list(PINNED_STEP))
def test_donated_step_traffic_does_not_grow(name, rescue):
  make, compiled, common = PINNED_STEP[name]
  pinned = compiled if rescue == "compiled" else common
  got = step_traffic(make)
  assert got <= pinned + 0.005, (
      f"{name} step moves {got:.3f} x the floor ({rescue}), pinned at {pinned}")


def test_guard_moves_no_more_than_optax_clip_and_adam_in_a_donated_step(monkeypatch):
  """The safety stack as ``gc.guard`` records, clips adaptively and skips
  spikes for the traffic of optax's ``chain(clip_by_global_norm, adam)``
  (norms that need no rescue, as on an ordinary step)."""
  monkeypatch.setattr(_norms, "RESCUE_NORMS", False)
  ours = step_traffic(lambda: gc.guard(optax.adam(1e-3)))
  optax_figure = step_traffic(
      lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)))
  assert ours <= optax_figure + 0.005, (ours, optax_figure)


def test_a_norm_of_a_scaled_tree_reads_each_leaf_once():
  """``global_norm(tree, scale=s)`` is the norm of ``scale_tree(tree, s)``,
  bit for bit, for one read (XLA:CPU writes out a broadcast shared by the
  leaves and reads it back, 1.05, unless each leaf has a copy of its own)."""
  tree = _tree()
  scale = jnp.float32(0.37)
  floor = _bytes(lambda t: jax.tree.map(jnp.negative, t), tree)
  fused = _bytes(lambda t, s: _norms.global_norm(t, scale=s), tree, scale) / floor
  assert fused <= 1.0 + 0.005  # the read plus the redo branch XLA counts
  np.testing.assert_array_equal(
      jax.jit(lambda t, s: _norms.global_norm(t, scale=s))(tree, scale),
      jax.jit(lambda t, s: _norms.global_norm(gc_tree.scale_tree(t, s)))(tree, scale))
