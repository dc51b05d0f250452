"""The scoring server: MLflow's own `/invocations` app (what `mlflow models serve` runs) on a live model, guarded.

MLflow's app serves one model for the life of the process, reads any request body whole into memory and,
on some errors, answers with the whole body echoed back or a Python stack trace. Around it:
  * `ScoringApp` serves whatever `LiveModel` holds now (it follows the registry, see live_model.py), adds
    X-Model-Name / X-Model-Version / X-Model-Run-Id to every answer, and answers GET /model (what is
    served), GET /health (ok or degraded, and why), GET /metrics (Prometheus) and POST /reload (loopback
    only: check the registry now);
  * `BodyLimit` answers 413 before reading more than MAX_BODY_BYTES; `WellFormed` answers 415 or 400 to
    what MLflow's app would answer with a 500 (no Content-Type, JSON nested too deep);
  * `CleanErrors` turns every error answer into `{"error_code": ..., "message": ...}`: the message is
    MLflow's own reason (without the echoed input), at most MAX_ERROR_CHARS, and no stack trace;
  * `Observed` and `ScoredRows` count requests, latency, bytes, rows by input kind and predicted classes.
`entrypoints/serve.py` runs it with uvicorn; `mlflow models serve` serves the same model the same way,
only without any of this.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from http import HTTPStatus
from pathlib import Path

from fmnist_pyfunc import metrics
from fmnist_pyfunc.config import FOLLOW_INTERVAL_S
from fmnist_pyfunc.live_model import LiveModel
from fmnist_pyfunc.preprocessing import MAX_BODY_BYTES, MAX_JSON_DEPTH, json_depth

# What entrypoints/serve.py hands to every uvicorn worker (each builds its own app from them).
MODEL_URI_ENV = "FMNIST_SERVING_MODEL_URI"          # what the user asked for: a registry reference or fixed
MODEL_PATH_ENV = "FMNIST_SERVING_MODEL_PATH"        # where it was downloaded before the workers started
MODEL_VERSION_ENV = "FMNIST_SERVING_MODEL_VERSION"  # the registry version that download is ("" if none)
INTERVAL_ENV = "FMNIST_SERVING_FOLLOW_INTERVAL_S"
TRIGGER_ENV = "FMNIST_SERVING_RELOAD_TRIGGER"       # a file all workers watch: touched by any worker's /reload
MAX_BODY_ENV = "FMNIST_SERVING_MAX_BODY_BYTES"
# Scoring requests one worker works on at once; MLflow's app runs each in a thread of a pool of
# min(32, cores + 4), and ones beyond the pool would queue unseen. Past the cap: 429 and Retry-After.
MAX_CONCURRENT_REQUESTS = 16
RETRY_AFTER = (b"retry-after", b"1")  # seconds: a scoring request takes milliseconds to about a second
ROUTES = frozenset({"/invocations", "/ping", "/health", "/version", "/model", "/metrics", "/reload"})
LOOPBACK_CLIENTS = frozenset({"127.0.0.1", "::1"})
MAX_ERROR_CHARS = 500   # a reason, not a dump: MLflow's messages can embed the whole request
# MLflow's scoring errors read "Failed to predict data '<the input>'. \nError: <reason>": keep the reason.
MLFLOW_REASON_MARKER = "\nError: "


async def _send(send, status: int, body: bytes, content_type: bytes = b"application/json",
                headers: list | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


async def _send_json(send, status: int, payload: dict, headers: list | None = None) -> None:
    await _send(send, status, json.dumps(payload).encode(), headers=headers)


def _replaying(message: dict, receive):
    """A `receive` that first gives the app `message` (a body a guard has read already), then the real one."""
    pending = [message]

    async def replay():
        return pending.pop() if pending else await receive()

    return replay


class BodyLimit:
    """Refuse request bodies over `max_bytes` with 413, by Content-Length or while streaming."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = {"error_code": HTTPStatus.REQUEST_ENTITY_TOO_LARGE.name,
                     "message": f"request body exceeds {self.max_bytes:,} bytes; send fewer or smaller images"}
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await _send_json(send, 413, too_large)
        body = bytearray()
        while True:  # chunked bodies declare no length: count what arrives
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await _send_json(send, 413, too_large)
            if not message.get("more_body"):
                break
        await self.app(scope, _replaying({"type": "http.request", "body": bytes(body), "more_body": False}, receive),
                       send)


