"""The demo (``python -m gradcal_jax``), run small: its tables and its plot."""

from __future__ import annotations

import re

import pytest

from gradcal_jax import __main__ as demo


def test_demo_prints_its_tables_and_writes_a_png(capsys, tmp_path):
  path = tmp_path / "curves.png"
  assert demo.main(["--depth", "4", "--steps", "12", "--seed", "1",
                    "--plot", str(path)]) == 0
  out = capsys.readouterr().out

  health = out.split("Gradient health at initialization")[1].split(
      "Training results")[0]
  rows = re.findall(r"^(layers/\d+/kernel)\s+\((\d+), (\d+)\)\s+(\S+)\s+(\S+)$",
                    health, re.M)
  assert sorted(r[0] for r in rows) == [f"layers/{i}/kernel" for i in range(4)]
  assert all(flag in ("ok", "exploding", "vanishing", "non-finite")
             for *_, flag in rows)
  severity = ["non-finite", "exploding", "vanishing", "ok"]
  ranks = [severity.index(r[4]) for r in rows]
  assert ranks == sorted(ranks), "worst layers first"

  table = out.split("Training results")[1]
  for name in demo.runs():
    line = next(l for l in table.splitlines() if l.startswith(name))
    cells = line[len(name):].split()
    assert len(cells) == 6, line
    final, best, exceeded = cells[0], cells[1], int(cells[2])
    assert 0 <= exceeded <= 12
    if final != "nan":
      assert float(best) <= float(final)
  assert f"wrote {path}" in out
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_flags_are_refused():
  with pytest.raises(SystemExit):
    demo.main(["--depth", "1"])
  with pytest.raises(SystemExit):
    demo.main(["--steps", "0"])
