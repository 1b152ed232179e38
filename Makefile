# The two commands: `make demo` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= out/demo

.PHONY: demo test lint typecheck check install clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "p2pdoe needs Python >= 3.11")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/p2pdoe demo --out $(OUT)

test: $(STAMP)
	$(BIN)/ruff check p2pdoe edge_agent dso_coordinator meter_sim tests
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/python -m pytest tests --durations=25

lint: $(STAMP)
	$(BIN)/ruff check p2pdoe edge_agent dso_coordinator meter_sim tests
	$(BIN)/ruff format --check p2pdoe edge_agent dso_coordinator meter_sim tests

typecheck: $(STAMP)
	$(BIN)/mypy

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache .hypothesis
