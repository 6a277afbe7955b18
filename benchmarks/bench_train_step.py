"""Benchmark rows for a whole training step: a small GPT-style Flax NNX model.

One jitted step (forward, backward, optimizer, params and state donated) with
the safety stack ``chain(monitor, zclip, skip_spikes(adamw))`` against the same
step with plain ``optax.adamw``: time ratio, XLA's bytes accessed over the
floor (reading and writing the params once) and the first call's compile time,
side by side. ``sizes`` is ignored: the model is fixed (2 blocks, width 128,
sequence 64, batch 16, about 0.5M params), small enough for a 2-core machine.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import _harness
import gradcal_jax as gc

VOCAB, WIDTH, HEADS, DEPTH, SEQ, BATCH = 256, 128, 4, 2, 64, 16


class Block(nnx.Module):
  """Pre-LayerNorm transformer block: causal self-attention, then an MLP."""

  def __init__(self, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(WIDTH, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(HEADS, WIDTH, decode=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(WIDTH, rngs=rngs)
    self.up = nnx.Linear(WIDTH, 4 * WIDTH, rngs=rngs)
    self.down = nnx.Linear(4 * WIDTH, WIDTH, rngs=rngs)

  def __call__(self, x, mask):
    x = x + self.attn(self.ln1(x), mask=mask)
    return x + self.down(nnx.gelu(self.up(self.ln2(x))))


class GPT(nnx.Module):
  """Token and position embeddings, ``DEPTH`` blocks, a final norm and head."""

  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(VOCAB, WIDTH, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (SEQ, WIDTH)))
    self.blocks = nnx.List([Block(rngs) for _ in range(DEPTH)])
    self.ln = nnx.LayerNorm(WIDTH, rngs=rngs)
    self.head = nnx.Linear(WIDTH, VOCAB, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.pos[...][: tokens.shape[1]]
    mask = nnx.make_causal_mask(tokens)
    for block in self.blocks:
      x = block(x, mask)
    return self.head(self.ln(x))


def _step_fn(graphdef, tx):
  def loss(params, tokens):
    logits = nnx.merge(graphdef, params)(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, tokens[:, 1:]).mean()

  def step(params, state, tokens):
    value, grads = jax.value_and_grad(loss)(params, tokens)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value
  return jax.jit(step, donate_argnums=(0, 1))


def _prepared(tx, graphdef, params, tokens):
  """The compiled step, its compile time (s), its bytes accessed, and a call
  that carries params and state from one call to the next."""
  step = _step_fn(graphdef, tx)
  carry = {"params": jax.tree.map(jnp.copy, params)}
  carry["state"] = tx.init(carry["params"])
  start = time.perf_counter()
  compiled = step.lower(carry["params"], carry["state"], tokens).compile()
  compile_s = time.perf_counter() - start
  bytes_ = float(compiled.cost_analysis()["bytes accessed"])

  def call():
    carry["params"], carry["state"], value = compiled(
        carry["params"], carry["state"], tokens)
    return value
  return call, compile_s, bytes_


def rows(sizes: list[int]) -> list[_harness.Row]:
  del sizes  # one fixed model
  model = GPT(nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (BATCH, SEQ + 1)))
  stack = optax.chain(gc.monitor(), gc.zclip(), gc.skip_spikes(optax.adamw(1e-3)))
  plain = optax.adamw(1e-3)
  ours, ours_compile, ours_bytes = _prepared(stack, graphdef, params, tokens)
  ref, ref_compile, ref_bytes = _prepared(plain, graphdef, params, tokens)
  floor_bytes = _harness.bytes_accessed(
      lambda t: jax.tree.map(jnp.negative, t), params)
  ours_t, ref_t, floor_t = _harness.time_interleaved(
      [ours, ref, _harness.floor_call(params)], rounds=21)
  return [_harness.Row(
      "GPT train step, chain(monitor, zclip, skip_spikes(adamw))",
      _harness.entries(params), ours_t, "adamw train step", ref_t, floor_t,
      f"{DEPTH} blocks, width {WIDTH}, batch {BATCH}x{SEQ}, donated; first-call "
      f"compile {ours_compile:.2f} s vs {ref_compile:.2f} s",
      ours_bytes / floor_bytes, ref_bytes / floor_bytes)]


if __name__ == "__main__":
  print(_harness.table(rows([])))
