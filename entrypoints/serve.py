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
import socket
import sys
import tempfile
from pathlib import Path

import uvicorn
from mlflow.exceptions import MlflowException
from uvicorn.main import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from fmnist_pyfunc import cli, config
from fmnist_pyfunc.contract import MAX_BATCH_ROWS
from fmnist_pyfunc.transport import MAX_BODY_BYTES

DEFAULT_HOST = config.LOOPBACK  # exposing the server is a decision, made with --host
# Each worker holds the model (~10 MB) and uses ~2 threads of inference: one per 2 cores.
DEFAULT_WORKERS = 1
# Compiled, not uvicorn's pure-Python fallbacks (h11, asyncio's loop): a request's HTTP handling was ~15 % of the
# event loop's time, and 64 concurrent clients got ~1.3x the answers per second with these (docs/serving.md).
HTTP_PARSER, EVENT_LOOP = "httptools", "uvloop"


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
    parser.add_argument("--prediction-log", default=None,
                        help="where to log what is served: a SQLAlchemy URL, or 'off' (default: "
                             f"${config.PREDICTION_LOG_ENV}, else {config.PREDICTION_LOG_FILE} beside a SQLite "
                             "tracking store, or a PostgreSQL tracking store's database)")
    parser.add_argument("--log-sample-rate", type=float, default=config.LOG_SAMPLE_RATE,
                        help="share of requests logged, 0-1 (default: %(default)s)")
    parser.add_argument("--log-max-rows", type=int, default=config.LOG_MAX_ROWS,
                        help="keep at most this many predictions (default: %(default)s)")
    parser.add_argument("--log-max-days", type=float, default=config.LOG_MAX_DAYS,
                        help="and none older than this (default: %(default)s); those with feedback are kept")
    parser.add_argument("--batch-max-rows", type=int, default=config.BATCH_MAX_ROWS,
                        help="rows one forward pass may gather from concurrent requests; 0: no batching, each "
                             f"request its own (default: %(default)s, at most {MAX_BATCH_ROWS})")
    parser.add_argument("--batch-max-wait-ms", type=float, default=config.BATCH_MAX_WAIT_S * 1000,
                        help="how long a forward pass waits for requests still being parsed; an idle server never "
                             "waits (default: %(default)s)")
    parser.add_argument("--max-queued-rows", type=int, default=config.MAX_QUEUED_ROWS,
                        help="rows a worker accepts before answering 429 (default: %(default)s)")
    args = parser.parse_args(argv)
    if not 0 <= args.log_sample_rate <= 1 or args.log_max_rows < 1 or args.log_max_days <= 0:
        parser.error("--log-sample-rate must be in 0..1, --log-max-rows and --log-max-days positive")
    if not 0 <= args.batch_max_rows <= MAX_BATCH_ROWS or args.batch_max_wait_ms < 0 or args.max_queued_rows < 1:
        parser.error(f"--batch-max-rows must be in 0..{MAX_BATCH_ROWS}, --batch-max-wait-ms >= 0, "
                     "--max-queued-rows positive")
    if args.workers < 1 or args.max_body_bytes < 1 or not 0 < args.port < 65536 or args.follow_interval_s < 0:
        parser.error("--workers and --max-body-bytes must be positive, --port in 1..65535, "
                     "--follow-interval-s >= 0")
    os.environ.setdefault("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")  # our model needs no pickle
    # This server's own state: every worker writes its metrics in metrics/ (set before prometheus_client is
    # first imported, by the two modules below) and watches the file `reload`.
    state = Path(tempfile.mkdtemp(prefix="fmnist-serve-"))
    (state / "metrics").mkdir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(state / "metrics")
    from fmnist_pyfunc import live_model, prediction_log, scoring

    cli.use_tracking_store()
    try:
        model_path, version = live_model.download_initial(args.model_uri)
    except (MlflowException, OSError, LookupError) as exc:
        parser.error(f"cannot load {args.model_uri} ({str(exc).splitlines()[0]}); "
                     "train and promote a model first: make train promote")
    log_url = args.prediction_log or prediction_log.default_url()
    os.environ.update(scoring.Settings(args.model_uri, model_path, version, args.follow_interval_s,
                                       str(state / "reload"), args.max_body_bytes, log_url, args.log_sample_rate,
                                       args.log_max_rows, args.log_max_days, args.batch_max_rows,
                                       args.batch_max_wait_ms / 1000, args.max_queued_rows).to_env())
    if log_url != config.PREDICTION_LOG_OFF:
        print(f"prediction log: {prediction_log.redacted(log_url)} (sample rate {args.log_sample_rate:g})", flush=True)
    try:
        run_uvicorn(uvicorn.Config("fmnist_pyfunc.scoring:app_from_env", factory=True, host=args.host,
                                   port=args.port, workers=args.workers, http=HTTP_PARSER, loop=EVENT_LOOP))
    finally:
        shutil.rmtree(state, ignore_errors=True)
    return 0


def run_uvicorn(config: uvicorn.Config) -> None:
    """`uvicorn.run` for this config. With several workers uvicorn binds a socket of protocol 0, on whose
    connections asyncio does not set TCP_NODELAY: an answer's headers and body then go as two packets, the
    second held until the client's delayed ACK, and every request took ~50 ms (measured: 52 ms p50 for one
    image with 2 workers, ~10 ms with 1). Set on the listening socket, Linux passes it to every connection."""
    if config.workers == 1:
        server = uvicorn.Server(config)
        server.run()
        if not server.started:  # e.g. the port is taken: uvicorn has said why
            sys.exit(STARTUP_FAILURE)
        return
    sock = config.bind_socket()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    Multiprocess(config, sockets=[sock]).run()


if __name__ == "__main__":
    sys.exit(main())
