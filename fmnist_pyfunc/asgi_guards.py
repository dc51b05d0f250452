"""ASGI guards that any HTTP app here can wear, outermost first: `Observed` (requests, latency and bytes in
/metrics), `BodyLimit` (413 before reading more than a limit), `WellFormed` (415/400 for what a JSON app
would answer with a 500), `CleanErrors` (every error answer as {"error_code", "message"}: the reason only,
no echoed input, no stack trace). Nothing here knows the model; `scoring.py` puts them around MLflow's app.
"""

from __future__ import annotations

import json
import time
from http import HTTPStatus

from fmnist_pyfunc import metrics
from fmnist_pyfunc.transport import MAX_HELD_BODY_BYTES, MAX_JSON_DEPTH, json_depth

MAX_ERROR_CHARS = 500   # a reason, not a dump: MLflow's messages can embed the whole request
# MLflow's scoring errors read "Failed to predict data '<the input>'. \nError: <reason>": keep the reason.
MLFLOW_REASON_MARKER = "\nError: "
RETRY_AFTER = (b"retry-after", b"1")  # seconds: a scoring request takes milliseconds to about a second


async def send_bytes(send, status: int, body: bytes, content_type: bytes = b"application/json",
                headers: list | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


async def send_json(send, status: int, payload: dict, headers: list | None = None) -> None:
    await send_bytes(send, status, json.dumps(payload).encode(), headers=headers)


def _replaying(message: dict, receive):
    """A `receive` that first gives the app `message` (a body a guard has read already), then the real one."""
    pending = [message]

    async def replay():
        return pending.pop() if pending else await receive()

    return replay


class BodyLimit:
    """Refuse request bodies over `max_bytes` with 413, by Content-Length or while streaming; and, while this
    app already holds `max_held_bytes` of bodies (declared, or `max_bytes` for a chunked one), answer 429 with
    Retry-After before reading another."""

    def __init__(self, app, max_bytes: int, max_held_bytes: int = MAX_HELD_BODY_BYTES):
        self.app, self.max_bytes, self.max_held_bytes = app, max_bytes, max_held_bytes
        self.held = 0  # one event loop per worker: no lock needed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = {"error_code": HTTPStatus.REQUEST_ENTITY_TOO_LARGE.name,
                     "message": f"request body exceeds {self.max_bytes:,} bytes; send fewer or smaller images"}
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await send_json(send, 413, too_large)
        reserved = int(declared) if declared is not None and declared.isdigit() else self.max_bytes
        if self.held and self.held + reserved > self.max_held_bytes:
            return await send_json(send, 429, {
                "error_code": HTTPStatus.TOO_MANY_REQUESTS.name,
                "message": f"this worker holds {self.held:,} bytes of requests already; retry in a moment"},
                [RETRY_AFTER])
        self.held += reserved
        try:
            body = bytearray()
            while True:  # chunked bodies declare no length: count what arrives
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                if len(body) > self.max_bytes:
                    return await send_json(send, 413, too_large)
                if not message.get("more_body"):
                    break
            await self.app(scope, _replaying({"type": "http.request", "body": bytes(body), "more_body": False},
                                             receive), send)
        finally:
            self.held -= reserved


class WellFormed:
    """Client mistakes that a JSON app answers with a 500, answered with a 4xx that says what to send
    (`hint`): no Content-Type on a POST to `path` (415), JSON nested deeper than MAX_JSON_DEPTH (400: Python's
    parser would recurse until RecursionError). Sits inside BodyLimit, so the body is already whole in memory."""

    def __init__(self, app, path: str, hint: str):
        self.app, self.path, self.hint = app, path, hint

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        if b"content-type" not in dict(scope["headers"]):
            return await send_json(send, 415, {
                "error_code": HTTPStatus.UNSUPPORTED_MEDIA_TYPE.name,
                "message": f"no Content-Type: send 'Content-Type: application/json' with {self.hint}"})
        message = await receive()
        depth = json_depth(message.get("body", b""))
        if depth > MAX_JSON_DEPTH:
            return await send_json(send, 400, {
                "error_code": HTTPStatus.BAD_REQUEST.name,
                "message": f"JSON nested {depth} levels deep (at most {MAX_JSON_DEPTH}): send {self.hint}"})
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
    """Rewrite every 4xx/5xx answer with `clean_error`, then `shape(scope, error)` (a protocol's own fields);
    successful answers pass through untouched."""

    def __init__(self, app, shape=lambda scope, error: error):
        self.app, self.shape = app, shape

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
                    cleaned = clean_error(error["status"], bytes(error["body"]))
                    await send_json(send, error["status"], self.shape(scope, cleaned), error["headers"])
                return None
            return await send(message)

        await self.app(scope, receive, filtered_send)


class Observed:
    """Count every answer by route (`route(path)`: a bounded set of labels) and status, its latency and the
    request bytes received, labelled with `server`."""

    def __init__(self, app, server: str, route):
        self.app, self.server, self.route = app, server, route

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = self.route(scope["path"])
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
