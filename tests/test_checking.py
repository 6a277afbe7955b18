"""check_gradients and gradient_check: a corpus of gradient bugs it must catch,
correct functions it must pass over 20 keys, and NumPy references.

Every corpus function is defined once at module level: check_gradients compiles
one check per function and argument shapes, so the 20 keys reuse it.
"""

from __future__ import annotations

import doctest
import re

import chex
import jax
import jax.test_util  # noqa: F401  (check_grads, for the comparison)
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import gradcal_jax as gc
from gradcal_jax.checking import VERDICTS, Verdict, _check_gradients, _directions, _gradient_check

JIT = pytest.mark.parametrize("jit", [lambda f: f, jax.jit], ids=["eager", "jit"])
KEYS = [jax.random.key(k) for k in range(20)]


def _rand(seed: int, shape: tuple[int, ...], scale: float = 1.0,
          dtype=np.float32) -> np.ndarray:
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(dtype)


def _with_vjp(fn, wrong_bwd):
  """``fn`` with a hand-written (buggy) backward rule."""
  f = jax.custom_vjp(fn)
  f.defvjp(lambda *xs: (fn(*xs), xs), lambda xs, g: wrong_bwd(*xs, g))
  return f


# ---------------------------------------------------------------------------
# The bug corpus: each entry is (fn, args, the leaf that must be `mismatch`).

_neg_tanh = _with_vjp(jnp.tanh, lambda x, g: (-(1 - jnp.tanh(x) ** 2) * g,))
_square_half = _with_vjp(lambda x: x ** 2, lambda x, g: (x * g,))
_add_bias = _with_vjp(lambda x, b: x + b,
                      lambda x, b, g: (g, jnp.mean(g, axis=0)))  # should be sum
_matmul_t = _with_vjp(lambda x, w: x @ w,
                      lambda x, w, g: (g @ w.T, (x.T @ g).T))  # dW transposed
_scaled_101 = _with_vjp(lambda x: jnp.sin(x), lambda x, g: (1.01 * jnp.cos(x) * g,))
_scaled_110 = _with_vjp(lambda x: jnp.sin(x), lambda x, g: (1.1 * jnp.cos(x) * g,))


@jax.custom_jvp
def _softplus_bad(x):
  return jax.nn.softplus(x)


_softplus_bad.defjvp(
    lambda p, t: (_softplus_bad(p[0]), jax.nn.sigmoid(-p[0]) * t[0]))  # not sigmoid(x)


def _sign_error(p):
  return jnp.sum(_neg_tanh(p["a"]) * p["b"])


def _missing_factor_two(p):
  return jnp.sum(_square_half(p["w"])) + jnp.sum(jnp.cos(p["c"]))


def _wrong_reduction(p, x):
  return jnp.sum(jnp.tanh(_add_bias(x @ p["kernel"], p["bias"])) ** 2)


def _transposed(p):
  return jnp.sum(jnp.sin(_matmul_t(p["x"], p["w"])))


def _dropped_branch(p):
  return jnp.sum(jnp.sin(p["a"]) * jax.lax.stop_gradient(p["b"])) + jnp.sum(p["b"] ** 2)


def _wrong_tangent(p):
  return jnp.sum(_softplus_bad(p["w"]) * p["v"])


def _hundred_leaves(p):
  # Stacked so the function traces in a few operations whatever the leaf.
  good = jnp.stack([p[f"w{i:02d}"] for i in range(100) if i != 37])
  weights = jnp.arange(99.0)[:, None] / 100 + 1
  return jnp.sum(jnp.sin(good) * weights) + jnp.sum(_scaled_110(p["w37"]))


def _one_percent(p):
  return jnp.sum(jnp.cos(p["a"]) ** 2) + jnp.sum(_scaled_101(p["b"]) * p["a"])


def _params(**shapes):
  return {k: jnp.asarray(_rand(n, s)) for n, (k, s) in enumerate(shapes.items())}


BUGS = {
    "sign error in custom_vjp": (_sign_error, (_params(a=(5, 4), b=(4,)),), "a"),
    "missing factor 2": (_missing_factor_two, (_params(w=(7,), c=(3,)),), "w"),
    "mean instead of sum under broadcasting": (
        _wrong_reduction, (_params(kernel=(4, 3), bias=(3,)), jnp.asarray(_rand(9, (6, 4)))),
        "bias"),
    "transposed matrix in custom_vjp": (_transposed, (_params(x=(3, 6), w=(6, 6)),), "w"),
    "stop_gradient drops a branch": (_dropped_branch, (_params(a=(4,), b=(4,)),), "b"),
    "custom_jvp with a wrong tangent": (_wrong_tangent, (_params(w=(8,), v=(8,)),), "w"),
    "error in one leaf of 100": (
        _hundred_leaves, ({f"w{i:02d}": jnp.asarray(_rand(i, (3,))) for i in range(100)},),
        "w37"),
    "1% error in one leaf": (_one_percent, (_params(a=(50,), b=(50,)),), "b"),
}


