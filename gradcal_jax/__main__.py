"""The demo (``python -m gradcal_jax``): calibrating the gradients of a deep tanh MLP.

A plain tanh MLP (no residual connection, no normalization) whose weights are
drawn a little too large sits past the "edge of chaos": its gradients grow
layer after layer toward the input, so the first layers get gradients tens
of times larger than the last. The same network is trained three ways on
synthetic data made on the spot, with the same SGD learning rate:

1. plain SGD: the large gradients of the first layers throw the network off;
2. SGD after ``clip_by_global_norm``: stable, but the global norm is set by the
   first layers, so clipping it to a safe size starves every other layer;
3. a calibrated chain: ``adaptive_grad_clip`` bounds each unit's step relative
   to its own weights, then ``clip_by_global_norm`` guards against spikes.

Every chain starts with a ``monitor`` (the raw gradient) and has a second one
just before SGD (the direction actually taken); ``stats`` reads both at each
step of a ``lax.scan`` training loop.

Usage: ``python -m gradcal_jax [--depth 24] [--steps 300] [--seed 0]
[--plot FILE]``.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import gradcal_jax as gc

WIDTH = 32
INPUTS = 8
SAMPLES = 256
GAIN = 2.5  # weight std = GAIN / sqrt(fan_in); tanh nets explode above ~1
LEARNING_RATE = 0.1
MAX_NORM = 1.0  # clip_by_global_norm threshold, in both clipped runs
CLIPPING = 0.01  # adaptive_grad_clip: at most 1% of a unit's weight norm
EXPLODING_ABOVE = 100.0  # a gradient (or layer) norm above this is exploding
VANISHING_BELOW = 1e-4


class MLP(nnx.Module):
  """``depth`` Dense layers with tanh between them, nothing else."""

  def __init__(self, depth: int, gain: float, rngs: nnx.Rngs):
    init = nnx.initializers.variance_scaling(gain**2, "fan_in", "normal")
    sizes = [INPUTS] + [WIDTH] * (depth - 1) + [1]
    self.layers = nnx.List(
      [
        nnx.Linear(fan_in, fan_out, kernel_init=init, rngs=rngs)
        for fan_in, fan_out in itertools.pairwise(sizes)
      ]
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in self.layers[:-1]:
      x = jnp.tanh(layer(x))
    return self.layers[-1](x)


def make_data(seed: int) -> tuple[jax.Array, jax.Array]:
  """A smooth regression target of 8 inputs, scaled to unit variance."""
  kx, kw = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (SAMPLES, INPUTS))
  w = jax.random.normal(kw, (INPUTS, 4))
  y = jnp.sum(jnp.sin(x @ w), axis=1, keepdims=True)
  return x, (y - y.mean()) / y.std()


def _loss(model: MLP, x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean((model(x) - y) ** 2)


def runs() -> dict[str, optax.GradientTransformation]:
  """The three optimizers, each between two monitors."""

  def watched(*calibration: optax.GradientTransformation):
    return optax.chain(
      gc.monitor(VANISHING_BELOW, EXPLODING_ABOVE),
      *calibration,
      gc.monitor(VANISHING_BELOW, EXPLODING_ABOVE),
      optax.sgd(LEARNING_RATE),
    )

  return {
    "plain SGD": watched(),
    "SGD + clip_by_global_norm": watched(gc.clip_by_global_norm(MAX_NORM)),
    "calibrated (AGC + clip)": watched(
      gc.adaptive_grad_clip(CLIPPING), gc.clip_by_global_norm(MAX_NORM)
    ),
  }


def _spread(found: dict[str, jax.Array], monitor: str) -> jax.Array:
  """max / min of the layers' kernel norms recorded by ``monitor``."""
  norms = jnp.stack(
    [
      v
      for k, v in found.items()
      if k.startswith(f"{monitor}/leaf_norms/") and k.endswith("/kernel")
    ]
  )
  return jnp.max(norms) / jnp.min(norms)


def train(
  depth: int, seed: int, steps: int, tx: optax.GradientTransformation, x: jax.Array, y: jax.Array
) -> dict[str, np.ndarray]:
  """Trains a fresh MLP; returns the per-step loss and monitor statistics."""
  model = MLP(depth, GAIN, nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))

  def step(state: Any, _: None) -> tuple[Any, dict[str, jax.Array]]:
    model, optimizer = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(_loss)(model, x, y)
    optimizer.update(model, grads)
    found = gc.stats(optimizer.opt_state)
    logged = {
      "loss": loss,
      "grad_norm": found["monitor/norm"],
      "grad_spread": _spread(found, "monitor"),
      "update_spread": _spread(found, "monitor_1"),
    }
    return nnx.state((model, optimizer)), logged

  # One compiled loop for all steps: the monitors' states keep their
  # structure from init on, so lax.scan can carry them.
  _, logged = jax.jit(lambda s: jax.lax.scan(step, s, length=steps))(state)
  return {k: np.asarray(v) for k, v in logged.items()}


def _health_at_init(depth: int, seed: int, x: jax.Array, y: jax.Array) -> str:
  model = MLP(depth, GAIN, nnx.Rngs(seed))
  grads = nnx.jit(nnx.grad(_loss))(model, x, y)
  kernels = nnx.filter_state(grads, nnx.PathContains("kernel"))
  return gc.report(kernels, vanishing_below=VANISHING_BELOW, exploding_above=EXPLODING_ABOVE)


