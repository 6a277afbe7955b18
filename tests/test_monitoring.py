"""monitor, stats and report, against NumPy references over several steps."""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import gradcal_jax as gc

JIT = pytest.mark.parametrize("jit", [lambda f: f, jax.jit], ids=["eager", "jit"])


def _grads(step: int) -> dict:
  rng = np.random.default_rng(step)
  scale = 10.0 ** (step - 2)  # from 1e-2 to 1e2 over five steps
  return {
      "dense": {"kernel": (scale * rng.standard_normal((6, 4))).astype(np.float32),
                "bias": rng.standard_normal(4).astype(np.float32)},
      "tiny": np.full((3,), 1e-9, np.float32),
      "scalar": np.float32(-7.0 * scale),
  }


def _reference(grads: dict, low: float, high: float) -> dict:
  """The statistics by their definitions, in float64 NumPy."""
  leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(grads)]
  norms = [np.sqrt(np.sum(x ** 2)) for x in leaves]
  return {
      "norm": np.sqrt(sum(n ** 2 for n in norms)),
      "norms": norms,
      "max_abs": max(np.max(np.abs(x)) for x in leaves),
      "vanishing": sum(n < low for n in norms),
      "exploding": sum(n > high for n in norms),
  }


@JIT
def test_matches_numpy_over_steps(jit):
  low, high = 1e-6, 5.0
  tx = gc.monitor(vanishing_below=low, exploding_above=high)
  update = jit(tx.update)
  state = tx.init(jax.tree.map(jnp.asarray, _grads(0)))
  exploding_seen = vanishing_seen = 0
  for t in range(5):
    grads = jax.tree.map(jnp.asarray, _grads(t))
    out, state = update(grads, state)
    chex.assert_trees_all_equal(out, grads)
    ref = _reference(_grads(t), low, high)
    assert int(state.count) == t + 1
    np.testing.assert_allclose(state.norm, ref["norm"], rtol=1e-6)
    np.testing.assert_allclose(jax.tree.leaves(state.leaf_norms), ref["norms"],
                               rtol=1e-6)
    np.testing.assert_allclose(state.max_abs, ref["max_abs"], rtol=1e-6)
    assert int(state.nonfinite) == 0
    assert int(state.vanishing) == ref["vanishing"]
    assert int(state.exploding) == ref["exploding"]
    exploding_seen += ref["exploding"]
    vanishing_seen += ref["vanishing"]
    for field in ("norm", "max_abs"):
      assert getattr(state, field).dtype == jnp.float32
    for field in ("count", "nonfinite", "vanishing", "exploding"):
      assert getattr(state, field).dtype == jnp.int32
  # The sequence must exercise both thresholds, or the counts prove nothing.
  assert exploding_seen > 0 and vanishing_seen > 0


def test_hand_computed_norms():
  tx = gc.monitor()
  grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([[1.0, 2.0], [2.0, 4.0]]),
           "c": jnp.zeros(2, jnp.bfloat16)}
  _, state = tx.update(grads, tx.init(grads))
  assert float(state.leaf_norms["a"]) == 5.0
  assert float(state.leaf_norms["b"]) == 5.0
  assert float(state.leaf_norms["c"]) == 0.0
  assert float(state.norm) == pytest.approx(np.sqrt(50.0))
  assert float(state.max_abs) == 4.0
  assert int(state.vanishing) == 1 and int(state.exploding) == 0


def test_updates_are_passed_through_as_the_same_objects():
  tx = gc.monitor()
  grads = {"w": jnp.ones((2, 3)), "b": jnp.ones(3, jnp.bfloat16)}
  out, _ = tx.update(grads, tx.init(grads))
  assert out is grads


@JIT
def test_nonfinite_entries_are_counted(jit):
  tx = gc.monitor(exploding_above=100.0)
  update = jit(tx.update)
  grads = {"a": jnp.array([1.0, jnp.inf, -jnp.inf]),
           "b": jnp.array([jnp.nan, 2.0]),
           "c": jnp.array([3.0, 4.0])}
  _, state = update(grads, tx.init(grads))
  assert int(state.nonfinite) == 3
  assert np.isnan(float(state.norm))
  assert np.isnan(float(state.max_abs))
  assert float(state.leaf_norms["a"]) == np.inf
  assert np.isnan(float(state.leaf_norms["b"]))
  assert float(state.leaf_norms["c"]) == 5.0
  # An infinite norm is above any threshold; NaN is neither above nor below.
  assert int(state.exploding) == 1 and int(state.vanishing) == 0

  # Back to finite gradients: the count is of the last step, not cumulative.
  finite = {"a": jnp.ones(3), "b": jnp.ones(2), "c": jnp.ones(2)}
  _, state = update(finite, state)
  assert int(state.nonfinite) == 0 and int(state.count) == 2
  np.testing.assert_allclose(state.norm, np.sqrt(7.0), rtol=1e-6)