@pytest.mark.parametrize("name", list(BUGS))
def test_corpus_bug_is_a_mismatch_on_the_right_leaf(name):
  fn, args, bad_leaf = BUGS[name]
  report = gc.check_gradients(fn, *args)
  verdicts = report.verdicts()
  assert verdicts[bad_leaf] == "mismatch", str(report)
  assert all(v == "ok" for k, v in verdicts.items() if k != bad_leaf), str(report)
  assert not report.ok
  with pytest.raises(gc.GradientCheckError, match=re.escape(f"{bad_leaf} (mismatch)")):
    report.raise_if_failed()


def test_custom_vjp_skips_the_forward_leg_but_checks_reverse():
  report = gc.check_gradients(_sign_error, *BUGS["sign error in custom_vjp"][1])
  rows = {r.path: r for r in report.rows}
  # Only "a" reaches the custom_vjp function: jax.jvp refuses it alone.
  assert rows["a"].forward is None and rows["b"].forward is not None
  assert "skipped" in str(report)
  np.testing.assert_allclose(rows["b"].reverse, rows["b"].finite_difference, rtol=1e-8)
  np.testing.assert_allclose(rows["b"].reverse, rows["b"].forward, rtol=1e-12)
  assert rows["a"].reverse == pytest.approx(-rows["a"].finite_difference, rel=1e-6)


def test_custom_jvp_forward_and_reverse_agree_with_each_other_not_with_fd():
  report = gc.check_gradients(_wrong_tangent, *BUGS["custom_jvp with a wrong tangent"][1])
  row = {r.path: r for r in report.rows}["w"]
  assert row.forward == pytest.approx(row.reverse, rel=1e-10)
  assert abs(row.reverse - row.finite_difference) > 1e-3 * abs(row.finite_difference)


# ---------------------------------------------------------------------------
# Correct functions: no false alarm over 20 keys.


def _mlp(params, x):
  h = x
  for layer in params:
    h = jnp.tanh(h @ layer["kernel"] + layer["bias"])
  return jnp.mean(h ** 2)


_MLP_PARAMS = [  # 1,001,500 float32 parameters in 6 leaves
    {"kernel": jnp.asarray(_rand(1, (500, 1000), 1 / np.sqrt(500))),
     "bias": jnp.asarray(_rand(2, (1000,), 0.1))},
    {"kernel": jnp.asarray(_rand(3, (1000, 500), 1 / np.sqrt(1000))),
     "bias": jnp.asarray(_rand(4, (500,), 0.1))},
    {"kernel": jnp.asarray(_rand(5, (500, 1), 1 / np.sqrt(500))),
     "bias": jnp.zeros((1,), jnp.float32)},
]
_MLP_X = jnp.asarray(_rand(6, (4, 500)))


def _smooth(p):
  z = p["z"]
  mu = jnp.mean(z, axis=-1, keepdims=True)
  var = jnp.var(z, axis=-1, keepdims=True)
  normed = (z - mu) / jnp.sqrt(var + 1e-5) * p["gamma"] + p["beta"]
  return (jnp.sum(jax.nn.softplus(p["s"]) * p["s"]) + jax.nn.logsumexp(p["l"])
          + jnp.sum(jnp.sin(normed) * jnp.arange(normed.shape[-1])))


_SMOOTH = {"s": jnp.asarray(_rand(1, (6,), 3.0)), "l": jnp.asarray(_rand(2, (9,), 2.0)),
           "z": jnp.asarray(_rand(3, (4, 5))), "gamma": jnp.asarray(_rand(4, (5,))),
           "beta": jnp.asarray(_rand(5, (5,)))}


def _scaled_fn(p):
  # A loss whose curvature lives at the inputs' own scale, so any magnitude works.
  w, u = p["w"], p["u"]
  s = jnp.max(jnp.abs(w))
  return jnp.sum(jnp.sin(w / s) * s) + jnp.sum(jnp.tanh(u * 3.0)) + jnp.sum(w * u)