def _fmt(value: float) -> str:
  return f"{value:.3g}" if np.isfinite(value) else str(value)


def _median(values: np.ndarray) -> str:
  finite = values[np.isfinite(values)]
  return _fmt(float(np.median(finite))) if finite.size else "nan"


def _table(results: dict[str, dict[str, np.ndarray]]) -> str:
  headers = (
    "run",
    "final loss",
    "best loss",
    f"steps |g|>{EXPLODING_ABOVE:g}",
    "first non-finite",
    "grad spread",
    "update spread",
  )
  lines = []
  for name, r in results.items():
    finite = np.isfinite(r["loss"]) & np.isfinite(r["grad_norm"])
    first_bad = "-" if finite.all() else str(int(np.argmin(finite)) + 1)
    exceeded = int(np.sum(~(r["grad_norm"] <= EXPLODING_ABOVE)))
    lines.append(
      (
        name,
        _fmt(float(r["loss"][-1])),
        _fmt(float(np.nanmin(r["loss"]))),
        str(exceeded),
        first_bad,
        _median(r["grad_spread"]),
        _median(r["update_spread"]),
      )
    )
  widths = [max(len(row[i]) for row in [headers, *lines]) for i in range(len(headers))]

  def line(row: Sequence[str]) -> str:
    cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
    return "  ".join(cells)

  return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, lines)])


def _diverged_at(loss: np.ndarray) -> int | None:
  """The first step (0-based) whose loss is non-finite or 10x the initial one."""
  bad = ~(loss <= 10 * loss[0])
  return int(np.argmax(bad)) if bad.any() else None


def plot(results: dict[str, dict[str, np.ndarray]], path: str) -> None:
  """Writes a PNG of the loss and raw gradient-norm curves of every run.

  A run that diverges is drawn up to that step and marked with a cross, so
  its blow-up does not flatten the other curves.
  """
  import matplotlib  # only when a plot is asked for

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax_loss, ax_norm) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
  for name, r in results.items():
    end = _diverged_at(r["loss"])
    stop = len(r["loss"]) if end is None else end
    steps = np.arange(1, stop + 1)
    for ax, key in ((ax_loss, "loss"), (ax_norm, "grad_norm")):
      (line,) = ax.plot(steps, r[key][:stop], label=name if end is None else f"{name} (diverged)")
      if end is not None and stop:
        ax.plot(stop, r[key][stop - 1], "x", color=line.get_color(), ms=9, mew=2)
  ax_loss.set(title="training loss (MSE)", xlabel="step", yscale="log")
  ax_norm.set(title="global norm of the raw gradient", xlabel="step", yscale="log")
  ax_norm.axhline(
    EXPLODING_ABOVE,
    color="grey",
    lw=0.8,
    ls="--",
    label=f"exploding threshold ({EXPLODING_ABOVE:g})",
  )
  ax_norm.axhline(
    MAX_NORM, color="grey", lw=0.8, ls=":", label=f"clip_by_global_norm threshold ({MAX_NORM:g})"
  )
  ax_loss.legend(fontsize=8)
  ax_norm.legend(fontsize=8)
  for ax in (ax_loss, ax_norm):
    ax.grid(True, which="major", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, format="png")
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m gradcal_jax",
    description="Train a deep plain tanh MLP three ways and compare the "
    "gradient calibration of each.",
  )
  parser.add_argument("--depth", type=int, default=24, help="number of Dense layers (default 24)")
  parser.add_argument(
    "--steps", type=int, default=300, help="full-batch SGD steps per run (default 300)"
  )
  parser.add_argument(
    "--seed", type=int, default=0, help="seed of the data and of the initial weights"
  )
  parser.add_argument(
    "--plot", metavar="FILE", help="also write the loss and gradient-norm curves to this PNG file"
  )
  args = parser.parse_args(argv)
  if args.depth < 2 or args.steps < 1:
    parser.error("--depth must be at least 2 and --steps at least 1")

  x, y = make_data(args.seed)
  print(
    f"A plain tanh MLP: {args.depth} Dense layers of width {WIDTH}, no "
    f"residual, no normalization,\nweights drawn with gain {GAIN:g} "
    "(past the edge of chaos), fitting "
    f"{SAMPLES} synthetic points.\nEach run: SGD, learning rate "
    f"{LEARNING_RATE:g}, {args.steps} full-batch steps, seed {args.seed}."
    "\n"
  )
  print("Gradient health at initialization (kernels, worst first):")
  print(_health_at_init(args.depth, args.seed, x, y))
  print()

  results = {}
  for name, tx in runs().items():
    print(f"training: {name} ...", file=sys.stderr, flush=True)
    results[name] = train(args.depth, args.seed, args.steps, tx, x, y)

  print("Training results")
  print(_table(results))
  print(f"""
steps |g|>{EXPLODING_ABOVE:g}: steps whose raw gradient's global norm was above \
{EXPLODING_ABOVE:g} or not finite.
grad spread: largest / smallest per-layer kernel norm of the raw gradient;
update spread: the same for the direction given to SGD after calibration
(medians over the finite steps). clip_by_global_norm({MAX_NORM:g}) in both
clipped runs; adaptive_grad_clip({CLIPPING:g}) bounds each unit's step to
{CLIPPING:g} of its weight norm, which evens out the layers' steps.""")
  if args.plot:
    plot(results, args.plot)
    print(f"\nwrote {args.plot}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
