"""AutoClip, ZClip and skip_spikes against NumPy re-implementations of their papers."""

from __future__ import annotations

import collections

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradcal_jax as gc

JITS = [pytest.param(lambda f: f, id="eager"), pytest.param(jax.jit, id="jit")]
STEPS = 300
# Op-by-op execution is slow, so the eager runs cover the first spikes only.
EAGER_STEPS = 45
SPIKES = {40: 30.0, 41: 8.0, 120: 50.0, 200: 12.0, 201: 0.05, 260: 100.0}


def _norm_sequence(steps: int = STEPS, seed: int = 0) -> np.ndarray:
  """Slowly drifting, noisy norms with spikes (and a collapse) at known steps."""
  rng = np.random.default_rng(seed)
  base = 2.0 + np.linspace(0.0, -1.0, steps) + 0.3 * rng.standard_normal(steps)
  norms = np.abs(base) + 0.1
  for step, factor in SPIKES.items():
    if step < steps:
      norms[step] *= factor
  return norms


def _grads(norm: float, step: int) -> dict[str, jax.Array]:
  """A random direction with the given global norm, in a small model tree."""
  rng = np.random.default_rng(1000 + step)
  tree = {"w": rng.standard_normal((7, 5)), "b": rng.standard_normal(5)}
  total = np.sqrt(sum(np.sum(x**2) for x in tree.values()))
  return {k: jnp.asarray(v * norm / total, jnp.float32) for k, v in tree.items()}


def _norm64(tree) -> float:
  return float(np.sqrt(sum(np.sum(np.asarray(x, np.float64)**2)
                           for x in jax.tree.leaves(tree))))


def _steps(jit) -> int:
  return STEPS if jit is jax.jit else EAGER_STEPS


def _run(tx, norms, jit, extra=None, params=None):
  """(grads, outputs, states) of ``tx`` over the grads built from ``norms``."""
  grads_seq = [_grads(n, t) for t, n in enumerate(norms)]
  state = tx.init(grads_seq[0])
  update = jit(tx.update)
  outs, states = [], []
  for t, grads in enumerate(grads_seq):
    kwargs = {} if extra is None else extra(t)
    out, state = update(grads, state, params, **kwargs)
    outs.append(out)
    states.append(state)
  return grads_seq, outs, states


