"""Serve a model over HTTP: MLflow's scoring protocol (/invocations, /ping, /version) with a body limit.

    python -m entrypoints.serve                                # models:/fashion-mnist-cnn/Production
    python -m entrypoints.serve --model-uri export/model --host 0.0.0.0 --workers 2
Same answers as `mlflow models serve -m <uri> --env-manager local`; see fmnist_pyfunc/serving.py for
what it adds. Binds to 127.0.0.1 unless --host says otherwise; loads without unpickling anything.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import mlflow
import uvicorn
from mlflow.exceptions import MlflowException

from fmnist_pyfunc import cli, config, servers, serving
from fmnist_pyfunc.preprocessing import MAX_BODY_BYTES

DEFAULT_HOST = servers.LOOPBACK  # exposing the server is a decision, made with --host
# Each worker holds the model (~10 MB) and uses ~2 threads of inference: one per 2 cores.
DEFAULT_WORKERS = 1


def resolve(model_uri: str) -> str:
    """A local folder for the model: registry and run URIs are downloaded once, before workers start."""
    if Path(model_uri).is_dir():
        return str(Path(model_uri).resolve())
    return mlflow.artifacts.download_artifacts(artifact_uri=model_uri)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-uri", default=config.PRODUCTION_MODEL_URI,
                        help="models:/..., runs:/... or a local model folder (default: %(default)s)")
    parser.add_argument("--host", default=DEFAULT_HOST, help="bind address (default: %(default)s)")
    parser.add_argument("--port", type=int, default=servers.SCORING_PORT, help="(default: %(default)s)")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="processes (default: %(default)s)")
    parser.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES,
                        help="larger request bodies get 413 (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.max_body_bytes < 1 or not 0 < args.port < 65536:
        parser.error("--workers and --max-body-bytes must be positive, --port in 1..65535")
    os.environ.setdefault("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")  # our model needs no pickle
    cli.use_tracking_store()
    try:
        model_path = resolve(args.model_uri)
    except (MlflowException, OSError) as exc:
        parser.error(f"cannot load {args.model_uri} ({str(exc).splitlines()[0]}); "
                     "train and promote a model first: make train promote")
    os.environ.update({serving.MODEL_PATH_ENV: model_path, serving.MAX_BODY_ENV: str(args.max_body_bytes)})
    uvicorn.run("fmnist_pyfunc.serving:app_from_env", factory=True, host=args.host, port=args.port,
                workers=args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