def _assert_no_mismatch(fn, args, keys=KEYS, **kwargs):
  verdicts = set()
  for key in keys:
    report = gc.check_gradients(fn, *args, key=key, **kwargs)
    assert report.ok, str(report)
    verdicts |= set(report.verdicts().values())
  return verdicts


def test_float32_mlp_of_a_million_parameters_passes_20_keys():
  assert sum(x.size for x in jax.tree.leaves(_MLP_PARAMS)) > 1_000_000
  verdicts = _assert_no_mismatch(_mlp, (_MLP_PARAMS, _MLP_X), num_directions=1)
  assert verdicts == {"ok"}


def test_softplus_logsumexp_layer_norm_pass_20_keys():
  assert _assert_no_mismatch(_smooth, (_SMOOTH,)) == {"ok"}


@pytest.mark.parametrize("precision", ["float64", "input"])
@pytest.mark.parametrize("magnitude", [1e5, 1e-5])
def test_large_and_tiny_inputs_pass_20_keys(magnitude, precision):
  params = {"w": jnp.asarray(_rand(1, (8,), magnitude)),
            "u": jnp.asarray(_rand(2, (8,), magnitude))}
  verdicts = _assert_no_mismatch(_scaled_fn, (params,), precision=precision)
  if precision == "float64":
    assert verdicts == {"ok"}


def test_fixed_step_of_jax_test_util_fails_where_ours_passes():
  params = {"w": jnp.asarray(_rand(1, (8,), 1e5)), "u": jnp.asarray(_rand(2, (8,), 1e5))}
  with pytest.raises(AssertionError):
    jax.test_util.check_grads(_scaled_fn, (params,), order=1, modes=["rev"])
  assert gc.check_gradients(_scaled_fn, params, precision="input").ok


@pytest.mark.parametrize("precision", ["float64", "input"])
def test_bfloat16_inputs_are_never_a_mismatch(precision):
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _SMOOTH)
  verdicts = _assert_no_mismatch(_smooth, (params,), precision=precision)
  if precision == "float64":
    assert verdicts == {"ok"}  # checked in float64
  else:
    assert verdicts <= {"ok", "unreliable"}


def test_relu_at_zero_is_unreliable_not_mismatch():
  fn = lambda p: jnp.sum(jax.nn.relu(p["w"]) * 2.0) + jnp.sum(jnp.sin(p["c"]))
  params = {"w": jnp.asarray([0.0, 0.0, 1.0, -1.0]), "c": jnp.ones(3)}
  for key in KEYS[:5]:
    verdicts = gc.check_gradients(fn, params, key=key).verdicts()
    assert verdicts == {"w": "unreliable", "c": "ok"}


def test_nonfinite_gradient_is_reported_and_fails():
  fn = lambda p: jnp.sum(jnp.sqrt(p["w"])) + jnp.sum(p["c"] ** 2)
  report = gc.check_gradients(fn, {"w": jnp.asarray([0.0, 1.0]), "c": jnp.ones(2)})
  assert report.verdicts() == {"w": "nonfinite", "c": "ok"}
  with pytest.raises(gc.GradientCheckError, match=r"w \(nonfinite\)"):
    report.raise_if_failed()


# ---------------------------------------------------------------------------
# Inputs: output pytrees, argnums, Flax NNX state, precision handling.


def test_float64_precision_leaves_x64_as_it_was():
  before = jax.config.jax_enable_x64
  report = gc.check_gradients(_smooth, _SMOOTH)
  assert jax.config.jax_enable_x64 == before
  assert jnp.ones(2).dtype == (jnp.float64 if before else jnp.float32)
  assert max(r.error for r in report.rows) < 1e-7  # float64-level agreement


def test_non_scalar_output_is_projected_and_a_layer_bug_is_found():
  def layer(p, x):
    return {"y": _matmul_t(x, p["w"]), "z": jnp.tanh(x @ p["v"])}
  params = _params(w=(5, 5), v=(5, 2))
  report = gc.check_gradients(layer, params, jnp.asarray(_rand(7, (3, 5))))
  assert report.verdicts() == {"w": "mismatch", "v": "ok"}


def test_argnums_checks_the_chosen_argument():
  fn = lambda x, p: jnp.sum(_square_half(x) * p["a"])
  args = (jnp.asarray(_rand(1, (4,))), {"a": jnp.asarray(_rand(2, (4,)))})
  assert gc.check_gradients(fn, *args, argnums=1).verdicts() == {"a": "ok"}
  assert gc.check_gradients(fn, *args, argnums=0).verdicts() == {"": "mismatch"}


