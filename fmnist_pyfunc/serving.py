"""The scoring server: MLflow's own `/invocations` app (what `mlflow models serve` runs) plus two guards.

MLflow's app reads any request body whole into memory and, on some errors, answers with the whole body
echoed back or a Python stack trace. Two ASGI wrappers close that, without changing the protocol:
  * `BodyLimit` answers 413 before reading more than MAX_BODY_BYTES;
  * `CleanErrors` turns every error answer into `{"error_code": ..., "message": ...}`: the message is
    MLflow's own reason (without the echoed input), at most MAX_ERROR_CHARS, and no stack trace.
`entrypoints/serve.py` runs it with uvicorn; `mlflow models serve` serves the same model the same way,
only without these guards.
"""

from __future__ import annotations

import json
import os
from http import HTTPStatus

from mlflow.pyfunc import scoring_server

from fmnist_pyfunc.preprocessing import MAX_BODY_BYTES

MODEL_PATH_ENV = "FMNIST_SERVING_MODEL_PATH"   # set by entrypoints/serve.py for each uvicorn worker
MAX_BODY_ENV = "FMNIST_SERVING_MAX_BODY_BYTES"
MAX_ERROR_CHARS = 500   # a reason, not a dump: MLflow's messages can embed the whole request
# MLflow's scoring errors read "Failed to predict data '<the input>'. \nError: <reason>": keep the reason.
MLFLOW_REASON_MARKER = "\nError: "


async def _send_json(send, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """Refuse request bodies over `max_bytes` with 413, by Content-Length or while streaming."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = {"error_code": "REQUEST_TOO_LARGE",
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
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


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
        error = {"status": 0, "body": bytearray()}

        async def filtered_send(message):
            if message["type"] == "http.response.start" and message["status"] >= 400:
                error["status"] = message["status"]
                return None
            if message["type"] == "http.response.body" and error["status"]:
                error["body"] += message.get("body", b"")
                if not message.get("more_body"):
                    await _send_json(send, error["status"], clean_error(error["status"], bytes(error["body"])))
                return None
            return await send(message)

        await self.app(scope, receive, filtered_send)


def create_app(model_path: str, max_body_bytes: int = MAX_BODY_BYTES):
    """MLflow's scoring app for the model at `model_path` (a local MLflow model folder), guarded."""
    model = scoring_server.load_model_with_mlflow_config(model_path)
    return BodyLimit(CleanErrors(scoring_server.init(model)), max_body_bytes)


def app_from_env():
    """uvicorn's factory: each worker process builds its app from what `entrypoints/serve.py` set."""
    return create_app(os.environ[MODEL_PATH_ENV], int(os.environ.get(MAX_BODY_ENV, MAX_BODY_BYTES)))
