"""The transform contract (CONTRIBUTING.md, sections 1 to 10), checked for every public transform.

One parameterized suite over ``CASES``: a new transform is covered by adding one
``Case`` line. Each check compares the transform with itself under another
condition (jit, scan, sharding, a checkpoint, optax's combinators) or with a
property every transform must have; the values of each technique are checked
against NumPy references in its own test file.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import gradcal_jax as gc


def _half_square(params: Any) -> jax.Array:
  """A loss whose gradient is ``params``: a value_fn for checking transforms."""
  return sum(0.5 * jnp.sum(jnp.square(x.astype(jnp.float32)))
             for x in jax.tree.leaves(params)
             if jnp.issubdtype(x.dtype, jnp.floating))


@dataclasses.dataclass(frozen=True)
class Case:
  """A public transform with typical arguments.

  Attributes:
    name: the factory's name; ``stats`` keys of its state start with it.
    make: the factory (or a lambda wrapping it, e.g. binding an inner transform).
    kwargs: typical keyword arguments for ``make``.
    needs_params: whether ``update`` requires params.
    extra_args: ``(grads, params) -> dict`` of keyword arguments for ``update``
      (``value_fn=``, ``loss=``, ``weight=``), or None.
    bad: ``(kwargs, regex)`` pairs: ``make(**kwargs)`` raises a ``ValueError``
      whose message matches ``regex``.
    static_args: arguments that ``optax.inject_hyperparams`` must keep static
      (shapes depend on them, e.g. a buffer length).
    has_stats: whether ``stats`` finds at least one statistic in its state.
    skips_nonfinite: a guard that skips a non-finite step (zeros out, counted
      in a ``*nonfinite*`` or ``num_skipped`` statistic) instead of letting it
      through.
    inner_names: for a wrapper, the gradcal transforms inside it, whose
      statistics ``stats`` must also find.
    own_stats: whether its statistics are keyed by its own name (a composite
      such as ``guard`` records under its parts' names only).
  """

  name: str
  make: Callable[..., optax.GradientTransformation]
  kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
  needs_params: bool = False
  extra_args: Callable[[Any, Any], dict[str, Any]] | None = None
  bad: tuple[tuple[dict[str, Any], str], ...] = ()
  static_args: tuple[str, ...] = ()
  has_stats: bool = True
  skips_nonfinite: bool = False
  inner_names: tuple[str, ...] = ()
  own_stats: bool = True

  def __str__(self) -> str:
    return self.name

  def build(self) -> optax.GradientTransformation:
    return self.make(**self.kwargs)

  def extra(self, grads: Any, params: Any) -> dict[str, Any]:
    return {} if self.extra_args is None else self.extra_args(grads, params)

  @property
  def stat_names(self) -> tuple[str, ...]:
    return ((self.name,) if self.own_stats else ()) + self.inner_names

  def owns(self, key: str) -> bool:
    return any(key.startswith(f"{n}/") for n in self.stat_names)


CASES: list[Case] = [
    Case("monitor", gc.monitor, {"vanishing_below": 1e-6, "exploding_above": 10.0},
         bad=(({"vanishing_below": -1.0}, "vanishing_below must be in"),
              ({"exploding_above": -1.0}, "exploding_above must be in"),
              ({"vanishing_below": 5.0, "exploding_above": 1.0},
               "vanishing_below must be smaller than exploding_above"))),
    Case("autoclip", gc.autoclip, {"percentile": 50.0, "history": 4},
         static_args=("history",),
         bad=(({"percentile": 101.0}, r"percentile must be in \[0.0, 100.0\]"),
              ({"history": 0}, "history must be an integer >= 1"))),
    Case("zclip", gc.zclip, {"z_threshold": 1.0, "alpha": 0.9, "warmup_steps": 2},
         bad=(({"z_threshold": 0.0}, r"z_threshold must be in \(0.0"),
              ({"alpha": 1.0}, r"alpha must be in \(0.0, 1.0\)"),
              ({"warmup_steps": 0}, "warmup_steps must be an integer >= 1"),
              ({"max_norm": -1.0}, "max_norm must be in"))),
    # Wrappers wrap a transform that meets the contract itself (optax.adam
    # turns integer leaves into float32 and overflows in float16), so that
    # what is checked is the wrapper; tests/test_adaptive.py and
    # tests/test_accumulation.py check them around optax.adam.
    Case("skip_spikes",
         lambda sigma=6.0, window=128, min_history=64: gc.skip_spikes(
             gc.clip_by_global_norm(1.0), sigma=sigma, window=window,
             min_history=min_history),
         {"sigma": 1.0, "window": 4, "min_history": 2},
         inner_names=("clip_by_global_norm",),
         extra_args=lambda grads, params: {"loss": _half_square(params)},
         static_args=("window",), skips_nonfinite=True,
         bad=(({"sigma": 0.0}, r"sigma must be in \(0.0"),
              ({"window": 0}, "window must be an integer >= 1"),
              ({"min_history": 5}, r"min_history must be in \[1, 4\]"))),
    # The safety stack in one transform; its statistics are its parts'.
    Case("guard",
         lambda sigma=6.0, window=128, min_history=64, z_threshold=2.5, alpha=0.97,
         warmup_steps=25, vanishing_below=1e-7: gc.guard(
             gc.clip_by_global_norm(1.0), sigma=sigma, window=window,
             min_history=min_history, z_threshold=z_threshold, alpha=alpha,
             warmup_steps=warmup_steps, vanishing_below=vanishing_below),
         {"sigma": 1.0, "window": 4, "min_history": 2, "z_threshold": 1.0,
          "warmup_steps": 2},
         own_stats=False,
         inner_names=("monitor", "zclip", "skip_spikes", "clip_by_global_norm"),
         extra_args=lambda grads, params: {"loss": _half_square(params)},
         static_args=("window",), skips_nonfinite=True,
         bad=(({"sigma": 0.0}, r"sigma must be in \(0.0"),
              ({"min_history": 5}, r"min_history must be in \[1, 4\]"),
              ({"z_threshold": 0.0}, r"z_threshold must be in \(0.0"),
              ({"alpha": 1.0}, r"alpha must be in \(0.0, 1.0\)"),
              ({"vanishing_below": -1.0}, "vanishing_below must be in"))),
    Case("clip_by_value", gc.clip_by_value, {"max_abs": 0.5},
         bad=(({"max_abs": -1.0}, r"max_abs must be in \[0.0, inf\]"),)),
    Case("clip_by_global_norm", gc.clip_by_global_norm, {"max_norm": 1.0},
         bad=(({"max_norm": -1.0}, r"max_norm must be in \[0.0, inf\]"),)),
    Case("clip_by_layer_norm", gc.clip_by_layer_norm, {"max_norm": 1.0},
         bad=(({"max_norm": -1.0}, r"max_norm must be in \[0.0, inf\]"),)),
    Case("adaptive_grad_clip", gc.adaptive_grad_clip, {"clipping": 0.05, "eps": 1e-3},
         needs_params=True,
         bad=(({"clipping": -0.1}, r"clipping must be in \[0.0, inf\]"),
              ({"eps": 0.0}, r"eps must be in \(0.0, inf\]"),
              ({"unit_axes": {"w": "rows"}}, "unit_axes must be None, a callable"))),
    Case("centralize", gc.centralize, has_stats=False),
    Case("gradient_check", gc.gradient_check, {"every_k": 2}, needs_params=True,
         # A Partial is a pytree, so value_fn can also be an argument of jax.jit.
         extra_args=lambda grads, params: {
             "value_fn": jax.tree_util.Partial(_half_square)},
         static_args=("num_directions",),
         bad=(({"every_k": 0}, "every_k must be an integer >= 1"),
              ({"num_directions": 0}, "num_directions must be an integer >= 1"),
              ({"rtol": 0.0}, r"rtol must be in \(0.0, inf\]"))),
    Case("clip_weights", gc.clip_weights, {"max_abs": 0.5}, needs_params=True,
         bad=(({"max_abs": -1.0}, r"max_abs must be in \[0.0, inf\]"),)),
    Case("accumulate",
         lambda every_k=2: gc.accumulate(gc.clip_by_global_norm(1.0), every_k=every_k),
         {"every_k": 2}, inner_names=("clip_by_global_norm",),
         extra_args=lambda grads, params: {"weight": 3.0},
         bad=(({"every_k": 0}, "every_k must be an integer >= 1"),
              ({"every_k": 1.5}, "every_k must be an integer >= 1"))),
    Case("dynamic_loss_scale",
         lambda initial_scale=2.0**15, growth_interval=2000, growth_factor=2.0,
         backoff_factor=0.5, min_scale=1.0, max_scale=2.0**24:
         gc.dynamic_loss_scale(
             gc.clip_by_global_norm(1.0), initial_scale=initial_scale,
             growth_interval=growth_interval, growth_factor=growth_factor,
             backoff_factor=backoff_factor, min_scale=min_scale,
             max_scale=max_scale),
         {"initial_scale": 4.0, "growth_interval": 2},
         inner_names=("clip_by_global_norm",), skips_nonfinite=True,
         bad=(({"initial_scale": 0.0}, r"initial_scale must be in \(0.0"),
              ({"growth_interval": 0}, "growth_interval must be an integer >= 1"),
              ({"growth_factor": 1.0}, r"growth_factor must be in \(1.0"),
              ({"backoff_factor": 1.0}, r"backoff_factor must be in \(0.0, 1.0\)"),
              ({"min_scale": 0.0}, r"min_scale must be in \(0.0"),
              ({"min_scale": 8.0, "max_scale": 2.0}, "min_scale must not exceed"))),
    Case("adagc", gc.adagc, {"lambda_abs": 2.0, "beta": 0.9, "warmup_steps": 2},
         bad=(({"lambda_abs": -1.0}, r"lambda_abs must be in \[0.0"),
              ({"lambda_rel": -1.0}, r"lambda_rel must be in \[0.0"),
              ({"beta": 1.0}, r"beta must be in \[0.0, 1.0\)"),
              ({"warmup_steps": 0}, "warmup_steps must be an integer >= 1"))),
    Case("spam", gc.spam,
         {"learning_rate": 0.1, "theta": 50.0, "interval": 3, "warmup_steps": 2,
          "clip_delay": 2},
         bad=(({"theta": 0.0}, r"theta must be in \(0.0"),
              ({"interval": 0}, "interval must be an integer >= 1"),
              ({"b1": 1.0}, r"b1 must be in \[0.0, 1.0\)"),
              ({"clip_delay": 1}, "clip_delay must be an integer >= 2"))),
    Case("clip_update_rms", gc.clip_update_rms, {"threshold": 0.5},
         bad=(({"threshold": 0.0}, r"threshold must be in \(0.0"),
              ({"b2": 1.0}, r"b2 must be in \[0.0, 1.0\)"),
              ({"eps": 0.0}, r"eps must be in \(0.0"))),
    # The wrapper form reads the second moment of gc.spam, which meets the
    # contract itself (optax.adam does not: see skip_spikes above).
    Case("clip_update_rms",
         lambda threshold=1.0: gc.clip_update_rms(
             gc.spam(0.1, interval=4, clip_delay=2), threshold=threshold),
         {"threshold": 0.5}, inner_names=("spam",)),
    Case("truncate_top_k", gc.truncate_top_k, {"fraction": 0.1},
         bad=(({"fraction": 0.0}, r"fraction must be in \(0.0, 1.0\]"),
              ({"fraction": 1.5}, r"fraction must be in \(0.0, 1.0\]"))),
    Case("truncate_top_k", gc.truncate_top_k,
         {"fraction": 0.1, "error_feedback": False}),
]


# ---------------------------------------------------------------------------
# Inputs


def _tree(dtype: Any = jnp.float32, seed: int = 0, scale: float = 1.0) -> dict[str, Any]:
  """A small model-shaped pytree: Dense and Conv kernels, a bias, a scalar."""
  rng = np.random.default_rng(seed)
  shapes = {
      "dense": {"kernel": (16, 8), "bias": (8,)},
      "conv": {"kernel": (3, 3, 4, 8)},
      "scale": (),
  }
  return jax.tree.map(
      lambda s: jnp.asarray(scale * rng.standard_normal(s), dtype),
      shapes, is_leaf=lambda s: isinstance(s, tuple))


def _grads_at(step: int, dtype: Any = jnp.float32) -> dict[str, Any]:
  # Steps of different sizes, so history-based transforms see a varied sequence.
  return _tree(dtype, seed=100 + step, scale=1.0 + 0.5 * (step % 3))


def _run(tx: optax.GradientTransformation, case: Case, steps: int,
         jit: bool, dtype: Any = jnp.float32,
         grads_fn: Callable[[int], Any] | None = None,
         params: Any = None) -> tuple[list[Any], Any]:
  """Runs ``steps`` updates with moving params; returns (updates list, state)."""
  grads_fn = grads_fn or (lambda t: _grads_at(t, dtype))
  params = _tree(dtype, seed=1) if params is None else params
  state = tx.init(params)

  def step(grads, state, params):
    return tx.update(grads, state, params, **case.extra(grads, params))

  step = jax.jit(step) if jit else step
  outs = []
  for t in range(steps):
    updates, state = step(grads_fn(t), state, params)
    params = optax.apply_updates(params, updates)
    outs.append(updates)
  return outs, state


def _stat_dtypes_ok(state: Any) -> None:
  allowed = {np.dtype(np.float32), np.dtype(np.int32), np.dtype(np.bool_)}
  for key, value in gc.stats(state).items():
    assert np.dtype(value.dtype) in allowed, (key, value.dtype)
    assert np.shape(value) == (), (key, np.shape(value))


@pytest.fixture(params=CASES, ids=str)
def case(request) -> Case:
  return request.param


# ---------------------------------------------------------------------------
# 1. Pure optax: chain, masked, inject_hyperparams


def test_is_an_optax_transform(case):
  tx = case.build()
  assert isinstance(tx, optax.GradientTransformation)
  chained = optax.chain(tx, optax.sgd(0.1))
  outs, _ = _run(chained, case, steps=2, jit=True)
  chex.assert_tree_all_finite(outs)


def test_inside_masked_matches_the_selected_subtree(case):
  mask = {"dense": True, "conv": False, "scale": False}
  masked = optax.masked(case.build(), mask)
  params = _tree(seed=1)
  sub_params = {"dense": params["dense"]}
  plain = case.build()
  state, sub_state = masked.init(params), plain.init(sub_params)
  for t in range(3):
    grads = _grads_at(t)
    sub_grads = {"dense": grads["dense"]}
    out, state = jax.jit(masked.update)(
        grads, state, params, **case.extra(sub_grads, sub_params))
    expect, sub_state = jax.jit(plain.update)(
        sub_grads, sub_state, sub_params, **case.extra(sub_grads, sub_params))
    chex.assert_trees_all_close(out["dense"], expect["dense"], rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_equal(out["conv"], grads["conv"])
    chex.assert_trees_all_equal(out["scale"], grads["scale"])
    params = optax.apply_updates(params, out)
    sub_params = {"dense": params["dense"]}


def test_inject_hyperparams_matches_plain(case):
  numeric = {k: v for k, v in case.kwargs.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)
             and k not in case.static_args}
  if not numeric:
    pytest.skip("no numeric hyperparameter to inject")
  injected = optax.inject_hyperparams(
      case.make, static_args=case.static_args)(**case.kwargs)
  expect, plain_state = _run(case.build(), case, steps=3, jit=True)
  got, state = _run(injected, case, steps=3, jit=True)
  chex.assert_trees_all_close(got, expect, rtol=1e-5, atol=1e-6)
  for k, v in numeric.items():
    assert np.isclose(float(state.hyperparams[k]), v)
  plain_stats, injected_stats = gc.stats(plain_state), gc.stats(state)
  assert plain_stats.keys() == injected_stats.keys()
  chex.assert_trees_all_close(injected_stats, plain_stats, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# 2. Jit and scan safe


def test_jit_matches_eager(case):
  eager, eager_state = _run(case.build(), case, steps=3, jit=False)
  jitted, jit_state = _run(case.build(), case, steps=3, jit=True)
  chex.assert_trees_all_close(jitted, eager, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(gc.stats(jit_state), gc.stats(eager_state),
                              rtol=1e-5, atol=1e-6)


def test_state_structure_is_fixed(case):
  tx = case.build()
  params = _tree(seed=1)
  init_state = tx.init(params)
  _, state = jax.jit(lambda g, s, p: tx.update(g, s, p, **case.extra(g, p)))(
      _grads_at(0), init_state, params)
  assert jax.tree.structure(state) == jax.tree.structure(init_state)
  chex.assert_trees_all_equal_shapes_and_dtypes(state, init_state)


def test_lax_scan_over_five_steps_matches_a_loop(case):
  tx = case.build()
  grads_seq = jax.tree.map(lambda *xs: jnp.stack(xs), *[_grads_at(t) for t in range(5)])

  def body(carry, grads):
    params, state = carry
    updates, state = tx.update(grads, state, params, **case.extra(grads, params))
    return (optax.apply_updates(params, updates), state), updates

  params = _tree(seed=1)
  (_, scan_state), scan_updates = jax.jit(
      lambda p: jax.lax.scan(body, (p, tx.init(p)), grads_seq))(params)
  loop_updates, loop_state = _run(tx, case, steps=5, jit=True)
  loop_updates = jax.tree.map(lambda *xs: jnp.stack(xs), *loop_updates)
  chex.assert_trees_all_close(scan_updates, loop_updates, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(gc.stats(scan_state), gc.stats(loop_state),
                              rtol=1e-5, atol=1e-6)


def test_a_fresh_state_can_be_donated(case):
  # A state whose fields share one buffer (a zero reused in init) cannot be
  # donated: "Attempt to donate the same buffer twice".
  tx = case.build()
  params = _tree(seed=1)
  update = jax.jit(lambda g, s, p: tx.update(g, s, p, **case.extra(g, p)),
                   donate_argnums=1)
  _, state = update(_grads_at(0), tx.init(params), params)
  _, state = update(_grads_at(1), state, params)
  chex.assert_tree_all_finite(gc.stats(state))


# ---------------------------------------------------------------------------
# 3. Dtypes


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
def test_low_precision_in_low_precision_out(case, dtype):
  outs, state = _run(case.build(), case, steps=3, jit=True, dtype=dtype)
  for updates in outs:
    for x in jax.tree.leaves(updates):
      assert x.dtype == dtype
  chex.assert_tree_all_finite(outs)
  _stat_dtypes_ok(state)


def test_float16_gradient_with_norm_above_65504(case):
  # 10,000 entries of 300: the true norm, 30,000, is far above float16's max,
  # but each entry and each step are ordinary.
  params = {**_tree(jnp.float16, seed=1), "big": jnp.ones((10_000,), jnp.float16)}
  grads = jax.tree.map(lambda x: jnp.full_like(x, 300.0), params)
  outs, state = _run(case.build(), case, steps=3, jit=True, dtype=jnp.float16,
                     grads_fn=lambda t: grads, params=params)
  for updates in outs:
    for x in jax.tree.leaves(updates):
      assert x.dtype == jnp.float16
  chex.assert_tree_all_finite(outs)
  chex.assert_tree_all_finite(gc.stats(state))


# ---------------------------------------------------------------------------
# 4. Numbers


def test_zero_gradients_and_zero_params_stay_finite(case):
  tx = case.build()
  zeros = jax.tree.map(jnp.zeros_like, _tree(seed=1))
  state = tx.init(zeros)
  update = jax.jit(lambda g, s, p: tx.update(g, s, p, **case.extra(g, p)))
  for _ in range(3):
    out, state = update(zeros, state, zeros)
    chex.assert_tree_all_finite(out)
  chex.assert_tree_all_finite(gc.stats(state))


def test_nonfinite_gradient_is_never_hidden(case):
  def grads_fn(t):
    grads = _grads_at(t)
    grads["dense"]["kernel"] = grads["dense"]["kernel"].at[0, 0].set(jnp.inf)
    return grads
  outs, state = _run(case.build(), case, steps=2, jit=True, grads_fn=grads_fn)
  finite = all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(outs))
  if case.skips_nonfinite:
    for x in jax.tree.leaves(outs):
      assert not np.any(np.asarray(x)), "a skipped step must give zeros"
    counted = [v for k, v in gc.stats(state).items()
               if case.owns(k) and ("nonfinite" in k or k.endswith("/num_skipped"))]
    assert counted and max(int(v) for v in counted) > 0
  else:
    assert not finite, "an inf gradient was turned into finite updates"


# ---------------------------------------------------------------------------
# 5. Validation at build time


def test_bad_hyperparameters_raise_a_clear_value_error(case):
  if not case.bad:
    pytest.skip("no hyperparameter to validate")
  for kwargs, message in case.bad:
    with pytest.raises(ValueError, match=message):
      case.make(**{**case.kwargs, **kwargs})


def test_numeric_hyperparameters_refuse_strings_and_booleans(case):
  # float("1") is 1.0: a string must not slip through as a number.
  names = sorted({name for kwargs, _ in case.bad for name, value in kwargs.items()
                  if isinstance(value, (int, float)) and not isinstance(value, bool)})
  if not names:
    pytest.skip("no numeric hyperparameter to validate")
  for name in names:
    for value in ("1", True):
      with pytest.raises(ValueError, match=f"{name} must be"):
        case.make(**{**case.kwargs, name: value})


@pytest.mark.parametrize("make, message", [
    (lambda: gc.clip_by_global_norm(None), "max_norm must be a real number, got None"),
    (lambda: gc.clip_by_value(None), "max_abs must be a real number, got None"),
    (lambda: gc.adaptive_grad_clip(None), "clipping must be a real number, got None"),
    (lambda: gc.clip_update_rms(1.0), "inner must be an optax.GradientTransformation"),
    (lambda: gc.skip_spikes("adam"), "inner must be an optax.GradientTransformation"),
    (lambda: gc.guard("adam"), "inner must be an optax.GradientTransformation"),
    (lambda: gc.accumulate(None, 2), "inner must be an optax.GradientTransformation"),
    (lambda: gc.dynamic_loss_scale(optax.adam), "inner must be an optax.GradientTransformation"),
], ids=["global_norm", "value", "agc", "clip_update_rms", "skip_spikes", "guard",
        "accumulate", "loss_scale"])
def test_required_arguments_of_the_wrong_kind_raise_when_built(make, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    make()


def test_missing_params_raise_a_clear_value_error(case):
  if not case.needs_params:
    pytest.skip("does not need params")
  tx = case.build()
  grads = _grads_at(0)
  with pytest.raises(ValueError, match="needs the parameters"):
    tx.update(grads, tx.init(grads), None, **case.extra(grads, grads))


# ---------------------------------------------------------------------------
# 6. Statistics in the state


def test_stats_are_float32_or_int32_scalars(case):
  _, state = _run(case.build(), case, steps=2, jit=True)
  found = gc.stats(state)
  if case.has_stats:
    assert found, "no statistic found in the state"
    assert all(case.owns(k) for k in found), list(found)
    for name in case.stat_names:
      assert any(k.startswith(f"{name}/") for k in found), (name, list(found))
  _stat_dtypes_ok(state)


# ---------------------------------------------------------------------------
# 7. Pytrees


def test_unusual_pytrees(case):
  tx = case.build()
  params = {
      "a": {"w": jnp.ones((3, 2)), "b": None},
      "masked": optax.MaskedNode(),
      "s": jnp.asarray(0.5),
      "step": jnp.asarray(7, jnp.int32),
  }
  grads = {
      "a": {"w": jnp.full((3, 2), 0.25), "b": None},
      "masked": optax.MaskedNode(),
      "s": jnp.asarray(2.0),
      "step": jnp.asarray(3, jnp.int32),
  }
  state = tx.init(params)
  update = jax.jit(lambda g, s, p: tx.update(g, s, p, **case.extra(g, p)))
  for _ in range(2):
    out, state = update(grads, state, params)
    assert jax.tree.structure(out) == jax.tree.structure(grads)
    assert out["step"].dtype == jnp.int32
    assert int(out["step"]) in (3, 0)
    chex.assert_tree_all_finite(out)

  empty_state = tx.init({})
  out, _ = tx.update({}, empty_state, {}, **case.extra({}, {}))
  assert out == {}


def test_flax_nnx_optimizer(case):
  model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.chain(case.build(), optax.sgd(0.1)),
                            wrt=nnx.Param)
  x, y = jnp.ones((5, 4)), jnp.zeros((5, 3))

  def loss_fn(model):
    return jnp.mean((model(x) - y) ** 2)

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    params = nnx.state(model, nnx.Param)
    optimizer.update(model, grads, **case.extra(grads, params))
    return loss

  losses = [float(step(model, optimizer)) for _ in range(3)]
  assert np.all(np.isfinite(losses))
  found = gc.stats(optimizer.opt_state)
  if case.has_stats:
    assert found and all(case.owns(k) for k in found), list(found)


# ---------------------------------------------------------------------------
# 8. Sharding


_SHARDED_SPECS = {
    "dense": {"kernel": P("d", None), "bias": P("d")},
    "conv": {"kernel": P(None, None, None, "d")},
    "scale": P(),
}


def _sharded_tree(mesh: Mesh, seed: int) -> Any:
  rng = np.random.default_rng(seed)
  shapes = {"dense": {"kernel": (64, 16), "bias": (16,)},
            "conv": {"kernel": (3, 3, 4, 16)}, "scale": ()}
  return jax.tree.map(
      lambda s, spec: jax.device_put(jnp.asarray(rng.standard_normal(s), jnp.float32),
                                     NamedSharding(mesh, spec)),
      shapes, _SHARDED_SPECS, is_leaf=lambda s: isinstance(s, tuple))


_GATHERS = re.compile(r"\b(all-gather|all-to-all|collective-permute)(-start)?\(")


def test_sharded_gradient_keeps_its_sharding_and_values(case):
  assert len(jax.devices()) >= 8, "tests/conftest.py should give 8 CPU devices"
  mesh = Mesh(np.array(jax.devices()[:8]), ("d",))
  tx = case.build()
  params = _sharded_tree(mesh, seed=1)
  grads = [_sharded_tree(mesh, seed=10 + t) for t in range(3)]

  def step(g, s, p):
    return tx.update(g, s, p, **case.extra(g, p))

  update = jax.jit(step)
  hlo = update.lower(grads[0], tx.init(params), params).compile().as_text()
  moved = _GATHERS.findall(hlo)
  assert not moved, f"the update moves gradient data between devices: {moved}"

  state, local_state = tx.init(params), tx.init(jax.device_get(params))
  local_params = jax.device_get(params)
  for g in grads:
    out, state = update(g, state, params)
    expect, local_state = jax.jit(step)(jax.device_get(g), local_state, local_params)
    chex.assert_trees_all_close(jax.device_get(out), expect, rtol=1e-5, atol=1e-6)
    for leaf, grad_leaf in zip(jax.tree.leaves(out), jax.tree.leaves(g)):
      assert leaf.sharding.is_equivalent_to(grad_leaf.sharding, leaf.ndim), (
          leaf.sharding, grad_leaf.sharding)
    params = optax.apply_updates(params, out)
    local_params = optax.apply_updates(local_params, expect)


def test_fresh_state_keeps_the_params_sharding(case):
  # Gradient-sized state (accumulators, residuals, moments) is laid out like
  # the params it mirrors, as optax.adam's moments are, not put on device 0.
  mesh = Mesh(np.array(jax.devices()[:8]), ("d",))
  params = _sharded_tree(mesh, seed=1)
  by_shape = {leaf.shape: leaf.sharding for leaf in jax.tree.leaves(params) if leaf.ndim}
  state = case.build().init(params)
  checked = 0
  for path, leaf in jax.tree.leaves_with_path(state):
    if getattr(leaf, "ndim", 0) and leaf.shape in by_shape:
      assert leaf.sharding.is_equivalent_to(by_shape[leaf.shape], leaf.ndim), (
          jax.tree_util.keystr(path), leaf.sharding)
      checked += 1
  gradient_sized = sum(getattr(leaf, "size", 0) >= 64 * 16
                       for leaf in jax.tree.leaves(state))
  assert checked >= gradient_sized, (checked, gradient_sized)


# ---------------------------------------------------------------------------
# 9. Checkpointable


def test_orbax_checkpoint_resume_continues_exactly(case, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  tx = case.build()
  update = jax.jit(lambda g, s, p: tx.update(g, s, p, **case.extra(g, p)))

  def steps(params, state, start, stop):
    outs = []
    for t in range(start, stop):
      out, state = update(_grads_at(t), state, params)
      params = optax.apply_updates(params, out)
      outs.append(out)
    return params, state, outs

  params = _tree(seed=1)
  params, state, _ = steps(params, tx.init(params), 0, 3)
  _, _, expect = steps(params, state, 3, 6)

  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", {"params": params, "opt_state": state})
  checkpointer.wait_until_finished()
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                          {"params": params, "opt_state": state})
  restored = checkpointer.restore(tmp_path / "ckpt", abstract)
  checkpointer.close()
  assert jax.tree.structure(restored["opt_state"]) == jax.tree.structure(state)
  _, _, got = steps(restored["params"], restored["opt_state"], 3, 6)
  chex.assert_trees_all_equal(got, expect)


# ---------------------------------------------------------------------------
# 10. Logged and named from inside jit


def test_log_stats_hands_every_transforms_statistics_to_the_writer(case):
  # gc.log_stats inside the jitted step gives the writer what gc.stats gives,
  # keys in the same order, on the steps asked for only.
  tx = case.build()
  params = _tree(seed=1)
  logged = []

  @jax.jit
  def step(t, grads, state):
    _, state = tx.update(grads, state, params, **case.extra(grads, params))
    gc.log_stats(state, t, lambda s, v: logged.append((s, v)), every=2)
    return state

  state = tx.init(params)
  expected = {}
  for t in range(3):
    state = step(t, _grads_at(t), state)
    if t % 2 == 0:
      expected[t] = {k: np.asarray(v) for k, v in gc.stats(state).items()}
  jax.effects_barrier()
  assert [s for s, _ in logged] == [0, 2]
  for s, values in logged:
    assert list(values) == list(expected[s])
    chex.assert_trees_all_equal(values, expected[s])


def test_leaf_paths_name_every_leaf_in_the_order_of_jax_tree_leaves():
  params = _tree(seed=1)
  paths = gc.leaf_paths(params)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  assert len(paths) == len(jax.tree.leaves(params)) == len(flat)
  assert paths == ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in flat]


def test_nnx_value_fn_is_the_loss_of_the_params_it_is_given():
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  x = jnp.arange(6.0).reshape(2, 3)
  loss_fn = lambda m, x: jnp.sum(m(x) ** 2)
  value_fn = gc.nnx_value_fn(loss_fn, model, x)
  params = nnx.state(model, nnx.Param)
  doubled = jax.tree.map(lambda p: 2.0 * p, params)
  # A reference written by hand: y = x W + b.
  w, b = params["kernel"][...], params["bias"][...]
  assert float(value_fn(params)) == pytest.approx(float(jnp.sum((x @ w + b) ** 2)), rel=1e-6)
  assert float(value_fn(doubled)) == pytest.approx(4.0 * float(value_fn(params)), rel=1e-6)
  assert float(loss_fn(model, x)) == pytest.approx(float(value_fn(params)), rel=1e-6)
