"""Inside ``shard_map``: per-shard gradients give the jit/SPMD result.

Every transform whose result depends on more than one entry takes
``axis_name=`` (and ``partition=``, the gradient's ``in_specs``). Run inside
``shard_map`` over a (data=4, model=2) mesh of the 8 CPU devices, on the
blocks of a gradient with leaves split over one axis, both, or neither, it
must give the updates and statistics that the same transform without
``axis_name`` gives under ``jax.jit`` on the whole arrays, steps with a NaN
and a spike included, and its compiled step may communicate scalars only.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import gradcal_jax as gc

AXES = ("data", "model")
# Unique shapes, so a state leaf's spec can be found from its shape.
LAYOUT = {
    "dense": {"kernel": ((24, 10), P("data", "model")), "bias": ((10,), P("model"))},
    "embed": ((40, 6), P("data", None)),
    "out": ((6, 8), P(None, "model")),
    "scale": ((7,), P()),
}
SPECS = jax.tree.map(lambda leaf: leaf[1], LAYOUT, is_leaf=lambda x: isinstance(x, tuple)
                     and isinstance(x[1], P))
SHAPES = jax.tree.map(lambda leaf: leaf[0], LAYOUT, is_leaf=lambda x: isinstance(x, tuple)
                      and isinstance(x[1], P))
STEPS = 4


def _mesh() -> Mesh:
  return Mesh(np.array(jax.devices()[:8]).reshape(4, 2), AXES)


def _values(seed: int, scale: float = 1.0) -> dict[str, Any]:
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda shape: jnp.asarray(scale * rng.standard_normal(shape),
                                                jnp.float32), SHAPES,
                      is_leaf=lambda x: isinstance(x, tuple))


def _grads(step: int) -> dict[str, Any]:
  g = _values(100 + step, 0.1)
  if step == 2:
    g["dense"]["kernel"] = g["dense"]["kernel"].at[20, 3].set(jnp.nan)
  if step == 3:
    g["dense"]["kernel"] = g["dense"]["kernel"].at[20, 3].set(1e4)
  return g


def _half_square(params):
  return sum(0.5 * jnp.sum(jnp.square(x)) for x in jax.tree.leaves(params))


def _with(**axis):
  adam = optax.adam(1e-2)
  return {
      "clip_by_global_norm": lambda: gc.clip_by_global_norm(0.5, **axis),
      "clip_by_value": lambda: gc.clip_by_value(0.05, **axis),
      "clip_by_layer_norm": lambda: gc.clip_by_layer_norm(0.2, **axis),
      "adaptive_grad_clip": lambda: gc.adaptive_grad_clip(0.05, **axis),
      "centralize": lambda: gc.centralize(**axis),
      "clip_weights": lambda: optax.chain(optax.sgd(0.5), gc.clip_weights(0.5, **axis)),
      "monitor": lambda: gc.monitor(**axis),
      "autoclip": lambda: gc.autoclip(history=8, **axis),
      "zclip": lambda: gc.zclip(warmup_steps=2, **axis),
      "skip_spikes": lambda: gc.skip_spikes(adam, min_history=2, **axis),
      "guard": lambda: gc.guard(adam, warmup_steps=2, min_history=2, **axis),
      "accumulate": lambda: gc.accumulate(
          optax.chain(gc.clip_by_global_norm(1.0, **axis), adam), 2, **axis),
      "truncate_top_k": lambda: gc.truncate_top_k(0.2, **axis),
      "dynamic_loss_scale": lambda: gc.dynamic_loss_scale(
          adam, initial_scale=16.0, growth_interval=2,
          **{k: v for k, v in axis.items() if k == "axis_name"}),
      "adagc": lambda: gc.adagc(warmup_steps=2, **axis),
      "spam": lambda: gc.spam(1e-2, interval=3, warmup_steps=1, clip_delay=2, **axis),
      "clip_update_rms": lambda: gc.clip_update_rms(adam, **axis),
  }


CASES = list(_with())


def _state_specs(state: Any) -> Any:
  by_shape = {shape: spec for shape, spec in zip(
      jax.tree.leaves(SHAPES, is_leaf=lambda x: isinstance(x, tuple)),
      jax.tree.leaves(SPECS))}
  return jax.tree.map(lambda x: by_shape.get(tuple(x.shape), P()), state)


def _run_jit(tx):
  params = _values(0)
  state = tx.init(params)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p))
  out = []
  for t in range(STEPS):
    updates, state = step(_grads(t), state, params)
    params = optax.apply_updates(params, updates)
    out.append((updates, dict(gc.stats(state))))
  return out


def _run_shard_map(tx):
  mesh = _mesh()
  params = _values(0)
  state = jax.eval_shape(tx.init, params)
  state_specs = _state_specs(state)
  init = jax.jit(jax.shard_map(tx.init, mesh=mesh, in_specs=(SPECS,),
                               out_specs=state_specs))
  update = jax.jit(jax.shard_map(lambda g, s, p: tx.update(g, s, p), mesh=mesh,
                                 in_specs=(SPECS, state_specs, SPECS),
                                 out_specs=(SPECS, state_specs)))
  state = init(params)
  out = []
  for t in range(STEPS):
    updates, state = update(_grads(t), state, params)
    params = optax.apply_updates(params, updates)
    out.append((updates, dict(gc.stats(state))))
  return out, update.lower(_grads(0), state, params).compile().as_text()


def _close(want, got, what):
  want, got = np.asarray(want), np.asarray(got)
  assert want.shape == got.shape, what
  if np.issubdtype(want.dtype, np.floating):
    # Partial sums add up in another order; the noise scale is a ratio of
    # differences of such sums, so it keeps fewer digits.
    rtol = 1e-4 if "noise" in what else 3e-6
    np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-8, equal_nan=True,
                               err_msg=what)
  else:
    np.testing.assert_array_equal(got, want, err_msg=what)


@pytest.mark.parametrize("name", CASES)
def test_inside_shard_map_equals_jit(name):
  plain = _with()[name]()
  sharded = _with(axis_name=AXES, partition=SPECS)[name]()
  want = _run_jit(plain)
  got, hlo = _run_shard_map(sharded)
  for t, ((u0, s0), (u1, s1)) in enumerate(zip(want, got)):
    jax.tree.map(lambda a, b: _close(a, b, f"{name} step {t} updates"), u0, u1)
    assert sorted(s0) == sorted(s1)
    for key in s0:
      _close(s0[key], s1[key], f"{name} step {t} {key}")
  # Scalars only: no collective moves more than a short vector of statistics.
  for line in hlo.splitlines():
    if re.search(r"= \S+ (all-reduce|all-gather|all-to-all|collective-permute)", line):
      sizes = [int(np.prod([int(d) for d in dims.split(",") if d]))
               for dims in re.findall(r"\[([\d,]*)\]", line.split("=")[1].split("(")[0])]
      assert max(sizes, default=1) <= 16, line


def test_axis_name_is_validated():
  with pytest.raises(ValueError, match="axis_name"):
    gc.clip_by_global_norm(1.0, axis_name=3)
  with pytest.raises(ValueError, match="partition= needs axis_name"):
    gc.clip_by_global_norm(1.0, partition=SPECS)


def test_partition_must_match_the_gradient():
  mesh = _mesh()
  tx = gc.clip_by_global_norm(1.0, axis_name=AXES, partition={"a": P()})
  fn = jax.shard_map(lambda g: tx.update(g, tx.init(g))[0], mesh=mesh,
                     in_specs=(SPECS,), out_specs=SPECS)
  with pytest.raises(ValueError, match="partition= must be a pytree"):
    jax.jit(fn)(_values(0))


def test_accumulate_in_a_shard_map_training_step():
  """A data x model parallel step: each device holds a quarter of the batch
  (with its own number of real tokens) and half of the kernel's rows; the
  loss is the mean over the whole micro-batch's tokens. ``accumulate`` with
  each device's token count as ``weight=`` equals the jit step given the
  micro-batch's total."""
  mesh = _mesh()
  specs = {"w": P("model", None), "b": P()}
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.standard_normal((16, 4)), jnp.float32),
            "b": jnp.zeros(4, jnp.float32)}
  batches = []
  for _ in range(4):
    x = jnp.asarray(rng.standard_normal((32, 16)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((32, 4)), jnp.float32)
    mask = jnp.asarray(rng.random(32) < 0.6, jnp.float32)
    batches.append((x, y, mask))

  def make(**axis):
    inner = optax.chain(gc.clip_by_global_norm(1.0, **axis), optax.adam(1e-1))
    return gc.accumulate(inner, 2, **axis)

  plain, sharded = make(), make(axis_name=AXES, partition=specs)

  def jit_loss(p, x, y, mask):
    err = jnp.sum(jnp.square(x @ p["w"] + p["b"] - y), axis=-1)
    return jnp.sum(mask * err) / jnp.sum(mask)

  @jax.jit
  def jit_step(p, s, x, y, mask):
    g = jax.grad(jit_loss)(p, x, y, mask)
    u, s = plain.update(g, s, p, weight=jnp.sum(mask))
    return optax.apply_updates(p, u), s

  def local_step(p, s, x, y, mask):
    def loss(p):
      pre = jax.lax.psum(x @ p["w"], "model") + p["b"]
      err = jnp.sum(jnp.square(pre - y), axis=-1)
      return jax.lax.psum(jnp.sum(mask * err), "data") / jax.lax.psum(
          jnp.sum(mask), "data")
    g = jax.grad(loss)(p)
    u, s = sharded.update(g, s, p, weight=jnp.sum(mask))
    return optax.apply_updates(p, u), s

  state_specs = _specs_like(jax.eval_shape(sharded.init, params), params, specs)
  step = jax.jit(jax.shard_map(
      local_step, mesh=mesh,
      in_specs=(specs, state_specs, P("data", "model"), P("data", None), P("data")),
      out_specs=(specs, state_specs)))
  init = jax.jit(jax.shard_map(sharded.init, mesh=mesh, in_specs=(specs,),
                               out_specs=state_specs))
  p0, s0 = params, plain.init(params)
  p1, s1 = params, init(params)
  for x, y, mask in batches:
    p0, s0 = jit_step(p0, s0, x, y, mask)
    p1, s1 = step(p1, s1, x, y, mask)
  assert int(s1.inner_steps) == 2
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=2e-5, atol=1e-6),
               p0, p1)
  for key, value in gc.stats(s0).items():
    _close(value, gc.stats(s1)[key], key)