def test_float16_norm_above_65504_is_exact():
  tx = gc.monitor()
  grads = {"big": jnp.full((10_000,), 300.0, jnp.float16)}
  _, state = tx.update(grads, tx.init(grads))
  np.testing.assert_allclose(state.norm, 30_000.0, rtol=1e-6)
  assert int(state.nonfinite) == 0 and int(state.exploding) == 1


def test_integer_and_empty_leaves_are_not_vanishing():
  tx = gc.monitor()
  grads = {"w": jnp.ones(4), "step": jnp.asarray(0, jnp.int32),
           "empty": jnp.zeros((0, 3)), "none": None}
  out, state = tx.update(grads, tx.init(grads))
  assert out is grads
  assert int(state.vanishing) == 0
  assert state.leaf_norms["step"] is None and state.leaf_norms["empty"] is None
  assert state.leaf_norms["none"] is None
  assert list(gc.stats(state)) == [
      "monitor/count", "monitor/norm", "monitor/leaf_norms/w",
      "monitor/max_abs", "monitor/nonfinite", "monitor/vanishing",
      "monitor/exploding"]
  assert _table_rows(gc.report(state)) == [["w", "2.000e+00", "ok"]]


def test_empty_tree():
  tx = gc.monitor()
  out, state = tx.update({}, tx.init({}))
  assert out == {}
  assert float(state.norm) == 0.0 and float(state.max_abs) == 0.0
  assert int(state.count) == 1


def test_lax_scan_over_five_steps():
  tx = optax.chain(gc.monitor(vanishing_below=1e-6, exploding_above=5.0),
                   optax.sgd(1e-3))
  seq = [jax.tree.map(jnp.asarray, _grads(t)) for t in range(5)]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *seq)
  params = jax.tree.map(jnp.zeros_like, seq[0])

  def body(carry, grads):
    params, state = carry
    updates, state = tx.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), gc.stats(state)

  (_, state), logged = jax.jit(
      lambda p: jax.lax.scan(body, (p, tx.init(p)), stacked))(params)
  np.testing.assert_array_equal(logged["monitor/count"], np.arange(1, 6))
  np.testing.assert_allclose(
      logged["monitor/norm"],
      [_reference(_grads(t), 1e-6, 5.0)["norm"] for t in range(5)], rtol=1e-6)
  np.testing.assert_array_equal(
      logged["monitor/exploding"],
      [_reference(_grads(t), 1e-6, 5.0)["exploding"] for t in range(5)])
  np.testing.assert_allclose(
      logged["monitor/leaf_norms/tiny"], np.full(5, np.sqrt(3) * 1e-9), rtol=1e-6)
  assert int(gc.stats(state)["monitor/count"]) == 5


def _run(tx, grads, params=None, steps=1):
  state = tx.init(grads if params is None else params)
  for _ in range(steps):
    _, state = jax.jit(tx.update)(grads, state, params)
  return state


def test_stats_keys_of_repeated_monitors_in_a_chain():
  grads = {"w": jnp.array([30.0, 40.0]), "b": jnp.array([0.0])}
  tx = optax.chain(gc.monitor(), optax.clip_by_global_norm(1.0), gc.monitor())
  found = gc.stats(_run(tx, grads, steps=2))
  assert list(found) == [
      "monitor/count", "monitor/norm", "monitor/leaf_norms/b",
      "monitor/leaf_norms/w", "monitor/max_abs", "monitor/nonfinite",
      "monitor/vanishing", "monitor/exploding",
      "monitor_1/count", "monitor_1/norm", "monitor_1/leaf_norms/b",
      "monitor_1/leaf_norms/w", "monitor_1/max_abs", "monitor_1/nonfinite",
      "monitor_1/vanishing", "monitor_1/exploding"]
  assert float(found["monitor/norm"]) == pytest.approx(50.0)
  assert float(found["monitor_1/norm"]) == pytest.approx(1.0)
  assert int(found["monitor_1/count"]) == 2


