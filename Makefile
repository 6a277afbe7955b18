# `make demo` and `make test` work on a fresh machine with Python 3.11 and make:
# each creates .venv and installs the package (pinned by constraints.txt) first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pytest workers: the suite is CPU-bound compilation, one worker per core.
JOBS ?= 2

DEV_STAMP := $(VENV)/.installed-dev

DOCS_STAMP := $(VENV)/.installed-docs

.PHONY: demo test bench lint package docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,dev]'
	touch $(DEV_STAMP)

# Flags for the demo: make demo ARGS="--plot demo.png --steps 200".
ARGS ?=
demo: $(STAMP)
	$(BIN)/python -m gradcal_jax $(ARGS)

# One pytest run: the tests, the docstring examples and the notebooks
# (tests/test_notebooks.py runs each in a process of its own, no Jupyter
# kernel, so they share the workers). worksteal keeps both cores busy to the
# end when a long test (notebook 07, the two-process run) lands late.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(JOBS) --dist worksteal tests --doctest-modules gradcal_jax

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

$(DOCS_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,docs]'
	touch $(DOCS_STAMP)

# The API reference and the tutorials (executed) as HTML in docs/_build/html;
# any warning fails the build. GRADCAL_DOCS_EXECUTE=0 skips the notebooks' run.
docs: $(DOCS_STAMP)
	rm -rf docs/_build
	$(BIN)/python -m sphinx -W --keep-going -b html -q docs docs/_build/html
	@echo "docs: open docs/_build/html/index.html"

# ruff (lint and format check) and mypy over the package.
lint: $(DEV_STAMP)
	$(BIN)/ruff check gradcal_jax
	$(BIN)/ruff format --check gradcal_jax
	$(BIN)/mypy

# An sdist and a wheel in dist/, checked by twine; the wheel installed in a
# fresh venv (outside the source tree) runs the demo.
WHEEL_VENV := build/wheel-venv
package: $(DEV_STAMP)
	rm -rf dist $(WHEEL_VENV)
	$(BIN)/python -m build --outdir dist .
	$(BIN)/twine check --strict dist/*
	$(PYTHON) -m venv $(WHEEL_VENV) || python3 -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip install --quiet -c constraints.txt dist/*.whl
	cd $(WHEEL_VENV) && bin/python -c "import gradcal_jax, sys; \
	  assert 'site-packages' in gradcal_jax.__file__, gradcal_jax.__file__; \
	  print('installed', gradcal_jax.__version__, 'at', gradcal_jax.__file__)"
	cd $(WHEEL_VENV) && bin/python -m gradcal_jax --steps 20 --depth 8

clean:
	rm -rf $(VENV) .pytest_cache build dist docs/_build docs/api docs/tutorials
