# The two commands a new user needs:  `make run`  and  `make test`.
# Everything else is a step of those two, runnable on its own.

PYTHON       ?= python3.11
VENV         := .venv
BIN          := $(CURDIR)/$(VENV)/bin
# `mlflow models serve` and `mlflow run` shell out to tools of the venv: its bin/ must be on PATH.
export PATH  := $(BIN):$(PATH)
export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db
# `mlflow run` logs to this experiment (MLflow reads the variable); promote picks from it.
export MLFLOW_EXPERIMENT_NAME ?= fashion-mnist
PROJECT      := mlflow run . --env-manager local
DATASET_DIR  := /usr/share/datasets/fashion-mnist
SUDO         := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
STAMP        := $(VENV)/.installed
SPARK_STAMP  := $(VENV)/.installed-spark
MLFLOW_UI_PORT ?= 5000
SCORING_PORT ?= 5001
UI_PORT      ?= 8000
SWEEP_PRESET ?= default
SWEEP_BUDGET ?= 0# minutes of trials on any machine; 0: the preset's (default 28)
EXPORT_DIR   ?= export
HOST         ?= 127.0.0.1
MODEL_URI    ?=# empty: entrypoints/serve.py's default, the Production model
export FMNIST_SCORING_URL ?= http://127.0.0.1:$(SCORING_PORT)

# The image (see docs/container.md): docker when its daemon runs, else podman. OFFLINE=1 where builds reach no
# package index: a wheelhouse from the host's pip and, if the engine lacks python:3.11-slim, a base from Debian.
IMAGE        ?= fmnist:latest
ENGINE       ?= auto
OFFLINE      ?=

.PHONY: install spark dataset system-deps container-deps run train sweep promote export image image-test serve ui serve-all \
        tracking-server mlflow-ui test lint bench clean

install: $(STAMP) dataset

# pyspark for batch scoring (entrypoints/score.py): what `make test` needs beyond `make run`.
spark: $(SPARK_STAMP)

$(SPARK_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[spark]"
	touch $@

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[train,dev]"
	touch $@

# Debian's package when apt is available; otherwise torchvision downloads it on first use.
dataset:
	@if [ -f $(DATASET_DIR)/t10k-labels-idx1-ubyte.gz ]; then echo "dataset: $(DATASET_DIR)"; \
	elif command -v apt-get >/dev/null; then \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else echo "dataset: no apt-get; torchvision will download Fashion-MNIST into ~/.cache/fmnist-pyfunc"; fi

# What the browser, PostgreSQL, Spark and image tests need, from Debian.
system-deps: container-deps
	@$(call apt_install,chromium postgresql openjdk-17-jre-headless)

# podman and what an offline build needs, unless a docker daemon runs (GitHub's runners).
container-deps:
	@docker info >/dev/null 2>&1 || { $(call apt_install,podman runc debootstrap podman-compose); }

# Install the Debian packages of $(1) that are missing.
define apt_install
missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
if [ -n "$$missing" ]; then $(SUDO) apt-get update -qq && \
  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi
endef

train: install
	$(PROJECT) -e train

sweep: install
	$(PROJECT) -e sweep -P preset=$(SWEEP_PRESET) -P budget_minutes=$(SWEEP_BUDGET)

promote: install
	$(PROJECT) -e promote -P experiment=$(MLFLOW_EXPERIMENT_NAME)

# Train the default model (~4-5 min on 2 CPU cores, ~94.0 % test accuracy), promote it, serve it with the UI.
run: train promote serve-all

# The scoring server (/invocations, /ping, /version) for the Production model: MLflow's scoring app with a
# request body limit (entrypoints/serve.py); it loads without pickle.
serve: install
	python -m entrypoints.serve $(if $(MODEL_URI),--model-uri $(MODEL_URI)) --host $(HOST) --port $(SCORING_PORT)

# The upload UI; it proxies predictions to $(FMNIST_SCORING_URL).
ui: install
	python -m entrypoints.ui --host $(HOST) --port $(UI_PORT)

serve-all:
	@echo "scoring server: http://$(HOST):$(SCORING_PORT)/invocations   web UI: http://$(HOST):$(UI_PORT)/"
	@echo "(MLflow UI: make mlflow-ui -> http://$(HOST):$(MLFLOW_UI_PORT)/ ; Ctrl-C stops both servers)"
	$(MAKE) -j2 serve ui

# Team mode: a shared tracking server on PostgreSQL, artifacts served through it (see docs/team.md).
TRACKING_DB_URI ?= postgresql://mlflow@127.0.0.1:5432/mlflow
ARTIFACTS_DESTINATION ?= $(CURDIR)/mlartifacts
# Users and passwords (MLflow's basic-auth app): MLFLOW_TRACKING_ADMIN_PASSWORD and MLFLOW_FLASK_SERVER_SECRET_KEY
# in the environment; PostgreSQL's password in PGPASSWORD or ~/.pgpass.
tracking-server: install
	python -m entrypoints.tracking_server --backend-store-uri $(TRACKING_DB_URI) \
	  --artifacts-destination $(ARTIFACTS_DESTINATION) --host $(HOST) --port $(MLFLOW_UI_PORT)

mlflow-ui: install
	mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI) -h $(HOST) -p $(MLFLOW_UI_PORT)

# Several pytest workers (pytest-xdist): most end-to-end tests wait on servers and subprocesses, so more
# workers than cores keep both cores busy; each worker takes its share of the cores' threads (tests/conftest.py).
# Longest first (conftest.LONGEST_FIRST), a few tests at a time per worker, so no worker is left with a queue;
# the modules of conftest.ONE_WORKER_MODULES each run on one worker, which builds their module fixtures once.
TEST_WORKERS ?= 4
test: install spark system-deps lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder

lint: install
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile
	$(BIN)/actionlint

# The Production model, self-contained, for the image.
export: install
	$(BIN)/python -m entrypoints.export --output $(EXPORT_DIR)

image: export
	$(BIN)/python container/build.py --export $(EXPORT_DIR) --tag $(IMAGE) --engine $(ENGINE) $(if $(OFFLINE),--offline)

# A tiny model trained, promoted, exported, built into an image and smoke-tested (container/smoke.py); offline.
image-test: install container-deps
	$(BIN)/python -m pytest tests/test_container_image.py

bench: install
	$(BIN)/python benchmarks/train_speed.py

clean:
	rm -rf mlruns mlflow.db predictions.db* test-artifacts .pytest_cache
