"""Tests for the private tree helpers that several transforms share."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradcal_jax import _tree


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_fresh_returns_every_value_unchanged(jit):
  tree = {
      "f32": jnp.array([jnp.inf, -jnp.inf, -0.0, jnp.nan, 1.5, 3e38]),
      "bf16": jnp.array([1.0, -0.0, jnp.inf], jnp.bfloat16),
      "i32": jnp.array([-2, 0, 2**31 - 1], jnp.int32),
      "u8": jnp.array([0, 255], jnp.uint8),
      "bool": jnp.array([True, False]),
      "c64": jnp.array([jnp.inf + 2j]),
      "key": jax.random.key(0),
  }
  out = (jax.jit(_tree.fresh) if jit else _tree.fresh)(tree)
  for name in ("f32", "bf16", "i32", "u8", "bool", "c64"):
    assert out[name].dtype == tree[name].dtype
    # Bit patterns, so nan, inf and the sign of zero are compared too.
    np.testing.assert_array_equal(
        np.asarray(out[name]).view(np.uint8), np.asarray(tree[name]).view(np.uint8))
  np.testing.assert_array_equal(jax.random.key_data(out["key"]),
                                jax.random.key_data(tree["key"]))


def test_fresh_in_a_cond_branch_removes_the_copy_of_the_operand():
  x = jnp.ones((64, 128))

  def with_fresh(pred, x):
    return jax.lax.cond(pred, lambda x: x * 2.0, _tree.fresh, x)

  def without(pred, x):
    return jax.lax.cond(pred, lambda x: x * 2.0, lambda x: x, x)

  def copies(fn):
    text = jax.jit(fn).lower(True, x).compile().as_text()
    return [line for line in text.splitlines()
            if " copy(" in line and "f32[64,128]" in line.split("copy(")[0]]

  assert copies(without), "XLA no longer copies a passed-through operand"
  assert not copies(with_fresh)
  np.testing.assert_array_equal(jax.jit(with_fresh)(False, x), x)
