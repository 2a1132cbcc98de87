# `make demo` and `make test` each build their own virtual environment in .venv
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test bench lint clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

$(BIN)/.bench-installed: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/python -m ipyparallel_lite.demo

test: $(BIN)/.installed
	$(BIN)/python -m ruff check ipyparallel_lite tests benchmarks
	$(BIN)/python -m pytest

bench: $(BIN)/.bench-installed
	$(BIN)/python -m benchmarks

lint: $(BIN)/.installed
	$(BIN)/python -m ruff check ipyparallel_lite tests benchmarks

clean:
	rm -rf $(VENV)