def _assert_scaled(out, grads, scale):
  for k in grads:
    np.testing.assert_allclose(np.asarray(out[k]), np.asarray(grads[k]) * scale,
                               rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------
# AutoClip


def _autoclip_reference(norms, percentile, history):
  """Seetharaman et al. 2020: clip to the percentile of the recorded norms."""
  seen, thresholds, scales = [], [], []
  for g in norms:
    seen.append(g)
    threshold = np.percentile(seen[-history:], percentile)
    thresholds.append(threshold)
    scales.append(min(1.0, threshold / g))
  return np.array(thresholds), np.array(scales)


@pytest.mark.parametrize("jit, percentile, history", [
    pytest.param(jax.jit, 10.0, 1000, id="jit-defaults"),
    pytest.param(jax.jit, 90.0, 64, id="jit-90"),
    pytest.param(jax.jit, 0.0, 16, id="jit-0"),
    pytest.param(jax.jit, 50.0, 7, id="jit-50"),
    pytest.param(lambda f: f, 50.0, 7, id="eager-50"),
])
def test_autoclip_matches_numpy_percentile(jit, percentile, history):
  steps = _steps(jit)
  grads, outs, states = _run(gc.autoclip(percentile, history),
                             _norm_sequence(steps), jit)
  norms = [_norm64(g) for g in grads]
  thresholds, scales = _autoclip_reference(norms, percentile, history)
  np.testing.assert_allclose([float(s.threshold) for s in states], thresholds,
                             rtol=1e-5)
  np.testing.assert_allclose([float(s.norm) for s in states], norms, rtol=1e-5)
  for out, g, scale in zip(outs, grads, scales):
    _assert_scaled(out, g, scale)
  assert int(states[-1].count) == steps
  # The ring buffer holds the last `history` norms.
  recent = np.asarray(norms[-min(history, steps):])
  np.testing.assert_allclose(np.sort(np.asarray(states[-1].norms)[:len(recent)]),
                             np.sort(recent), rtol=1e-5)


def test_autoclip_percentile_100_never_clips():
  grads, outs, _ = _run(gc.autoclip(100.0, 5), _norm_sequence(60), jax.jit)
  for out, g in zip(outs, grads):
    chex.assert_trees_all_equal(out, g)


def test_autoclip_first_step_is_not_clipped_and_spike_is():
  tx = gc.autoclip(10.0, 100)
  state = tx.init({"w": jnp.zeros(3)})
  out, state = tx.update({"w": jnp.full(3, 5.0)}, state)
  chex.assert_trees_all_equal(out["w"], jnp.full(3, 5.0))
  out, state = tx.update({"w": jnp.full(3, 50.0)}, state)
  # Two norms, 5*sqrt(3) and 50*sqrt(3): the 10th percentile interpolates.
  expect = np.percentile([5 * np.sqrt(3), 50 * np.sqrt(3)], 10)
  np.testing.assert_allclose(float(state.threshold), expect, rtol=1e-6)
  np.testing.assert_allclose(float(jnp.linalg.norm(out["w"])), expect, rtol=1e-6)


def test_autoclip_nonfinite_norm_is_not_recorded_and_stays_visible():
  tx = gc.autoclip(50.0, 4)
  state = tx.init({"w": jnp.zeros(2)})
  for g in (1.0, 2.0):
    _, state = tx.update({"w": jnp.array([g, 0.0])}, state)
  out, state = jax.jit(tx.update)({"w": jnp.array([jnp.nan, 1.0])}, state)
  assert np.isnan(np.asarray(out["w"][0])) and float(out["w"][1]) == 1.0
  assert int(state.count) == 2 and np.isnan(float(state.norm))
  out, state = tx.update({"w": jnp.array([3.0, 0.0])}, state)
  np.testing.assert_allclose(float(state.threshold), 2.0, rtol=1e-6)


# ---------------------------------------------------------------------------
# ZClip


def _zclip_reference(norms, z_threshold, alpha, warmup_steps, max_norm, eps):
  """Kumar et al. 2025, following the authors' ZClip.step (zscore mode)."""
  buffer, mean, var = [], None, None
  thresholds, scales, means, variances = [], [], [], []
  for g in norms:
    if mean is None:
      buffer.append(g)
      if len(buffer) == warmup_steps:
        mean = float(np.mean(buffer))
        var = float(np.var(buffer))
      threshold = g if max_norm is None else min(g, max_norm)
    else:
      std = var**0.5
      z = (g - mean) / (std + eps)
      clip_to = mean + (z_threshold**2 / z) * std if z > z_threshold else g
      threshold = clip_to if max_norm is None else min(clip_to, max_norm)
      mean = alpha * mean + (1 - alpha) * clip_to
      var = alpha * var + (1 - alpha) * (clip_to - mean)**2
    thresholds.append(threshold)
    scales.append(min(1.0, threshold / g))
    means.append(np.nan if mean is None else mean)
    variances.append(np.nan if var is None else var)
  return [np.array(a) for a in (thresholds, scales, means, variances)]


_AGGRESSIVE = {"z_threshold": 1.5, "alpha": 0.9, "warmup_steps": 10}


@pytest.mark.parametrize("jit, kwargs", [
    pytest.param(jax.jit, {}, id="jit-defaults"),
    pytest.param(jax.jit, _AGGRESSIVE, id="jit-aggressive"),
    pytest.param(jax.jit, {"z_threshold": 2.0, "warmup_steps": 30, "max_norm": 3.0},
                 id="jit-max_norm"),
    pytest.param(lambda f: f, _AGGRESSIVE, id="eager-aggressive"),
])
def test_zclip_matches_the_reference_algorithm(jit, kwargs):
  full = {"z_threshold": 2.5, "alpha": 0.97, "warmup_steps": 25,
          "max_norm": None, "eps": 1e-6, **kwargs}
  grads, outs, states = _run(gc.zclip(**full), _norm_sequence(_steps(jit)), jit)
  norms = [_norm64(g) for g in grads]
  thresholds, scales, means, variances = _zclip_reference(norms, **full)
  np.testing.assert_allclose([float(s.threshold) for s in states], thresholds,
                             rtol=1e-5)
  warm = full["warmup_steps"] - 1
  np.testing.assert_allclose([float(s.mean) for s in states][warm:],
                             means[warm:], rtol=1e-5)
  np.testing.assert_allclose([float(s.variance) for s in states][warm:],
                             variances[warm:], rtol=1e-5)
  np.testing.assert_array_equal([int(s.clipped) for s in states],
                                (scales < 1.0).astype(int))
  for out, g, scale in zip(outs, grads, scales):
    _assert_scaled(out, g, scale)
  clipped = {t for t, s in enumerate(scales) if s < 1.0}
  if full["max_norm"] is None and jit is jax.jit:
    # Spikes after warm-up are clipped; the collapse at step 201 is not.
    assert {41, 120, 200, 260} <= clipped and 201 not in clipped


def test_zclip_nonfinite_norm_leaves_the_moments_alone():
  tx = gc.zclip(warmup_steps=2)
  state = tx.init({"w": jnp.zeros(1)})
  for g in (1.0, 3.0, 2.0):
    _, state = tx.update({"w": jnp.array([g])}, state)
  before = state
  out, state = jax.jit(tx.update)({"w": jnp.array([jnp.inf])}, state)
  assert np.isinf(np.asarray(out["w"][0]))
  assert float(state.mean) == float(before.mean)
  assert float(state.variance) == float(before.variance)
  assert int(state.step) == int(before.step) == 3
  assert np.isinf(float(state.norm))


def test_zclip_zero_gradients_after_warmup_stay_finite():
  tx = gc.zclip(warmup_steps=3)
  state = tx.init({"w": jnp.zeros(2)})
  for g in (0.0, 0.0, 0.0, 0.0, 1.0, 0.0):
    out, state = jax.jit(tx.update)({"w": jnp.array([g, 0.0])}, state)
    chex.assert_tree_all_finite((out, state))
  # The 1.0 step was an outlier (z = 1 / eps) against an all-zero history:
  # clipped to the threshold 0, so the statistics stay exactly zero.
  assert float(state.mean) == 0.0 and float(state.variance) == 0.0


def _unrolled_loss(tx, steps=4):
  """The loss after ``steps`` steps of ``tx`` then SGD on a quadratic, as a
  function of the initial weights: differentiated by a meta-learner."""
  opt = optax.chain(tx, optax.sgd(0.1))

  def loss(w0):
    params = {"w": w0}
    state = opt.init(params)
    for _ in range(steps):
      grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2))(params)
      updates, state = opt.update(grads, state, params)
      params = optax.apply_updates(params, updates)
    return jnp.sum(params["w"] ** 2)

  return loss