def test_flax_nnx_state_with_a_planted_bug():
  class Bad(nnx.Module):
    def __init__(self, rngs):
      self.dense = nnx.Linear(4, 3, rngs=rngs)
      self.scale = nnx.Param(jnp.ones(3))

    def __call__(self, x):
      return _neg_tanh(self.dense(x)) * self.scale

  model = Bad(nnx.Rngs(0))
  graphdef, state = nnx.split(model, nnx.Param)
  x = jnp.asarray(_rand(3, (2, 4)))
  loss = lambda s: jnp.sum(nnx.merge(graphdef, s)(x) ** 2)
  report = gc.check_gradients(loss, state)
  assert report.verdicts() == {
      "dense/bias": "mismatch", "dense/kernel": "mismatch", "scale": "ok"}


def test_integer_and_empty_leaves_are_not_checked():
  fn = lambda p: jnp.sum(jnp.sin(p["w"])) * p["n"]
  params = {"w": jnp.ones(3), "n": jnp.asarray(2, jnp.int32), "e": jnp.zeros((0,))}
  assert gc.check_gradients(fn, params).verdicts() == {"w": "ok"}


def test_report_table_is_worst_first_and_names_every_failure():
  fn, args, _ = BUGS["error in one leaf of 100"]
  report = gc.check_gradients(fn, *args)
  lines = str(report).splitlines()
  assert lines[0].startswith("gradient check: 100 leaves, 99 ok, 1 mismatch")
  assert lines[3].split()[:2] == ["w37", "3"]
  errors = [float(line.split()[3]) for line in lines[4:]]
  assert errors == sorted(errors, reverse=True)
  with pytest.raises(gc.GradientCheckError) as info:
    report.raise_if_failed()
  message = str(info.value)
  assert message.startswith("1 of 100 leaves have a wrong gradient:")
  assert re.search(r"w37 \(mismatch\): relative error \S+ > rtol 6.1e-06; reverse", message)


def test_ok_report_does_not_raise():
  report = gc.check_gradients(_smooth, _SMOOTH)
  assert report.ok and report.failures == ()
  report.raise_if_failed()


def test_richardson_is_exact_on_a_cubic():
  fn = lambda p: jnp.sum(p["w"] ** 3 - 2.0 * p["w"] ** 2)
  row = gc.check_gradients(fn, {"w": jnp.asarray(_rand(1, (5,)))}).rows[0]
  assert row.error < 1e-12 and row.uncertainty < 1e-6


@pytest.mark.parametrize("kwargs, message", [
    ({"argnums": 2}, r"argnums must be an integer in \[0, 1\]"),
    ({"num_directions": 0}, "num_directions must be an integer >= 1"),
    ({"precision": "float32"}, 'precision must be "float64" or "input"'),
    ({"rtol": 0.0}, r"rtol must be in \(0.0, inf\]"),
])
def test_bad_arguments_raise(kwargs, message):
  with pytest.raises(ValueError, match=message):
    gc.check_gradients(lambda p, x: jnp.sum(p * x), jnp.ones(2), jnp.ones(2), **kwargs)


def test_output_without_floats_raises():
  with pytest.raises(ValueError, match="fn must return a floating array"):
    gc.check_gradients(lambda p: jnp.argmax(p), jnp.ones(3))


# ---------------------------------------------------------------------------
# gradient_check


def _scalar_leaves(step: int) -> dict:
  return {f"p{i}": jnp.asarray(0.5 + i + 0.1 * step, jnp.float32) for i in range(3)}


def _half_square(p):
  return sum(0.5 * jnp.sum(x ** 2) for x in jax.tree.leaves(p))


@JIT
def test_gradient_check_matches_numpy_over_steps(jit):
  # Scalar leaves: the direction is +-1, so the relative error of a gradient
  # c * p of 0.5 * p**2 is |c - 1| / max(|c|, 1) exactly.
  every_k, steps = 3, 7
  tx = gc.gradient_check(every_k=every_k)
  update = jit(lambda g, s, p: tx.update(g, s, p, value_fn=_half_square))
  state = tx.init(_scalar_leaves(0))
  rtol = float(np.finfo(np.float32).eps) ** (1 / 3)
  worst, worst_leaf, checked, failures = 0.0, -1, 0, 0
  for t in range(steps):
    params = _scalar_leaves(t)
    factors = np.array([1.0, 1.3, 0.9] if t < 4 else [1.0, 1.0, 2.0], np.float32)
    grads = {k: v * c for (k, v), c in zip(params.items(), factors)}
    out, state = update(grads, state, params)
    chex.assert_trees_all_equal(out, grads)
    if t % every_k == 0:
      checked += 1
      errors = np.abs(factors - 1) / np.maximum(np.abs(factors), 1)
      failures += int(np.any(errors > rtol))
      if errors.max() > worst:
        worst, worst_leaf = errors.max(), int(np.argmax(errors))
    assert int(state.count) == t + 1
    assert int(state.steps_checked) == checked
    assert int(state.failures) == failures
    np.testing.assert_allclose(state.worst_error, worst, rtol=1e-3)
    assert int(state.worst_leaf) == worst_leaf
  assert (checked, failures, worst_leaf) == (3, 3, 2)


