"""The image's entrypoint: the scoring server on the exported model and the UI beside it, one process tree.

    python -m entrypoints.container --export export --host 0.0.0.0
Starts the scoring server (`entrypoints.serve`, scoring port) and gunicorn (UI port); SIGTERM or SIGINT
stops both; if either exits, the other is stopped and the exit code is non-zero, so the container's restart
policy takes over.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fmnist_pyfunc import config
from fmnist_pyfunc.export import EXPORT_MODEL_DIR

POLL_S = 0.5
CONTAINER_PREDICTION_LOG = "sqlite:////tmp/predictions.db"
STOP_TIMEOUT_S = 20   # SIGTERM grace per child before SIGKILL (docker stop waits 10 s, then kills us anyway)


def _stop(child: subprocess.Popen) -> None:
    try:
        child.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", type=Path, default=Path("export"), help="exported folder (default: %(default)s)")
    parser.add_argument("--host", default=config.LOOPBACK,
                        help="bind address; 0.0.0.0 in a container (default: %(default)s)")
    parser.add_argument("--scoring-port", type=int, default=config.SCORING_PORT,
                        help="scoring server port (default: %(default)s)")
    parser.add_argument("--ui-port", type=int, default=config.UI_PORT, help="web UI port (default: %(default)s)")
    parser.add_argument("--ui-workers", type=int, default=2, help="gunicorn workers (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    cli = parser()
    args = cli.parse_args(argv)
    if not (args.export / EXPORT_MODEL_DIR / "MLmodel").is_file():
        cli.error(f"{args.export / EXPORT_MODEL_DIR} holds no MLflow model: run `make export` first")
    env = dict(os.environ, MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false",
               FMNIST_SCORING_URL=f"http://{config.LOOPBACK}:{args.scoring_port}")
    # The root is read-only: the prediction log goes to /tmp unless the user points it at a volume or a database.
    env.setdefault(config.PREDICTION_LOG_ENV, CONTAINER_PREDICTION_LOG)
    python = [sys.executable, "-m"]
    commands = [python + ["entrypoints.serve", "--model-uri", str(args.export / EXPORT_MODEL_DIR),
                          "--host", args.host, "--port", str(args.scoring_port)],
                python + ["entrypoints.ui", "--host", args.host, "--port", str(args.ui_port),
                          "--workers", str(args.ui_workers)]]
    children = [subprocess.Popen(command, env=env) for command in commands]
    stopping = False

    def stop(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"scoring server http://{args.host}:{args.scoring_port}/invocations  web UI http://{args.host}:{args.ui_port}/",
          flush=True)
    while not stopping and all(child.poll() is None for child in children):
        time.sleep(POLL_S)
    for child in children:
        if child.poll() is None:
            child.terminate()
    for child in children:
        _stop(child)
    return 0 if stopping else 1


if __name__ == "__main__":
    sys.exit(main())
