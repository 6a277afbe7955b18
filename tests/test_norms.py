"""Norms of finite gradients are finite, tiny ones are not zero, eager equals jit.

A float32 sum of squares overflows once a norm passes 1.8e19 and flushes
entries below 1e-19 to zero; ``_norms.rescued_norm`` redoes such a sum with the
entries scaled by a power of two. These tests hold every norm helper against
float64 NumPy, and every transform that clips or records by a norm on a
gradient of 1e20 entries (it clipped nothing and recorded ``inf`` before) and
on one of 1e-25 entries (norm 0 before).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradcal_jax as gc
from gradcal_jax import _norms

# Entries of one leaf: huge (their squares overflow), tiny (theirs flush to
# zero), the largest and smallest normal float32, a mix, and the ordinary.
CASES = {
    "huge": np.full((4,), 1e20),
    "largest": np.array([3e38, 1.0]),
    "tiny": np.full((5,), 1e-25),
    "smallest normal": np.full((3,), 2e-38),
    "mixed": np.array([1e-30, 1e30, 1.0]),
    "ordinary": np.array([3.0, -4.0]),
    "zero": np.zeros(3),
}


def _norm64(*arrays) -> float:
  return float(np.sqrt(sum(np.sum(np.square(a.astype(np.float64))) for a in arrays)))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("case", list(CASES))
def test_norm_helpers_match_float64(case, jit):
  x = CASES[case]
  other = np.full((2,), 7e-26)
  tree = {"a": jnp.asarray(x, jnp.float32), "b": jnp.asarray(other, jnp.float32)}
  wrap = jax.jit if jit else (lambda f: f)
  want = _norm64(x.astype(np.float32), other.astype(np.float32))
  np.testing.assert_allclose(float(wrap(_norms.global_norm)(tree)), want, rtol=1e-6)
  want_leaf = _norm64(x.astype(np.float32))
  np.testing.assert_allclose(float(wrap(_norms.leaf_norm)(tree["a"])), want_leaf, rtol=1e-6)
  leaf_norms = wrap(_norms.leaf_norms)(tree)
  np.testing.assert_allclose(float(leaf_norms["a"]), want_leaf, rtol=1e-6)
  combined = wrap(_norms.combine_norms)(jnp.stack([leaf_norms["a"], leaf_norms["b"]]))
  np.testing.assert_allclose(float(combined), want, rtol=1e-6)


@pytest.mark.parametrize("value, want", [(np.nan, np.nan), (np.inf, np.inf)])
def test_norm_of_nonfinite_entries_is_not_rescued_into_a_number(value, want):
  tree = {"a": jnp.array([value, 1e30, 1e-30]), "b": jnp.ones(2)}
  for fn in (_norms.global_norm, jax.jit(_norms.global_norm)):
    np.testing.assert_equal(float(fn(tree)), want)
  np.testing.assert_equal(float(_norms.leaf_norm(tree["a"])), want)
  np.testing.assert_equal(float(_norms.combine_norms(jnp.array([1e30, value]))), want)


def test_combine_norms_of_nothing_and_of_zeros_is_zero():
  assert float(_norms.combine_norms(jnp.zeros((0,)))) == 0.0
  assert float(_norms.combine_norms(jnp.zeros((3,)))) == 0.0


def test_an_ordinary_norm_is_the_plain_square_root_bit_for_bit():
  # The redo branch runs only when needed: an ordinary gradient's norm is
  # exactly sqrt of its float32 sum of squares, as before the rescue.
  tree = {"a": jnp.linspace(-3.0, 5.0, 101), "b": jnp.arange(7.0)}
  plain = jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(tree)))
  assert float(jax.jit(_norms.global_norm)(tree)) == float(plain)


HUGE = {"w": jnp.full((4,), 1e20), "b": jnp.ones(3)}
PARAMS = {"w": jnp.ones(4), "b": jnp.ones(3)}


def _run(tx, grads, jit, steps=1, params=PARAMS):
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  for _ in range(steps):
    out, state = update(grads, state, params)
  return out, gc.stats(state)


def _l2(tree) -> float:
  return _norm64(*[np.asarray(x, np.float64) for x in jax.tree.leaves(tree)])


# transform, the largest output norm allowed on HUGE, the norm stat's key.
CLIPPERS = {
    "clip_by_global_norm": (lambda: gc.clip_by_global_norm(1.0), 1.0,
                            "clip_by_global_norm/norm"),
    "clip_by_layer_norm": (lambda: gc.clip_by_layer_norm(1.0), np.sqrt(2.0),
                           "clip_by_layer_norm/norm/w"),
    "zclip(max_norm)": (lambda: gc.zclip(max_norm=1.0), 1.0, "zclip/norm"),
    "adagc": (lambda: gc.adagc(lambda_abs=1.0), np.sqrt(2.0), "adagc/norm"),
}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", list(CLIPPERS))
def test_huge_finite_gradients_are_clipped(name, jit):
  make, bound, key = CLIPPERS[name]
  out, stats = _run(make(), HUGE, jit)
  assert np.isfinite(float(stats[key])) and float(stats[key]) > 1e20, stats
  assert _l2(out) <= bound * (1 + 1e-5), (name, out)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_adaptive_grad_clip_clips_huge_finite_gradients(jit):
  out, stats = _run(gc.adaptive_grad_clip(0.01), HUGE, jit)
  # Each unit (an entry of a 1-D leaf) is held to 0.01 x its weight's norm.
  np.testing.assert_allclose(np.asarray(out["w"]), 0.01, rtol=1e-5)
  np.testing.assert_allclose(float(stats["adaptive_grad_clip/max_ratio"]), 1e20, rtol=1e-5)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_autoclip_clips_a_huge_step_after_ordinary_ones(jit):
  tx = gc.autoclip(percentile=50.0)
  params = PARAMS
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  for _ in range(3):
    _, state = update({"w": jnp.ones(4), "b": jnp.ones(3)}, state, params)
  out, state = update(HUGE, state, params)
  stats = gc.stats(state)
  np.testing.assert_allclose(float(stats["autoclip/norm"]), _l2(HUGE), rtol=1e-6)
  assert _l2(out) <= np.sqrt(7.0) * (1 + 1e-5), out


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_clip_update_rms_bounds_huge_updates(jit):
  out, stats = _run(gc.clip_update_rms(), HUGE, jit)
  np.testing.assert_allclose(float(stats["clip_update_rms/max_rms"]), 1e20, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(out["w"]), 1.0, rtol=1e-6)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_monitor_reports_a_huge_finite_gradient_as_finite(jit):
  out, stats = _run(gc.monitor(), HUGE, jit)
  np.testing.assert_allclose(float(stats["monitor/norm"]), _l2(HUGE), rtol=1e-6)
  np.testing.assert_allclose(float(stats["monitor/leaf_norms/w"]), 2e20, rtol=1e-6)
  assert int(stats["monitor/nonfinite"]) == 0


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_tiny_gradients_do_not_have_norm_zero(jit):
  tiny = {"w": jnp.full((4,), 1e-25), "b": jnp.full((3,), 1e-19)}
  want = _l2(jax.tree.map(lambda x: np.asarray(x, np.float64), tiny))
  _, stats = _run(gc.clip_by_global_norm(1.0), tiny, jit)
  np.testing.assert_allclose(float(stats["clip_by_global_norm/norm"]), want, rtol=1e-6)
  _, stats = _run(gc.monitor(), tiny, jit)
  np.testing.assert_allclose(float(stats["monitor/norm"]), want, rtol=1e-6)
  np.testing.assert_allclose(float(stats["monitor/leaf_norms/w"]), 2e-25, rtol=1e-6)
  _, stats = _run(gc.zclip(), tiny, jit)
  np.testing.assert_allclose(float(stats["zclip/norm"]), want, rtol=1e-6)


def test_skip_spikes_on_a_huge_bfloat16_gradient_is_the_same_eager_and_jitted():
  grads = {"w": jnp.array([1e26], jnp.bfloat16)}
  tx = gc.skip_spikes(optax.sgd(1.0))
  runs = [_run(tx, grads, jit, params=grads) for jit in (False, True)]
  (eager, eager_stats), (jitted, jitted_stats) = runs
  want = float(np.float32(jnp.array(1e26, jnp.bfloat16)))
  np.testing.assert_allclose(float(eager_stats["skip_spikes/norm"]), want, rtol=1e-6)
  assert eager_stats.keys() == jitted_stats.keys()
  for key in eager_stats:
    np.testing.assert_array_equal(np.asarray(eager_stats[key]), np.asarray(jitted_stats[key]))
  np.testing.assert_array_equal(np.asarray(eager["w"], np.float32),
                                np.asarray(jitted["w"], np.float32))