def _train(tx_first, steps, grad_fn):
  params = {"dense": {"kernel": jnp.asarray(_rand(1, (6, 8), 0.4)),
                      "bias": jnp.zeros((8,))},
            "out": {"kernel": jnp.asarray(_rand(2, (8, 1), 0.4))}}
  x, y = jnp.asarray(_rand(3, (16, 6))), jnp.asarray(_rand(4, (16, 1)))

  def loss(p):
    h = jnp.tanh(x @ p["dense"]["kernel"] + p["dense"]["bias"])
    return jnp.mean((h @ p["out"]["kernel"] - y) ** 2)

  tx = optax.chain(tx_first, optax.adam(1e-2))
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    grads = grad_fn(loss, params)
    updates, state = tx.update(grads, state, params, value_fn=loss)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  return gc.stats(state)


def test_gradient_check_passes_a_correct_training_loop():
  found = _train(gc.gradient_check(every_k=2), 10, lambda loss, p: jax.grad(loss)(p))
  assert int(found["gradient_check/steps_checked"]) == 5
  assert int(found["gradient_check/failures"]) == 0
  assert float(found["gradient_check/worst_error"]) < 5e-3


def test_gradient_check_catches_a_bug_in_one_leaf():
  def buggy_grad(loss, p):
    g = jax.grad(loss)(p)
    return {**g, "dense": {**g["dense"], "bias": -g["dense"]["bias"]}}
  found = _train(gc.gradient_check(every_k=2, num_directions=2), 6, buggy_grad)
  assert int(found["gradient_check/failures"]) == 3
  assert int(found["gradient_check/worst_leaf"]) == 0  # dense/bias, first leaf
  assert float(found["gradient_check/worst_error"]) > 0.5


def _narrow_mlp_run(dtype, sizes, seeds, bug_leaf=None, num_directions=1,
                    steps=3):
  """``gradient_check`` stats after ``steps`` checked SGD steps of a two-layer
  Flax NNX MLP whose params are ``dtype``, for every seed; ``bug_leaf``
  multiplies that leaf's gradient by 3."""
  din, hidden, dout = sizes
  template = nnx.Sequential(
      nnx.Linear(din, hidden, param_dtype=dtype, rngs=nnx.Rngs(0)), jnp.tanh,
      nnx.Linear(hidden, dout, param_dtype=dtype, rngs=nnx.Rngs(1)))
  graphdef, _ = nnx.split(template, nnx.Param)
  # SGD: optax.adam's eps and squared gradients underflow in float16 params.
  tx = optax.chain(gc.gradient_check(every_k=1, num_directions=num_directions),
                   optax.sgd(0.1))

  @jax.jit
  def step(params, state, x, y):
    def loss(p):
      return jnp.mean((nnx.merge(graphdef, p)(x) - y).astype(jnp.float32) ** 2)
    grads = jax.grad(loss)(params)
    if bug_leaf is not None:
      leaves, treedef = jax.tree.flatten(grads)
      leaves[bug_leaf] = leaves[bug_leaf] * 3
      grads = treedef.unflatten(leaves)
    updates, state = tx.update(grads, state, params, value_fn=loss)
    return optax.apply_updates(params, updates), state

  found = []
  for seed in seeds:
    model = nnx.Sequential(
        nnx.Linear(din, hidden, param_dtype=dtype, rngs=nnx.Rngs(seed)), jnp.tanh,
        nnx.Linear(hidden, dout, param_dtype=dtype, rngs=nnx.Rngs(seed + 100)))
    params = nnx.state(model, nnx.Param)
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((64, din)), dtype)
    y = jnp.asarray(rng.standard_normal((64, dout)), dtype)
    state = tx.init(params)
    for _ in range(steps):
      params, state = step(params, state, x, y)
    found.append(gc.stats(state))
  return found


NARROW = pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16],
                                 ids=["bf16", "f16"])