def _specs_like(state: Any, params: Any, specs: Any) -> Any:
  """Specs for a state: a leaf shaped like a param gets that param's spec."""
  by_shape = {tuple(x.shape): spec for x, spec in zip(jax.tree.leaves(params),
                                                        jax.tree.leaves(specs))}
  return jax.tree.map(lambda x: by_shape.get(tuple(x.shape), P())
                      if x.ndim else P(), state)


def test_top_k_ties_inside_shard_map():
  """Many equal magnitudes across blocks: the cut-off by whole-leaf position
  keeps exactly the entries jit keeps."""
  mesh = _mesh()
  rng = np.random.default_rng(3)
  grads = jax.tree.map(lambda shape: jnp.asarray(
      rng.integers(-2, 3, shape), jnp.float32), SHAPES,
      is_leaf=lambda x: isinstance(x, tuple))
  plain = gc.truncate_top_k(0.3)
  sharded = gc.truncate_top_k(0.3, axis_name=AXES, partition=SPECS)
  want, _ = jax.jit(plain.update)(grads, plain.init(grads))
  state_specs = _state_specs(jax.eval_shape(sharded.init, grads))
  got, state = jax.jit(jax.shard_map(
      lambda g: sharded.update(g, sharded.init(g)), mesh=mesh, in_specs=(SPECS,),
      out_specs=(SPECS, state_specs)))(grads)
  jax.tree.map(np.testing.assert_array_equal, got, want)
  assert 0.29 < float(state.kept_fraction) < 0.32