@pytest.mark.parametrize("make", [
    pytest.param(lambda: gc.zclip(warmup_steps=2), id="zclip"),
    pytest.param(lambda: gc.skip_spikes(optax.identity(), min_history=1), id="skip_spikes"),
    pytest.param(lambda: gc.clip_by_global_norm(1.0), id="clip_by_global_norm"),
])
def test_the_derivative_through_training_is_finite_and_right(make):
  # Equal norms give a zero variance: the derivative of its square root is
  # taken as 0, not inf (which made the whole derivative NaN).
  loss = _unrolled_loss(make())
  w0 = jnp.array([0.7, -0.9])  # clip_by_global_norm clips all four steps
  for grad in (jax.grad(loss), jax.jit(jax.grad(loss))):
    g = np.asarray(grad(w0))
    assert np.isfinite(g).all(), g
  eps = 1e-3
  numeric = [(loss(w0.at[i].add(eps)) - loss(w0.at[i].add(-eps))) / (2 * eps)
             for i in range(2)]
  np.testing.assert_allclose(g, numeric, rtol=2e-2, atol=1e-4)


# ---------------------------------------------------------------------------
# skip_spikes


def _skip_reference(norms, losses, sigma, window, min_history):
  """OLMo / Levanter skip-step rule on the accepted history (current excluded)."""
  kept_norms = collections.deque(maxlen=window)
  kept_losses = collections.deque(maxlen=window)
  skipped, thresholds = [], []
  for g, loss in zip(norms, losses):
    limit = (np.mean(kept_norms) + sigma * np.std(kept_norms)) if kept_norms else 0.0
    skip = not np.isfinite(g) or (len(kept_norms) >= min_history and g > limit)
    if loss is not None:
      loss_limit = (np.mean(kept_losses) + sigma * np.std(kept_losses)
                    if kept_losses else 0.0)
      skip |= not np.isfinite(loss) or (
          len(kept_losses) >= min_history and loss > loss_limit)
    if not skip:
      kept_norms.append(g)
      if loss is not None:
        kept_losses.append(loss)
    skipped.append(skip)
    thresholds.append(limit)
  return np.array(skipped), np.array(thresholds)


