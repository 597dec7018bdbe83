# tinyllm — `make help` lists the targets. Everything installs into .venv/ by itself.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; on machines with a local wheel this is instant. GPU users: install
# the torch build for their CUDA first (any version in pyproject's range is kept as it is).
TORCH_SPEC ?= torch==2.13.0
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install install-dev train test test-all test-browser lint fmt bench tb clean

help: ## list the targets
	@echo "Usage: make TARGET [ARGS=\"...\"]"
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'
	@echo
	@echo "ARGS passes overrides / options to the target's command, e.g.:"
	@echo "  make train ARGS=\"model=tiny\"                   (any config override, see conf/train.yaml)"
	@echo "  make train ARGS=\"budget.max_time_s=60\"         (a shorter first run)"
	@echo "  make test ARGS=\"-k generate -x\"                (pytest options)"

$(BIN)/python:
	$(PY) -m venv $(VENV)

# Stamps make the installs idempotent: they rerun only when pyproject.toml changes.
$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e .
	@touch $@

$(VENV)/.dev: pyproject.toml $(VENV)/.runtime
	$(BIN)/pip install -q -e ".[dev]"
	@touch $@

install: $(VENV)/.runtime ## install tinyllm and its runtime dependencies into .venv/

install-dev: $(VENV)/.dev ## install tinyllm with test/lint/benchmark extras

train: install ## prepare the embedded corpus, train a small model (<= 3 min of fitting), print a sample
	$(BIN)/python -m tinyllm.train experiment=quickstart $(ARGS)
	$(BIN)/python -m tinyllm.generate ckpt=latest prompt=The max_new_tokens=200 temperature=0.8 top_k=50

test: install-dev ## run the default test suite (under 15 minutes on 2 cores)
	$(BIN)/python -m pytest -m "not slow" -q $(ARGS)

test-all: install-dev ## run every test, the slow ones too
	$(BIN)/python -m pytest -q $(ARGS)

# Debian's chromium + chromedriver from apt (a browser download from elsewhere is not needed).
test-browser: install-dev ## the chat page in headless chromium (apt-installs chromium when missing)
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ $(if $(filter 0,$(shell id -u)),,sudo) apt-get update && \
		  $(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y chromium chromium-driver; }
	$(BIN)/python -m pytest -q -m browser tests/test_chat_page.py $(ARGS)

lint: install-dev ## ruff check and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: install-dev ## format the code with ruff
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install-dev ## run the benchmarks (JSON on stdout, side by side with peers)
	$(BIN)/python benchmarks/tokenizer.py
	$(BIN)/python benchmarks/data.py
	$(BIN)/python benchmarks/train.py
	$(BIN)/python benchmarks/shakespeare.py
	$(BIN)/python benchmarks/precision.py --widths 128 256 --steps 3 --batch 4
	$(BIN)/python benchmarks/generate.py

tb: install ## TensorBoard over outputs/ (single runs and sweeps)
	$(BIN)/tensorboard --logdir outputs

clean: ## remove caches and build files (keeps .venv, data/, outputs/)
	rm -rf build *.egg-info .pytest_cache .ruff_cache .hypothesis
	find . -name __pycache__ -not -path './.venv/*' -prune -exec rm -rf {} +
