"""One process of the multi-process test (``tests/test_multiprocess.py``).

Run as ``python multiprocess_worker.py OUT PROCESSES PROCESS_ID PORT``. With
``PROCESSES=2`` each process holds 4 CPU devices and joins a loopback
coordinator on ``PORT`` (gloo collectives); with ``PROCESSES=1`` one process
holds all 8. Either way the same program runs on a (data=4, model=2) mesh of
8 devices, and every process writes each stack's params and updates after
each step (gathered whole) and its own copy of every statistic to
``OUT.<process id>.npz``, so the test can compare the two topologies entry for
entry and check that both processes took every decision alike.

The gradients are sharded across both processes: leaves of unequal shapes,
split over one axis or both, and replicated leaves. Step 2 puts a NaN and step 4 a spike
(1e6) in entries that only process 1 holds, step 5 an inf there.
"""

from __future__ import annotations

import os
import sys

OUT, PROCESSES, PROCESS_ID, PORT = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // PROCESSES}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
if PROCESSES > 1:
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{PORT}",
                             num_processes=PROCESSES, process_id=PROCESS_ID,
                             initialization_timeout=60)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import gradcal_jax as gc  # noqa: E402

STEPS = 6
MESH = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
# name -> (shape, partition spec): split over data, model or both, leaves of
# unequal sizes (jax.sharding needs each split dimension divisible; 42 rows
# over 4 devices raises IndivisibleError), and replicated leaves.
LAYOUT = {
    "dense/kernel": ((24, 10), P("data", "model")),
    "dense/bias": ((10,), P("model")),
    "embed": ((40, 6), P("data", None)),
    "out/kernel": ((6, 8), P(None, "model")),
    "norm/scale": ((6,), P()),
    "scalar": ((), P()),
}
# A global position in "dense/kernel" that only process 1 holds (rows 12+ sit
# on devices 4..7, the second process's).
FAULT = ("dense/kernel", (20, 3))


def _global(values: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """Global arrays over the mesh, each process filling only its own shards."""
  return {name: jax.make_array_from_callback(
      values[name].shape, NamedSharding(MESH, spec),
      lambda index, v=values[name]: v[index])
      for name, (_, spec) in LAYOUT.items()}


def _values(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {name: (scale * rng.standard_normal(shape)).astype(np.float32)
          for name, (shape, _) in LAYOUT.items()}


def _gradients(step: int) -> dict[str, jax.Array]:
  values = _values(100 + step, scale=0.1)
  name, at = FAULT
  if step == 2:
    values[name][at] = np.nan
  if step == 4:
    values[name][at] = 1e6
  if step == 5:
    values[name][at] = np.inf
  return _global(values)


def _half_square(params):
  return sum(0.5 * jnp.sum(jnp.square(x)) for x in jax.tree.leaves(params))


def _stacks() -> dict[str, tuple[optax.GradientTransformation, dict]]:
  """name -> (transform, extra update kwargs): every public transform."""
  adam = lambda: optax.adam(1e-2)  # noqa: E731
  return {
      "global_norm": (optax.chain(gc.monitor(), gc.clip_by_global_norm(0.5), adam()), {}),
      "safety": (optax.chain(gc.monitor(), gc.zclip(warmup_steps=2),
                             gc.skip_spikes(adam(), min_history=2)), {}),
      "guard": (gc.guard(adam(), warmup_steps=2, min_history=2), {}),
      "autoclip": (optax.chain(gc.autoclip(history=8), gc.clip_by_value(0.05), adam()), {}),
      "layer": (optax.chain(gc.clip_by_layer_norm(0.2), gc.adaptive_grad_clip(0.05),
                            gc.centralize(), optax.sgd(0.1, momentum=0.9)), {}),
      "accumulate": (gc.accumulate(optax.chain(gc.clip_by_global_norm(1.0), adam()), 2),
                     {}),
      "top_k": (optax.chain(gc.truncate_top_k(0.2), optax.sgd(0.1)), {}),
      "loss_scale": (gc.dynamic_loss_scale(adam(), initial_scale=2.0**4,
                                           growth_interval=2), {}),
      "spikes_2025": (optax.chain(gc.adagc(warmup_steps=2), gc.clip_update_rms(adam())), {}),
      "spam": (gc.spam(1e-2, interval=3, warmup_steps=1, clip_delay=2), {}),
      "weights": (optax.chain(optax.sgd(0.5), gc.clip_weights(0.5)), {}),
      "gradient_check": (optax.chain(gc.gradient_check(every_k=3), optax.sgd(0.1)),
                         {"value_fn": _half_square}),
  }


def _host(tree):
  """Every leaf gathered to a full NumPy array on every process."""
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def _local(x: jax.Array) -> np.ndarray:
  """This process's own copy of a replicated statistic (no communication)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    assert x.is_fully_replicated, x.sharding
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)


def main() -> None:
  results: dict[str, np.ndarray] = {}
  for name, (tx, extra) in _stacks().items():
    params = _global(_values(0))

    @jax.jit
    def step(params, state, grads, tx=tx, extra=extra):
      updates, state = tx.update(grads, state, params, **extra)
      return optax.apply_updates(params, updates), state, updates

    state = jax.jit(tx.init)(params)
    for t in range(STEPS):
      params, state, updates = step(params, state, _gradients(t))
      host = _host({"params": params, "updates": updates})
      host["stats"] = {key: _local(value) for key, value in gc.stats(state).items()}
      for kind in ("params", "updates", "stats"):
        for key, value in host[kind].items():
          results[f"{name}|{t}|{kind}|{key}"] = value
  np.savez(f"{OUT}.{jax.process_index()}.npz", **results)
  if PROCESSES > 1:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main()
