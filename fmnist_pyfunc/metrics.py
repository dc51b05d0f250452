"""Prometheus metrics of both servers, correct across worker processes.

uvicorn and gunicorn fork or spawn several workers; each keeps its own counters. The entry points
(`entrypoints/serve.py`, `entrypoints/ui.py`) give every server a fresh PROMETHEUS_MULTIPROC_DIR before any
worker imports prometheus_client, so each worker writes its values there and `/metrics`, whichever worker
answers, sums them all. Without that variable (an app built in-process) the values are this process's.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# From a single image (milliseconds) through a full batch (a large fraction of a second) to a slow upstream at
# the UI's 10 s timeout.
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
OTHER_ROUTE = "other"  # unknown paths share one label: a scanner must not create one time series per URL

REQUESTS = Counter("fmnist_http_requests", "HTTP requests answered", ["server", "route", "status"])
LATENCY = Histogram("fmnist_http_request_seconds", "Time from request to the end of the answer",
                    ["server", "route"], buckets=LATENCY_BUCKETS_S)
REQUEST_BYTES = Counter("fmnist_http_request_bytes", "Request body bytes received", ["server", "route"])
IMAGES = Counter("fmnist_images_scored", "Rows scored, by input kind (pixels, image)", ["kind"])
PREDICTED = Counter("fmnist_predicted_class", "Predictions, by predicted class", ["class_name"])
# Answers whose picture did not look like clothing (in_distribution false); models without the detector add none.
OUT_OF_DISTRIBUTION = Counter("fmnist_out_of_distribution", "Predictions flagged as not looking like clothing")
# 1 for the version a worker serves now, 0 for those it served before; "liveall": one series per live worker.
MODEL = Gauge("fmnist_model_info", "The model version a scoring worker serves", ["name", "version", "run_id"],
              multiprocess_mode="liveall")
LOG_WRITTEN = Counter("fmnist_prediction_log_written", "Predictions written to the prediction log")
# Rows the log could not take (queue full: the store is slow or down) or could not write: requests never fail for it.
LOG_DROPPED = Counter("fmnist_prediction_log_dropped", "Predictions not logged: queue full or store unavailable")
# Rows per forward pass of the scoring worker's model (batching.py): 1 when idle, growing under load.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)  # up to contract.MAX_BATCH_ROWS
BATCH_ROWS = Histogram("fmnist_batch_rows", "Rows scored by one forward pass", buckets=BATCH_BUCKETS)
# Rows waiting for the model, summed over the live workers.
QUEUED_ROWS = Gauge("fmnist_queued_rows", "Rows waiting for a forward pass", multiprocess_mode="livesum")
RELOADS = Counter("fmnist_model_reloads", "New model versions loaded and swapped in")
RELOAD_FAILURES = Counter("fmnist_model_reload_failures", "New versions refused (download, load or self-check failed)")


def route_label(path: str, routes: frozenset[str]) -> str:
    return path if path in routes else OTHER_ROUTE


def exposition() -> tuple[bytes, str]:
    """The text format of every worker's values, and its content type."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return generate_latest(registry), CONTENT_TYPE_LATEST
