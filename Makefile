# `make demo` and `make test` work on a fresh machine with Python 3.11 and make:
# each creates .venv and installs the package (pinned by constraints.txt) first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pytest workers: the suite is CPU-bound compilation, one worker per core.
JOBS ?= 2

.PHONY: demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m gradcal_jax

# The notebooks run in a second, serial pytest: two Jupyter kernels starting
# at once on pytest-xdist workers can race for the same ZMQ port (seen in CI:
# "Address already in use", kernel died).
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(JOBS) tests --doctest-modules gradcal_jax
	$(BIN)/python -m pytest -q --nbmake notebooks

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) .pytest_cache
