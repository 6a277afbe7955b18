"""Two processes give what one process gives: every transform across hosts.

``multiprocess_worker.py`` runs every public transform, in the stacks users
build, for six steps on gradients sharded over a (data=4, model=2) mesh. Here
it runs once as one process with 8 CPU devices and once as two processes with
4 devices each, joined by ``jax.distributed`` on a loopback coordinator with
gloo collectives. The params, updates and statistics must agree entry for
entry, steps with a NaN, a spike and an inf in entries only the second
process holds included, and both processes must hold the same statistics:
every decision (skip, clip, back off) is taken globally.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("multiprocess_worker.py")
TIMEOUT_S = 150


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run(out: Path, processes: int) -> None:
  """Runs the worker as ``processes`` processes; ends them all on any failure."""
  port = str(_free_port())
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen(
      [sys.executable, str(WORKER), str(out), str(processes), str(i), port],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      start_new_session=True) for i in range(processes)]
  deadline = time.monotonic() + TIMEOUT_S
  try:
    while any(p.poll() is None for p in procs):
      if time.monotonic() > deadline:
        raise TimeoutError(f"workers still running after {TIMEOUT_S} s")
      if any(p.poll() not in (None, 0) for p in procs):
        break
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
      p.wait()
  logs = [p.stdout.read().decode(errors="replace")[-3000:] for p in procs]
  for i, p in enumerate(procs):
    assert p.returncode == 0, f"process {i} of {processes} failed:\n{logs[i]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multiprocess")
  _run(root / "one", 1)
  _run(root / "two", 2)
  return {name: dict(np.load(root / name)) for name in
          ("one.0.npz", "two.0.npz", "two.1.npz")}


def _assert_same(key: str, want: np.ndarray, got: np.ndarray) -> None:
  assert want.shape == got.shape and want.dtype == got.dtype, key
  if np.issubdtype(want.dtype, np.floating):
    # The same program, but collectives add partial sums in another order.
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-8, equal_nan=True,
                               err_msg=key)
  else:
    np.testing.assert_array_equal(got, want, err_msg=key)


def test_two_processes_equal_one(runs):
  one, two = runs["one.0.npz"], runs["two.0.npz"]
  assert sorted(one) == sorted(two)
  stacks = {key.split("|")[0] for key in one}
  assert len(stacks) == 12, stacks
  for key in one:
    _assert_same(key, one[key], two[key])


def test_both_processes_hold_the_same_statistics(runs):
  first, second = runs["two.0.npz"], runs["two.1.npz"]
  assert sorted(first) == sorted(second)
  for key in first:
    np.testing.assert_array_equal(first[key], second[key], err_msg=key)


def _stat(run, stack: str, step: int, key: str) -> np.ndarray:
  return run[f"{stack}|{step}|stats|{key}"]


def test_faults_in_one_process_shard_decide_globally(runs):
  """The NaN (step 2), spike (step 4) and inf (step 5) sit in the second
  process's shard; the guards act on them in both processes."""
  for run in (runs["two.0.npz"], runs["two.1.npz"]):
    for stack in ("safety", "guard"):
      skipped = [bool(_stat(run, stack, t, "skip_spikes/skipped")) for t in range(6)]
      assert skipped[2] and skipped[5] and not skipped[0], (stack, skipped)
      assert int(_stat(run, stack, 2, "monitor/nonfinite")) == 1
    scales = [float(_stat(run, "loss_scale", t, "dynamic_loss_scale/scale"))
              for t in range(6)]
    assert scales[2] < scales[1] and scales[5] < scales[4], scales
    for t in (2, 5):
      params = [run[key] for key in run if key.startswith(f"safety|{t}|params|")]
      assert all(np.isfinite(p).all() for p in params)