@pytest.mark.parametrize("jit, sigma, window, min_history", [
    pytest.param(jax.jit, 6.0, 128, 64, id="jit-defaults"),
    pytest.param(jax.jit, 2.0, 8, 8, id="jit-short"),
    pytest.param(jax.jit, 3.0, 16, 4, id="jit"),
    pytest.param(lambda f: f, 3.0, 16, 4, id="eager"),
])
def test_skip_spikes_matches_the_reference_rule(jit, sigma, window, min_history):
  steps = _steps(jit)
  tx = gc.skip_spikes(optax.identity(), sigma, window, min_history)
  grads, outs, states = _run(tx, _norm_sequence(steps), jit)
  norms = [_norm64(g) for g in grads]
  skipped, thresholds = _skip_reference(norms, [None] * steps, sigma, window,
                                        min_history)
  got = np.array([int(s.skipped) for s in states], bool)
  np.testing.assert_array_equal(got, skipped)
  if jit is jax.jit:
    assert skipped[120] and skipped[260]
  np.testing.assert_allclose([float(s.threshold) for s in states], thresholds,
                             rtol=1e-5, atol=1e-6)
  for out, g, skip in zip(outs, grads, skipped):
    _assert_scaled(out, g, 0.0 if skip else 1.0)
  assert int(states[-1].num_skipped) == skipped.sum()
  assert int(states[-1].num_nonfinite) == 0
  assert int(states[-1].norm_count) == steps - skipped.sum()


@pytest.mark.parametrize("jit", JITS)
def test_skip_spikes_keeps_adam_state_bit_for_bit_on_skipped_steps(jit):
  norms = 1.0 + 0.1 * np.random.default_rng(5).standard_normal(16)
  norms[10] = 30.0
  grads_seq = [_grads(n, t) for t, n in enumerate(norms)]
  grads_seq[13]["w"] = grads_seq[13]["w"].at[0, 0].set(jnp.nan)
  params = jax.tree.map(jnp.ones_like, grads_seq[0])
  adam = optax.adam(1e-2)
  tx = gc.skip_spikes(adam, sigma=3.0, window=8, min_history=4)
  # Compiled, the guarded Adam is Adam bit for bit; op by op, rounding of the
  # fused and unfused kernels may differ in the last place.
  same = (chex.assert_trees_all_equal if jit is jax.jit else
          lambda a, b: chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-7))
  state, adam_state = tx.init(params), adam.init(params)
  update, adam_update = jit(tx.update), jit(adam.update)
  skipped = []
  for t, grads in enumerate(grads_seq):
    out, new_state = update(grads, state, params)
    if int(new_state.skipped):
      skipped.append(t)
      chex.assert_trees_all_equal(new_state.inner_state, state.inner_state)
      chex.assert_trees_all_equal(out, jax.tree.map(jnp.zeros_like, grads))
    else:
      expect, adam_state = adam_update(grads, adam_state, params)
      same(out, expect)
      same(new_state.inner_state, adam_state)
    state = new_state
  assert skipped == [10, 13], skipped
  assert int(state.num_nonfinite) == 1
  assert int(state.num_skipped) == len(skipped)


def test_skip_spikes_skips_loss_spikes_and_nonfinite_losses():
  rng = np.random.default_rng(3)
  losses = 2.0 + 0.05 * rng.standard_normal(60)
  losses[30], losses[45] = 9.0, np.inf
  norms = np.full(60, 1.0) + 0.01 * rng.standard_normal(60)
  tx = gc.skip_spikes(optax.sgd(0.1), sigma=4.0, window=16, min_history=8)
  grads, outs, states = _run(tx, norms, jax.jit,
                             extra=lambda t: {"loss": losses[t]})
  skipped, _ = _skip_reference([_norm64(g) for g in grads], list(losses), 4.0, 16, 8)
  np.testing.assert_array_equal([bool(s.skipped) for s in states], skipped)
  assert skipped[30] and skipped[45] and skipped.sum() == 2
  assert int(states[-1].num_nonfinite) == 1
  assert int(states[-1].loss_count) == 58
  chex.assert_trees_all_equal(outs[30], jax.tree.map(jnp.zeros_like, grads[30]))


