"""What the prediction log costs a request: the scoring server with the log off, then on (SQLite), in one run.

    python benchmarks/prediction_log.py                   # the Production model of MLFLOW_TRACKING_URI
    python benchmarks/prediction_log.py --tiny            # a throwaway registry with a tiny default-width model

For each: single raw-image requests (p50/p99), batches of 256 raw images (images/s); with the log on, also
how long after the last answer every row was in the store, and how many were dropped. The ratio on/off is
the log's cost on the request path (its writes happen in a thread of the same worker).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
import sqlalchemy as sa
from serve_speed import percentiles, time_calls, tiny_registry

from fmnist_pyfunc import config, data, prediction_log
from fmnist_testkit import harness

BATCH = 256
WRITE_TIMEOUT_S = 60


def _body(images: np.ndarray) -> bytes:
    return json.dumps({"dataframe_records": [{"pixels": image.tolist()} for image in images]}).encode()


def _rows(log_url: str) -> int:
    with prediction_log.connect(log_url).connect() as connection:
        return connection.execute(sa.select(sa.func.count()).select_from(prediction_log.PREDICTIONS)).scalar()


def measure(model_uri: str, log_url: str, ds: data.FashionMNIST, args, env: dict, logs: Path) -> dict:
    port = harness.free_port()
    url = f"http://127.0.0.1:{port}"
    command = [*harness.scoring_command(model_uri, config.LOOPBACK, port), "--prediction-log", log_url]
    single, batch = _body(ds.test_images[:1]), _body(ds.test_images[:BATCH])
    session = requests.Session()
    headers = {"Content-Type": "application/json"}

    def post(body):
        assert session.post(f"{url}/invocations", data=body, headers=headers, timeout=60).status_code == 200

    with harness.running(command, env, f"{url}/ping", logs / f"serve-{port}.log"):
        one = time_calls(lambda: post(single), args.requests)
        many = time_calls(lambda: post(batch), args.batches)
        answered = time.perf_counter()
        result = {"single": one, "batch_img_s": BATCH * len(many) / sum(many)}
        if log_url != config.PREDICTION_LOG_OFF:
            expected = args.requests + 1 + BATCH * (args.batches + 1)  # the warm-up calls are logged too
            while _rows(log_url) < expected and time.perf_counter() - answered < WRITE_TIMEOUT_S:
                time.sleep(0.05)
            result.update(rows=_rows(log_url), expected=expected, written_after_s=time.perf_counter() - answered)
            text = session.get(f"{url}/metrics", timeout=30).text
            result["dropped"] = sum(float(line.split()[-1]) for line in text.splitlines()
                                    if line.startswith("fmnist_prediction_log_dropped_total"))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-uri", default=config.PRODUCTION_MODEL_URI, help="(default: %(default)s)")
    parser.add_argument("--tiny", action="store_true", help="train a tiny default-width model into a throwaway "
                        "registry and serve that (default: off)")
    parser.add_argument("--requests", type=int, default=500, help="single-image requests (default: %(default)s)")
    parser.add_argument("--batches", type=int, default=20, help="requests of 256 images (default: %(default)s)")
    args = parser.parse_args()
    ds = data.load()
    tracking_uri = tiny_registry(ds)[0] if args.tiny else None
    env = harness.child_env(tracking_uri)
    logs = Path(tempfile.mkdtemp(prefix="fmnist-log-bench-"))
    off = measure(args.model_uri, config.PREDICTION_LOG_OFF, ds, args, env, logs)
    on = measure(args.model_uri, f"sqlite:///{logs}/predictions.db", ds, args, env, logs)
    for name, result in (("log off", off), ("log on (SQLite)", on)):
        print(f"{name:16s} one raw image {percentiles(result['single'])}   batch {BATCH}: "
              f"{result['batch_img_s']:7.0f} img/s")
    p50 = np.median(on["single"]) / np.median(off["single"])
    print(f"on/off: single-image p50 x{p50:.2f}, batch throughput x{on['batch_img_s'] / off['batch_img_s']:.2f}; "
          f"{on['rows']:,} of {on['expected']:,} rows in the store {on['written_after_s']:.2f} s after the last "
          f"answer, {on['dropped']:.0f} dropped")


if __name__ == "__main__":
    main()
