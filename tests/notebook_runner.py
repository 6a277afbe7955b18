"""Runs one notebook's code cells in order, as Jupyter would, in this process.

Run as ``python notebook_runner.py NOTEBOOK``: each code cell goes through
IPython's ``InteractiveShell`` (so ``display``, rich reprs and a cell's last
expression behave as in a kernel), and the first cell that raises ends the run
with its traceback and exit status 1. No Jupyter kernel is started, so no ZMQ
ports are opened and any number of notebooks can run side by side
(``tests/test_notebooks.py`` runs them on the suite's pytest-xdist workers).
"""

from __future__ import annotations

import sys
import time

import nbformat
from IPython.core.interactiveshell import InteractiveShell


def main(path: str) -> int:
  notebook = nbformat.read(path, as_version=4)
  shell = InteractiveShell.instance()
  cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
  for number, cell in enumerate(cells, start=1):
    start = time.perf_counter()
    result = shell.run_cell(cell.source, store_history=True)
    print(f"[cell {number}/{len(cells)}: {time.perf_counter() - start:.1f} s]", flush=True)
    if not result.success:
      print(f"{path}: code cell {number} of {len(cells)} raised:\n{cell.source}", flush=True)
      return 1
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1]))
