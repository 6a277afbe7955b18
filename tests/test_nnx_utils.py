"""nnx_value_fn and gradient_check on a CNN with BatchNorm and Dropout in train mode."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import gradcal_jax as gc


class CNN(nnx.Module):
  """Flax's MNIST tutorial CNN, shrunk: Conv, BatchNorm, Dropout, Linear."""

  def __init__(self, rngs):
    self.conv = nnx.Conv(1, 4, kernel_size=(3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.dropout = nnx.Dropout(0.3, rngs=rngs)
    self.linear = nnx.Linear(4 * 8 * 8, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.gelu(self.bn(self.conv(x)))
    x = self.dropout(x)
    return self.linear(x.reshape(x.shape[0], -1))


def loss_fn(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


X = jax.random.normal(jax.random.key(1), (16, 8, 8, 1))
Y = jnp.arange(16) % 3


def _setup():
  model = CNN(nnx.Rngs(0))
  model.train()
  tx = optax.chain(gc.gradient_check(every_k=1), optax.adam(1e-3))
  return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


@pytest.mark.parametrize("factor", [1.0, 2.0], ids=["right", "doubled"])
def test_gradient_check_in_train_mode_with_dropout_and_batchnorm(factor):
  model, optimizer = _setup()

  @nnx.jit
  def step(model, optimizer, x, y):
    value_fn = gc.nnx_value_fn(loss_fn, model, x, y)
    grads = nnx.grad(loss_fn)(model, x, y)
    grads = jax.tree.map(lambda g: factor * g, grads)
    optimizer.update(model, grads, value_fn=value_fn)

  stats_before = model.bn.mean[...]
  for _ in range(3):
    step(model, optimizer, X, Y)
  found = gc.stats(optimizer)
  assert int(found["gradient_check/steps_checked"]) == 3
  assert int(found["gradient_check/failures"]) == (0 if factor == 1.0 else 3)
  # The model's own BatchNorm statistics moved with the three gradient steps
  # only (the check's evaluations updated copies).
  assert not jnp.allclose(model.bn.mean[...], stats_before)


def test_value_fn_replays_the_dropout_masks_the_gradient_saw():
  model, _ = _setup()
  value_fn = gc.nnx_value_fn(loss_fn, model, X, Y)
  params = nnx.state(model, nnx.Param)
  loss, _ = nnx.value_and_grad(loss_fn)(model, X, Y)   # advances Dropout's RNG
  assert float(value_fn(params)) == pytest.approx(float(loss), rel=1e-6)
  assert float(value_fn(params)) == float(value_fn(params))
  assert float(loss_fn(model, X, Y)) != pytest.approx(float(loss), rel=1e-6)  # new masks


def test_a_value_fn_over_the_live_model_gets_our_message():
  model, optimizer = _setup()

  @nnx.jit
  def naive(model, optimizer, x, y):
    grads = nnx.grad(loss_fn)(model, x, y)
    optimizer.update(model, grads, value_fn=lambda p: loss_fn(model, x, y))

  with pytest.raises(ValueError, match=r"gc.nnx_value_fn\(loss_fn, model, \*batch\)"):
    naive(model, optimizer, X, Y)