def test_skip_spikes_forwards_other_keyword_arguments_to_inner():
  def scale_by_weight():
    def update_fn(updates, state, params=None, *, weight):
      del params
      return jax.tree.map(lambda g: g * weight, updates), state
    return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(),
                                                 update_fn)

  tx = gc.skip_spikes(scale_by_weight(), window=4, min_history=2)
  grads = {"w": jnp.ones(3)}
  out, _ = jax.jit(tx.update)(grads, tx.init(grads), None, weight=3.0, loss=1.0)
  chex.assert_trees_all_equal(out["w"], jnp.full(3, 3.0))


def test_skipped_branch_does_not_run_inner():
  # A skipped NaN step must not touch Adam: its count stays at zero.
  tx = gc.skip_spikes(optax.adam(1e-3), window=4, min_history=2)
  grads = {"w": jnp.array([jnp.nan, 1.0])}
  _, state = jax.jit(tx.update)(grads, tx.init(grads))
  assert int(state.inner_state[0].count) == 0


def test_skip_spikes_compiles_no_gradient_sized_copy_or_temporary(donated_step_copies):
  # The skipped branch holds nothing gradient-sized but the zeros it returns
  # (outputs, not temporaries), and Adam's moments pass through the lax.cond
  # as is: in a training step that donates its state they are updated in
  # place, never copied.
  # Temporaries smaller than the smallest leaf are scalars and the 128-entry
  # norm history, copied around the conds.
  grads = {"w": jnp.zeros((64, 128)), "b": jnp.zeros(1024)}
  tx = gc.skip_spikes(optax.adam(1e-3))
  compiled = jax.jit(tx.update).lower(grads, tx.init(grads)).compile()
  assert compiled.memory_analysis().temp_size_in_bytes < 1024 * 4, (
      compiled.memory_analysis())
  copies = donated_step_copies(tx, grads)
  assert not copies, copies


# ---------------------------------------------------------------------------
# All three: resuming from a saved state, stats keys, validation


@pytest.mark.parametrize("make", [
    lambda: gc.autoclip(20.0, 16),
    lambda: gc.zclip(warmup_steps=10),
    lambda: gc.skip_spikes(optax.adam(1e-3), 3.0, 16, 8),
], ids=["autoclip", "zclip", "skip_spikes"])
def test_resume_from_host_copy_gives_the_same_thresholds(make):
  tx = make()
  norms = _norm_sequence(60)
  _, outs, states = _run(tx, norms, jax.jit)
  saved = jax.tree.map(np.asarray, jax.device_get(states[29]))
  state = jax.tree.map(jnp.asarray, saved)
  update = jax.jit(tx.update)
  for t in range(30, 60):
    out, state = update(_grads(norms[t], t), state)
    chex.assert_trees_all_equal(out, outs[t])
    chex.assert_trees_all_equal(gc.stats(state), gc.stats(states[t]))


def test_stats_keys():
  tx = optax.chain(gc.autoclip(), gc.zclip(),
                   gc.skip_spikes(optax.adam(1e-3)))
  grads = {"w": jnp.ones(3)}
  _, state = tx.update(grads, tx.init(grads), grads)
  assert set(gc.stats(state)) == {
      "autoclip/norm", "autoclip/threshold",
      "zclip/norm", "zclip/threshold", "zclip/mean", "zclip/variance",
      "zclip/clipped",
      "skip_spikes/norm", "skip_spikes/threshold", "skip_spikes/num_skipped",
      "skip_spikes/num_nonfinite", "skip_spikes/skipped"}


