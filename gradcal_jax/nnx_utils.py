"""Flax NNX recipes: a pure value function of a model's params, for gradient checks.

:func:`gradcal_jax.gradient_check` compares the training gradient with finite
differences of ``value_fn(params)``, evaluated many times inside the
optimizer's update (under ``jit``, ``vmap`` and ``lax.cond``). A value
function written as ``lambda p: loss_fn(model, batch)`` reads the live model
instead of ``p`` and, with Dropout or BatchNorm in train mode, mutates it
from inside those transforms: Flax then raises ``TraceContextError``, or
Dropout draws other masks than the gradient saw and every check fails.
:func:`nnx_value_fn` builds the right one: params in, the model's other state
(RNG counts, batch statistics) frozen as it was when the gradient was taken.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax


def nnx_value_fn(
  loss_fn: Callable[..., jax.Array],
  model: Any,
  *args: Any,
  wrt: Any = None,
  **kwargs: Any,
) -> Callable[[Any], jax.Array]:
  """``params -> loss_fn(model with params, *args, **kwargs)``, pure, for ``value_fn=``.

  Call it in the training step **before** taking the gradient: it snapshots
  the model's non-``wrt`` state (Dropout's RNG counts, BatchNorm's running
  statistics), and every evaluation runs on a fresh copy of the model made
  from the params it is given and that snapshot. So Dropout draws the masks
  the gradient saw, BatchNorm in train mode normalizes by the same batch
  statistics, and the updates they make land on the copy, never on
  ``model``. The loss is the one the gradient is of:

  .. math::
    v(p) = \\ell(\\mathrm{merge}(g, p, s_0), \\text{batch})

  with :math:`g` the model's graph and :math:`s_0` its other state at the
  call.

  Args:
    loss_fn: ``loss_fn(model, *args, **kwargs) -> scalar``, the function whose
      gradient the step takes (``nnx.grad(loss_fn)(model, *args)``).
    model: the Flax NNX model, in the mode of the step (``model.train()``).
    *args: the batch, as ``loss_fn`` takes it.
    wrt: the filter of the params the optimizer updates; default ``nnx.Param``
      (``nnx.Optimizer(model, tx, wrt=nnx.Param)``).
    **kwargs: passed to ``loss_fn``.

  Returns:
    ``value_fn(params) -> loss`` for ``optimizer.update(model, grads,
    value_fn=value_fn)`` with a :func:`gradcal_jax.gradient_check` in the chain.

  Example:
    >>> import jax, jax.numpy as jnp, optax, gradcal_jax as gc
    >>> from flax import nnx
    >>> class Net(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.dense = nnx.Linear(3, 2, rngs=rngs)
    ...     self.drop = nnx.Dropout(0.5, rngs=rngs)
    ...   def __call__(self, x):
    ...     return self.drop(jnp.tanh(self.dense(x)))
    >>> loss_fn = lambda m, x: jnp.mean(m(x) ** 2)
    >>> model = Net(nnx.Rngs(0))
    >>> tx = optax.chain(gc.gradient_check(every_k=1), optax.sgd(0.1))
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    >>> x = jnp.ones((4, 3))
    >>> value_fn = gc.nnx_value_fn(loss_fn, model, x)   # before the gradient
    >>> grads = nnx.grad(loss_fn)(model, x)
    >>> _ = optimizer.update(model, grads, value_fn=value_fn)
    >>> int(gc.stats(optimizer)["gradient_check/failures"])
    0
  """
  from flax import nnx

  graphdef, _, *others = nnx.split(model, nnx.Param if wrt is None else wrt, ...)
  rest = others[0]
  # `split` hands out the model's own Variables, which the gradient step is
  # about to advance (Dropout's RNG count): copy them now.
  rest = jax.tree.map(lambda v: v, rest)

  def value_fn(params: Any) -> jax.Array:
    return loss_fn(nnx.merge(graphdef, params, rest, copy=True), *args, **kwargs)

  return value_fn
