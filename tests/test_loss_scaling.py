"""dynamic_loss_scale against a NumPy transcription of Keras' and DeepSpeed's scaler."""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import gradcal_jax as gc

JIT = pytest.mark.parametrize("jit", [lambda f: f, jax.jit], ids=["eager", "jit"])
# Steps whose scaled gradient overflowed, and how (entry 0 of "w").
BAD = {3: np.inf, 4: np.nan, 11: -np.inf, 12: np.nan, 13: np.inf, 14: np.nan,
       15: np.inf, 55: np.nan}


def _scaled_grads(step: int, scale: float) -> dict[str, np.ndarray]:
  """The true gradient of step ``step`` times ``scale`` (float32), with an
  overflow planted at the BAD steps."""
  rng = np.random.default_rng(step)
  grads = {"w": rng.standard_normal((4, 3)).astype(np.float32),
           "b": rng.standard_normal(3).astype(np.float32)}
  grads = {k: (v * np.float32(scale)).astype(np.float32) for k, v in grads.items()}
  if step in BAD:
    grads["w"][0, 0] = BAD[step]
  return grads


def _reference(steps, lr, initial_scale, growth_interval, growth_factor,
               backoff_factor, min_scale, max_scale):
  """The scaler as Keras' LossScaleOptimizer and DeepSpeed's DynamicLossScaler
  describe it, around SGD, in NumPy: (updates, scale, good, skipped_total,
  skipped) after every step."""
  scale, good, total = np.float32(initial_scale), 0, 0
  rows = []
  for t in range(steps):
    grads = _scaled_grads(t, scale)
    unscaled = {k: v / scale for k, v in grads.items()}
    if all(np.all(np.isfinite(v)) for v in unscaled.values()):
      updates = {k: -np.float32(lr) * v for k, v in unscaled.items()}
      good += 1
      if good == growth_interval:
        scale, good = np.float32(min(scale * growth_factor, max_scale)), 0
      skipped = 0
    else:
      updates = {k: np.zeros_like(v) for k, v in unscaled.items()}
      scale, good = np.float32(max(scale * backoff_factor, min_scale)), 0
      total += 1
      skipped = 1
    rows.append((updates, float(scale), good, total, skipped))
  return rows


SETTINGS = dict(initial_scale=2.0**4, growth_interval=3, growth_factor=2.0,
                backoff_factor=0.25, min_scale=0.5, max_scale=2.0**7)


@JIT
def test_matches_numpy_reference_over_many_steps(jit):
  # 60 steps reach both bounds: the scale grows to max_scale, and a run of
  # overflows (steps 11-15) drives it down to min_scale.
  steps, lr = 60, 0.1
  expect = _reference(steps, lr, **SETTINGS)
  tx = gc.dynamic_loss_scale(optax.sgd(lr), **SETTINGS)
  state = tx.init(_scaled_grads(0, 1.0))
  update = jit(tx.update)
  scales = []
  for t, (updates, scale, good, total, skipped) in enumerate(expect):
    grads = _scaled_grads(t, float(gc.loss_scale(state)))
    out, state = update(jax.tree.map(jnp.asarray, grads), state)
    chex.assert_trees_all_close(out, updates, rtol=1e-6, atol=0)
    assert float(state.scale) == scale, t
    assert (int(state.good_steps), int(state.num_skipped), int(state.skipped)) == (
        good, total, skipped), t
    scales.append(scale)
  assert max(scales) == SETTINGS["max_scale"]
  assert min(scales) == SETTINGS["min_scale"]


