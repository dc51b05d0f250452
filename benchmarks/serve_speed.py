"""Serving latency and throughput over HTTP on loopback vs. the model's in-process predict.

Starts `mlflow models serve` (one worker) for MODEL_URI and the UI (gunicorn) in front of it, then times
on real test images:
  * single-image requests (p50/p99) for raw pixels and base64 PNG, direct and through the UI;
  * batches of 1, 32, 256 (images/s), raw and PNG;
  * the same inputs through the in-process pyfunc `predict` (the ratio is the serving overhead).

    python benchmarks/serve_speed.py                      # the Production model of MLFLOW_TRACKING_URI
    python benchmarks/serve_speed.py --model-uri models:/fashion-mnist-cnn@champion --requests 500
"""

from __future__ import annotations

import argparse
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
import pandas as pd
import requests
from PIL import Image

from fmnist_pyfunc import data

BIN = Path(sys.executable).parent
BATCH_SIZES = (1, 32, 256)
STARTUP_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], url: str, env: dict) -> subprocess.Popen:
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + STARTUP_TIMEOUT_S
    while time.time() < deadline:
        try:
            if requests.get(url, timeout=2).status_code in (200, 503):
                return process
        except requests.RequestException:
            time.sleep(0.5)
    process.kill()
    raise SystemExit(f"{command[0]} did not start")


def png_b64(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


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
    parser.add_argument("--model-uri", default="models:/fashion-mnist-cnn/Production",
                        help="model to serve (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=300,
                        help="single-image requests per case (default: %(default)s)")
    parser.add_argument("--batch-repeats", type=int, default=10, help="requests per batch size (default: %(default)s)")
    args = parser.parse_args()
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    ds = data.load(download=False)
    images = ds.test_images[:256]
    raw = [{"pixels": img.tolist()} for img in images]
    png = [{"image": png_b64(img)} for img in images]

    port, ui_port = free_port(), free_port()
    server = start([str(BIN / "mlflow"), "models", "serve", "-m", args.model_uri, "--env-manager", "local",
                    "-h", "127.0.0.1", "-p", str(port), "-w", "1"], f"http://127.0.0.1:{port}/ping", env)
    ui = start([str(BIN / "gunicorn"), "-w", "1", "--threads", "4", "-b", f"127.0.0.1:{ui_port}",
                "webui.app:create_app()"], f"http://127.0.0.1:{ui_port}/health",
               dict(env, FMNIST_SCORING_URL=f"http://127.0.0.1:{port}"))
    try:
        session = requests.Session()
        url = f"http://127.0.0.1:{port}/invocations"
        model = mlflow.pyfunc.load_model(args.model_uri)

        def invoke(records):
            response = session.post(url, json={"dataframe_records": records}, timeout=60)
            response.raise_for_status()

        print(f"model {args.model_uri}; 1 scoring worker; {os.cpu_count()} CPU cores")
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
        for process in (ui, server):
            process.terminate()
            process.wait(timeout=20)


if __name__ == "__main__":
    main()
