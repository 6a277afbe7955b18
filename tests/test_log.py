"""log_stats: statistics handed to a Python writer from inside jit, every N steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradcal_jax as gc

TX = optax.chain(gc.monitor(), gc.clip_by_global_norm(1.0), optax.sgd(0.1))


def _grads(i):
  return {"w": (i + 1.0) * jnp.ones(3), "b": jnp.ones(2)}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_writes_every_kth_step_the_values_of_stats(jit):
  logged = []

  def step(i, state):
    _, state = TX.update(_grads(i), state)
    gc.log_stats(state, i, lambda s, v: logged.append((s, v)), every=3,
                 include=["*/norm", "monitor/max_abs"])
    return state

  run = jax.jit(step) if jit else step
  state = TX.init(_grads(0))
  expected = {}
  for i in range(7):
    state = run(i, state)
    if i % 3 == 0:
      expected[i] = {k: np.asarray(v) for k, v in gc.stats(
          state, include=["*/norm", "monitor/max_abs"]).items()}
  jax.effects_barrier()
  assert [s for s, _ in logged] == [0, 3, 6]
  for s, values in logged:
    assert list(values) == ["monitor/norm", "monitor/max_abs", "clip_by_global_norm/norm"]
    for key, value in values.items():
      assert isinstance(value, np.ndarray)
      np.testing.assert_array_equal(value, expected[s][key])


def test_the_callback_sits_in_a_conditional_branch():
  # Off steps run the empty branch: no host callback is reached on them.
  state = TX.init(_grads(0))
  jaxpr = jax.make_jaxpr(lambda i, s: gc.log_stats(s, i, lambda *_: None, every=10))(0, state)
  top = [e.primitive.name for e in jaxpr.jaxpr.eqns]
  assert "debug_callback" not in top and "cond" in top
  cond = next(e for e in jaxpr.jaxpr.eqns if e.primitive.name == "cond")
  inner = [e.primitive.name for b in cond.params["branches"] for e in b.jaxpr.eqns]
  assert "debug_callback" in inner


def test_bad_every_and_empty_state_raise():
  state = TX.init(_grads(0))
  with pytest.raises(ValueError, match="every must be an integer >= 1"):
    gc.log_stats(state, 0, print, every=0)
  with pytest.raises(ValueError, match="found no optimizer state"):
    gc.log_stats(_grads(0), 0, print)