def test_stats_inside_masked_and_inject_hyperparams():
  grads = {"dense": {"kernel": jnp.full((2, 2), 2.0)}, "head": jnp.array([5.0])}
  mask = {"dense": True, "head": False}

  def make(learning_rate):
    return optax.chain(optax.masked(gc.monitor(), mask), gc.monitor(),
                       optax.sgd(learning_rate))

  tx = optax.inject_hyperparams(make)(learning_rate=0.1)
  found = gc.stats(_run(tx, grads, steps=3))
  assert float(found["monitor/leaf_norms/dense/kernel"]) == pytest.approx(4.0)
  assert "monitor/leaf_norms/head" not in found
  assert float(found["monitor/norm"]) == pytest.approx(4.0)
  assert float(found["monitor_1/norm"]) == pytest.approx(np.sqrt(41.0))
  assert int(found["monitor_1/count"]) == 3

  injected = optax.inject_hyperparams(gc.monitor)(exploding_above=3.0)
  found = gc.stats(_run(injected, grads))
  assert int(found["monitor/exploding"]) == 2


def _mlp() -> nnx.Module:
  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.layers = nnx.List([nnx.Linear(3, 4, rngs=rngs),
                              nnx.Linear(4, 2, rngs=rngs)])

    def __call__(self, x):
      for layer in self.layers:
        x = jnp.tanh(layer(x))
      return x

  return MLP(nnx.Rngs(0))


def test_flax_nnx_optimizer_stats_and_report():
  model = _mlp()
  optimizer = nnx.Optimizer(
      model, optax.chain(gc.monitor(), optax.sgd(0.1, momentum=0.9)),
      wrt=nnx.Param)
  x = jnp.linspace(-1.0, 1.0, 15).reshape(5, 3)

  def loss_fn(model):
    return jnp.mean(model(x) ** 2)

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(loss_fn)(model)
    optimizer.update(model, grads)
    return grads

  grads = step(model, optimizer)
  found = gc.stats(optimizer.opt_state)
  for layer in (0, 1):
    for name in ("kernel", "bias"):
      expect = np.linalg.norm(np.asarray(grads["layers"][layer][name][...]))
      np.testing.assert_allclose(
          found[f"monitor/leaf_norms/layers/{layer}/{name}"], expect, rtol=1e-6)
  assert int(found["monitor/count"]) == 1

  assert list(gc.stats(optimizer)) == list(found)
  text = gc.report(optimizer.opt_state)
  assert gc.report(optimizer) == text
  assert "layers/0/kernel" in text and "/value" not in text
  # The same norms whether read from the state or computed from the gradient.
  from_state = re.findall(r"(layers/\S+)\s+(\S+e[+-]\d+)", text)
  from_grads = re.findall(r"(layers/\S+)\s+\(.*?\)\s+(\S+e[+-]\d+)", gc.report(grads))
  assert sorted(from_state) == sorted(from_grads) and len(from_state) == 4


def _table_rows(text: str) -> list[list[str]]:
  lines = text.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith("---")) + 1
  rows = []
  for line in lines[start:]:
    if not line.strip():
      break
    rows.append(line.split())
  return rows


def test_report_of_gradients_orders_worst_first():
  grads = {
      "ok": jnp.ones((2, 2)),
      "small": jnp.full((3,), 1e-9),
      "big": jnp.full((4,), 5e3),
      "nan": jnp.array([jnp.nan, 1.0]),
      "zero": jnp.zeros((2, 3)),
      "huge": jnp.full((4,), 5e6),
      "inf": jnp.array([jnp.inf]),
      "step": jnp.asarray(3, jnp.int32),
  }
  text = gc.report(grads)
  rows = _table_rows(text)
  assert [r[0] for r in rows] == ["inf", "nan", "huge", "big", "zero", "small", "ok"]
  assert [r[-1] for r in rows] == ["non-finite", "non-finite", "exploding",
                                   "exploding", "vanishing", "vanishing", "ok"]
  assert rows[2][1:] == ["(4,)", "1.000e+07", "exploding"]
  assert rows[5][1:3] == ["(3,)", "1.732e-09"]
  assert "1 ok" in text and "2 exploding" in text and "2 non-finite" in text
  assert "non-finite entries 2" in text


