"""Serve the upload UI with gunicorn; every prediction is proxied to the scoring server.

    python -m entrypoints.ui                                   # http://127.0.0.1:8000/ (make ui)
    python -m entrypoints.ui --host 0.0.0.0 --workers 4
The scoring server's URL comes from FMNIST_SCORING_URL (default http://127.0.0.1:5001).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from fmnist_pyfunc.config import LOOPBACK, UI_PORT

DEFAULT_WORKERS = 2   # requests mostly wait on the scoring server: few processes...
THREADS = 4           # ...each with a few threads
# On SIGTERM a worker finishes its requests, but also waits for idle keep-alive connections (a browser's)
# until this runs out; then gunicorn kills it. Under `docker stop`'s 10 s, so that the master, and with it
# the container, ends on SIGTERM however many browsers are connected.
GRACEFUL_TIMEOUT_S = 8
APP = "webui.app:create_app()"


def gunicorn_argv(host: str, port: int, workers: int) -> list[str]:
    gunicorn = str(Path(sys.executable).parent / "gunicorn")
    return [gunicorn, "--workers", str(workers), "--threads", str(THREADS), "--graceful-timeout",
            str(GRACEFUL_TIMEOUT_S), "--bind", f"{host}:{port}", APP]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=LOOPBACK, help="bind address (default: %(default)s)")
    parser.add_argument("--port", type=int, default=UI_PORT, help="(default: %(default)s)")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="processes (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.workers < 1 or not 0 < args.port < 65536:
        parser.error("--workers must be positive, --port in 1..65535")
    command = gunicorn_argv(args.host, args.port, args.workers)
    # Each worker writes its metrics here (fmnist_pyfunc/metrics.py); a fresh folder per server start.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="fmnist-ui-metrics-")
    os.execv(command[0], command)  # gunicorn takes this process over: signals reach it directly


if __name__ == "__main__":
    sys.exit(main())
