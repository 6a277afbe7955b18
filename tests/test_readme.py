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
