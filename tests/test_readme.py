"""The README's usage example runs as written and shows what it says."""

import contextlib
import io
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_runs():
  text = README.read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, re.S)
  assert blocks, "README.md has no python example"
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(blocks[0], str(README), "exec"), {})
  printed = out.getvalue()
  assert "'monitor/norm'" in printed
  assert "'clip_by_global_norm/norm'" in printed
  assert "layers/0/kernel" in printed


def test_readme_float16_recipe_runs_after_the_usage_example():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  assert len(blocks) >= 2, "README.md has no float16 recipe"
  namespace: dict = {}
  with contextlib.redirect_stdout(io.StringIO()):
    for block in blocks[:2]:
      exec(compile(block, str(README), "exec"), namespace)
  found = namespace["gc"].stats(namespace["optimizer"].opt_state)
  assert float(found["dynamic_loss_scale/scale"]) == 2.0**15
  assert int(found["dynamic_loss_scale/good_steps"]) == 1


def test_readme_shard_map_example_gives_the_jit_norm():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  assert len(blocks) >= 3, "README.md has no shard_map example"
  namespace: dict = {}
  with contextlib.redirect_stdout(io.StringIO()):
    for block in blocks[:3]:
      exec(compile(block, str(README), "exec"), namespace)
  import jax.numpy as jnp
  grads = namespace["grads"]
  want = float(jnp.sqrt(sum(jnp.sum(x * x) for x in grads.values())))
  got = float(namespace["gc"].stats(namespace["state"])["clip_by_global_norm/norm"])
  assert abs(got - want) < 1e-5 * want


def test_readme_nnx_optimizer_recipes_run_after_the_usage_example():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  assert len(blocks) >= 4, "README.md has no nnx.Optimizer recipes"
  namespace: dict = {}
  with contextlib.redirect_stdout(io.StringIO()):
    for block in (blocks[0], blocks[3]):
      exec(compile(block, str(README), "exec"), namespace)
  gc = namespace["gc"]
  micro = gc.stats(namespace["micro"])
  assert int(micro["accumulate/inner_steps"]) == 1
  found = gc.stats(namespace["optimizer"])
  assert int(found["gradient_check/steps_checked"]) == 1
  assert int(found["gradient_check/failures"]) == 0
  assert int(found["skip_spikes/skipped"]) == 0
