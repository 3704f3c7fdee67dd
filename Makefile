# Two commands do everything on a fresh clone: `make demo` and `make test`.
# Both go through `make setup`, which creates .venv once and is a no-op afterwards.
# ARGS passes options through: make demo ARGS="--max-minutes 10 --fresh", make test ARGS="-k voting".
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.vismem-installed
ARGS ?=

.PHONY: setup demo test clean

setup: $(STAMP)

# torch and torchvision first, pinned: pip takes them from local disk here; any other request
# downloads gigabytes. requirements.lock pins the rest, so installs are repeatable and quick to resolve.
$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -c requirements.lock -e '.[dev]'
	@touch $(STAMP)

demo: setup
	$(BIN)/vismem demo $(ARGS)

test: setup
	$(BIN)/python -m pytest $(ARGS)

clean:
	rm -rf vismem-demo .pytest_cache
