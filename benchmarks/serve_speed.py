"""Serving latency and throughput over HTTP on loopback vs. the model's in-process predict.

Starts the scoring server (one worker, as `make serve`) for MODEL_URI and the UI (gunicorn) in front of it,
then times
on real test images:
  * single-image requests (p50/p99) for raw pixels and base64 PNG, direct and through the UI;
  * batches of 1, 32, 256 (images/s), raw and PNG;
  * the same inputs through the in-process pyfunc `predict` (the ratio is the serving overhead).

    python benchmarks/serve_speed.py                      # the Production model of MLFLOW_TRACKING_URI
    python benchmarks/serve_speed.py --model-uri models:/fashion-mnist-cnn@champion --requests 500
    python benchmarks/serve_speed.py --plain-mlflow       # baseline: `mlflow models serve`, without the guards
"""

from __future__ import annotations

import argparse
import base64
import os
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from fmnist_pyfunc import config, data, preprocessing, servers

BATCH_SIZES = (1, 32, 256)


def percentiles(samples: list[float]) -> str:
    ms = np.array(samples) * 1000
    return f"p50 {np.percentile(ms, 50):6.2f} ms  p99 {np.percentile(ms, 99):6.2f} ms"


def time_calls(call, n: int) -> list[float]:
    call()  # warm-up
    times = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-uri", default=config.PRODUCTION_MODEL_URI,
                        help="model to serve (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=300,
                        help="single-image requests per case (default: %(default)s)")
    parser.add_argument("--batch-repeats", type=int, default=10, help="requests per batch size (default: %(default)s)")
    parser.add_argument("--plain-mlflow", action="store_true",
                        help="serve with plain `mlflow models serve` instead of entrypoints.serve (default: off)")
    args = parser.parse_args()
    ds = data.load(download=False)
    images = ds.test_images[:256]
    raw = [{"pixels": img.tolist()} for img in images]
    png = [{"image": preprocessing.png_base64(img)} for img in images]

    port, ui_port = servers.free_port(), servers.free_port()
    logs = Path(tempfile.mkdtemp(prefix="fmnist-serve-speed-"))
    scoring = servers.scoring_command(args.model_uri, servers.LOOPBACK, port)
    if args.plain_mlflow:
        scoring = ["mlflow", "models", "serve", "-m", args.model_uri, "--env-manager", "local",
                   "-h", servers.LOOPBACK, "-p", str(port)]
    server = servers.start(scoring, servers.child_env(), f"http://127.0.0.1:{port}/ping", logs / "serve.log")
    ui = servers.start(servers.ui_command(servers.LOOPBACK, ui_port, workers=1),
                       servers.child_env(FMNIST_SCORING_URL=f"http://127.0.0.1:{port}"),
                       f"http://127.0.0.1:{ui_port}/health", logs / "ui.log")
    try:
        session = servers.ui_session(f"http://127.0.0.1:{ui_port}")  # as a browser: with the CSRF token
        url = f"http://127.0.0.1:{port}/invocations"
        model = mlflow.pyfunc.load_model(args.model_uri)

        def invoke(records):
            response = session.post(url, json={"dataframe_records": records}, timeout=60)
            response.raise_for_status()

        print(f"model {args.model_uri}; {'mlflow models serve' if args.plain_mlflow else 'entrypoints.serve'}, "
              f"1 worker; {os.cpu_count()} CPU cores")
        png_bytes = base64.b64decode(png[0]["image"])
        for name, records in (("raw pixels", raw), ("base64 PNG", png)):
            http = time_calls(lambda r=records: invoke(r[:1]), args.requests)
            local = time_calls(lambda r=records: model.predict(pd.DataFrame(r[:1])), args.requests)
            print(f"single {name:10s}  HTTP {percentiles(http)} | in-process {percentiles(local)} | "
                  f"overhead x{np.median(http) / np.median(local):.1f}")
        ui_times = time_calls(lambda: session.post(f"http://127.0.0.1:{ui_port}/predict", timeout=60,
                                                   files=[("files", ("a.png", png_bytes, "image/png"))]),
                              args.requests)
        direct = time_calls(lambda: invoke(png[:1]), args.requests)
        added_ms = 1000 * (np.median(ui_times) - np.median(direct))
        print(f"single PNG via UI   {percentiles(ui_times)} | UI adds {added_ms:.2f} ms p50")
        for name, records in (("raw pixels", raw), ("base64 PNG", png)):
            for batch in BATCH_SIZES:
                http = time_calls(lambda r=records, b=batch: invoke(r[:b]), args.batch_repeats)
                local = time_calls(lambda r=records, b=batch: model.predict(pd.DataFrame(r[:b])), args.batch_repeats)
                print(f"batch {batch:3d} {name:10s}  HTTP {batch / np.median(http):8.0f} img/s | in-process "
                      f"{batch / np.median(local):8.0f} img/s | overhead x{np.median(http) / np.median(local):.1f}")
    finally:
        servers.stop(ui)
        servers.stop(server)


if __name__ == "__main__":
    main()