def test_report_thresholds_can_be_given():
  grads = {"a": jnp.full((4,), 0.5), "b": jnp.full((4,), 50.0)}
  rows = _table_rows(gc.report(grads, vanishing_below=2.0, exploding_above=10.0))
  assert rows == [["b", "(4,)", "1.000e+02", "exploding"],
                  ["a", "(4,)", "1.000e+00", "vanishing"]]


def test_report_of_an_optax_state_uses_each_monitors_norms_and_thresholds():
  grads = {"w": jnp.array([30.0, 40.0]), "b": jnp.array([1e-3])}
  tx = optax.chain(gc.monitor(exploding_above=10.0),
                   optax.clip_by_global_norm(1.0),
                   gc.monitor(vanishing_below=1e-3, exploding_above=1e3),
                   optax.adam(1e-3))
  text = gc.report(_run(tx, grads, steps=2))
  first, second = text.split("\n\n")[:2]
  assert first.startswith("monitor\nstep 2: global norm 5.000e+01")
  assert _table_rows(first) == [["w", "5.000e+01", "exploding"],
                                ["b", "1.000e-03", "ok"]]
  assert second.startswith("monitor_1\n")
  assert _table_rows(second) == [["b", "2.000e-05", "vanishing"],
                                 ["w", "1.000e+00", "ok"]]
  # A threshold given to report overrides the monitors' own.
  overridden = gc.report(_run(tx, grads), exploding_above=1e4)
  assert "exploding" not in _table_rows(overridden.split("\n\n")[0])[0]


def test_report_lists_other_gradcal_statistics():
  grads = {"w": jnp.array([3.0, 4.0])}
  tx = optax.chain(gc.monitor(), gc.clip_by_global_norm(1.0), gc.monitor())
  text = gc.report(_run(tx, grads))
  sections = text.split("\n\n")
  assert [s.splitlines()[0] for s in sections] == [
      "monitor", "monitor_1", "other statistics"]
  assert "clip_by_global_norm/norm = 5" in sections[2]
  assert "monitor" not in sections[2]


def test_report_of_a_state_without_monitor():
  grads = {"w": jnp.array([3.0, 4.0])}
  text = gc.report(_run(optax.chain(optax.clip_by_global_norm(1.0),
                                    optax.sgd(0.1, momentum=0.9)), grads))
  assert text.startswith("no monitor in this state")


def test_report_of_an_empty_gradient():
  assert "(no floating-point leaves)" in gc.report({})


@pytest.mark.parametrize("kwargs, message", [
    ({"vanishing_below": -1.0}, r"vanishing_below must be in \[0.0, inf\]"),
    ({"exploding_above": -2.0}, r"exploding_above must be in \[0.0, inf\]"),
    ({"vanishing_below": float("nan")}, "vanishing_below must be in"),
    ({"vanishing_below": 1.0, "exploding_above": 1.0},
     "vanishing_below must be smaller than exploding_above"),
    ({"vanishing_below": 2.0, "exploding_above": 1.0},
     "vanishing_below must be smaller than exploding_above"),
])
def test_bad_thresholds_raise(kwargs, message):
  with pytest.raises(ValueError, match=message):
    gc.monitor(**kwargs)
  with pytest.raises(ValueError, match=message):
    gc.report({"w": jnp.ones(2)}, **kwargs)


# --- wrong objects fail loudly; stats picks keys (issue 16 items 7 and 8) ----

class _TinyMLP(nnx.Module):
  def __init__(self):
    self.dense = nnx.Linear(3, 2, rngs=nnx.Rngs(0))

  def __call__(self, x):
    return self.dense(x)


def test_stats_and_report_refuse_a_model():
  model = _TinyMLP()
  with pytest.raises(ValueError, match=r"stats\(\) got a Flax model \(_TinyMLP\)"):
    gc.stats(model)
  with pytest.raises(ValueError, match=r"report\(\) got a Flax model .*nnx.grad"):
    gc.report(model)


@pytest.mark.parametrize("state", [{"w": jnp.ones(2)}, None, 3.0, jnp.ones(3)],
                         ids=["gradients", "none", "number", "array"])
