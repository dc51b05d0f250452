"""The two HTTP servers as child processes (started through their entry points, as `make serve` and
`make ui` do), the one environment every child process gets, waiting for them, stopping them, a browser-like
UI client, memory."""

from __future__ import annotations

import itertools
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import requests

from fmnist_pyfunc.config import LOOPBACK

BIN = Path(sys.executable).parent
STARTUP_TIMEOUT_S = 180  # a cold start imports torch and MLflow and downloads the model: ~10 s, slow disks more
STOP_TIMEOUT_S = 20      # SIGTERM grace before SIGKILL (docker stop waits 10 s by default)
POLL_S = 0.5


def scoring_command(model_uri: str, host: str, port: int, workers: int = 1) -> list[str]:
    return [str(BIN / "python"), "-m", "entrypoints.serve", "--model-uri", model_uri, "--host", host,
            "--port", str(port), "--workers", str(workers)]


def plain_mlflow_command(model_uri: str, host: str, port: int) -> list[str]:
    """MLflow's own scoring server, as the docs give it: `mlflow models serve ... --env-manager local`."""
    return [str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local", "--host", host,
            "--port", str(port)]


def ui_command(host: str, port: int, workers: int) -> list[str]:
    return [str(BIN / "python"), "-m", "entrypoints.ui", "--host", host, "--port", str(port),
            "--workers", str(workers)]


# Set by mlflow.set_experiment/start_run in this process; a child process must choose its own.
INHERITED_MLFLOW_VARS = ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")


def child_env(tracking_uri: str | None = None, **extra: str) -> dict:
    """This environment for a child process: the venv's bin/ first on PATH (MLflow shells out to its tools),
    without this process's experiment and run, on `tracking_uri` if given, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in INHERITED_MLFLOW_VARS}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return env | extra


# Ports for the servers that tests and benchmarks start: below Linux's ephemeral range (32768-60999), so the
# kernel never hands one out to a client connection, and a block of its own for each pytest-xdist worker, so
# that two workers never pick the same port between choosing it and binding it.
FIRST_PORT = 20000
PORTS_PER_WORKER = 1000
_next_port = itertools.count()


def free_port() -> int:
    """A port on LOOPBACK that nothing listens on, from this worker's block, a new one on every call."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")  # gw0, gw1, ...; outside pytest: the first block
    block = FIRST_PORT + int(worker.removeprefix("gw")) * PORTS_PER_WORKER
    for _ in range(PORTS_PER_WORKER):
        port = block + next(_next_port) % PORTS_PER_WORKER
        with socket.socket() as s:
            try:
                s.bind((LOOPBACK, port))
            except OSError:  # in use: a server of this worker's, or someone else's
                continue
            return port
    raise RuntimeError(f"no free port in {block}-{block + PORTS_PER_WORKER - 1}")


def wait_until_up(url: str, process: subprocess.Popen, log: Path | None = None,
                  timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    """Until `url` answers 200; a process that exits or never answers raises with its log's tail."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: server exited with {process.returncode}\n{_tail(log)}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(POLL_S)
    raise RuntimeError(f"{url} did not come up in {timeout_s:.0f} s\n{_tail(log)}")


def _tail(log: Path | None) -> str:
    return log.read_text()[-3000:] if log and log.exists() else ""


def start(command: list[str], env: dict, health_url: str, log: Path, cwd: Path | None = None) -> subprocess.Popen:
    """Start a server with its output in `log` and wait until `health_url` answers."""
    process = subprocess.Popen(command, env=env, cwd=cwd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        wait_until_up(health_url, process, log)
    except RuntimeError:
        stop(process)
        raise
    return process


@contextmanager
def running(command: list[str], env: dict, health_url: str, log: Path,
            cwd: Path | None = None) -> Iterator[subprocess.Popen]:
    """A server for the duration of a `with` block: started and up, then stopped whatever happens."""
    process = start(command, env, health_url, log, cwd)
    try:
        yield process
    finally:
        stop(process)


class Pair(NamedTuple):
    """The scoring server and the UI in front of it: their URLs and processes."""
    scoring_url: str
    ui_url: str
    scoring: subprocess.Popen
    ui: subprocess.Popen


@contextmanager
def scoring_and_ui(model_uri: str, env: dict, logs: Path, scoring_workers: int = 1, ui_workers: int = 1,
                   scoring_args: tuple[str, ...] = (), plain_mlflow: bool = False) -> Iterator[Pair]:
    """The scoring server on `model_uri` (or MLflow's own, `plain_mlflow`) and the UI in front of it, as
    `make serve-all` runs them; yields both and stops both."""
    port, ui_port = free_port(), free_port()
    scoring_url, ui_url = f"http://{LOOPBACK}:{port}", f"http://{LOOPBACK}:{ui_port}"
    command = (plain_mlflow_command(model_uri, LOOPBACK, port) if plain_mlflow
               else [*scoring_command(model_uri, LOOPBACK, port, scoring_workers), *scoring_args])
    with running(command, env, f"{scoring_url}/ping", logs / "serve.log") as scoring, \
            running(ui_command(LOOPBACK, ui_port, ui_workers), env | {"FMNIST_SCORING_URL": scoring_url},
                    f"{ui_url}/health", logs / "ui.log") as ui:
        yield Pair(scoring_url, ui_url, scoring, ui)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def ui_session(ui_url: str) -> requests.Session:
    """A keep-alive client that loaded the UI's page, as a browser does: it holds the CSRF cookie and sends
    the page's token with its form posts."""
    from webui.app import CSRF_HEADER  # here, not at the top: the scoring side never needs Flask

    session = requests.Session()
    page = session.get(ui_url, timeout=30)
    page.raise_for_status()
    session.headers[CSRF_HEADER] = re.search(r'name="csrf-token" content="([^"]+)"', page.text).group(1)
    return session


def process_tree(pid: int) -> list[int]:
    """A process and all its descendants (uvicorn and gunicorn fork workers, MLflow's helpers), Linux."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        try:
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:  # exited meanwhile
            continue
        found.append(current)
        pending += [int(child) for child in children]
    return found


def command_line(pid: int) -> str:
    """How a process was started ("" once it has exited)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants, Linux."""
    total = 0
    for current in process_tree(pid):
        try:
            status = Path(f"/proc/{current}/status").read_text()
        except OSError:  # exited meanwhile
            continue
        total += next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:"))
    return total
