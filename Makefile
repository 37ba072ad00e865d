# Set-up from nothing: both targets create .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Rows for `make demo` (16 float64 features): 8,388,608 rows = 1 GiB.
N ?= 8388608

.PHONY: demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python scripts/demo.py --n-samples $(N)

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest

bench: $(VENV)/.installed-test
	$(BIN)/python scripts/bench/bench_vs_sklearn.py

clean:
	rm -rf data .pytest_cache .hypothesis