@pytest.mark.parametrize("make, message", [
    (lambda: gc.autoclip(percentile=-1.0), r"percentile must be in \[0.0, 100.0\]"),
    (lambda: gc.autoclip(percentile=100.5), r"percentile must be in \[0.0, 100.0\]"),
    (lambda: gc.autoclip(percentile=float("nan")), "percentile must be in"),
    (lambda: gc.autoclip(history=0), "history must be an integer >= 1"),
    (lambda: gc.autoclip(history=2.5), "history must be an integer >= 1"),
    (lambda: gc.zclip(z_threshold=0.0), r"z_threshold must be in \(0.0, inf\]"),
    (lambda: gc.zclip(z_threshold=-1.0), r"z_threshold must be in \(0.0, inf\]"),
    (lambda: gc.zclip(alpha=0.0), r"alpha must be in \(0.0, 1.0\)"),
    (lambda: gc.zclip(alpha=1.0), r"alpha must be in \(0.0, 1.0\)"),
    (lambda: gc.zclip(warmup_steps=0), "warmup_steps must be an integer >= 1"),
    (lambda: gc.zclip(max_norm=-0.1), r"max_norm must be in \[0.0, inf\]"),
    (lambda: gc.zclip(eps=-1e-6), r"eps must be in \[0.0, inf\]"),
    (lambda: gc.skip_spikes(optax.sgd(0.1), sigma=0.0), r"sigma must be in \(0.0, inf\]"),
    (lambda: gc.skip_spikes(optax.sgd(0.1), window=0), "window must be an integer >= 1"),
    (lambda: gc.skip_spikes(optax.sgd(0.1), min_history=0),
     "min_history must be an integer >= 1"),
    (lambda: gc.skip_spikes(optax.sgd(0.1), window=8, min_history=9),
     r"min_history must be in \[1, 8\]"),
])
def test_bad_hyperparameters(make, message):
  with pytest.raises(ValueError, match=message):
    make()


# --- int32 counters past 2**31-1 (issue 19.5) ---------------------------------

INT32_MAX = 2 ** 31 - 1


def _fill_then_jump(tx, update, fields, extra):
  """Fills a 3-entry ring with norms 0.5, 0.6, 0.7, then moves its ``fields``
  to 2**31-2, the same ring position (2**31-2 = 3 * 715827882): the state a
  run reaches after that many updates."""
  state = tx.init({"w": jnp.zeros(1)})
  for n in [0.5, 0.6, 0.7]:
    _, state = update({"w": jnp.array([n])}, state, **extra(n))
  return state._replace(**{f: jnp.int32(INT32_MAX - 1) for f in fields})


@pytest.mark.parametrize("jit", [False, True])
def test_autoclip_ring_keeps_turning_past_int32_max(jit):
  tx = gc.autoclip(percentile=50.0, history=3)
  update = jax.jit(tx.update) if jit else tx.update
  state = _fill_then_jump(tx, update, ["count"], extra=lambda n: {})
  seen = []
  for n in [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]:
    _, state = update({"w": jnp.array([n])}, state)
    seen.append(int(state.count))
  assert min(seen) > 0 and max(seen) == INT32_MAX
  # The last three norms fill the ring, and its sorted copy agrees.
  np.testing.assert_array_equal(np.sort(np.asarray(state.norms)), [5.0, 6.0, 7.0])
  np.testing.assert_array_equal(np.asarray(state.sorted_norms), [5.0, 6.0, 7.0])
  assert float(state.threshold) == 6.0


@pytest.mark.parametrize("jit", [False, True])
def test_skip_spikes_rings_keep_turning_past_int32_max(jit):
  tx = gc.skip_spikes(optax.identity(), sigma=1e6, window=3, min_history=1)
  update = jax.jit(tx.update) if jit else tx.update
  state = _fill_then_jump(tx, update, ["norm_count", "loss_count"],
                          extra=lambda n: {"loss": jnp.float32(10 * n)})
  state = state._replace(num_skipped=jnp.int32(INT32_MAX))
  counts = []
  for n in [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]:
    _, state = update({"w": jnp.array([n])}, state, loss=jnp.float32(10 * n))
    counts += [int(state.norm_count), int(state.loss_count)]
  assert min(counts) > 0
  np.testing.assert_array_equal(np.sort(np.asarray(state.norms)), [5.0, 6.0, 7.0])
  np.testing.assert_array_equal(np.sort(np.asarray(state.losses)), [50.0, 60.0, 70.0])
  # A skip at the saturated total keeps it there, never negative.
  _, state = update({"w": jnp.array([jnp.inf])}, state, loss=jnp.float32(1.0))
  assert int(state.num_skipped) == INT32_MAX and int(state.skipped) == 1


def test_skip_spikes_says_a_loss_must_be_a_scalar():
  tx = gc.skip_spikes(optax.identity(), min_history=1)
  params = {"w": jnp.ones(2)}
  with pytest.raises(ValueError, match=r"loss= must be a scalar .* got shape \(4,\)"):
    tx.update(params, tx.init(params), loss=jnp.ones(4))