def test_stats_refuses_what_holds_no_optimizer_state(state):
  with pytest.raises(ValueError, match="found no optimizer state"):
    gc.stats(state)


def test_stats_of_an_optax_state_without_gradcal_transforms_is_empty():
  # A baseline in a loop over optimizers logs nothing rather than failing.
  assert gc.stats(optax.adam(1e-3).init({"w": jnp.ones(2)})) == {}
  assert gc.stats(optax.chain(gc.centralize(), optax.sgd(0.1)).init({"w": jnp.ones(2)})) == {}


def _layer_stack_state(b=5.0):
  grads = {"a": {"kernel": jnp.full((2, 2), 3.0), "bias": jnp.full((2,), 4.0)},
           "b": {"kernel": jnp.full((2, 2), b)}}
  tx = optax.chain(gc.monitor(), gc.clip_by_layer_norm(1.0))
  _, state = tx.update(grads, tx.init(grads))
  return state


def test_stats_per_leaf_summary_and_none():
  state = _layer_stack_state()
  every = gc.stats(state)
  assert "monitor/leaf_norms/a/kernel" in every
  summary = gc.stats(state, per_leaf="summary")
  assert not any(k.startswith("monitor/leaf_norms/a") for k in summary)
  assert float(summary["monitor/leaf_norms/max"]) == pytest.approx(10.0)  # b/kernel
  assert float(summary["monitor/leaf_norms/min"]) == pytest.approx(np.sqrt(32.0))  # a/bias
  with_nan = gc.stats(_layer_stack_state(b=jnp.nan), per_leaf="summary")
  assert np.isnan(with_nan["monitor/leaf_norms/max"])
  assert np.isnan(with_nan["monitor/leaf_norms/min"])
  none = gc.stats(state, per_leaf="none")
  scalars = {k: v for k, v in every.items() if k.count("/") == 1}
  assert none.keys() == scalars.keys() and "monitor/norm" in none
  assert set(none) <= set(summary)
  with pytest.raises(ValueError, match="per_leaf must be one of"):
    gc.stats(state, per_leaf="mean")


def test_stats_include_patterns_keep_the_order():
  state = _layer_stack_state()
  every = gc.stats(state)
  picked = gc.stats(state, include="*/norm")
  assert list(picked) == [k for k in every if k.endswith("/norm") and k.count("/") == 1]
  assert picked.keys() == {"monitor/norm"}
  both = gc.stats(state, include=["monitor/max_abs", "clip_by_layer_norm/*"])
  assert list(both) == [k for k in every
                        if k == "monitor/max_abs" or k.startswith("clip_by_layer_norm/")]


def test_report_other_statistics_follow_the_order_of_stats():
  grads = {"w": jnp.array([3.0, 4.0])}
  tx = optax.chain(gc.clip_by_global_norm(1.0), gc.zclip(), optax.sgd(0.1))
  _, state = tx.update(grads, tx.init(grads))
  lines = gc.report(state).splitlines()
  listed = [line.split(" = ")[0] for line in lines if " = " in line]
  assert listed == list(gc.stats(state))


def test_worst_leaf_maps_to_a_path_in_stats_and_report():
  params = {"dense": {"kernel": jnp.array([1.0, 2.0]), "bias": jnp.array([0.5])}}
  loss = lambda p: jnp.sum(p["dense"]["kernel"] ** 2) + jnp.sum(p["dense"]["bias"] ** 2)
  grads = jax.grad(loss)(params)
  grads = {"dense": {"kernel": 3.0 * grads["dense"]["kernel"], "bias": grads["dense"]["bias"]}}
  tx = gc.gradient_check(every_k=1)
  _, state = tx.update(grads, tx.init(params), params, value_fn=loss)
  worst = int(gc.stats(state)["gradient_check/worst_leaf"])
  assert gc.leaf_paths(params) == ["dense/bias", "dense/kernel"]
  assert gc.leaf_paths(params)[worst] == "dense/kernel"
  assert f"gradient_check/worst_leaf = {worst} (dense/kernel)" in gc.report(state, params=params)
  assert f"gradient_check/worst_leaf = {worst}\n" in gc.report(state) + "\n"
  model_state = nnx.state(nnx.Linear(2, 1, rngs=nnx.Rngs(0)), nnx.Param)
  assert gc.leaf_paths(model_state) == ["bias", "kernel"]
