"""What every entry point shares: argparse helpers (each training parameter a flag whose default is
TRAIN_DEFAULTS') and the MLflow set-up. Light on purpose: the scoring server imports it, so it must not pull
in training code (torch's training loop, tqdm, optuna, matplotlib are not in the image)."""

from __future__ import annotations

import argparse
import os

import mlflow

from fmnist_pyfunc.config import (
    ARCHS,
    AUGMENTS,
    DEFAULT_TRACKING_URI,
    DEVICES,
    EXPERIMENT_NAME,
    PRECISIONS,
    TRAIN_DEFAULTS,
)

CHOICES = {"arch": ARCHS, "augment": AUGMENTS, "device": DEVICES, "precision": PRECISIONS}
TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes"), ("false", "0", "no")


def parse_bool(text: str) -> bool:
    if text.lower() in TRUE_WORDS:
        return True
    if text.lower() in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training parameters (MLproject's train entry point mirrors these)")
    for name, default in TRAIN_DEFAULTS.items():
        kind = parse_bool if isinstance(default, bool) else type(default)
        metavar = None if name in CHOICES else ("BOOL" if kind is parse_bool else kind.__name__.upper())
        group.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=default,
                           choices=CHOICES.get(name), metavar=metavar,
                           help="(default: %(default)s)")


def add_experiment_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experiment", default=EXPERIMENT_NAME,
                        help="MLflow experiment to log to (default: %(default)s)")


def training_config(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in TRAIN_DEFAULTS}


def use_tracking_store() -> None:
    """Honour MLFLOW_TRACKING_URI; otherwise use the project's local SQLite store."""
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        mlflow.set_tracking_uri(DEFAULT_TRACKING_URI)


def use_experiment(name: str) -> None:
    """Log to experiment `name`, unless `mlflow run` already opened the run (and chose its experiment)."""
    if "MLFLOW_RUN_ID" not in os.environ:
        mlflow.set_experiment(name)
