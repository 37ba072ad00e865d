# Set-up from nothing: both targets create .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Rows for `make demo` (16 float64 features): 8,388,608 rows = 1 GiB.
N ?= 8388608

.PHONY: demo test bench docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# With the plot extra (matplotlib): `streamem plot`, as `make demo` suggests, works in the .venv.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e '.[plot]'
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

$(VENV)/.installed-docs: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[docs]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python scripts/demo.py --n-samples $(N)

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest

bench: $(VENV)/.installed-test
	$(BIN)/python scripts/bench/bench_vs_sklearn.py

# The documentation site, warnings as errors: docs/_build/html/index.html.
docs: $(VENV)/.installed-docs
	$(BIN)/sphinx-build -W --keep-going -b html docs docs/_build/html

clean:
	rm -rf data .pytest_cache .hypothesis