NARROW_SIZES = pytest.mark.parametrize("sizes", [(8, 32, 1), (16, 48, 4)],
                                       ids=["8-32-1", "16-48-4"])


@NARROW
@NARROW_SIZES
def test_gradient_check_never_flags_a_correct_narrow_model(dtype, sizes):
  # Evaluated in its own dtype, the bf16 model of 8-32-1 seed 0 was a
  # mismatch on a bias leaf (relative error 0.27, rtol 0.2); its bfloat16
  # gradient is up to 60% off at some steps, which must read as unreliable.
  for seed, found in enumerate(_narrow_mlp_run(dtype, sizes, range(8))):
    assert int(found["gradient_check/steps_checked"]) == 3
    assert int(found["gradient_check/failures"]) == 0, (seed, found)
    assert float(found["gradient_check/worst_error"]) < 0.2, (seed, found)


@NARROW
@NARROW_SIZES
def test_gradient_check_catches_a_3x_gradient_in_a_narrow_model(dtype, sizes):
  # Leaves in tree order: layers/0/bias, layers/0/kernel, layers/2/bias, ...
  for bug_leaf in (1, 2):
    for seed, found in enumerate(_narrow_mlp_run(dtype, sizes, range(3), bug_leaf,
                                                 num_directions=2)):
      assert int(found["gradient_check/failures"]) >= 2, (bug_leaf, seed, found)
      assert int(found["gradient_check/worst_leaf"]) == bug_leaf, (seed, found)
      assert float(found["gradient_check/worst_error"]) > 0.3


def test_gradient_check_needs_params_and_value_fn():
  tx = gc.gradient_check()
  grads = {"w": jnp.ones(2)}
  state = tx.init(grads)
  with pytest.raises(ValueError, match="needs the parameters"):
    tx.update(grads, state, None, value_fn=_half_square)
  with pytest.raises(ValueError, match="gradient_check needs the loss: .*value_fn="):
    tx.update(grads, state, grads)


@pytest.mark.parametrize("kwargs, message", [
    ({"every_k": 0}, "every_k must be an integer >= 1"),
    ({"num_directions": 0}, "num_directions must be an integer >= 1"),
    ({"rtol": -1.0}, r"rtol must be in \(0.0, inf\]"),
])
def test_gradient_check_bad_hyperparameters(kwargs, message):
  with pytest.raises(ValueError, match=message):
    gc.gradient_check(**kwargs)


def test_gradient_check_skips_work_off_schedule():
  tx = gc.gradient_check(every_k=5)
  params = {"w": jnp.ones(3)}
  hlo = jax.jit(lambda g, s, p: tx.update(g, s, p, value_fn=_half_square)).lower(
      params, tx.init(params), params).as_text()
  assert "conditional" in hlo or "stablehlo.case" in hlo


def test_gradient_check_adds_one_evaluation_of_temporaries_to_the_step():
  # XLA allocates a cond's branch temporaries with the step's, on every step.
  # Batched over its 4 * num_directions points, the check would hold that many
  # copies of the activations (32 MB here with 8 directions); one point at a
  # time, about one forward pass's worth (1 MB of hidden activations).
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((4096, 16)), jnp.float32)
  params = {"w1": jnp.asarray(rng.standard_normal((16, 64)), jnp.float32),
            "w2": jnp.asarray(rng.standard_normal((64, 1)), jnp.float32)}

  def loss(p):
    return jnp.mean(jnp.tanh(x @ p["w1"]) @ p["w2"])

  def temp_bytes(first):
    tx = optax.chain(first, optax.sgd(0.1))

    def step(p, s):
      updates, s = tx.update(jax.grad(loss)(p), s, p, value_fn=loss)
      return optax.apply_updates(p, updates), s
    compiled = jax.jit(step).lower(params, tx.init(params)).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  plain = temp_bytes(optax.identity())
  activations = 4096 * 64 * 4
  for directions in (1, 8):
    checked = temp_bytes(gc.gradient_check(every_k=10, num_directions=directions))
    assert checked <= plain + 3 * activations, (directions, plain, checked)


