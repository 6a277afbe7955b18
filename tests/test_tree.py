"""Private helpers with a behaviour of their own: ``_control.cond`` (eager steps
run one branch op by op) and ``_tree.copies_apart``; and what importing the
package pulls in."""

from __future__ import annotations

import logging
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradcal_jax as gc
from gradcal_jax import _control, _tree


def _branches(calls):
  def big(x):
    calls.append("big")
    return x * 2.0, jnp.int32(1)

  def small(x):
    calls.append("small")
    return x, 0  # a Python int: lax.cond would make it int32

  return big, small


@pytest.mark.parametrize("pred", [True, False])
def test_an_eager_cond_calls_only_the_branch_it_picks(pred):
  calls = []
  big, small = _branches(calls)
  out = _control.cond(jnp.asarray(pred), big, small, jnp.ones(3, jnp.bfloat16))
  want = jax.lax.cond(jnp.asarray(pred), *_branches([]), jnp.ones(3, jnp.bfloat16))
  # Both branches are traced once for the output types, then one runs.
  assert calls.count("big" if pred else "small") == 2
  assert calls.count("small" if pred else "big") == 1
  assert jax.tree.map(lambda x: (x.shape, x.dtype), out) == jax.tree.map(
      lambda x: (x.shape, x.dtype), want)
  jax.tree.map(np.testing.assert_array_equal, out, want)


def test_under_jit_it_is_lax_cond():
  jaxpr = jax.make_jaxpr(lambda p, x: _control.cond(p, *_branches([]), x))(True, jnp.ones(3))
  assert any(e.primitive.name == "cond" for e in jaxpr.jaxpr.eqns)


def test_an_eager_guarded_step_compiles_no_cond(caplog):
  # Eagerly, a lax.cond compiled both branches anew at every step (about
  # 200 ms a step of skip_spikes(adam)); now the picked branch runs op by op.
  tx = gc.skip_spikes(optax.adam(1e-3))
  grads = {"w": jnp.ones((4, 3))}
  _, state = tx.update(grads, tx.init(grads))
  with jax.log_compiles(), caplog.at_level(logging.DEBUG):
    tx.update(grads, state)
  compiled = [r.getMessage() for r in caplog.records if "ompil" in r.getMessage()]
  assert not [m for m in compiled if "cond" in m], compiled


def test_copies_apart_are_the_value():
  copies = _tree.copies_apart(jnp.float32(0.25), 3)
  assert len(copies) == 3 and all(float(c) == 0.25 for c in copies)
  assert _tree.copies_apart(jnp.float32(1.0), 0) == []


def test_importing_the_package_does_not_import_flax():
  # Flax NNX support (stats of an nnx.Optimizer, nnx_value_fn) works without
  # importing flax up front: a user of plain optax does not pay for it.
  code = "import sys, gradcal_jax; print(sorted(m for m in sys.modules if m.startswith('flax')))"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "[]", out.stdout
