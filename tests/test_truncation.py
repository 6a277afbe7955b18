"""Tests for ``truncate_top_k`` against a NumPy top-k with error feedback."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradcal_jax as gc

JITS = [lambda f: f, jax.jit]
JIT_IDS = ["eager", "jit"]


def _np_top_k(x: np.ndarray, fraction: float) -> np.ndarray:
  """Keeps the ceil(fraction * n) largest |x|, ties to the lower flat index."""
  flat = x.ravel()
  k = max(1, math.ceil(round(fraction * flat.size, 9)))
  order = np.lexsort((np.arange(flat.size), -np.abs(flat)))
  out = np.zeros_like(flat)
  out[order[:k]] = flat[order[:k]]
  return out.reshape(x.shape)


def _grads(rng, ties: bool = False):
  tree = {"kernel": rng.standard_normal((37, 11)), "bias": rng.standard_normal(13),
          "conv": rng.standard_normal((3, 3, 2, 4)), "scale": rng.standard_normal(())}
  if ties:  # few distinct magnitudes, so the k-th largest is shared by many
    tree = jax.tree.map(lambda x: np.round(x * 2) / 2, tree)
  return jax.tree.map(lambda x: np.asarray(x, np.float32), tree)


@pytest.mark.parametrize("wrap", JITS, ids=JIT_IDS)
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("fraction", [0.01, 0.37, 1.0])
def test_keeps_exactly_the_top_k_entries(wrap, ties, fraction):
  rng = np.random.default_rng(0)
  tx = gc.truncate_top_k(fraction, error_feedback=False)
  update = wrap(tx.update)
  state = tx.init(_grads(rng))
  for _ in range(3):
    grads = _grads(rng, ties)
    out, state = update(jax.tree.map(jnp.asarray, grads), state)
    for got, g in zip(jax.tree.leaves(out), jax.tree.leaves(grads)):
      np.testing.assert_array_equal(np.asarray(got), _np_top_k(g, fraction))
  assert state.residual is None


_HARD_LEAVES = {
    # The search's first guess assumes a Gaussian; these are far from one.
    "uniform": lambda rng, n: rng.random(n),
    "heavy_tail": lambda rng, n: rng.standard_t(1, n),
    "bimodal": lambda rng, n: np.where(rng.random(n) < 0.98, 1e-3, 10.0)
                              * rng.standard_normal(n),
    "sparse": lambda rng, n: rng.standard_normal(n) * (rng.random(n) < 0.004),
    "integers": lambda rng, n: rng.integers(-20, 20, n).astype(np.float64),
    "denormal": lambda rng, n: rng.standard_normal(n) * 1e-39,
    "with_inf": lambda rng, n: np.where(rng.random(n) < 0.001, np.inf, 1.0)
                               * rng.standard_normal(n),
    "zeros": lambda rng, n: np.zeros(n),
}


@pytest.mark.parametrize("kind", list(_HARD_LEAVES))
@pytest.mark.parametrize("fraction", [0.01, 0.3])
def test_exact_on_leaves_far_from_gaussian(kind, fraction):
  rng = np.random.default_rng(3)
  grads = {name: np.asarray(_HARD_LEAVES[kind](rng, n), np.float32).reshape(shape)
           for name, n, shape in (("big", 20_000, (160, 125)), ("small", 77, (77,)))}
  tx = gc.truncate_top_k(fraction, error_feedback=False)
  out, _ = jax.jit(tx.update)(jax.tree.map(jnp.asarray, grads), tx.init(grads))
  for name, g in grads.items():
    np.testing.assert_array_equal(np.asarray(out[name]), _np_top_k(g, fraction))


def test_count_is_exact_past_float32_integers():
  # Above 2**24 entries a float32 sum of ones would round, so the count
  # switches to int32 there.
  from gradcal_jax import truncation
  mask = jnp.arange(2**24 + 3) % 3 != 0
  assert int(truncation._count(mask)) == int(np.count_nonzero(np.asarray(mask)))
  small = jnp.arange(1000) % 7 == 0
  assert int(truncation._count(small)) == 143


@pytest.mark.parametrize("wrap", JITS, ids=JIT_IDS)
def test_error_feedback_matches_numpy_and_loses_nothing_over_50_steps(wrap):
  rng = np.random.default_rng(1)
  fraction = 0.05
  tx = gc.truncate_top_k(fraction)
  update = wrap(tx.update)
  state = tx.init(_grads(rng))
  residual = jax.tree.map(np.zeros_like, _grads(rng))
  sum_grads = jax.tree.map(np.zeros_like, residual)
  sum_out = jax.tree.map(np.zeros_like, residual)
  for _ in range(50):
    grads = _grads(rng)
    out, state = update(jax.tree.map(jnp.asarray, grads), state)
    x = jax.tree.map(lambda g, r: g + r, grads, residual)
    expect = jax.tree.map(lambda v: _np_top_k(v, fraction), x)
    residual = jax.tree.map(lambda v, e: v - e, x, expect)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 out, expect)
    sum_grads = jax.tree.map(lambda s, g: s + g.astype(np.float64), sum_grads, grads)
    sum_out = jax.tree.map(lambda s, o: s + np.asarray(o, np.float64), sum_out, out)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               state.residual, residual)
  # The identity: everything emitted plus what is still held is every gradient.
  jax.tree.map(
      lambda o, r, g: np.testing.assert_allclose(o + np.asarray(r), g, atol=1e-4),
      sum_out, state.residual, sum_grads)
  dropped = np.sqrt(sum(np.sum(np.square(r)) for r in jax.tree.leaves(residual)))
  assert np.isclose(float(gc.stats(state)["truncate_top_k/dropped_norm"]), dropped,
                    rtol=1e-5)
  assert float(np.abs(dropped)) > 1.0  # something really was held back


def test_bfloat16_output_rounding_is_carried_in_the_residual():
  rng = np.random.default_rng(2)
  tx = gc.truncate_top_k(0.25)
  g0 = jnp.asarray(rng.standard_normal(64), jnp.bfloat16)
  state = tx.init(g0)
  total_in, total_out = np.zeros(64), np.zeros(64)
  for t in range(20):
    g = (g0 * (1.0 + 0.013 * t)).astype(jnp.bfloat16)
    out, state = jax.jit(tx.update)(g, state)
    assert out.dtype == jnp.bfloat16 and state.residual.dtype == jnp.float32
    total_in += np.asarray(g, np.float64)
    total_out += np.asarray(out, np.float64)
  np.testing.assert_allclose(total_out + np.asarray(state.residual), total_in, atol=1e-4)


def test_kept_fraction_is_recorded():
  tx = gc.truncate_top_k(0.1)
  grads = {"a": jnp.ones(10), "b": jnp.ones(25)}
  _, state = tx.update(grads, tx.init(grads))
  # ceil(1.0) + ceil(2.5) = 1 + 3 entries of 35.
  assert float(gc.stats(state)["truncate_top_k/kept_fraction"]) == pytest.approx(4 / 35)


def test_a_nan_entry_is_always_emitted():
  tx = gc.truncate_top_k(0.1)
  g = jnp.arange(20.0).at[3].set(jnp.nan)
  out, state = tx.update(g, tx.init(g))
  assert np.isnan(out[3])
  assert np.count_nonzero(np.asarray(out)) == 2  # NaN and 19.0
  assert np.all(np.isfinite(state.residual))


def test_fewer_non_zeros_than_k_emits_them_all():
  g = jnp.zeros(100).at[7].set(-2.0)
  tx = gc.truncate_top_k(0.2)
  out, state = jax.jit(tx.update)(g, tx.init(g))
  np.testing.assert_array_equal(out, g)
  np.testing.assert_array_equal(state.residual, 0.0)


def test_chains_with_an_optimizer():
  tx = optax.chain(gc.truncate_top_k(0.5), optax.sgd(1.0))
  g = jnp.array([1.0, -3.0, 0.5, 2.0])
  out, _ = tx.update(g, tx.init(g))
  np.testing.assert_array_equal(out, [0.0, 3.0, 0.0, -2.0])


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, float("nan")])
def test_bad_fraction_raises(fraction):
  with pytest.raises(ValueError, match=r"fraction must be in \(0.0, 1.0\]"):
    gc.truncate_top_k(fraction)


def test_non_number_fraction_raises():
  with pytest.raises(ValueError, match="fraction must be a real number"):
    gc.truncate_top_k("ten percent")
