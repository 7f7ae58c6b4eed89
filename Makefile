# Quick start: `make demo` (the main job on embedded defaults), `make test` (the whole suite).
# Both install the project into .venv first (once; again when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: demo test bench build clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/timm-splat demo

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

build: $(BIN)/.installed
	$(BIN)/timm-splat build --verbose

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/kernel_speed.py
	$(BIN)/python benchmarks/fit_quality.py
	$(BIN)/python benchmarks/fit_memory.py

clean:
	rm -rf $(VENV) out build *.egg-info
