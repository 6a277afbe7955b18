"""``gc.guard(inner)`` is ``chain(monitor(), zclip(), skip_spikes(inner))``.

Same statistics bit for bit, same updates and inner state at every step
(clipped steps, spikes, a NaN, an inf, a loss spike, float32 and bfloat16),
eagerly and under ``jax.jit``; what differs is the memory it moves (pinned
in ``tests/test_traffic.py``) and where it does the work (checked here in
the compiled step).

The guard applies ZClip's scale inside the fusion that reads the gradient for
``inner``, where the chain reads a clipped gradient written out. Both are the
same operations in the same order, but on a processor with FMA instructions
XLA:CPU's code generator contracts them differently, so Adam's second moment
can differ in its last bit. Compiled without FMA (``--xla_cpu_max_isa=SSE4_2``,
in a process of its own below) everything is equal bit for bit.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradcal_jax as gc

SETTINGS = {"warmup_steps": 3, "z_threshold": 2.0, "window": 8, "min_history": 3,
            "sigma": 2.0}


def _chain(inner):
  return optax.chain(
      gc.monitor(),
      gc.zclip(z_threshold=SETTINGS["z_threshold"], warmup_steps=SETTINGS["warmup_steps"]),
      gc.skip_spikes(inner, sigma=SETTINGS["sigma"], window=SETTINGS["window"],
                     min_history=SETTINGS["min_history"]))


def _guard(inner):
  return gc.guard(inner, **SETTINGS)


def _grads(step: int, dtype) -> dict[str, jax.Array]:
  """Norms that vary, a few that zclip clips and skip_spikes skips, a NaN
  (step 9), an inf (step 13) and a tiny gradient (step 15)."""
  rng = np.random.default_rng(step)
  scale = {5: 4.0, 7: 30.0, 11: 500.0, 15: 1e-30}.get(step, 1.0 + 0.1 * np.sin(step))
  g = {"w": rng.standard_normal((6, 5)) * scale, "b": rng.standard_normal((5,)) * scale,
       "step": np.asarray(step, np.int32)}
  if step == 9:
    g["w"][2, 3] = np.nan
  if step == 13:
    g["b"][1] = np.inf
  return jax.tree.map(lambda x: jnp.asarray(x, dtype if x.dtype != np.int32 else x.dtype), g)


def _loss(step: int) -> float:
  return 50.0 if step == 12 else 1.0 + 0.05 * np.cos(step)


def _run(tx, steps, dtype, jit, with_loss):
  params = jax.tree.map(jnp.zeros_like, _grads(0, dtype))
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  history = []
  for t in range(steps):
    extra = {"loss": jnp.float32(_loss(t))} if with_loss else {}
    updates, state = update(_grads(t, dtype), state, params, **extra)
    params = optax.apply_updates(params, updates)
    history.append((updates, gc.stats(state), state))
  return history


def _assert_same(want, got, exact=True):
  """Statistics equal bit for bit; updates and the inner state (Adam's
  moments and count) too when ``exact``, else within one rounding of the
  output dtype (an FMA contracted differently)."""
  def same(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if exact:
      np.testing.assert_array_equal(a, b)
    else:
      np.testing.assert_allclose(b, a, rtol=2e-6, atol=1e-12)

  for (u_want, s_want, st_want), (u_got, s_got, st_got) in zip(want, got, strict=True):
    assert list(s_want) == list(s_got)
    for key in s_want:
      np.testing.assert_array_equal(s_want[key], s_got[key], err_msg=key)
    jax.tree.map(same, u_want, u_got)
    jax.tree.map(same, st_want[2].inner_state, st_got.skip_spikes.inner_state)


def _compare(dtype, with_loss, exact, steps=18, jit=True):
  want = _run(_chain(optax.adam(1e-2)), steps, dtype, jit, with_loss)
  got = _run(_guard(optax.adam(1e-2)), steps, dtype, jit, with_loss)
  _assert_same(want, got, exact)
  return got


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("with_loss", [False, True], ids=["norm", "loss"])
def test_guard_matches_the_chain_under_jit(dtype, with_loss):
  got = _compare(dtype, with_loss, exact=False)
  stats = got[-1][1]
  # The run went through every case it is meant to cover.
  assert int(got[-1][2].zclip.step) == 16  # every finite step
  assert int(stats["skip_spikes/num_nonfinite"]) == 2
  assert int(stats["skip_spikes/num_skipped"]) >= 4  # steps 8 and 14 are norm spikes
  assert int(got[9][1]["monitor/nonfinite"]) == 1
  assert int(got[10][1]["monitor/nonfinite"]) == 0
  assert int(got[13][1]["monitor/nonfinite"]) == 1
  assert any(int(h[1]["zclip/clipped"]) for h in got)
  if with_loss:
    assert int(got[12][1]["skip_spikes/skipped"]) == 1


def test_guard_matches_the_chain_eagerly():
  # Op by op is slow: the warm-up and the first clipped step.
  got = _compare(jnp.float32, True, exact=False, steps=6, jit=False)
  assert int(got[5][1]["zclip/clipped"]) == 1


def test_guard_is_the_chain_bit_for_bit_without_fma():
  env = {**os.environ, "XLA_FLAGS": "--xla_cpu_max_isa=SSE4_2", "JAX_PLATFORMS": "cpu"}
  code = ("import test_guard as t, jax.numpy as jnp; "
          "t._compare(jnp.float32, True, exact=True); "
          "t._compare(jnp.bfloat16, False, exact=True); print('bit for bit')")
  out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and "bit for bit" in out.stdout, out.stdout + out.stderr[-3000:]


def test_extra_arguments_reach_the_inner_transform():
  tx = gc.guard(gc.accumulate(optax.sgd(1.0), every_k=2), warmup_steps=2)
  grads = {"w": jnp.ones(3)}
  state = tx.init(grads)
  _, state = tx.update(grads, state, weight=3.0, loss=jnp.float32(1.0))
  assert float(gc.stats(state)["accumulate/weight"]) == 3.0
  updates, state = tx.update({"w": jnp.full(3, 5.0)}, state, weight=1.0, loss=jnp.float32(1.0))
  # The weighted mean of the two micro-batches: (3 * 1 + 1 * 5) / 4.
  np.testing.assert_allclose(updates["w"], -np.full(3, 2.0))
  assert int(gc.stats(state)["accumulate/inner_steps"]) == 1


def _compiled(tx, tree):
  return jax.jit(lambda g, s: tx.update(g, s)).lower(tree, tx.init(tree)).compile().as_text()


def test_monitors_count_sits_in_the_held_branch():
  # (That the clipped gradient is not written out is pinned by its traffic,
  # tests/test_traffic.py.)
  tree = {f"l{i}": jnp.ones((64, 32)) for i in range(3)}
  chain_text = _compiled(_chain(optax.adam(1e-3)), tree)
  guard_text = _compiled(_guard(optax.adam(1e-3)), tree)
  # One conditional fewer: monitor's count moved into the held branch.
  conds = lambda text: len([line for line in text.splitlines()
                            if " conditional(" in line and "ENTRY" not in line])
  assert conds(guard_text) == conds(chain_text) - 1


def test_bad_arguments_name_themselves():
  with pytest.raises(ValueError, match="sigma must be"):
    gc.guard(optax.adam(1e-3), sigma=-1.0)
  with pytest.raises(ValueError, match="warmup_steps must be"):
    gc.guard(optax.adam(1e-3), warmup_steps=0)
  with pytest.raises(ValueError, match="exploding_above"):
    gc.guard(optax.adam(1e-3), vanishing_below=5.0, exploding_above=1.0)
  with pytest.raises(ValueError, match="inner must be"):
    gc.guard(None)
