"""Runs every ``bench_*.py`` beside this file and prints one table of ratios.

Usage: ``python benchmarks/run.py [--sizes 1000000 10000000] [--only NAME]
[--write]``. ``--write`` also saves the table to ``benchmarks/results.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import platform
import sys

import jax

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _harness  # noqa: E402


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--sizes", type=int, nargs="+",
                      default=[1_000_000, 10_000_000])
  parser.add_argument("--only", action="append", default=[],
                      help="run only bench_<NAME>.py (repeatable)")
  parser.add_argument("--write", action="store_true",
                      help="also write benchmarks/results.md")
  args = parser.parse_args(argv)

  rows = []
  for path in sorted(HERE.glob("bench_*.py")):
    family = path.stem.removeprefix("bench_")
    if args.only and family not in args.only:
      continue
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    print(f"running {path.name} ...", file=sys.stderr, flush=True)
    rows.extend(module.rows(args.sizes))

  device = jax.devices()[0]
  header = (f"jax {jax.__version__} on {device.platform} "
            f"({device.device_kind}), {platform.machine()}, "
            f"{len(jax.devices())} device(s)")
  text = f"{header}\n\n{_harness.table(rows)}\n"
  print(text)
  if args.write:
    (HERE / "results.md").write_text(f"# Benchmark results\n\n{text}")


if __name__ == "__main__":
  main()
