# Quick start: `make demo` (the main job on embedded defaults), `make test` (lint + the suite).
# Both install the project into .venv first (once; again when pyproject.toml or setup.py change;
# editable, so no kernels are built then: they compile on first use). `make wheel`: a platform
# wheel with the kernels prebuilt for the installed torch (README, "Building wheels").
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: demo test lint bench build wheel clean

$(BIN)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/timm-splat demo

test: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

lint: $(BIN)/.installed  # fix what ruff can, then show the rest
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

build: $(BIN)/.installed
	$(BIN)/timm-splat build --verbose

wheel: $(BIN)/.installed
	$(BIN)/python -m pip wheel . --no-build-isolation --no-deps -w dist

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/kernel_speed.py
	$(BIN)/python benchmarks/fit_quality.py
	$(BIN)/python benchmarks/fit_memory.py

clean:
	rm -rf $(VENV) out build dist *.egg-info timm_splat/_kernels*