def test_skipped_step_leaves_the_inner_state_bit_for_bit():
  tx = gc.dynamic_loss_scale(optax.adam(1e-2), initial_scale=8.0)
  params = {"w": jnp.ones((3, 2)), "n": jnp.asarray(3, jnp.int32)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  good = {"w": jnp.full((3, 2), 4.0), "n": jnp.asarray(0, jnp.int32)}
  _, state = update(good, state)
  bad = {"w": good["w"].at[1, 1].set(jnp.nan), "n": good["n"]}
  out, skipped = update(bad, state)
  chex.assert_trees_all_equal(skipped.inner_state, state.inner_state)
  assert not np.any(np.asarray(out["w"]))
  assert float(skipped.scale) == 4.0 and int(skipped.skipped) == 1


def test_unscaled_gradient_reaches_inner_in_its_own_dtype():
  tx = gc.dynamic_loss_scale(optax.identity(), initial_scale=1024.0)
  grads = {"h": jnp.asarray([1024.0, -2048.0], jnp.float16),
           "f": jnp.asarray([3072.0], jnp.float32),
           "n": jnp.asarray(7, jnp.int32)}
  out, _ = tx.update(grads, tx.init(grads))
  assert out["h"].dtype == jnp.float16 and out["f"].dtype == jnp.float32
  np.testing.assert_array_equal(out["h"], [1.0, -2.0])
  np.testing.assert_array_equal(out["f"], [3.0])
  assert int(out["n"]) == 7


def test_unscaling_below_one_that_overflows_float16_is_skipped():
  # 60000 is a finite float16; divided by a scale of 0.5 it is not.
  tx = gc.dynamic_loss_scale(optax.sgd(1.0), initial_scale=0.5, min_scale=0.25)
  grads = {"w": jnp.asarray([60000.0, 1.0], jnp.float16)}
  out, state = jax.jit(tx.update)(grads, tx.init(grads))
  assert int(state.skipped) == 1 and float(state.scale) == 0.25
  assert out["w"].dtype == jnp.float16 and not np.any(np.asarray(out["w"]))


def test_loss_scaling_recovers_float16_gradients_that_underflow():
  # A float16 model of tiny gradients: d/dw of 1e-4 * (w x)^2 / 2 is about
  # 1e-9 per entry, below float16's smallest subnormal (6e-8).
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(0.5, 1.0, 64) * 1e-2, jnp.float16)
  w = {"w": jnp.asarray(rng.uniform(0.5, 1.0, 64), jnp.float32)}

  def loss(p):  # the same loss in float32 throughout
    h = p["w"] * x.astype(jnp.float32)
    return 1e-4 * 0.5 * jnp.sum(h * h)

  def loss_f16(p):  # the whole backward pass in float16
    h = p["w"].astype(jnp.float16) * x
    return (jnp.float16(1e-4) * jnp.float16(0.5) * jnp.sum(h * h)).astype(jnp.float32)

  exact = jax.grad(loss)(w)["w"]
  plain = jax.grad(loss_f16)(w)["w"]
  assert float(jnp.mean(plain == 0)) > 0.9  # underflow without a scale
  tx = gc.dynamic_loss_scale(optax.sgd(1.0))
  state = tx.init(w)
  scaled = jax.grad(lambda p: gc.loss_scale(state) * loss_f16(p))(w)
  updates, state = tx.update(scaled, state)
  np.testing.assert_allclose(-updates["w"], exact, rtol=2e-2)
  assert int(state.skipped) == 0


def test_inside_accumulate_a_nonfinite_micro_batch_skips_the_boundary():
  every_k, lr = 3, 0.1
  tx = gc.accumulate(gc.dynamic_loss_scale(optax.adam(lr), initial_scale=16.0),
                     every_k=every_k)
  params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  plain = optax.adam(lr)
  plain_state = plain.init(params)
  for t in range(9):
    scale = gc.loss_scale(state)
    grads = jax.tree.map(jnp.asarray, _scaled_grads(t, float(scale)))
    if t == 4:  # the middle micro-batch of the second cycle overflows
      grads["w"] = grads["w"].at[2, 1].set(jnp.inf)
    before = state
    out, state = update(grads, state, params)
    if t % every_k < every_k - 1:
      assert float(gc.loss_scale(state)) == float(scale)  # fixed within a cycle
      continue
    inner = state.inner_state
    if t == 5:
      chex.assert_trees_all_equal(inner.inner_state, before.inner_state.inner_state)
      assert not any(np.any(np.asarray(x)) for x in jax.tree.leaves(out))
      assert float(inner.scale) == 8.0 and int(inner.num_skipped) == 1
    else:
      mean = jax.tree.map(
          lambda *gs: sum(g.astype(jnp.float32) for g in gs) / every_k / scale,
          *[jax.tree.map(jnp.asarray, _scaled_grads(s, float(scale)))
            for s in range(t - 2, t + 1)])
      expect, plain_state = plain.update(mean, plain_state)
      chex.assert_trees_all_close(out, expect, rtol=1e-5, atol=1e-7)
  assert int(state.inner_steps) == 3  # the skipped boundary ran inner too


def test_inner_transforms_see_unscaled_gradients():
  inner = optax.chain(gc.monitor(), gc.zclip(warmup_steps=2),
                      gc.skip_spikes(optax.sgd(0.1), window=4, min_history=2))
  tx = gc.dynamic_loss_scale(inner, initial_scale=2.0**10, growth_interval=2)
  reference = optax.chain(gc.monitor(), gc.zclip(warmup_steps=2),
                          gc.skip_spikes(optax.sgd(0.1), window=4, min_history=2))
  params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
  state, ref_state = tx.init(params), reference.init(params)
  for t in range(6):
    true = _scaled_grads(100 + t, 1.0)
    scaled = jax.tree.map(lambda g: jnp.asarray(g) * gc.loss_scale(state), true)
    out, state = jax.jit(tx.update)(scaled, state)
    expect, ref_state = jax.jit(reference.update)(
        jax.tree.map(jnp.asarray, true), ref_state)
    chex.assert_trees_all_close(out, expect, rtol=1e-6)
  # The scale grew three times, yet the inner statistics are those of the
  # unscaled gradient: no spike was seen, and the norms agree.
  assert float(gc.loss_scale(state)) == 2.0**13
  ours, theirs = gc.stats(state), gc.stats(ref_state)
  for key in ("monitor/norm", "zclip/mean", "skip_spikes/norm", "skip_spikes/num_skipped"):
    np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-6)


