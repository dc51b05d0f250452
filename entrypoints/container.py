"""The image's entrypoint: the scoring server on the exported model and the UI beside it, one process tree.

    python -m entrypoints.container --export export --host 0.0.0.0
Starts `mlflow models serve` (scoring port) and gunicorn (UI port); SIGTERM or SIGINT stops both; if either
exits, the other is stopped and the exit code is non-zero, so the container's restart policy takes over.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fmnist_pyfunc.registry import EXPORT_INFO_FILE, EXPORT_MODEL_DIR

BIN = Path(sys.executable).parent
STOP_TIMEOUT_S = 20  # SIGTERM grace per child before SIGKILL (docker stop waits 10 s by default: plenty)
POLL_S = 0.5


def commands(export: Path, host: str, scoring_port: int, ui_port: int, ui_workers: int) -> list[list[str]]:
    return [
        [str(BIN / "mlflow"), "models", "serve", "-m", str(export / EXPORT_MODEL_DIR), "--env-manager", "local",
         "-h", host, "-p", str(scoring_port)],
        [str(BIN / "gunicorn"), "--workers", str(ui_workers), "--threads", "4", "--bind", f"{host}:{ui_port}",
         "webui.app:create_app()"],
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", type=Path, default=Path("export"), help="exported folder (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="bind address; 0.0.0.0 in a container (default: %(default)s)")
    parser.add_argument("--scoring-port", type=int, default=8000, help="scoring server port (default: %(default)s)")
    parser.add_argument("--ui-port", type=int, default=8080, help="web UI port (default: %(default)s)")
    parser.add_argument("--ui-workers", type=int, default=2, help="gunicorn workers (default: %(default)s)")
    args = parser.parse_args(argv)
    if not (args.export / EXPORT_MODEL_DIR / "MLmodel").is_file():
        parser.error(f"{args.export / EXPORT_MODEL_DIR} holds no MLflow model: run `make export` first")
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false",
               FMNIST_SCORING_URL=f"http://127.0.0.1:{args.scoring_port}",
               FMNIST_MODEL_INFO=str((args.export / EXPORT_INFO_FILE).resolve()))
    children = [subprocess.Popen(cmd, env=env) for cmd in commands(args.export, args.host, args.scoring_port,
                                                                    args.ui_port, args.ui_workers)]
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
        try:
            child.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            child.kill()
    return 0 if stopping else 1


if __name__ == "__main__":
    sys.exit(main())