class WellFormed:
    """Client mistakes that MLflow's app answers with a 500, answered with a 4xx that says what to send: no
    Content-Type on /invocations (415), JSON nested deeper than MAX_JSON_DEPTH (400: Python's parser would
    recurse until RecursionError). Sits inside BodyLimit, so the body is already whole in memory."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/invocations" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        if b"content-type" not in dict(scope["headers"]):
            return await _send_json(send, 415, {
                "error_code": HTTPStatus.UNSUPPORTED_MEDIA_TYPE.name,
                "message": "no Content-Type: send 'Content-Type: application/json' with "
                           '{"dataframe_records": [...]}, or text/csv'})
        message = await receive()
        depth = json_depth(message.get("body", b""))
        if depth > MAX_JSON_DEPTH:
            return await _send_json(send, 400, {
                "error_code": HTTPStatus.BAD_REQUEST.name,
                "message": f"JSON nested {depth} levels deep (at most {MAX_JSON_DEPTH}): send "
                           '{"dataframe_records": [{"pixels": [[...28 numbers...], ...]} or {"image": "<base64>"}]}'})
        await self.app(scope, _replaying(message, receive), send)


def clean_error(status: int, body: bytes) -> dict:
    """MLflow's error body -> {"error_code", "message"} with the reason only."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        payload = {"message": body.decode("utf-8", "replace")}
    if not isinstance(payload, dict):
        payload = {"message": str(payload)}
    message = str(payload.get("message") or payload.get("detail") or f"HTTP {status}")  # detail: FastAPI's 404/405
    if MLFLOW_REASON_MARKER in message:
        message = message.rsplit(MLFLOW_REASON_MARKER, 1)[1]
    message = message.split("\nInput:", 1)[0].strip()  # malformed JSON: MLflow appends the input itself
    if len(message) > MAX_ERROR_CHARS:
        message = message[:MAX_ERROR_CHARS] + "..."
    return {"error_code": str(payload.get("error_code", HTTPStatus(status).name)), "message": message}


class CleanErrors:
    """Rewrite every 4xx/5xx answer with `clean_error`; successful answers pass through untouched."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        error = {"status": 0, "body": bytearray(), "headers": []}

        async def filtered_send(message):
            if message["type"] == "http.response.start" and message["status"] >= 400:
                error["status"] = message["status"]
                # keep X-Model-*, Retry-After and the like; the body and its length and type are rewritten
                error["headers"] = [(k, v) for k, v in message.get("headers", [])
                                    if k.lower() not in (b"content-type", b"content-length")]
                return None
            if message["type"] == "http.response.body" and error["status"]:
                error["body"] += message.get("body", b"")
                if not message.get("more_body"):
                    await _send_json(send, error["status"], clean_error(error["status"], bytes(error["body"])),
                                     error["headers"])
                return None
            return await send(message)

        await self.app(scope, receive, filtered_send)


class ScoringApp:
    """MLflow's app for whatever model `live` holds at the moment a request arrives, plus our routes."""

    def __init__(self, live: LiveModel):
        self.live = live
        self.scoring = 0  # /invocations requests in progress (one event loop per worker: no lock needed)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":  # lifespan: MLflow's app has nothing to start
            return await self.live.current.app(scope, receive, send)
        route = (scope["path"], scope["method"])
        if route == ("/model", "GET"):
            return await _send_json(send, 200, self.live.current.info)
        if route == ("/health", "GET"):
            return await _send_json(send, 200, self.live.status())
        if route == ("/metrics", "GET"):
            body, content_type = metrics.exposition()
            return await _send(send, 200, body, content_type.encode())
        if scope["path"] == "/reload":
            return await self._reload(scope, send)
        if scope["path"] == "/invocations" and self.scoring >= MAX_CONCURRENT_REQUESTS:
            return await _send_json(send, 429, {
                "error_code": HTTPStatus.TOO_MANY_REQUESTS.name,
                "message": f"this worker is scoring {MAX_CONCURRENT_REQUESTS} requests already; retry in a moment"},
                [RETRY_AFTER])
        served = self.live.current  # this request's model, whatever is swapped in meanwhile
        # Counted until its answer is complete, not until MLflow's app returns: its middleware may finish
        # after the client has the answer and sent its next request on the same connection.
        counted = {"on": scope["path"] == "/invocations"}
        self.scoring += counted["on"]

        def done():
            self.scoring -= counted["on"]
            counted["on"] = False

        async def with_model_headers(message):
            if message["type"] == "http.response.start":
                busy = [RETRY_AFTER] if message["status"] == 429 else []  # the model's decoding budget
                message = {**message, "headers": [*message.get("headers", []), *served.headers, *busy]}
            elif not message.get("more_body"):
                done()
            await send(message)

        try:
            await served.app(scope, receive, with_model_headers)
        finally:
            done()

    async def _reload(self, scope, send):
        if scope["method"] != "POST":
            return await _send_json(send, 405, {"error_code": HTTPStatus.METHOD_NOT_ALLOWED.name,
                                                "message": "POST /reload"})
        if (scope.get("client") or ("",))[0] not in LOOPBACK_CLIENTS:
            return await _send_json(send, 403, {"error_code": HTTPStatus.FORBIDDEN.name,
                                                "message": "/reload answers only on the server's own machine"})
        self.live.request_reload()  # the other workers
        await asyncio.to_thread(self.live.refresh, True)  # this one, before answering
        return await _send_json(send, 200, self.live.status())


