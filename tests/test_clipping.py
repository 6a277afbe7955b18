"""The clipping family against NumPy references written from the papers' formulas.

Each reference below is a few lines of float64 NumPy, independent of the code
under test; every technique runs over several steps with moving params, both
eagerly and under ``jax.jit``.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradcal_jax as gc

JITS = [pytest.param(lambda f: f, id="eager"), pytest.param(jax.jit, id="jit")]

SHAPES = {
    "dense": {"kernel": (12, 5), "bias": (5,)},
    "conv1d": {"kernel": (3, 4, 6)},
    "conv2d": {"kernel": (3, 3, 2, 4)},
    "conv3d": {"kernel": (2, 2, 2, 3, 2)},
    "scale": (),
}


def _tree(seed: int, scale: float = 1.0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: jnp.asarray(scale * rng.standard_normal(s), dtype),
      SHAPES, is_leaf=lambda s: isinstance(s, tuple))


def _np(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def _grads(step: int):
  # Alternately small and large, so some steps clip and some do not.
  return _tree(100 + step, scale=(0.05, 3.0, 0.3, 10.0, 1.0)[step % 5])


@jax.jit
def _sgd_step(params, updates, lr):
  return jax.tree.map(lambda p, u: p - lr * u, params, updates)


def _loop(tx, update, steps=5, params=None, lr=0.1):
  """Yields (grads, params before the step, updates, state) for each step."""
  params = _tree(1) if params is None else params
  state = tx.init(params)
  for t in range(steps):
    grads = _grads(t)
    updates, state = update(grads, state, params)
    yield grads, params, updates, state
    params = _sgd_step(params, updates, lr)


def _close(got, expect, rtol=1e-5, atol=1e-6):
  chex.assert_trees_all_close(_np(got), expect, rtol=rtol, atol=atol)


# ---------------------------------------------------------------- by value


@pytest.mark.parametrize("wrap", JITS)
def test_clip_by_value_matches_numpy(wrap):
  c = 0.7
  tx = gc.clip_by_value(c)
  for grads, _, updates, state in _loop(tx, wrap(tx.update)):
    g = _np(grads)
    leaves = jax.tree.leaves(g)
    _close(updates, jax.tree.map(lambda x: np.clip(x, -c, c), g))
    norm = np.sqrt(sum(np.sum(x ** 2) for x in leaves))
    fraction = sum(np.sum(np.abs(x) > c) for x in leaves) / sum(x.size for x in leaves)
    np.testing.assert_allclose(state.norm, norm, rtol=1e-5)
    np.testing.assert_allclose(state.clipped_fraction, fraction, rtol=1e-6)
    assert state.norm.dtype == state.clipped_fraction.dtype == jnp.float32


def test_clip_by_value_keeps_nonfinite_entries_and_dtype():
  tx = gc.clip_by_value(1.0)
  g = {"w": jnp.array([jnp.inf, -jnp.inf, jnp.nan, 3.0, -0.5], jnp.bfloat16)}
  out, state = tx.update(g, tx.init(g))
  assert out["w"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(
      np.asarray(out["w"], np.float32), [np.inf, -np.inf, np.nan, 1.0, -0.5])
  # nan poisons both statistics: a non-finite gradient shows in the log.
  assert np.isnan(float(state.clipped_fraction)) and np.isnan(float(state.norm))
  out, state = tx.update({"w": g["w"][jnp.array([0, 1, 3, 4])]}, state)
  assert float(state.clipped_fraction) == pytest.approx(0.75)  # inf counts
  assert float(state.norm) == np.inf


# ------------------------------------------------------------- global norm


@pytest.mark.parametrize("wrap", JITS)
def test_clip_by_global_norm_matches_numpy(wrap):
  c = 2.0
  tx = gc.clip_by_global_norm(c)
  scales = []
  for grads, _, updates, state in _loop(tx, wrap(tx.update)):
    g = _np(grads)
    norm = np.sqrt(sum(np.sum(x ** 2) for x in jax.tree.leaves(g)))
    scale = min(1.0, c / norm)
    _close(updates, jax.tree.map(lambda x: x * scale, g))
    np.testing.assert_allclose(state.norm, norm, rtol=1e-5)
    np.testing.assert_allclose(state.scale, scale, rtol=1e-5)
    scales.append(scale)
  assert min(scales) < 1.0 and max(scales) == 1.0  # both branches exercised


def test_clip_by_global_norm_float16_norm_above_65504_is_scaled_not_zeroed():
  g = {"w": jnp.full((10_000,), 300.0, jnp.float16)}
  tx = gc.clip_by_global_norm(1.0)
  out, state = jax.jit(tx.update)(g, tx.init(g))
  assert out["w"].dtype == jnp.float16
  np.testing.assert_allclose(float(state.norm), 30_000.0, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(out["w"], np.float32), 0.01, rtol=1e-3)
  out_norm = np.linalg.norm(np.asarray(out["w"], np.float64))
  np.testing.assert_allclose(out_norm, 1.0, rtol=1e-3)


def test_clip_by_global_norm_zero_threshold_zero_gradient_gives_zeros():
  g = {"w": jnp.zeros((4, 3)), "b": jnp.zeros((3,))}
  tx = gc.clip_by_global_norm(0.0)
  out, state = jax.jit(tx.update)(g, tx.init(g))
  chex.assert_trees_all_equal(out, g)
  assert float(state.norm) == 0.0 and float(state.scale) == 1.0
  # A non-zero gradient with a zero threshold becomes exactly zero.
  out, state = tx.update({"w": jnp.ones((2,))}, state)
  np.testing.assert_array_equal(out["w"], [0.0, 0.0])
  assert float(state.scale) == 0.0


def test_clip_by_global_norm_inf_entry_keeps_finite_entries_and_shows_inf():
  g = {"w": jnp.array([jnp.inf, 1.0, -2.0]), "b": jnp.array([3.0])}
  tx = gc.clip_by_global_norm(1.0)
  out, state = jax.jit(tx.update)(g, tx.init(g))
  np.testing.assert_array_equal(out["w"], [np.inf, 1.0, -2.0])
  np.testing.assert_array_equal(out["b"], [3.0])
  assert float(state.norm) == np.inf and float(state.scale) == 1.0


@pytest.mark.skipif(optax.__version__ != "0.2.8",
                    reason="documents optax 0.2.8; ours is asserted above")
def test_optax_0_2_8_gets_the_global_norm_edge_cases_wrong():
  """Documents why we do not wrap ``optax.clip_by_global_norm``."""
  def optax_out(g, max_norm):
    tx = optax.clip_by_global_norm(max_norm)
    return np.asarray(tx.update(g, tx.init(g))[0]["w"], np.float64)

  broken = []
  f16 = optax_out({"w": jnp.full((10_000,), 300.0, jnp.float16)}, 1.0)
  if not np.any(f16):
    broken.append("float16 norm overflow zeroes the gradient")
  zero = optax_out({"w": jnp.zeros((3,))}, 0.0)
  if np.any(np.isnan(zero)):
    broken.append("max_norm=0 with a zero gradient gives nan")
  inf = optax_out({"w": jnp.array([jnp.inf, 1.0, -2.0])}, 1.0)
  if np.all(inf[1:] == 0.0):
    broken.append("one inf entry zeroes every finite entry")
  assert len(broken) == 3, broken


# -------------------------------------------------------------- layer norm


@pytest.mark.parametrize("wrap", JITS)
def test_clip_by_layer_norm_matches_numpy(wrap):
  c = 1.5
  tx = gc.clip_by_layer_norm(c)
  for grads, _, updates, state in _loop(tx, wrap(tx.update)):
    g = _np(grads)
    norms = jax.tree.map(lambda x: np.sqrt(np.sum(x ** 2)), g)
    scales = jax.tree.map(lambda n: min(1.0, c / n), norms)
    _close(updates, jax.tree.map(lambda x, s: x * s, g, scales))
    _close(state.norm, norms, rtol=1e-5)
    _close(state.scale, scales, rtol=1e-5)
  logged = gc.stats(state)
  assert "clip_by_layer_norm/norm/dense/kernel" in logged
  assert "clip_by_layer_norm/scale/conv2d/kernel" in logged


def test_clip_by_layer_norm_inf_leaf_stays_visible_others_clipped():
  g = {"a": jnp.array([jnp.inf, 1.0]), "b": jnp.array([3.0, 4.0])}
  tx = gc.clip_by_layer_norm(1.0)
  out, state = tx.update(g, tx.init(g))
  np.testing.assert_array_equal(out["a"], [np.inf, 1.0])
  np.testing.assert_allclose(out["b"], [0.6, 0.8], rtol=1e-6)
  assert float(state.norm["a"]) == np.inf and float(state.scale["a"]) == 1.0


# --------------------------------------------------------------------- AGC


def _agc_numpy(g, w, axes, clipping, eps):
  """Brock et al. 2021, eq. (3): rescale units whose ratio exceeds clipping."""
  g_norm = np.sqrt(np.sum(g ** 2, axis=axes, keepdims=True))
  w_norm = np.maximum(np.sqrt(np.sum(w ** 2, axis=axes, keepdims=True)), eps)
  ratio = g_norm / w_norm
  clipped = np.where(ratio > clipping, g * clipping * w_norm / g_norm, g)
  return clipped, np.sum(ratio > clipping), ratio.size, np.max(ratio)


FLAX_UNIT_AXES = {
    "dense": {"kernel": (0,), "bias": (0,)},
    "conv1d": {"kernel": (0, 1)},
    "conv2d": {"kernel": (0, 1, 2)},
    "conv3d": {"kernel": (0, 1, 2, 3)},
    "scale": (),
}


def _check_agc(tx, wrap, axes_tree, clipping, eps):
  fractions = []
  for grads, params, updates, state in _loop(tx, wrap(tx.update)):
    results = jax.tree.map(
        lambda g, w, a: _agc_numpy(g, w, a, clipping, eps),
        _np(grads), _np(params), axes_tree)
    results = jax.tree.leaves(results, is_leaf=lambda x: isinstance(x, tuple))
    expect = jax.tree.unflatten(jax.tree.structure(grads), [r[0] for r in results])
    _close(updates, expect)
    fraction = sum(r[1] for r in results) / sum(r[2] for r in results)
    np.testing.assert_allclose(state.clipped_fraction, fraction, rtol=1e-6)
    np.testing.assert_allclose(
        state.max_ratio, max(r[3] for r in results), rtol=1e-5)
    fractions.append(fraction)
  assert any(0.0 < f < 1.0 for f in fractions)  # some units clipped, some not


@pytest.mark.parametrize("wrap", JITS)
def test_adaptive_grad_clip_matches_numpy_on_flax_kernels(wrap):
  tx = gc.adaptive_grad_clip(clipping=0.3, eps=1e-3)
  _check_agc(tx, wrap, FLAX_UNIT_AXES, 0.3, 1e-3)


def test_adaptive_grad_clip_unit_axes_pytree():
  # Units along axis 0 of each kernel instead (PyTorch-like rows), given as a tree.
  axes = {
      "dense": {"kernel": (1,), "bias": None},
      "conv1d": {"kernel": (1, 2)},
      "conv2d": {"kernel": (-3, -2, -1)},
      "conv3d": {"kernel": None},
      "scale": None,
  }
  expect_axes = {**FLAX_UNIT_AXES, "dense": {"kernel": (1,), "bias": (0,)},
                 "conv1d": {"kernel": (1, 2)}, "conv2d": {"kernel": (1, 2, 3)}}
  tx = gc.adaptive_grad_clip(clipping=0.3, unit_axes=axes)
  _check_agc(tx, jax.jit, expect_axes, 0.3, 1e-3)


def test_adaptive_grad_clip_unit_axes_callable():
  seen = []

  def unit_axes(path, leaf):
    seen.append(jax.tree_util.keystr(path))
    return tuple(range(1, leaf.ndim)) if leaf.ndim >= 2 else None

  expect_axes = jax.tree.map(
      lambda s: tuple(range(1, len(s))) if len(s) >= 2 else tuple(range(len(s))),
      SHAPES, is_leaf=lambda s: isinstance(s, tuple))
  tx = gc.adaptive_grad_clip(clipping=0.3, unit_axes=unit_axes)
  _check_agc(tx, jax.jit, expect_axes, 0.3, 1e-3)
  assert "['conv1d']['kernel']" in seen


def test_adaptive_grad_clip_differs_from_optax_on_a_conv1d_kernel():
  # optax 0.2.8 reduces only axis 0 of a rank-3 leaf (multi-head layout); a
  # Flax Conv1D kernel (width, in, out) has one unit per output channel.
  rng = np.random.default_rng(0)
  w = {"k": jnp.asarray(rng.standard_normal((3, 4, 6)), jnp.float32)}
  g = {"k": jnp.asarray(5 * rng.standard_normal((3, 4, 6)), jnp.float32)}
  ours = gc.adaptive_grad_clip(0.1)
  out, _ = ours.update(g, ours.init(w), w)
  expect = _agc_numpy(_np(g["k"]), _np(w["k"]), (0, 1), 0.1, 1e-3)[0]
  np.testing.assert_allclose(out["k"], expect, rtol=1e-5)
  theirs = optax.adaptive_grad_clip(0.1)
  optax_out, _ = theirs.update(g, theirs.init(w), w)
  assert not np.allclose(optax_out["k"], expect, rtol=1e-3)


def test_adaptive_grad_clip_zero_params_and_inf_gradient():
  tx = gc.adaptive_grad_clip(clipping=0.5, eps=1e-2)
  w = {"b": jnp.zeros((3,)), "k": jnp.zeros((2, 2))}
  g = {"b": jnp.array([1.0, 0.0, 0.0]), "k": jnp.array([[jnp.inf, 1.0], [0.0, 1.0]])}
  out, state = tx.update(g, tx.init(w), w)
  # The bias unit is scaled to norm clipping * eps; the kernel's second unit too.
  np.testing.assert_allclose(out["b"], [5e-3, 0.0, 0.0], rtol=1e-6)
  np.testing.assert_allclose(out["k"][:, 1], [3.5355e-3, 3.5355e-3], rtol=1e-4)
  # The unit holding inf is left as it is, so the inf stays visible.
  np.testing.assert_array_equal(out["k"][:, 0], [np.inf, 0.0])
  assert float(state.clipped_fraction) == pytest.approx(2 / 3)
  assert float(state.max_ratio) == np.inf


# -------------------------------------------------------------- centralize


def _centralize_numpy(g):
  """Yong et al. 2020, eq. (4), with output units on the last axis (Flax)."""
  if g.ndim < 2:
    return g
  return g - g.mean(axis=tuple(range(g.ndim - 1)), keepdims=True)


@pytest.mark.parametrize("wrap", JITS)
def test_centralize_matches_numpy(wrap):
  tx = gc.centralize()
  for grads, _, updates, state in _loop(tx, wrap(tx.update)):
    _close(updates, jax.tree.map(_centralize_numpy, _np(grads)), atol=1e-5)
    # Each output unit of a kernel now sums to zero.
    k = np.asarray(updates["conv2d"]["kernel"], np.float64)
    np.testing.assert_allclose(k.sum(axis=(0, 1, 2)), 0.0, atol=1e-4)
    assert state == optax.EmptyState()


def test_centralize_differs_from_optax_on_a_flax_kernel():
  rng = np.random.default_rng(0)
  g = {"kernel": jnp.asarray(rng.standard_normal((12, 5)), jnp.float32)}
  ours, _ = gc.centralize().update(g, optax.EmptyState())
  theirs, _ = optax.centralize().update(g, optax.EmptyState())
  np.testing.assert_allclose(ours["kernel"], _centralize_numpy(_np(g["kernel"])),
                             atol=1e-6)
  # optax centres rows (PyTorch's (out, in)); a Flax unit is a column.
  np.testing.assert_allclose(np.sum(theirs["kernel"], axis=1), 0.0, atol=1e-5)
  assert np.abs(np.sum(theirs["kernel"], axis=0)).max() > 0.1
  assert not np.allclose(ours["kernel"], theirs["kernel"], atol=1e-3)


def test_centralize_keeps_bf16_and_leaves_rank_one_alone():
  g = {"k": jnp.array([[1.0, 2.0], [3.0, 8.0]], jnp.bfloat16),
       "b": jnp.array([1.0, 2.0], jnp.bfloat16)}
  out, _ = gc.centralize().update(g, optax.EmptyState())
  assert out["k"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out["k"], np.float32),
                                [[-1.0, -3.0], [1.0, 3.0]])
  chex.assert_trees_all_equal(out["b"], g["b"])


@pytest.mark.parametrize("wrap", JITS)
def test_centralize_float16_saturates_instead_of_overflowing(wrap):
  # Column 0's mean is -21834.67: 65504 minus it is past float16's 65504.
  g = {"k": jnp.array([[65504.0, 1.0], [-65504.0, 3.0], [-65504.0, 2.0]], jnp.float16)}
  out, _ = wrap(gc.centralize().update)(g, optax.EmptyState())
  k = np.asarray(out["k"], np.float32)
  assert np.isfinite(k).all()
  np.testing.assert_allclose(k[:, 0], [65504.0, -43669.3, -43669.3], rtol=1e-3)
  np.testing.assert_array_equal(k[:, 1], [-1.0, 1.0, 0.0])
  # A non-finite entry still makes its unit non-finite.
  g = {"k": g["k"].at[1, 1].set(jnp.inf)}
  out, _ = wrap(gc.centralize().update)(g, optax.EmptyState())
  assert not np.isfinite(np.asarray(out["k"][:, 1], np.float32)).any()
  assert np.isfinite(np.asarray(out["k"][:, 0], np.float32)).all()


# ------------------------------------------------------------ clip weights


@pytest.mark.parametrize("wrap", JITS)
def test_clip_weights_matches_numpy_and_keeps_weights_in_range(wrap):
  c = 0.8
  tx = gc.clip_weights(c)
  update = wrap(tx.update)
  params = _tree(1)
  state = tx.init(params)
  for t in range(5):
    grads = _grads(t)
    updates, state = update(grads, state, params)
    p, u = _np(params), _np(grads)
    target = jax.tree.map(lambda a, b: a + b, p, u)
    leaves = jax.tree.leaves(target)
    fraction = sum(np.sum(np.abs(x) > c) for x in leaves) / sum(x.size for x in leaves)
    np.testing.assert_allclose(state.clipped_fraction, fraction, rtol=1e-6)
    params = optax.apply_updates(params, updates)
    _close(params, jax.tree.map(lambda x: np.clip(x, -c, c), target), atol=1e-6)
    for x in jax.tree.leaves(params):
      assert np.abs(np.asarray(x)).max() <= np.float32(c)  # exactly, not approximately


def test_clip_weights_leaves_in_range_updates_and_nonfinite_alone():
  tx = gc.clip_weights(1.0)
  w = {"w": jnp.array([0.5, 0.9, 0.0, -0.9])}
  u = {"w": jnp.array([0.25, 0.5, jnp.inf, -1e6])}
  out, state = tx.update(u, tx.init(w), w)
  assert float(out["w"][0]) == 0.25  # bit for bit
  np.testing.assert_allclose(np.asarray(out["w"])[[1, 3]], [0.1, -0.1], rtol=1e-6)
  assert float(out["w"][2]) == np.inf
  assert float(state.clipped_fraction) == pytest.approx(0.5)


def test_clip_weights_exact_range_for_many_random_weights():
  rng = np.random.default_rng(0)
  c = np.float32(0.5)
  for scale in (1.0, 100.0, 1e4):
    w = {"w": jnp.asarray(scale * rng.standard_normal(20_000), jnp.float32)}
    u = {"w": jnp.asarray(scale * rng.standard_normal(20_000), jnp.float32)}
    tx = gc.clip_weights(float(c))
    out, _ = jax.jit(tx.update)(u, tx.init(w), w)
    new = np.asarray(optax.apply_updates(w, out)["w"])
    assert np.abs(new).max() <= c


@pytest.mark.parametrize("wrap", JITS)
def test_clip_weights_lands_inside_for_a_bf16_update_of_f32_weights(wrap):
  # No bfloat16 difference moves a float32 1002 into [-0.5, 0.5] (bfloat16's
  # spacing there is 4): the update becomes float32.
  tx = gc.clip_weights(0.5)
  w = {"w": jnp.array([1002.0, -1002.0, 0.25, 7.0], jnp.float32)}
  u = {"w": jnp.array([1.0, 1.0, 0.125, -3.0], jnp.bfloat16)}
  out, state = wrap(tx.update)(u, tx.init(w), w)
  assert out["w"].dtype == jnp.float32
  new = np.asarray(optax.apply_updates(w, out)["w"])
  np.testing.assert_array_equal(new, [0.5, -0.5, 0.375, 0.5])
  assert float(state.clipped_fraction) == pytest.approx(0.75)


@pytest.mark.parametrize("dtype, bound", [(jnp.bfloat16, 0.3), (jnp.float16, 0.3),
                                          (jnp.bfloat16, 0.5)])
def test_clip_weights_low_precision_weights_stay_inside_an_unrepresentable_bound(
    dtype, bound):
  rng = np.random.default_rng(1)
  w = {"w": jnp.asarray(rng.uniform(-0.3, 0.3, 5000), dtype)}
  u = {"w": jnp.asarray(rng.standard_normal(5000) * 0.2, dtype)}
  tx = gc.clip_weights(bound)
  for update in (tx.update, jax.jit(tx.update)):
    out, _ = update(u, tx.init(w), w)
    assert out["w"].dtype == dtype
    new = np.asarray(optax.apply_updates(w, out)["w"], np.float64)
    assert np.abs(new).max() <= bound
    # Clipped weights sit at the largest value of the dtype within the bound.
    edge = float(np.abs(new).max())
    assert edge > bound - 0.01


def test_clip_weights_has_the_derivative_of_the_clip_formula():
  c = 0.5

  def loss(w, u):
    tx = gc.clip_weights(c)
    new, _ = tx.update({"w": u}, tx.init({"w": w}), {"w": w})
    return jnp.sum(optax.apply_updates({"w": w}, new)["w"] ** 2)

  w = jnp.array([0.4, 0.2, -3.0, 0.1])
  u = jnp.array([0.3, 0.1, 1.0, -0.05])
  for grad in (jax.grad(loss, argnums=(0, 1)), jax.jit(jax.grad(loss, argnums=(0, 1)))):
    dw, du = grad(w, u)
    target = np.asarray(w) + np.asarray(u)
    inside = np.abs(target) <= c
    # d/dw (clip(w + u) ** 2): 2 (w + u) inside the range, 0 where clipped.
    want = np.where(inside, 2 * target, 0.0)
    np.testing.assert_allclose(dw, want, rtol=1e-6)
    np.testing.assert_allclose(du, want, rtol=1e-6)


# -------------------------------------------------------------- validation


@pytest.mark.parametrize("make, message", [
    (lambda: gc.clip_by_value(-1.0), r"max_abs must be in \[0.0, inf\], got -1.0"),
    (lambda: gc.clip_by_value(float("nan")), r"max_abs must be in \[0.0, inf\]"),
    (lambda: gc.clip_by_value("big"), "max_abs must be a real number"),
    (lambda: gc.clip_by_global_norm(-0.1), r"max_norm must be in \[0.0, inf\]"),
    (lambda: gc.clip_by_layer_norm(-2), r"max_norm must be in \[0.0, inf\]"),
    (lambda: gc.adaptive_grad_clip(clipping=-0.01), r"clipping must be in \[0.0, inf\]"),
    (lambda: gc.adaptive_grad_clip(eps=0.0), r"eps must be in \(0.0, inf\]"),
    (lambda: gc.adaptive_grad_clip(unit_axes={"w": "rows"}),
     r"unit_axes must be None, a callable .* got 'rows' at 'w'"),
    (lambda: gc.clip_weights(-0.5), r"max_abs must be in \[0.0, inf\]"),
])
def test_bad_hyperparameters_name_the_argument(make, message):
  with pytest.raises(ValueError, match=message):
    make()


def test_unit_axes_errors_at_trace_time_name_the_leaf():
  w = {"k": jnp.ones((2, 3)), "b": jnp.ones((3,))}
  tx = gc.adaptive_grad_clip(unit_axes={"k": (2,), "b": None})
  with pytest.raises(ValueError, match=r"unit_axes for 'k' must be .* \[-2, 2\)"):
    tx.update(w, tx.init(w), w)
  tx = gc.adaptive_grad_clip(unit_axes={"k": (0,)})
  with pytest.raises(ValueError, match="unit_axes has no entry for the parameter 'b'"):
    tx.update(w, tx.init(w), w)


@pytest.mark.parametrize("make, name", [
    (gc.adaptive_grad_clip, "adaptive_grad_clip"),
    (lambda: gc.clip_weights(1.0), "clip_weights"),
])
def test_params_are_required(make, name):
  tx = make()
  g = {"w": jnp.ones((2, 2))}
  with pytest.raises(ValueError, match=f"{name} needs the parameters"):
    tx.update(g, tx.init(g))


def test_stats_keys_in_a_chain():
  tx = optax.chain(gc.clip_by_value(1.0), gc.clip_by_global_norm(1.0),
                   gc.adaptive_grad_clip(), gc.centralize(), gc.clip_weights(1.0))
  params = _tree(1)
  _, state = jax.jit(tx.update)(_grads(1), tx.init(params), params)
  assert set(gc.stats(state)) == {
      "clip_by_value/norm", "clip_by_value/clipped_fraction",
      "clip_by_global_norm/norm", "clip_by_global_norm/scale",
      "adaptive_grad_clip/clipped_fraction", "adaptive_grad_clip/max_ratio",
      "clip_weights/clipped_fraction"}