def test_loss_scale_is_found_anywhere_and_refuses_ambiguity():
  params = {"w": jnp.zeros(3)}
  dls = lambda: gc.dynamic_loss_scale(optax.sgd(1.0), initial_scale=64.0)
  for tx in (dls(), optax.chain(gc.monitor(), dls()), gc.accumulate(dls(), every_k=2),
             optax.inject_hyperparams(gc.dynamic_loss_scale, static_args=("inner",))(
                 inner=optax.sgd(1.0), initial_scale=64.0)):
    assert float(gc.loss_scale(tx.init(params))) == 64.0
  model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, dls(), wrt=nnx.Param)
  assert float(gc.loss_scale(optimizer.opt_state)) == 64.0
  with pytest.raises(ValueError, match="exactly one gc.dynamic_loss_scale.*found 0"):
    gc.loss_scale(optax.adam(1e-3).init(params))
  with pytest.raises(ValueError, match="found 2"):
    gc.loss_scale(optax.chain(dls(), dls()).init(params))


def test_nnx_optimizer_float16_training_step():
  model = nnx.Sequential(nnx.Linear(4, 8, dtype=jnp.float16, rngs=nnx.Rngs(0)),
                         jnp.tanh,
                         nnx.Linear(8, 1, dtype=jnp.float16, rngs=nnx.Rngs(1)))
  optimizer = nnx.Optimizer(model, gc.dynamic_loss_scale(optax.adam(1e-2)),
                            wrt=nnx.Param)
  x, y = jnp.ones((16, 4), jnp.float16), jnp.zeros((16, 1), jnp.float32)

  @nnx.jit
  def step(model, optimizer):
    def scaled_loss(model):
      loss = jnp.mean((model(x).astype(jnp.float32) - y) ** 2)
      return loss * gc.loss_scale(optimizer.opt_state), loss
    grads, loss = nnx.grad(scaled_loss, has_aux=True)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(20)]
  assert losses[-1] < 0.5 * losses[0]
  assert model.layers[0].kernel.get_value().dtype == jnp.float32
  # 2**15 overflows this float16 backward pass at first: the scale backs off.
  found = gc.stats(optimizer.opt_state)
  assert 1 <= int(found["dynamic_loss_scale/num_skipped"]) <= 3
  assert float(found["dynamic_loss_scale/scale"]) < 2.0**15


def test_a_fresh_state_can_be_donated():
  tx = gc.dynamic_loss_scale(optax.adam(1e-3))
  params = {"w": jnp.ones(3)}
  step = jax.jit(lambda g, s: tx.update(g, s), donate_argnums=1)
  _, state = step(params, tx.init(params))
  _, state = step(params, state)
  assert int(state.good_steps) == 2


def test_sharded_finiteness_flag_is_one_all_reduce_of_scalars():
  mesh = Mesh(np.array(jax.devices()[:8]), ("d",))
  sharding = NamedSharding(mesh, P("d"))
  grads = {f"l{i}": jax.device_put(jnp.ones((64 * (i + 1),)), sharding)
           for i in range(5)}
  tx = gc.dynamic_loss_scale(optax.sgd(0.1))
  hlo = jax.jit(tx.update).lower(grads, tx.init(grads)).compile().as_text()
  reduces = [line for line in hlo.splitlines()
             if re.search(r"= \S+ all-reduce(-start)?\(", line)
             or re.search(r"= \(.*\) all-reduce(-start)?\(", line)]
  assert len(reduces) == 1, reduces
  shapes = re.search(r"= (\S+|\(.*?\)) all-reduce", reduces[0]).group(1)
  assert re.fullmatch(r"\(?(f32\[\](, )?)+\)?", shapes), shapes
  bad = dict(grads)
  bad["l2"] = bad["l2"].at[100].set(jnp.nan)  # on one device's shard only
  out, state = jax.jit(tx.update)(bad, tx.init(grads))
  assert int(state.skipped) == 1
  assert not any(np.any(np.asarray(x)) for x in jax.tree.leaves(out))


@pytest.mark.parametrize("kwargs, message", [
    ({"initial_scale": 0.0}, r"initial_scale must be in \(0.0, inf\]"),
    ({"growth_factor": 1.0}, r"growth_factor must be in \(1.0, inf\]"),
    ({"backoff_factor": 1.0}, r"backoff_factor must be in \(0.0, 1.0\)"),
    ({"backoff_factor": 0.0}, r"backoff_factor must be in \(0.0, 1.0\)"),
    ({"growth_interval": 0}, "growth_interval must be an integer >= 1"),
    ({"min_scale": 0.0}, r"min_scale must be in \(0.0, inf\]"),
    ({"min_scale": 8.0, "max_scale": 4.0, "initial_scale": 4.0},
     "min_scale must not exceed max_scale"),
    ({"initial_scale": 2.0**30}, r"initial_scale must be in \[min_scale, max_scale\]"),
    ({"max_scale": float("inf")}, "max_scale must be in"),
])
def test_bad_hyperparameters(kwargs, message):
  with pytest.raises(ValueError, match=message):
    gc.dynamic_loss_scale(optax.sgd(1.0), **kwargs)