class Observed:
    """Count every answer by route and status, its latency and the request bytes received."""

    def __init__(self, app, server: str):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = metrics.route_label(scope["path"], ROUTES)
        started, status = time.perf_counter(), {"code": 500}

        async def counted_receive():
            message = await receive()
            metrics.REQUEST_BYTES.labels(self.server, route).inc(len(message.get("body", b"")))
            return message

        async def noted_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, counted_receive, noted_send)
        finally:
            metrics.REQUESTS.labels(self.server, route, str(status["code"])).inc()
            metrics.LATENCY.labels(self.server, route).observe(time.perf_counter() - started)


class ScoredRows:
    """After a successful /invocations answer has gone out, count its rows by input kind and predicted class,
    in a worker thread: the client never waits on this accounting."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/invocations":
            return await self.app(scope, receive, send)
        # The body's chunks are kept, not copied: behind BodyLimit it is one chunk of up to 32 MiB.
        request, answer = [], {"status": 0, "body": bytearray()}

        async def kept_receive():
            message = await receive()
            request.append(message.get("body", b""))
            return message

        async def kept_send(message):
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
            elif answer["status"] == 200:
                answer["body"] += message.get("body", b"")
            await send(message)

        await self.app(scope, kept_receive, kept_send)
        if answer["status"] == 200:
            asyncio.get_running_loop().run_in_executor(None, count_rows, b"".join(request), bytes(answer["body"]))


def count_rows(request: bytes, answer: bytes) -> None:
    try:
        predictions = json.loads(answer)["predictions"]
        kinds = input_kinds(json.loads(request), len(predictions))
    except (ValueError, KeyError, TypeError):
        return
    for kind in kinds:
        metrics.IMAGES.labels(kind).inc()
    for prediction in predictions:
        metrics.PREDICTED.labels(prediction.get("class_name", "?")).inc()


def input_kinds(payload: dict, n_rows: int) -> list[str]:
    """'image' or 'pixels' per row, in any of MLflow's JSON layouts; a bare tensor is pixels."""
    if "dataframe_split" in payload:
        split = payload["dataframe_split"]
        rows = [dict(zip(split["columns"], row, strict=False)) for row in split["data"]]
    else:
        rows = payload.get("dataframe_records") or payload.get("inputs") or payload.get("instances") or []
        if isinstance(rows, dict):  # columnar: {"image": [...], "pixels": [...]}
            rows = [dict(zip(rows, values, strict=False)) for values in zip(*rows.values(), strict=False)]
    if len(rows) != n_rows or not all(isinstance(row, dict) for row in rows):
        return ["pixels"] * n_rows
    return ["image" if row.get("image") is not None else "pixels" for row in rows]


def create_app(live: LiveModel, max_body_bytes: int = MAX_BODY_BYTES):
    """The whole scoring server around `live`, outermost first: metrics, body limit, clean errors."""
    return Observed(BodyLimit(WellFormed(ScoredRows(CleanErrors(ScoringApp(live)))), max_body_bytes), "scoring")


def app_from_env():
    """uvicorn's factory: each worker process builds its own live model and app from what serve.py set."""
    trigger = os.environ.get(TRIGGER_ENV)
    live = LiveModel(os.environ[MODEL_URI_ENV], os.environ[MODEL_PATH_ENV], os.environ.get(MODEL_VERSION_ENV) or None,
                     float(os.environ.get(INTERVAL_ENV, FOLLOW_INTERVAL_S)), Path(trigger) if trigger else None)
    return create_app(live, int(os.environ.get(MAX_BODY_ENV, MAX_BODY_BYTES)))
