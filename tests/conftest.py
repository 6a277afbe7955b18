"""Suite-wide setup: 8 CPU devices for the sharding tests (contract point 8).

XLA reads the flag when jax initialises its backend, so it is set here, before
any test module imports jax.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import pytest  # noqa: E402  (after the flags above, like every jax import)

# A script that test_multiprocess.py runs in processes of its own (it sets
# its own device count before importing jax), not a module to import.
collect_ignore = ["multiprocess_worker.py", "notebook_runner.py"]


@pytest.fixture
def donated_step_copies():
  """Lists the copies of parameter-shaped buffers that XLA compiles into a
  training step applying ``tx``'s updates with params and state donated."""
  import jax
  import optax

  def copies(tx, params):
    def step(params, grads, state):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    text = jax.jit(step, donate_argnums=(0, 2)).lower(
        params, params, tx.init(params)).compile().as_text()
    shapes = {f"f32[{','.join(map(str, x.shape))}]" for x in jax.tree.leaves(params)}
    return [line for line in text.splitlines()
            if " copy(" in line and any(s in line.split("copy(")[0] for s in shapes)]

  return copies
