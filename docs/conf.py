"""Sphinx configuration of the gradcal_jax API reference and tutorials.

Sphinx with autodoc and napoleon reads the Google-style docstrings the package
already has (Args / Returns / Example / References) with their ``:math:``
roles, and myst-nb renders the notebooks as tutorials, executed at build time
so their outputs and plots are those of the code as it is (``make docs``;
``GRADCAL_DOCS_EXECUTE=0`` skips the execution for a quick look at the API
pages). The API pages are generated here from ``gradcal_jax.__all__``: one
page per family (module), listing every public name, so a new export appears
without editing the docs, and a name that fits no family fails the build.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import sys

HERE = pathlib.Path(__file__).parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import gradcal_jax  # noqa: E402

project = "gradcal_jax"
release = version = gradcal_jax.__version__
copyright = "the gradcal_jax authors"

extensions = [
  "sphinx.ext.autodoc",
  "sphinx.ext.napoleon",
  "sphinx.ext.mathjax",
  "sphinx.ext.viewcode",
  "myst_nb",
  # MathJax 3 copied into _static/mathjax, so the math renders with no
  # network when the pages are read, not only when they are built.
  "sphinx-mathjax-offline",
]
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_default_options = {"show-inheritance": False}
exclude_patterns = ["_build", "api/_*", "**.ipynb_checkpoints"]
html_theme = "furo"
html_title = f"gradcal_jax {release}"
myst_enable_extensions = ["dollarmath"]
# A heading level skipped inside a notebook cell is style, not a broken page.
suppress_warnings = ["myst.header"]

nb_execution_mode = "force" if os.environ.get("GRADCAL_DOCS_EXECUTE", "1") != "0" else "off"
nb_execution_timeout = 900
nb_execution_raise_on_error = True
nb_execution_show_tb = True
# Cells that display(Markdown(...)) their computed prose and tables: parse those
# outputs as MyST (GFM tables, dollar math), like the notebooks' own text.
nb_render_markdown_format = "myst"

# --- the family pages, from __all__ ------------------------------------------

FAMILIES = {
  "clipping": "Clipping",
  "adaptive": "Adaptive calibration",
  "safety": "The safety stack in one transform",
  "spikes": "Loss-spike methods",
  "truncation": "Top-k truncation",
  "accumulation": "Accumulation",
  "loss_scaling": "Mixed precision",
  "checking": "Gradient checking",
  "monitoring": "Monitoring and statistics",
  "log": "Logging",
  "nnx_utils": "Flax NNX recipes",
}


def _family_pages() -> None:
  members: dict[str, list[str]] = {name: [] for name in FAMILIES}
  for name in gradcal_jax.__all__:
    obj = getattr(gradcal_jax, name)
    if name.startswith("__"):
      continue
    # A family that grew into a package (adaptive/) holds its names in
    # private modules: the family is the first part of the module's name.
    module = getattr(obj, "__module__", "").removeprefix("gradcal_jax.").split(".")[0]
    if module not in members:
      raise RuntimeError(f"gradcal_jax.{name} is in no documented family ({module!r}).")
    members[module].append(name)
  api = HERE / "api"
  api.mkdir(exist_ok=True)
  for module, title in FAMILIES.items():
    lines = [title, "=" * len(title), "", f".. automodule:: gradcal_jax.{module}", ""]
    for name in members[module]:
      kind = "autoclass" if isinstance(getattr(gradcal_jax, name), type) else "autofunction"
      lines += [f".. {kind}:: gradcal_jax.{name}", ""]
    (api / f"{module}.rst").write_text("\n".join(lines))


def _tutorials() -> None:
  # The notebooks live in notebooks/ (the suite runs them there); Sphinx reads
  # sources under docs/ only, so they are copied in (git-ignored).
  out = HERE / "tutorials"
  shutil.rmtree(out, ignore_errors=True)
  out.mkdir()
  for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
    shutil.copy(nb, out / nb.name)


_family_pages()
_tutorials()
