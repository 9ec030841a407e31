# One command sets up and runs the main job, one runs the tests (see README).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL ?=
PROMPT ?= def fibonacci(n):
MAX_TOKENS ?= 32

PORT ?= 8000

.PHONY: setup serve generate test clean

setup: $(VENV)/.installed

# torch is pinned to the CPU wheel the dev/CI machines carry; pip takes a CUDA build elsewhere.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

# Without MODEL=..., the shipped default model (tokenmill/default_models/tokenmill-code).
serve: setup
	$(BIN)/tokenmill serve $(if $(MODEL),--model $(MODEL),) --port $(PORT)

generate: setup
	$(BIN)/tokenmill generate $(if $(MODEL),--model $(MODEL),) --prompt "$(PROMPT)" --max-tokens $(MAX_TOKENS)

test: setup
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) build
