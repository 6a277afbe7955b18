"""Tests for ``accumulate`` against NumPy references of the accumulated gradient."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradcal_jax as gc

JITS = [lambda f: f, jax.jit]
JIT_IDS = ["eager", "jit"]


def _regression(n: int = 64, d: int = 5, seed: int = 0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, d)).astype(np.float32)
  y = (x @ rng.standard_normal(d) + 0.1 * rng.standard_normal(n)).astype(np.float32)
  return x, y


def _mse_grad(w, x, y, mask=None):
  """Gradient of the masked mean squared error, in NumPy (float64)."""
  w, x, y = (np.asarray(a, np.float64) for a in (w, x, y))
  mask = np.ones(len(y)) if mask is None else np.asarray(mask, np.float64)
  residual = (x @ w - y) * mask
  return 2.0 * x.T @ residual / mask.sum()


def _jax_mse_grad(w, x, y, mask=None):
  mask = jnp.ones(len(y)) if mask is None else mask
  def loss(w):
    return jnp.sum(mask * (x @ w - y) ** 2) / jnp.sum(mask)
  return jax.grad(loss)(w)


@pytest.mark.parametrize("wrap", JITS, ids=JIT_IDS)
def test_k_micro_batches_equal_the_full_batch_step(wrap):
  x, y = _regression()
  lr, k = 0.05, 4
  tx = gc.accumulate(optax.sgd(lr), every_k=k)
  w = jnp.zeros(x.shape[1])
  state = tx.init(w)
  update = wrap(tx.update)
  w_ref = np.zeros(x.shape[1])
  for _ in range(3):
    for i in range(k):
      sl = slice(16 * i, 16 * (i + 1))
      u, state = update(_jax_mse_grad(w, x[sl], y[sl]), state, w)
      if i < k - 1:
        np.testing.assert_array_equal(u, 0.0)
      w = optax.apply_updates(w, u)
    w_ref = w_ref - lr * _mse_grad(w_ref, x, y)
    np.testing.assert_allclose(w, w_ref, rtol=1e-5, atol=1e-6)
  assert int(state.inner_steps) == 3
  assert int(state.micro_step) == 0


@pytest.mark.parametrize("wrap", JITS, ids=JIT_IDS)
def test_weighted_unequal_micro_batches_give_the_token_mean(wrap):
  # Four padded micro-batches of 32 rows holding 3, 29, 8 and 24 real tokens.
  x, y = _regression(n=128, seed=1)
  lengths = [3, 29, 8, 24]
  masks = [np.arange(32) < n for n in lengths]
  w0 = np.random.default_rng(2).standard_normal(x.shape[1]).astype(np.float32)
  grads = [_jax_mse_grad(jnp.asarray(w0), x[32 * i:32 * (i + 1)],
                         y[32 * i:32 * (i + 1)], jnp.asarray(m, jnp.float32))
           for i, m in enumerate(masks)]

  tx = gc.accumulate(optax.sgd(1.0), every_k=4)
  state = tx.init(jnp.zeros_like(w0))
  update = wrap(tx.update)
  for g, n in zip(grads, lengths):
    u, state = update(g, state, weight=n)
  ours = -np.asarray(u, np.float64)

  token_mask = np.concatenate(masks)
  token_mean = _mse_grad(w0, x, y, token_mask)
  equal_mean = np.mean([_mse_grad(w0, x[32 * i:32 * (i + 1)], y[32 * i:32 * (i + 1)], m)
                        for i, m in enumerate(masks)], axis=0)
  np.testing.assert_allclose(ours, token_mean, rtol=1e-5, atol=1e-5)
  # Equal averaging (what optax.MultiSteps does) is off by far more than that.
  gap = np.linalg.norm(equal_mean - token_mean) / np.linalg.norm(token_mean)
  assert gap > 0.1, gap

  multi = optax.MultiSteps(optax.sgd(1.0), every_k_schedule=4)
  mstate = multi.init(jnp.zeros_like(w0))
  for g in grads:
    mu, mstate = multi.update(g, mstate)
  np.testing.assert_allclose(-np.asarray(mu), equal_mean, rtol=1e-4, atol=1e-5)


def test_inner_adam_runs_once_per_k_calls_and_is_untouched_between():
  k = 3
  params = {"w": jnp.ones((4, 2)), "b": jnp.zeros(2)}
  tx = gc.accumulate(optax.adam(1e-2), every_k=k)
  state = tx.init(params)
  update = jax.jit(tx.update)
  rng = np.random.default_rng(0)
  for call in range(1, 3 * k + 1):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype),
                         params)
    before = state.inner_state
    _, state = update(grads, state, params)
    adam_count = int(state.inner_state[0].count)
    assert adam_count == call // k
    assert int(state.inner_steps) == call // k
    assert int(state.micro_step) == call % k
    if call % k:
      chex.assert_trees_all_equal(state.inner_state, before)


def test_adam_on_the_weighted_mean_matches_a_numpy_adam():
  lr, b1, b2, eps, k = 1e-2, 0.9, 0.999, 1e-8, 2
  tx = gc.accumulate(optax.adam(lr, b1=b1, b2=b2, eps=eps), every_k=k)
  rng = np.random.default_rng(3)
  state = tx.init(jnp.zeros(6))
  m = v = np.zeros(6)
  for t in range(1, 6):
    gs = [rng.standard_normal(6) for _ in range(k)]
    ws = rng.uniform(1.0, 10.0, k)
    for g, w in zip(gs, ws):
      u, state = jax.jit(tx.update)(jnp.asarray(g, jnp.float32), state,
                                    weight=jnp.float32(w))
    g = np.sum([w * g for g, w in zip(gs, ws)], axis=0) / np.sum(ws)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    expect = -lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    np.testing.assert_allclose(u, expect, rtol=1e-4, atol=1e-7)


def test_extra_arguments_reach_the_inner_transform_on_the_boundary():
  def scale_by_factor():
    def update(updates, state, params=None, *, factor):
      return jax.tree.map(lambda g: g * factor, updates), state
    return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)

  tx = gc.accumulate(scale_by_factor(), every_k=2)
  state = tx.init(jnp.zeros(2))
  u, state = tx.update(jnp.array([1.0, 2.0]), state, factor=10.0)
  np.testing.assert_array_equal(u, 0.0)
  u, state = tx.update(jnp.array([3.0, 4.0]), state, factor=10.0)
  np.testing.assert_allclose(u, [20.0, 30.0])


def test_non_boundary_updates_are_zeros_in_each_leaf_dtype():
  params = {"a": jnp.ones(3, jnp.bfloat16), "b": jnp.ones(2, jnp.float16)}
  tx = gc.accumulate(optax.sgd(1.0), every_k=2)
  u, state = jax.jit(tx.update)(params, tx.init(params))
  for leaf, p in zip(jax.tree.leaves(u), jax.tree.leaves(params)):
    assert leaf.dtype == p.dtype
    np.testing.assert_array_equal(np.asarray(leaf, np.float32), 0.0)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.accumulator))


def test_bfloat16_accumulator():
  tx = gc.accumulate(optax.sgd(1.0), every_k=2, accumulator_dtype=jnp.bfloat16)
  state = tx.init(jnp.zeros(3))
  assert state.accumulator.dtype == jnp.bfloat16
  _, state = tx.update(jnp.array([1.0, 2.0, 3.0]), state)
  u, state = tx.update(jnp.array([3.0, 4.0, 5.0]), state)
  np.testing.assert_allclose(u, [-2.0, -3.0, -4.0], rtol=1e-2)


def test_a_zero_total_weight_emits_zeros_and_is_counted():
  tx = gc.accumulate(optax.adam(1e-3), every_k=2)
  state = tx.init(jnp.zeros(3))
  update = jax.jit(tx.update)
  nan = jnp.full(3, jnp.nan)  # the gradient of an empty, all-padding micro-batch
  for _ in range(2):
    u, state = update(nan, state, weight=0.0)
  np.testing.assert_array_equal(u, 0.0)
  found = gc.stats(state)
  assert int(found["accumulate/empty_steps"]) == 1
  assert int(found["accumulate/inner_steps"]) == 0
  assert int(state.inner_state[0].count) == 0
  # A zero-weight micro-batch beside a weighted one is ignored, NaN or not.
  _, state = update(nan, state, weight=0.0)
  u, state = update(jnp.ones(3), state, weight=5.0)
  # Adam's first step on the mean of ones alone: -lr * 1 / (1 + eps).
  np.testing.assert_allclose(u, -1e-3, rtol=1e-5)
  assert int(state.inner_steps) == 1


@pytest.mark.parametrize("wrap", JITS, ids=JIT_IDS)
def test_a_non_finite_cycle_does_not_leak_into_the_next(wrap):
  # The buffer is not zeroed at a boundary: the next cycle's first micro-batch
  # overwrites it. An inf from the last cycle must not survive that.
  tx = gc.accumulate(optax.sgd(1.0), every_k=2)
  update = wrap(tx.update)
  state = tx.init(jnp.zeros(2))
  _, state = update(jnp.array([jnp.inf, 1.0]), state, weight=1.0)
  u, state = update(jnp.array([1.0, jnp.nan]), state, weight=1.0)
  assert not np.isfinite(np.asarray(u)).any()
  _, state = update(jnp.array([2.0, 4.0]), state, weight=1.0)
  u, state = update(jnp.array([4.0, 8.0]), state, weight=3.0)
  np.testing.assert_allclose(u, -(1 * np.array([2.0, 4.0]) + 3 * np.array([4.0, 8.0])) / 4)


def test_a_donated_training_step_compiles_no_gradient_sized_copy(donated_step_copies):
  # The inner state passes through the lax.cond as is: with the state
  # donated, XLA then updates it in place on every call, boundary or not.
  params = {"w": jnp.zeros((64, 128)), "b": jnp.zeros(128)}
  copies = donated_step_copies(gc.accumulate(optax.adam(1e-3), every_k=4), params)
  assert not copies, copies


def test_a_traced_negative_weight_is_ignored_and_counted():
  tx = gc.accumulate(optax.sgd(1.0), every_k=2)
  update = jax.jit(tx.update)
  state = tx.init(jnp.zeros(2))
  _, state = update(jnp.array([100.0, 100.0]), state, weight=jnp.float32(-1.0))
  assert int(state.invalid_weights) == 1
  assert float(state.weight) == 0.0
  u, state = update(jnp.array([1.0, 2.0]), state, weight=jnp.float32(2.0))
  np.testing.assert_allclose(u, [-1.0, -2.0])
  assert int(gc.stats(state)["accumulate/invalid_weights"]) == 1


@pytest.mark.parametrize("every_k", [2, 3, 5])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_weights_whose_sum_overflows_still_weigh_every_micro_batch(every_k, jit):
  # 3e38 + 3e38 is inf in float32: the shares come from scaled totals.
  tx = gc.accumulate(optax.sgd(1.0), every_k=every_k)
  update = jax.jit(tx.update) if jit else tx.update
  state = tx.init(jnp.zeros(2))
  grads = [np.array([i + 1.0, -2.0 * i]) for i in range(every_k)]
  for g in grads:
    u, state = update(jnp.asarray(g, jnp.float32), state, weight=jnp.float32(3e38))
  np.testing.assert_allclose(u, -np.mean(grads, axis=0), rtol=1e-6)
  assert int(state.inner_steps) == 1 and int(state.invalid_weights) == 0
  if every_k >= 3:
    # Mid-cycle the reported total is inf (past float32), the mean exact.
    _, state = update(jnp.ones(2), state, weight=jnp.float32(3e38))
    _, state = update(3 * jnp.ones(2), state, weight=jnp.float32(3e38))
    assert np.isinf(float(state.weight)) and np.isfinite(float(state.scaled_weight))
    np.testing.assert_allclose(state.accumulator, [2.0, 2.0])


def test_scaled_weights_give_the_weighted_mean_and_a_scaled_total():
  rng = np.random.default_rng(0)
  tx = gc.accumulate(optax.sgd(1.0), every_k=3)
  state = tx.init(jnp.zeros(4))
  grads, weights = [], []
  for _ in range(2):
    grads.append(rng.standard_normal(4).astype(np.float32))
    weights.append(np.float32(rng.uniform(1, 1000)))
    _, state = jax.jit(tx.update)(jnp.asarray(grads[-1]), state, weight=weights[-1])
    np.testing.assert_allclose(state.accumulator,
                               np.average(grads, axis=0, weights=weights), rtol=1e-6)
    # every_k = 3: scaled by 2**-2, exactly.
    assert float(state.scaled_weight) == float(state.weight) / 4


def test_stats_show_the_cycle():
  tx = gc.accumulate(optax.sgd(1.0), every_k=3)
  state = tx.init(jnp.zeros(2))
  _, state = tx.update(jnp.ones(2), state, weight=2.0)
  _, state = tx.update(jnp.ones(2), state, weight=5.0)
  found = gc.stats(state)
  assert set(found) == {"accumulate/micro_step", "accumulate/inner_steps",
                        "accumulate/weight", "accumulate/empty_steps",
                        "accumulate/invalid_weights", "accumulate/noise_scale"}
  assert int(found["accumulate/micro_step"]) == 2
  assert float(found["accumulate/weight"]) == 7.0
  assert found["accumulate/weight"].dtype == jnp.float32


def test_compiled_memory_exceeds_multisteps_only_by_the_cond_tables():
  params = {"w": jnp.zeros((256, 256)), "b": jnp.zeros(256)}

  def footprint(tx):
    state = tx.init(params)
    memory = jax.jit(tx.update).lower(params, state, params).compile().memory_analysis()
    return memory.argument_size_in_bytes + memory.temp_size_in_bytes

  ours = footprint(gc.accumulate(optax.adam(1e-3), every_k=4))
  theirs = footprint(optax.MultiSteps(optax.adam(1e-3), every_k_schedule=4))
  # Both hold one accumulator beside the inner state; beyond that we carry
  # eight more state scalars (three counters, five for the noise scale) and
  # two lax.cond's buffer tables (8 bytes for each buffer they carry),
  # independent of the number of parameters.
  assert ours <= theirs + 2048, (ours, theirs)


@pytest.mark.parametrize("every_k", [0, -2, 1.5, "4"])
def test_bad_every_k_raises(every_k):
  with pytest.raises(ValueError, match="every_k must be an integer >= 1"):
    gc.accumulate(optax.sgd(1.0), every_k=every_k)


@pytest.mark.parametrize("weight", [-1.0, float("nan"), np.float32(-0.5)])
def test_bad_concrete_weight_raises(weight):
  tx = gc.accumulate(optax.sgd(1.0), every_k=2)
  state = tx.init(jnp.zeros(2))
  with pytest.raises(ValueError, match=r"weight must be in \[0.0, inf\]"):
    tx.update(jnp.ones(2), state, weight=weight)


# --------------------------------------------------------------- noise scale


def _noise_reference(cycles, decay):
  """McCandlish et al. (2018), appendix A.1, for micro-batches of weights w_i:
  tr(Sigma) = (sum w_i |g_i|^2 - W |g_bar|^2) / (k - 1), |G|^2 = |g_bar|^2 -
  tr(Sigma) / W, each smoothed by an EMA, B_simple their ratio (float64)."""
  trace_ema = signal_ema = 0.0
  scales = []
  for grads, weights in cycles:
    w = np.asarray(weights, np.float64)
    g = [np.asarray(x, np.float64) for x in grads]
    total = w.sum()
    mean = sum(wi * gi for wi, gi in zip(w, g)) / total
    trace = (sum(wi * np.sum(gi ** 2) for wi, gi in zip(w, g))
             - total * np.sum(mean ** 2)) / (len(g) - 1)
    signal = np.sum(mean ** 2) - trace / total
    trace_ema = decay * trace_ema + (1 - decay) * trace
    signal_ema = decay * signal_ema + (1 - decay) * signal
    scales.append(trace_ema / signal_ema if signal_ema > 0 else np.inf)
  return scales


def _noisy_cycles(n, every_k, dim=256, sigma=1.0, seed=0, sizes=None):
  """Micro-batch gradients of a true gradient G plus the mean of b_i
  per-example noises N(0, sigma^2 I): tr(Sigma) = dim * sigma^2."""
  rng = np.random.default_rng(seed)
  true = rng.standard_normal(dim) * 0.5
  cycles = []
  for _ in range(n):
    b = sizes if sizes is not None else [8] * every_k
    grads = [(true + sigma * rng.standard_normal(dim) / np.sqrt(bi)).astype(np.float32)
             for bi in b]
    cycles.append((grads, [float(bi) for bi in b]))
  return cycles, dim * sigma ** 2 / float(np.sum(true ** 2))


@pytest.mark.parametrize("jit", JITS, ids=JIT_IDS)
def test_noise_scale_matches_numpy_reference_with_unequal_weights(jit):
  sizes = [3, 8, 5]
  cycles, _ = _noisy_cycles(12 if jit is jax.jit else 4, 3, sizes=sizes)
  expect = _noise_reference(cycles, 0.9)
  tx = gc.accumulate(optax.sgd(0.1), every_k=3, noise_decay=0.9)
  state = tx.init({"w": jnp.zeros(256)})
  update = jit(tx.update)
  for (grads, weights), scale in zip(cycles, expect):
    for g, w in zip(grads, weights):
      _, state = update({"w": jnp.asarray(g)}, state, weight=w)
    np.testing.assert_allclose(gc.stats(state)["accumulate/noise_scale"], scale,
                               rtol=2e-3)


def test_noise_scale_estimates_the_critical_batch_size():
  cycles, true_scale = _noisy_cycles(300, 4, sigma=2.0, seed=1)
  tx = gc.accumulate(optax.sgd(0.1), every_k=4, noise_decay=0.99)
  state = tx.init({"w": jnp.zeros(256)})
  update = jax.jit(tx.update)
  for grads, weights in cycles:
    for g, w in zip(grads, weights):
      _, state = update({"w": jnp.asarray(g)}, state, weight=w)
  got = float(gc.stats(state)["accumulate/noise_scale"])
  # B_simple in examples: the micro-batches were weighted by their size.
  assert abs(got / true_scale - 1) < 0.2, (got, true_scale)


def test_noise_scale_needs_two_micro_batches_of_positive_weight():
  tx = gc.accumulate(optax.sgd(0.1), every_k=2)
  state = tx.init({"w": jnp.zeros(3)})
  for _ in range(3):
    _, state = tx.update({"w": jnp.ones(3)}, state, weight=1.0)
    _, state = tx.update({"w": jnp.full(3, jnp.nan)}, state, weight=0.0)
  assert float(state.noise_scale) == 0.0 and float(state.noise_trace) == 0.0
  single = gc.accumulate(optax.sgd(0.1), every_k=1)
  state = single.init({"w": jnp.zeros(3)})
  for g in (1.0, 2.0):
    _, state = single.update({"w": jnp.full(3, g)}, state)
  assert float(state.noise_scale) == 0.0


def test_a_fresh_state_can_be_donated():
  # init once gave several fields one shared zero buffer: "Attempt to donate
  # the same buffer twice".
  tx = gc.accumulate(optax.sgd(0.1), every_k=2)
  params = {"w": jnp.ones(3)}
  step = jax.jit(lambda g, s: tx.update(g, s, weight=2.0), donate_argnums=1)
  _, state = step(params, tx.init(params))
  _, state = step(params, state)
  assert int(state.inner_steps) == 1
