"""Serve a model over HTTP: MLflow's scoring protocol (/invocations, /ping, /version), following the registry.

    python -m entrypoints.serve                                # models:/fashion-mnist-cnn/Production
    python -m entrypoints.serve --model-uri models:/fashion-mnist-cnn@champion --workers 2
    python -m entrypoints.serve --model-uri export/model --host 0.0.0.0
Same answers as `mlflow models serve -m <uri> --env-manager local`; in addition (fmnist_pyfunc/scoring.py)
a registry reference is followed (a promotion is served within --follow-interval-s, no restart), every
answer names its model (X-Model-* headers), GET /model, /health and /metrics, POST /reload from this
machine, a body limit and clean error answers. Binds to 127.0.0.1 unless --host says otherwise; loads
without unpickling anything.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import uvicorn
from mlflow.exceptions import MlflowException

from fmnist_pyfunc import cli, config
from fmnist_pyfunc.transport import MAX_BODY_BYTES

DEFAULT_HOST = config.LOOPBACK  # exposing the server is a decision, made with --host
# Each worker holds the model (~10 MB) and uses ~2 threads of inference: one per 2 cores.
DEFAULT_WORKERS = 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-uri", default=config.PRODUCTION_MODEL_URI,
                        help="models:/..., runs:/... or a local model folder (default: %(default)s)")
    parser.add_argument("--host", default=DEFAULT_HOST, help="bind address (default: %(default)s)")
    parser.add_argument("--port", type=int, default=config.SCORING_PORT, help="(default: %(default)s)")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="processes (default: %(default)s)")
    parser.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES,
                        help="larger request bodies get 413 (default: %(default)s)")
    parser.add_argument("--follow-interval-s", type=float, default=config.FOLLOW_INTERVAL_S,
                        help="re-resolve a models:/NAME/STAGE or @ALIAS URI this often; 0: never, only on "
                             "POST /reload (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.max_body_bytes < 1 or not 0 < args.port < 65536 or args.follow_interval_s < 0:
        parser.error("--workers and --max-body-bytes must be positive, --port in 1..65535, "
                     "--follow-interval-s >= 0")
    os.environ.setdefault("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")  # our model needs no pickle
    # This server's own state: every worker writes its metrics in metrics/ (set before prometheus_client is
    # first imported, by the two modules below) and watches the file `reload`.
    state = Path(tempfile.mkdtemp(prefix="fmnist-serve-"))
    (state / "metrics").mkdir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(state / "metrics")
    from fmnist_pyfunc import live_model, scoring

    cli.use_tracking_store()
    try:
        model_path, version = live_model.download_initial(args.model_uri)
    except (MlflowException, OSError, LookupError) as exc:
        parser.error(f"cannot load {args.model_uri} ({str(exc).splitlines()[0]}); "
                     "train and promote a model first: make train promote")
    os.environ.update(scoring.Settings(args.model_uri, model_path, version, args.follow_interval_s,
                                       str(state / "reload"), args.max_body_bytes).to_env())
    try:
        uvicorn.run("fmnist_pyfunc.scoring:app_from_env", factory=True, host=args.host, port=args.port,
                    workers=args.workers)
    finally:
        shutil.rmtree(state, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
