"""Test and benchmark harness: the two HTTP servers as child processes (started through their entry points,
as `make serve` and `make ui` do), waiting for them, stopping them, a browser-like UI client, memory.

Used by tests/, benchmarks/ and container/smoke.py (which put this folder on sys.path). Nothing here imports
torch, and the product never imports this.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from fmnist_pyfunc.config import LOOPBACK

BIN = Path(sys.executable).parent
STARTUP_TIMEOUT_S = 180  # a cold start imports torch and MLflow and downloads the model: ~10 s, slow disks more
STOP_TIMEOUT_S = 20      # SIGTERM grace before SIGKILL (docker stop waits 10 s by default)
POLL_S = 0.5


def scoring_command(model_uri: str, host: str, port: int, workers: int = 1) -> list[str]:
    return [str(BIN / "python"), "-m", "entrypoints.serve", "--model-uri", model_uri, "--host", host,
            "--port", str(port), "--workers", str(workers)]


def ui_command(host: str, port: int, workers: int) -> list[str]:
    return [str(BIN / "python"), "-m", "entrypoints.ui", "--host", host, "--port", str(port),
            "--workers", str(workers)]


def child_env(**extra: str) -> dict:
    """This environment with the venv's bin/ first on PATH (MLflow shells out to its tools)."""
    return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


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


def rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants (uvicorn and gunicorn fork workers), Linux."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:  # exited meanwhile
            continue
        total += next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:"))
        pending += [int(child) for child in children]
    return total
