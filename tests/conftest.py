"""Shared fixtures: the real dataset, an isolated tracking store, and one tiny trained model."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# The smallest training run that still exercises every code path: ~20 s on 2 CPU cores.
TINY_TRAIN = {"epochs": "2", "max_train_samples": "6000", "width": "16", "val_size": "1000"}


@pytest.fixture(scope="session")
def dataset():
    from fmnist_pyfunc import data

    return data.load(download=False)


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory) -> str:
    """A private SQLite store per test session; nothing touches the user's mlflow.db."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    return uri


# Set by mlflow.set_experiment/start_run in this process; a child process must choose its own.
INHERITED_MLFLOW_VARS = ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")


def project_env(tracking_uri: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in INHERITED_MLFLOW_VARS}
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def mlflow_run(entry_point: str, params: dict, tracking_uri: str, experiment: str, cwd: Path,
               check: bool = True) -> subprocess.CompletedProcess:
    """`mlflow run . -e <entry_point> --env-manager local -P k=v ...` as a user types it."""
    command = [str(Path(sys.executable).parent / "mlflow"), "run", str(REPO), "-e", entry_point,
               "--env-manager", "local", "--experiment-name", experiment]
    for key, value in params.items():
        command += ["-P", f"{key}={value}"]
    result = subprocess.run(command, cwd=cwd, env=project_env(tracking_uri), capture_output=True, text=True,
                            timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="session")
def trained_run(tracking_uri, tmp_path_factory):
    """One `mlflow run . -e train` with a tiny budget; returns the finished run."""
    mlflow_run("train", TINY_TRAIN, tracking_uri, "e2e-train", tmp_path_factory.mktemp("cwd"))
    runs = mlflow.search_runs(experiment_names=["e2e-train"], output_format="list")
    assert len(runs) == 1
    return runs[0]


def png_base64(pixels: np.ndarray, fmt: str = "PNG", **save_args) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **save_args)
    return base64.b64encode(buffer.getvalue()).decode()