def test_directions_are_unit_uniform_and_independent():
  # The hashed draw against the law it stands for: entries uniform on
  # [-1, 1] before normalization (mean 0, variance 1/3, flat histogram),
  # directions of one member and of two members uncorrelated.
  key = jax.random.key(3)
  v = np.asarray(_directions._directions(key, jnp.asarray(0), 2, jnp.zeros((200, 50)),
                                      jnp.float32, jnp.float32))
  w = np.asarray(_directions._directions(key, jnp.asarray(1), 1, jnp.zeros((200, 50)),
                                      jnp.float32, jnp.float32))
  np.testing.assert_allclose(np.linalg.norm(v.reshape(2, -1), axis=1), 1.0, rtol=1e-6)
  raw = v[0].ravel() * np.sqrt(v[0].size / 3.0)  # back to entries of variance 1/3
  assert abs(raw.mean()) < 0.02 and abs(raw.var() - 1 / 3) < 0.02
  counts, _ = np.histogram(raw / np.abs(raw).max(), bins=10, range=(-1, 1))
  assert counts.min() > 0.8 * counts.mean() and counts.max() < 1.2 * counts.mean()
  for a, b in [(v[0], v[1]), (v[0], w[0])]:
    assert abs(float(np.sum(a * b))) < 4 / np.sqrt(a.size)


def test_gradient_check_adds_no_parameter_copy_to_a_donated_step():
  # A training step that donates params updates them in place. A check that
  # read params after the update would make XLA copy every param on every
  # step; the evaluation half runs first, so the step copies what the plain
  # step copies (the kernels the backward pass still reads), nothing more.
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((32, 16)), jnp.float32)
  params = {f"layer{i}": {"kernel": jnp.asarray(rng.standard_normal((16, 16)), jnp.float32),
                          "bias": jnp.zeros((16,), jnp.float32)} for i in range(3)}

  def loss(p):
    h = x
    for i in range(3):
      h = jnp.tanh(h @ p[f"layer{i}"]["kernel"] + p[f"layer{i}"]["bias"])
    return jnp.mean(h ** 2)

  def param_copies(first):
    tx = optax.chain(first, optax.adam(1e-3))

    def step(p, s):
      updates, s = tx.update(jax.grad(loss)(p), s, p, value_fn=loss)
      return optax.apply_updates(p, updates), s
    text = jax.jit(step, donate_argnums=(0, 1)).lower(
        params, tx.init(params)).compile().as_text()
    return [line for line in text.splitlines()
            if " copy(" in line and ("f32[16,16]" in line or "f32[16]" in line)]

  plain = param_copies(optax.identity())
  checked = param_copies(gc.gradient_check(every_k=10))
  assert len(checked) <= len(plain), (plain, checked)


def test_gradient_check_passes_signed_zeros_and_non_finite_entries_bit_for_bit():
  tx = gc.gradient_check(every_k=3)
  params = {"w": jnp.ones(4), "n": jnp.arange(3)}
  grads = {"w": jnp.asarray([-0.0, jnp.inf, -jnp.inf, 1e-45], jnp.float32),
           "n": jnp.arange(3)}
  update = jax.jit(lambda g, s, p: tx.update(g, s, p, value_fn=_half_square))
  state = tx.init(params)
  for _ in range(2):  # a checking step, then an off step
    out, state = update(grads, state, params)
    np.testing.assert_array_equal(np.asarray(out["w"]).view(np.uint32),
                                  np.asarray(grads["w"]).view(np.uint32))
    assert out["n"].dtype == grads["n"].dtype
    np.testing.assert_array_equal(out["n"], grads["n"])
  nan = {"w": jnp.full(4, jnp.nan), "n": jnp.arange(3)}
  out, _ = update(nan, state, params)
  assert np.all(np.isnan(out["w"]))


def test_report_shows_gradient_check_stats():
  tx = optax.chain(gc.gradient_check(every_k=1), optax.sgd(0.1))
  params = {"w": jnp.ones(3)}
  _, state = tx.update(jax.tree.map(lambda x: 3 * x, params), tx.init(params), params,
                       value_fn=_half_square)
  text = gc.report(state)
  assert "gradient_check/failures" in text


def test_docstring_examples():
  attempted = 0
  for module in (_check_gradients, _gradient_check):
    results = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert results.failed == 0, module.__name__
    attempted += results.attempted
  assert attempted >= 2


# ---------------------------------------------------------------------------
# jax.test_util.check_grads on the same corpus, for the comparison in the notes.


def _check_grads_flags(fn, args) -> bool:
  """True when jax.test_util.check_grads raises (it found a problem)."""
  try:
    jax.test_util.check_grads(fn, args, order=1, modes=["rev"])
  except AssertionError:
    return True
  return False


@pytest.mark.parametrize("name", list(BUGS))
def test_jax_check_grads_on_the_bug_corpus(name):
  fn, args, _ = BUGS[name]
  # Recorded in the notes: check_grads flags every bug but cannot name the leaf.
  assert _check_grads_flags(fn, args)


