"""AdaGC, SPAM and update-RMS clipping against NumPy transcriptions of their papers."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradcal_jax as gc

JITS = [pytest.param(lambda f: f, id="eager"), pytest.param(jax.jit, id="jit")]
# Steps whose gradient is multiplied, in one tensor or all of them.
SPIKES = {30: ("w", 40.0), 31: ("b", 15.0), 70: (None, 25.0), 95: ("w", 1e3)}


def _grads(step: int) -> dict[str, np.ndarray]:
  """Three tensors of different scales, slowly shrinking, with spikes."""
  rng = np.random.default_rng(500 + step)
  decay = 1.0 / (1.0 + 0.01 * step)
  grads = {"w": 0.3 * decay * rng.standard_normal((6, 4)),
           "b": 0.05 * decay * rng.standard_normal(4),
           "s": 2.0 * decay * rng.standard_normal(())}
  if step in SPIKES:
    name, factor = SPIKES[step]
    for k in grads:
      if name in (None, k):
        grads[k] = grads[k] * factor
  return {k: np.asarray(v, np.float32) for k, v in grads.items()}


def _run(tx, steps, jit):
  state = tx.init(jax.tree.map(jnp.asarray, _grads(0)))
  update = jit(tx.update)
  outs = []
  for t in range(steps):
    out, state = update(jax.tree.map(jnp.asarray, _grads(t)), state)
    outs.append(jax.tree.map(np.asarray, out))
  return outs, state


def _steps(jit, full=120, eager=40):
  return full if jit is jax.jit else eager


# ------------------------------------------------------------------- AdaGC


def _adagc_reference(steps, lambda_abs, lambda_rel, beta, warmup):
  """Algorithm 1 of Wang et al. (2025), in float64."""
  gamma = {k: math.inf for k in _grads(0)}
  outs, clipped = [], []
  for t in range(steps):
    g = {k: v.astype(np.float64) for k, v in _grads(t).items()}
    norms = {k: float(np.linalg.norm(v)) for k, v in g.items()}
    total = math.sqrt(sum(n * n for n in norms.values()))
    if t < warmup:
      h = {k: min(1.0, lambda_abs / total) for k in g}
    else:
      h = {k: min(1.0, lambda_rel * gamma[k] / norms[k]) for k in g}
    for k in g:
      c = h[k] * norms[k]
      gamma[k] = min(gamma[k], c) if t < warmup else beta * gamma[k] + (1 - beta) * c
    outs.append({k: h[k] * v for k, v in g.items()})
    clipped.append(sum(v < 1.0 for v in h.values()))
  return outs, clipped, gamma


@pytest.mark.parametrize("jit", JITS)
def test_adagc_matches_numpy_reference_over_many_steps(jit):
  steps = _steps(jit)
  kwargs = dict(lambda_abs=0.5, lambda_rel=1.05, beta=0.9, warmup_steps=10)
  expect, clipped, gamma = _adagc_reference(
      steps, kwargs["lambda_abs"], kwargs["lambda_rel"], kwargs["beta"],
      kwargs["warmup_steps"])
  outs, state = _run(gc.adagc(**kwargs), steps, jit)
  for t in range(steps):
    chex.assert_trees_all_close(outs[t], expect[t], rtol=2e-5, atol=1e-8)
  chex.assert_trees_all_close(jax.tree.map(float, state.gamma), gamma, rtol=2e-5)
  assert int(state.num_clipped) == clipped[-1]
  assert sum(clipped[10:]) > 0  # the spikes were clipped per tensor


def test_adagc_leaves_a_nonfinite_tensor_unscaled_and_its_gamma_alone():
  tx = gc.adagc(warmup_steps=1)
  state = tx.init({"a": jnp.zeros(2), "b": jnp.zeros(2)})
  _, state = tx.update({"a": jnp.ones(2), "b": jnp.ones(2)}, state)
  before = state.gamma
  out, state = tx.update({"a": jnp.array([jnp.inf, 1.0]), "b": jnp.ones(2)}, state)
  assert np.isinf(out["a"][0]) and float(out["a"][1]) == 1.0
  assert float(state.gamma["a"]) == float(before["a"])
  assert np.isfinite(float(state.gamma["b"]))


# -------------------------------------------------------------------- SPAM


def _spam_reference(steps, lr, b1, b2, eps, theta, gap, warmup, delay):
  """The authors' SPAM step (SPAM-Optimizer, ``SPAM.py``) transcribed to NumPy:
  updates ``-lr * scale * step_size * m / (sqrt(v) + eps)`` per tensor."""
  names = list(_grads(0))
  m = {k: np.zeros_like(_grads(0)[k], np.float64) for k in names}
  v = {k: np.zeros_like(m[k]) for k in names}
  total, current = 0, warmup + 1
  outs, clipped = [], []
  for s in range(steps):
    dr = 0.0 if current >= warmup else 0.99 * (1 + math.cos(math.pi * current / (warmup + 1))) / 2
    scale = 1.0 - dr
    out, n = {}, 0
    for k in names:
      g = _grads(s)[k].astype(np.float64)
      if (total + 1) % gap == 0:
        m[k], v[k] = np.zeros_like(m[k]), np.zeros_like(v[k])
      if total + 1 >= delay and (total + 1) % gap >= delay:
        mask = g ** 2 > theta * v[k]
        g = np.where(mask, np.sign(g) * np.sqrt(theta * v[k]), g)
        n += int(np.sum(mask))
      m[k] = b1 * m[k] + (1 - b1) * g
      v[k] = b2 * v[k] + (1 - b2) * g * g
      step = s + 1
      size = lr * math.sqrt(1 - b2 ** step) / (1 - b1 ** step)
      out[k] = -size * scale * m[k] / (np.sqrt(v[k]) + eps)
    total += 1
    current += 1
    if total != 0 and (total + 1) % gap == 0:
      current = 0
    outs.append(out)
    clipped.append(n)
  return outs, clipped


@pytest.mark.parametrize("jit", JITS)
def test_spam_matches_the_authors_algorithm_over_many_steps(jit):
  steps = _steps(jit)
  kwargs = dict(b1=0.9, b2=0.99, eps=1e-6, theta=20.0, interval=37,
                warmup_steps=8, clip_delay=5)
  expect, clipped = _spam_reference(
      steps, 0.1, kwargs["b1"], kwargs["b2"], kwargs["eps"], kwargs["theta"],
      kwargs["interval"], kwargs["warmup_steps"], kwargs["clip_delay"])
  tx = gc.spam(0.1, **kwargs)
  state = tx.init(jax.tree.map(jnp.asarray, _grads(0)))
  update = jit(tx.update)
  factors = []
  for t in range(steps):
    out, state = update(jax.tree.map(jnp.asarray, _grads(t)), state)
    chex.assert_trees_all_close(jax.tree.map(np.asarray, out), expect[t],
                                rtol=5e-4, atol=1e-7)
    assert int(state.num_clipped) == clipped[t], t
    factors.append(float(state.warmup_factor))
  assert sum(clipped) > 0
  if steps > 45:
    assert factors[36] == pytest.approx(0.01) and factors[36 + 8] == 1.0


def test_spam_keeps_an_infinite_entry_visible():
  tx = gc.spam(0.1, clip_delay=2)
  state = tx.init({"w": jnp.zeros(2)})
  for _ in range(3):
    _, state = tx.update({"w": jnp.ones(2)}, state)
  out, state = tx.update({"w": jnp.array([jnp.inf, 1.0])}, state)
  assert not np.isfinite(np.asarray(out["w"][0]))
  assert int(state.num_clipped) == 0


def test_spam_weight_decay_is_optax_decoupled_decay():
  params = {"w": jnp.full((3,), 2.0)}
  with_decay = gc.spam(0.1, weight_decay=0.5)
  plain = gc.spam(0.1)
  grads = {"w": jnp.array([1.0, -1.0, 0.5])}
  got, _ = with_decay.update(grads, with_decay.init(params), params)
  base, _ = plain.update(grads, plain.init(params), params)
  np.testing.assert_allclose(got["w"], base["w"] - 0.1 * 0.5 * params["w"],
                             rtol=1e-6, atol=1e-7)


# --------------------------------------------------------- update RMS clip


def _stable_adamw_reference(steps, lr, b1, b2, eps, threshold):
  """StableAdamW (Wortsman et al. 2023, Algorithm 2): Adam whose per-tensor
  learning rate is divided by max(1, RMS(g^2 / max(v_hat, eps^2)) / d)."""
  names = list(_grads(0))
  m = {k: np.zeros_like(_grads(0)[k], np.float64) for k in names}
  v = {k: np.zeros_like(m[k]) for k in names}
  outs, rms_max = [], []
  for s in range(steps):
    t = s + 1
    out, rms_all = {}, []
    for k in names:
      g = _grads(s)[k].astype(np.float64)
      m[k] = b1 * m[k] + (1 - b1) * g
      v[k] = b2 * v[k] + (1 - b2) * g * g
      m_hat, v_hat = m[k] / (1 - b1 ** t), v[k] / (1 - b2 ** t)
      rms = math.sqrt(np.mean(g * g / np.maximum(v_hat, eps ** 2)))
      rms_all.append(rms)
      out[k] = -lr / max(1.0, rms / threshold) * m_hat / (np.sqrt(v_hat) + eps)
    outs.append(out)
    rms_max.append(max(rms_all))
  return outs, rms_max


@pytest.mark.parametrize("jit", JITS)
def test_clip_update_rms_around_adam_is_stable_adamw(jit):
  steps = _steps(jit)
  expect, rms_max = _stable_adamw_reference(steps, 0.01, 0.9, 0.95, 1e-8, 1.0)
  tx = gc.clip_update_rms(optax.adam(0.01, b1=0.9, b2=0.95), b2=0.95)
  outs, state = _run(tx, steps, jit)
  for t in range(steps):
    chex.assert_trees_all_close(outs[t], expect[t], rtol=2e-4, atol=1e-8)
  np.testing.assert_allclose(state.max_rms, rms_max[-1], rtol=1e-4)
  assert max(rms_max) > 1.0  # the spikes were scaled down


def test_clip_update_rms_after_scale_by_adam_clips_the_update_by_its_rms():
  steps = 60
  tx = optax.chain(optax.scale_by_adam(b1=0.0, b2=0.95), gc.clip_update_rms())
  stable, _ = _stable_adamw_reference(steps, 1.0, 0.0, 0.95, 1e-8, 1.0)
  outs, state = _run(tx, steps, jax.jit)
  # b1 = 0: the update is g / sqrt(v_hat), whose RMS is StableAdamW's.
  for t in range(steps):
    chex.assert_trees_all_close(outs[t], jax.tree.map(np.negative, stable[t]),
                                rtol=2e-4, atol=1e-7)
  with_momentum = optax.chain(optax.scale_by_adam(), gc.clip_update_rms())
  adam_only = optax.scale_by_adam()
  ours, _ = _run(with_momentum, steps, jax.jit)
  plain, _ = _run(adam_only, steps, jax.jit)
  for a, b in zip(ours, plain):
    for k in a:
      rms = np.sqrt(np.mean(np.square(b[k].astype(np.float64))))
      np.testing.assert_allclose(a[k], b[k] / max(1.0, rms), rtol=1e-5, atol=1e-8)


def test_clip_update_rms_needs_a_second_moment_in_inner():
  with pytest.raises(ValueError, match="second moment `nu`"):
    gc.clip_update_rms(optax.sgd(0.1)).init({"w": jnp.zeros(2)})


@pytest.mark.parametrize("make, kwargs, message", [
    (gc.adagc, {"lambda_abs": -1.0}, r"lambda_abs must be in \[0.0"),
    (gc.adagc, {"lambda_rel": -1.0}, r"lambda_rel must be in \[0.0"),
    (gc.adagc, {"beta": 1.0}, r"beta must be in \[0.0, 1.0\)"),
    (gc.adagc, {"warmup_steps": 0}, "warmup_steps must be an integer >= 1"),
    (lambda **k: gc.spam(0.1, **k), {"theta": 0.0}, r"theta must be in \(0.0"),
    (lambda **k: gc.spam(0.1, **k), {"interval": 0}, "interval must be an integer >= 1"),
    (lambda **k: gc.spam(0.1, **k), {"b2": 1.0}, r"b2 must be in \[0.0, 1.0\)"),
    (lambda **k: gc.spam(0.1, **k), {"clip_delay": 1}, "clip_delay must be an integer >= 2"),
    (lambda **k: gc.spam(0.1, **k), {"weight_decay": -1.0}, r"weight_decay must be in \[0.0"),
    (gc.clip_update_rms, {"threshold": 0.0}, r"threshold must be in \(0.0"),
    (gc.clip_update_rms, {"eps": 0.0}, r"eps must be in \(0.0"),
])
def test_bad_hyperparameters(make, kwargs, message):
  with pytest.raises(ValueError, match=message):
    make(**kwargs)


@pytest.mark.parametrize("jit", JITS)
def test_spam_keeps_its_reset_period_past_int32_max(jit):
  # From 2**31-1 updates on the count cycles near the int32 maximum: the
  # moments still reset every `interval` updates (warm-up factor 0.01 on the
  # reset step) and the update stays finite.
  interval = 4
  tx = gc.spam(0.1, interval=interval, warmup_steps=2, clip_delay=2)
  state = tx.init({"w": jnp.zeros(2)})._replace(count=jnp.int32(2 ** 31 - 3))
  update = jit(tx.update)
  factors, counts = [], []
  for _ in range(3 * interval):
    out, state = update({"w": jnp.array([1.0, -2.0])}, state)
    assert np.all(np.isfinite(np.asarray(out["w"])))
    factors.append(float(state.warmup_factor))
    counts.append(int(state.count))
  assert min(counts) > 0
  resets = [i for i, f in enumerate(factors) if f == pytest.approx(0.01)]
  assert len(resets) == 3 and np.all(np.diff(resets) == interval), factors