def test_skip_spikes_loss_inside_shard_map():
  """A per-device loss is averaged over the devices it differs on: the spike
  on one device's quarter of the batch skips the step everywhere."""
  mesh = _mesh()
  grads = _values(1, 0.1)
  sharded = gc.skip_spikes(optax.sgd(0.1), min_history=2, axis_name=AXES,
                           partition=SPECS)
  plain = gc.skip_spikes(optax.sgd(0.1), min_history=2)
  losses = [np.full(4, 1.0 + 0.01 * t, np.float32) for t in range(4)]
  losses[3][1] = 1e3  # the spike: one data shard's loss
  state_specs = _state_specs(jax.eval_shape(sharded.init, grads))

  def local(g, s, loss):
    return sharded.update(g, s, loss=loss[0])

  step = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(SPECS, state_specs, P("data")),
                               out_specs=(SPECS, state_specs)))
  s1 = jax.jit(jax.shard_map(sharded.init, mesh=mesh, in_specs=(SPECS,),
                             out_specs=state_specs))(grads)
  s0 = plain.init(grads)
  for loss in losses:
    _, s0 = plain.update(grads, s0, loss=jnp.mean(loss))
    _, s1 = step(grads, s1, jnp.asarray(loss))
    for key, value in gc.stats(s0).items():
      _close(value, gc.stats(s1)[key], key)
  assert bool(s1.skipped) and int(s1.num_skipped) == 1
