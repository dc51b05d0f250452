"""Shared fixtures: the real dataset, an isolated tracking store, and one tiny trained model."""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
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
    os.chdir(root)  # runs logged in-process put their artifacts in ./mlruns: keep them out of the repo
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


# --- servers: the real scoring server and the UI, started once per test session ---

BIN = Path(sys.executable).parent
STARTUP_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + STARTUP_TIMEOUT_S
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{url} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not come up:\n{log.read_text()[-3000:]}")


def start(command: list[str], env: dict, health_url: str, log: Path) -> subprocess.Popen:
    process = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=log.parent)
    wait_until_up(health_url, process, log)
    return process


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="session")
def production(trained_run, dataset):
    """The tiny trained model, promoted to Production (forced: other tests may have promoted others)."""
    from fmnist_pyfunc import registry

    decision = registry.promote(trained_run.info.run_id, dataset, force=True)
    assert registry.current_production() == decision.version
    return decision.version


@pytest.fixture(scope="session")
def scoring_url(production, tracking_uri, tmp_path_factory):
    port = free_port()
    env = project_env(tracking_uri)
    env["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"  # the model must load without unpickling
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    process = start([str(BIN / "mlflow"), "models", "serve", "-m", "models:/fashion-mnist-cnn/Production",
                     "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], env,
                    f"http://127.0.0.1:{port}/ping", log)
    yield f"http://127.0.0.1:{port}"
    stop(process)


@pytest.fixture(scope="session")
def ui_url(scoring_url, tracking_uri, tmp_path_factory):
    port = free_port()
    env = project_env(tracking_uri)
    env["FMNIST_SCORING_URL"] = scoring_url
    log = tmp_path_factory.mktemp("ui") / "ui.log"
    process = start([str(BIN / "gunicorn"), "--workers", "1", "--threads", "4", "--bind", f"127.0.0.1:{port}",
                     "webui.app:create_app()"], env, f"http://127.0.0.1:{port}/health", log)
    yield f"http://127.0.0.1:{port}"
    stop(process)