@JIT
def test_gradient_check_goes_on_checking_past_int32_max(jit):
  # 2**31-1 = 3 * 715827882 + 1: a count frozen at the maximum would never
  # again be a multiple of 3. It cycles instead; the totals saturate.
  tx = gc.gradient_check(every_k=3)
  params = _scalar_leaves(0)
  wrong = jax.tree.map(lambda p: 2.0 * p, params)
  update = jit(lambda g, s, p: tx.update(g, s, p, value_fn=_half_square))
  state = tx.init(params)._replace(count=jnp.int32(2 ** 31 - 5),
                                   failures=jnp.int32(2 ** 31 - 2))
  counts = []
  for _ in range(12):
    _, state = update(wrong, state, params)
    counts.append(int(state.count))
  assert min(counts) > 0
  assert int(state.steps_checked) == 4
  assert int(state.failures) == 2 ** 31 - 1


# --- values rounded inside the function (issue 19.6) --------------------------

def _rounded_sin(dtype):
  return lambda x: jnp.sin(x.astype(dtype)).astype(x.dtype)


@pytest.mark.parametrize("x", [0.3, 2.0, 7.0, 1000.0])
@pytest.mark.parametrize("shape", [(), (50,)], ids=["scalar", "vector"])
def test_check_gradients_accounts_for_values_rounded_inside_fn(x, shape):
  # fn casts to float32 and back: in float64 its values carry float32's
  # rounding, which the check finds and holds the gradient to (it reported
  # mismatch with an uncertainty of 5e-12 at 2.0 before).
  report = gc.check_gradients(_rounded_sin(jnp.float32), jnp.full(shape, x, jnp.float32))
  assert report.rounded_to == "float32"
  assert report.verdicts() == {"": "ok"}, str(report)
  assert report.rows[0].rtol == pytest.approx(float(np.finfo(np.float32).eps) ** (1 / 3))
  assert "values rounded to float32" in str(report)


def test_check_gradients_catches_a_wrong_gradient_of_rounded_values():
  @jax.custom_vjp
  def rounded_sum_of_squares(x):
    return jnp.sum(x.astype(jnp.float32) ** 2).astype(x.dtype)
  rounded_sum_of_squares.defvjp(lambda x: (rounded_sum_of_squares(x), x),
                                lambda x, g: (3 * x * g,))  # bug: not 2 x g
  x = jnp.linspace(0.5, 2.0, 8)
  report = gc.check_gradients(rounded_sum_of_squares, x)
  assert report.rounded_to == "float32" and report.verdicts() == {"": "mismatch"}
  # bfloat16 rounds the inputs too, coarser than the float64 step: no false
  # mismatch, but finite differences cannot confirm it (pass bfloat16 inputs
  # with precision="input" for a bfloat16-sized step).
  report = gc.check_gradients(_rounded_sin(jnp.bfloat16), x)
  assert report.rounded_to == "bfloat16"
  assert report.verdicts() == {"": "unreliable"}, str(report)


@pytest.mark.parametrize("fn", [
    lambda x: jnp.sum(x ** 2), lambda x: x ** 2, lambda x: jnp.sum(jnp.sin(x))],
    ids=["sum_of_squares", "squares", "sin"])
def test_check_gradients_keeps_full_precision_for_full_precision_values(fn):
  # Dyadic inputs with dyadic outputs at x ([1, 4]) do not pass for rounding:
  # the outputs are also tested at a point off every short binary fraction.
  report = gc.check_gradients(fn, jnp.array([1.0, 2.0]))
  assert report.rounded_to is None and report.ok
  assert report.rows[0].rtol == pytest.approx(float(np.finfo(np.float64).eps) ** (1 / 3))


def test_the_verdicts_are_one_ordered_type():
  # The code the traced check computes, the word the report prints and the
  # severity the report and gradient_check order by, defined once.
  assert VERDICTS == tuple(v.word for v in Verdict) == ("ok", "mismatch", "unreliable", "nonfinite")
  assert [int(Verdict.of(w)) for w in VERDICTS] == [0, 1, 2, 3]
  by_severity = sorted(Verdict, key=lambda v: v.severity)
  assert [v.word for v in by_severity] == ["ok", "unreliable", "mismatch", "nonfinite"]
  assert all(v.meaning for v in Verdict)


def test_the_old_report_names_are_aliases_for_one_release():
  assert gc.GradCheckReport is gc.GradientCheckReport
  assert gc.GradCheckRow is gc.GradientCheckRow
  assert "GradCheckReport" not in gc.__all__ and "GradientCheckReport" in gc.__all__
