# The two commands a new user needs:  `make run`  and  `make test`.
# Everything else is a step of those two, runnable on its own.

PYTHON       ?= python3.11
VENV         := .venv
BIN          := $(CURDIR)/$(VENV)/bin
# `mlflow models serve` shells out to uvicorn: the venv's bin/ must be on PATH.
export PATH  := $(BIN):$(PATH)
export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db
# `mlflow run` logs to this experiment (MLflow reads the variable); promote picks from it.
export MLFLOW_EXPERIMENT_NAME ?= fashion-mnist
PROJECT      := mlflow run . --env-manager local
DATASET_DIR  := /usr/share/datasets/fashion-mnist
SUDO         := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
STAMP        := $(VENV)/.installed

.PHONY: install dataset system-deps run train sweep promote serve ui mlflow-ui test lint bench clean

install: $(STAMP) dataset

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

# Debian's package when apt is available; otherwise torchvision downloads it on first use.
dataset:
	@if [ -f $(DATASET_DIR)/t10k-labels-idx1-ubyte.gz ]; then echo "dataset: $(DATASET_DIR)"; \
	elif command -v apt-get >/dev/null; then \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else echo "dataset: no apt-get; torchvision will download Fashion-MNIST into ~/.cache/fmnist-pyfunc"; fi

# What the browser and PostgreSQL tests need, from Debian.
system-deps:
	@missing=""; for p in chromium chromium-driver postgresql; do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi

train: install
	$(PROJECT) -e train

sweep: install
	$(PROJECT) -e sweep

promote: install
	$(PROJECT) -e promote -P experiment=$(MLFLOW_EXPERIMENT_NAME)

# Train the default model (~3 min on 2 CPU cores, ~93.4 % test accuracy) and promote it.
run: train promote

test: install system-deps
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python benchmarks/train_speed.py

clean:
	rm -rf mlruns mlflow.db test-artifacts .pytest_cache
