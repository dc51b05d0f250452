"""Serving latency and throughput over HTTP on loopback vs. the model's in-process predict.

Starts the scoring server (one worker, as `make serve`; --workers N) for MODEL_URI and the UI (gunicorn) in
front of it, then times on real test images, each HTTP case taking turns with the same input through the
in-process pyfunc `predict` (the ratio is the serving overhead; bodies are encoded once, as a client that
keeps them would):
  * single-image requests (p50/p99) for raw pixels and base64 PNG, direct and through the UI;
  * batches of 1, 32, 256 (images/s) as JSON, raw pixels and PNG; 256 raw pixels through the Open Inference
    Protocol as binary tensor data (V2 UINT8 [256, 28, 28], binary outputs);
  * 16 and 64 concurrent single-image clients sending 256 requests in all, with adaptive batching on and off
    (a server each): throughput, p50/p99 latency, statuses.

    python benchmarks/serve_speed.py                      # the Production model of MLFLOW_TRACKING_URI
    python benchmarks/serve_speed.py --model-uri models:/fashion-mnist-cnn@champion --requests 500
    python benchmarks/serve_speed.py --plain-mlflow       # baseline: `mlflow models serve`, without the guards
    python benchmarks/serve_speed.py --swap               # single-image latency while promotions are followed

--swap trains two tiny versions into a throwaway registry, then times single raw-image requests, in one run:
plain `mlflow models serve` (the baseline), entrypoints.serve in steady state (default follow interval), and
entrypoints.serve while Production flips between the two versions every --swap-every-s seconds (each flip
followed at once through POST /reload).
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import requests

from fmnist_pyfunc import config, contract, data
from fmnist_testkit import harness

BATCH_SIZES = (1, 32, 256)
TINY = {"epochs": 1, "max_train_samples": 2000, "width": 32, "val_size": 500}  # the default width: real latency


def percentiles(samples: list[float]) -> str:
    ms = np.array(samples) * 1000
    return f"p50 {np.percentile(ms, 50):6.2f} ms  p99 {np.percentile(ms, 99):6.2f} ms"


def time_calls(call, n: int) -> list[float]:
    return time_interleaved({"call": call}, n)["call"]


def time_interleaved(calls: dict, n: int) -> dict[str, list[float]]:
    """Each call `n` times, taking turns (a, b, a, b, ...): on a shared 2-core machine whose speed drifts
    by tens of percent from one minute to the next, a ratio of two blocks timed one after the other measures
    the drift; interleaved, both see the same machine."""
    for call in calls.values():
        call()  # warm-up
    times = {name: [] for name in calls}
    for _ in range(n):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return times


def tiny_registry(ds: data.FashionMNIST) -> tuple[str, list[str]]:
    """A throwaway tracking store with two registered versions of the model, the first in Production."""
    from fmnist_pyfunc import tracking

    uri = f"sqlite:///{tempfile.mkdtemp(prefix='fmnist-swap-')}/mlflow.db"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    versions = []
    for seed in (0, 1):
        run_id = tracking.run_training(config.validate({**TINY, "seed": seed}), ds, progress=False)
        model_uri = mlflow.get_run(run_id).data.tags[config.MODEL_URI_TAG]
        versions.append(str(mlflow.register_model(model_uri, config.REGISTERED_MODEL_NAME).version))
    promote_version(versions[0])
    return uri, versions


def promote_version(version: str) -> None:
    from fmnist_pyfunc import registry

    registry.crown(version)


def swap_benchmark(args, ds: data.FashionMNIST) -> None:
    uri, versions = tiny_registry(ds)
    body = {"dataframe_records": [{"pixels": ds.test_images[0].tolist()}]}
    logs = Path(tempfile.mkdtemp(prefix="fmnist-swap-logs-"))
    print(f"{os.cpu_count()} CPU cores; single raw image, {args.requests} requests per phase; tiny width-32 model")
    results, swaps = {}, 0
    phases = [("plain mlflow models serve", None), ("entrypoints.serve, steady", None)]
    if args.baseline_checkout:
        phases.insert(1, (f"entrypoints.serve of {args.baseline_checkout.name}", args.baseline_checkout))
    for name, checkout in phases:
        port = harness.free_port()
        env = harness.child_env(uri)
        command = (harness.plain_mlflow_command if name.startswith("plain") else harness.scoring_command)(
            config.PRODUCTION_MODEL_URI, config.LOOPBACK, port)
        if checkout:  # an older checkout's server, e.g. `git worktree add /tmp/before <commit>`
            env["PYTHONPATH"] = str(checkout)
        with harness.running(command, env, f"http://127.0.0.1:{port}/ping", logs / f"{port}.log", cwd=checkout):
            session, url = requests.Session(), f"http://127.0.0.1:{port}/invocations"
            results[name] = time_calls(lambda s=session, u=url: s.post(u, json=body, timeout=60).raise_for_status(),
                                       args.requests)
            if name == "entrypoints.serve, steady":
                results["entrypoints.serve, during swaps"], swaps = during_swaps(session, url, body, versions, args)
    baseline = np.median(results["plain mlflow models serve"])
    for name, samples in results.items():
        print(f"{name:32s} {percentiles(samples)} | p50 x{np.median(samples) / baseline:.2f} of plain MLflow")
    print(f"the client saw the served version switch {swaps} times during the last phase; every request got 200")


def during_swaps(session, url: str, body: dict, versions: list[str], args) -> tuple[list[float], int]:
    """Time requests while Production flips every --swap-every-s, each flip followed at once (POST /reload,
    as an operator does after promoting; the server's own check runs every 10 s); every answer must
    succeed. Returns the times and how many switches of X-Model-Version the client saw."""
    times, answered, target = [], [], 1
    next_swap, promotions = time.perf_counter(), 0
    while len(times) < args.requests or promotions < 2:
        if time.perf_counter() >= next_swap:
            promote_version(versions[target])
            requests.post(url.replace("/invocations", "/reload"), timeout=60).raise_for_status()
            target, promotions, next_swap = 1 - target, promotions + 1, time.perf_counter() + args.swap_every_s
        start = time.perf_counter()
        response = session.post(url, json=body, timeout=60)
        times.append(time.perf_counter() - start)
        response.raise_for_status()
        answered.append(response.headers["X-Model-Version"])
    return times, sum(a != b for a, b in zip(answered, answered[1:], strict=False))


def v2_binary_body(images: np.ndarray) -> tuple[bytes, dict]:
    """An Open Inference Protocol request of UINT8 pixels [N, 28, 28] as binary tensor data, and its headers."""
    header = json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": list(images.shape),
                                     "parameters": {"binary_data_size": images.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    return header + images.tobytes(), {"Inference-Header-Content-Length": str(len(header)),
                                       "Content-Type": "application/octet-stream"}


def concurrent_clients(url: str, body: bytes, headers: dict, clients: int, total: int) -> dict:
    """`clients` threads, each with its own keep-alive connection, send `total` single-image requests in all."""
    statuses, latencies = collections.Counter(), []
    lock = threading.Lock()

    def client(n: int) -> None:
        session = requests.Session()
        for _ in range(n):
            start = time.perf_counter()
            status = session.post(url, data=body, headers=headers, timeout=60).status_code
            with lock:
                statuses[status] += 1
                latencies.append(time.perf_counter() - start)

    shares = [total // clients + (i < total % clients) for i in range(clients)]
    threads = [threading.Thread(target=client, args=(n,)) for n in shares]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"seconds": time.perf_counter() - start, "statuses": dict(statuses), "latencies": latencies}


def concurrency_benchmark(args, images: np.ndarray, logs: Path) -> None:
    """64 (and 16) concurrent single-image clients, with adaptive batching on and off."""
    body = json.dumps({"dataframe_records": [{"pixels": images[0].tolist()}]}).encode()
    json_headers = {"Content-Type": "application/json"}
    for label, extra in (("batching on", ()), ("batching off", ("--batch-max-rows", "0"))):
        (logs / label.replace(" ", "-")).mkdir()
        log = ("--prediction-log", "off") if args.log_off else ()
        with harness.scoring_and_ui(args.model_uri, harness.child_env(), logs / label.replace(" ", "-"),
                                    scoring_workers=args.workers, scoring_args=(*extra, *log)) as pair:
            url = f"{pair.scoring_url}/invocations"
            concurrent_clients(url, body, json_headers, 4, 16)  # warm-up
            for clients in (16, 64):
                result = concurrent_clients(url, body, json_headers, clients, args.concurrent_requests)
                print(f"{clients:2d} clients, {args.concurrent_requests} single-image requests, {label:12s}: "
                      f"{result['seconds']:5.2f} s = {args.concurrent_requests / result['seconds']:6.1f} req/s | "
                      f"{percentiles(result['latencies'])} | statuses {result['statuses']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-uri", default=config.PRODUCTION_MODEL_URI,
                        help="model to serve (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=300,
                        help="single-image requests per case (default: %(default)s)")
    parser.add_argument("--batch-repeats", type=int, default=20, help="requests per batch size (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=1,
                        help="scoring server workers, as `make serve` (default: %(default)s)")
    parser.add_argument("--concurrent-requests", type=int, default=256,
                        help="single-image requests in the concurrency phase (default: %(default)s)")
    parser.add_argument("--log-off", action="store_true",
                        help="serve with --prediction-log off: its writer thread shares the cores (~10 ms of "
                             "SQLite per 256 rows) (default: off, the log on as `make serve` runs it)")
    parser.add_argument("--skip-concurrency", action="store_true",
                        help="skip the concurrent clients phase, batching on and off (default: off)")
    parser.add_argument("--plain-mlflow", action="store_true",
                        help="serve with plain `mlflow models serve` instead of entrypoints.serve (default: off)")
    parser.add_argument("--swap", action="store_true",
                        help="latency while the server follows promotions, against steady state (default: off)")
    parser.add_argument("--swap-every-s", type=float, default=1.0,
                        help="--swap: seconds between promotions (default: %(default)s)")
    parser.add_argument("--baseline-checkout", type=Path,
                        help="--swap: also time the scoring server of this older checkout (default: none)")
    args = parser.parse_args()
    ds = data.load(download=False)
    if args.swap:
        return swap_benchmark(args, ds)
    images = ds.test_images[:256]
    raw = [{"pixels": img.tolist()} for img in images]
    png = [{"image": contract.png_base64(img)} for img in images]

    logs = Path(tempfile.mkdtemp(prefix="fmnist-serve-speed-"))
    extra = ("--prediction-log", "off") if args.log_off else ()
    with harness.scoring_and_ui(args.model_uri, harness.child_env(), logs, scoring_workers=args.workers,
                                scoring_args=extra, plain_mlflow=args.plain_mlflow) as pair:
        session = harness.ui_session(pair.ui_url)  # as a browser: with the CSRF token
        url = f"{pair.scoring_url}/invocations"
        model = mlflow.pyfunc.load_model(args.model_uri)

        # Bodies encoded once, before any timing: encoding them is the client's cost, not the server's.
        encoded = {(name, batch): json.dumps({"dataframe_records": records[:batch]}).encode()
                   for name, records in (("raw pixels", raw), ("base64 PNG", png)) for batch in BATCH_SIZES}

        def invoke(name: str, batch: int):
            session.post(url, data=encoded[name, batch], headers={"Content-Type": "application/json"},
                         timeout=60).raise_for_status()

        print(f"model {args.model_uri}; {'mlflow models serve' if args.plain_mlflow else 'entrypoints.serve'}, "
              f"{args.workers} worker(s), prediction log {'off' if args.log_off else 'on'}; {os.cpu_count()} CPU "
              f"cores; {cpu_name()}")
        png_bytes = base64.b64decode(png[0]["image"])
        for name, records in (("raw pixels", raw), ("base64 PNG", png)):
            times = time_interleaved({"http": lambda n=name: invoke(n, 1),
                                      "local": lambda r=records: model.predict(pd.DataFrame(r[:1]))}, args.requests)
            print(f"single {name:10s}  HTTP {percentiles(times['http'])} | in-process {percentiles(times['local'])} | "
                  f"HTTP p50 x{np.median(times['http']) / np.median(times['local']):.1f} of in-process")
        times = time_interleaved({"ui": lambda: session.post(f"{pair.ui_url}/predict", timeout=60,
                                                             files=[("files", ("a.png", png_bytes, "image/png"))]),
                                  "direct": lambda: invoke("base64 PNG", 1)}, args.requests)
        added_ms = 1000 * (np.median(times["ui"]) - np.median(times["direct"]))
        print(f"single PNG via UI   {percentiles(times['ui'])} | UI adds {added_ms:.2f} ms p50")
        for name, records in (("raw pixels", raw), ("base64 PNG", png)):
            for batch in BATCH_SIZES:
                times = time_interleaved({"http": lambda n=name, b=batch: invoke(n, b),
                                          "local": lambda r=records, b=batch: model.predict(pd.DataFrame(r[:b]))},
                                         args.batch_repeats)
                report_batch(f"batch {batch:3d} {name:10s}", batch, times)
        if not args.plain_mlflow:
            body, headers = v2_binary_body(images)
            infer = f"{pair.scoring_url}/v2/models/{config.REGISTERED_MODEL_NAME}/infer"
            times = time_interleaved({
                "http": lambda: session.post(infer, data=body, headers=headers, timeout=60).raise_for_status(),
                "local": lambda: model.predict(pd.DataFrame({"pixels": list(images)}))}, args.batch_repeats)
            report_batch("batch 256 V2 binary", 256, times)
    if not args.plain_mlflow and not args.skip_concurrency:
        concurrency_benchmark(args, images, logs)


def report_batch(label: str, batch: int, times: dict[str, list[float]]) -> None:
    http, local = np.median(times["http"]), np.median(times["local"])
    print(f"{label}  HTTP {batch / http:8.0f} img/s | in-process {batch / local:8.0f} img/s | "
          f"HTTP/in-process x{local / http:.2f}")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"

if __name__ == "__main__":
    main()
