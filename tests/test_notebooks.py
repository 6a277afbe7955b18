"""Every tutorial in ``notebooks/`` runs top to bottom without an error.

Each notebook runs in a fresh Python process (``notebook_runner.py``: its
code cells in order through IPython, as a Jupyter kernel runs them), in the
notebooks' folder, with matplotlib's Agg backend and the single CPU device a
laptop has (the suite's 8-device flag is not passed on). No kernel is started,
so the notebooks share the suite's pytest-xdist workers with the other tests
instead of running one after another at the end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))
RUNNER = Path(__file__).with_name("notebook_runner.py")
TIMEOUT_S = 600


def test_every_notebook_is_collected():
  assert len(NOTEBOOKS) >= 8, NOTEBOOKS


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(notebook: Path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(MPLBACKEND="Agg", JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  proc = subprocess.Popen([sys.executable, str(RUNNER), notebook.name], cwd=notebook.parent,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          start_new_session=True)
  try:
    out, _ = proc.communicate(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate()
    pytest.fail(f"{notebook.name} still running after {TIMEOUT_S} s:\n{out.decode()[-4000:]}")
  assert proc.returncode == 0, f"{notebook.name} failed:\n{out.decode(errors='replace')[-6000:]}"
