"""The scoring server: MLflow's own `/invocations` app (what `mlflow models serve` runs) on a live model, guarded.

MLflow's app serves one model for the life of the process, reads any request body whole into memory and,
on some errors, answers with the whole body echoed back or a Python stack trace. Around it:
  * `ScoringApp` serves whatever `LiveModel` holds now (it follows the registry, see live_model.py), adds
    X-Model-Name / X-Model-Version / X-Model-Run-Id to every answer, and answers GET /model (what is
    served), GET /health (ok or degraded, and why), GET /metrics (Prometheus) and POST /reload (loopback
    only: check the registry now);
  * `ScoredRows` counts rows by input kind and predicted class;
  * the generic guards of `asgi_guards.py` around all of it: a body limit, 4xx instead of 500 for
    malformed requests, clean error answers, request metrics.
`entrypoints/serve.py` runs it with uvicorn (one `Settings` for every worker); `mlflow models serve` serves
the same model the same way, only without any of this.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

from fmnist_pyfunc import metrics
from fmnist_pyfunc.asgi_guards import BodyLimit, CleanErrors, Observed, WellFormed, send_bytes, send_json
from fmnist_pyfunc.config import FOLLOW_INTERVAL_S
from fmnist_pyfunc.live_model import LiveModel
from fmnist_pyfunc.transport import MAX_BODY_BYTES

# Scoring requests one worker works on at once; MLflow's app runs each in a thread of a pool of
# min(32, cores + 4), and ones beyond the pool would queue unseen. Past the cap: 429 and Retry-After.
MAX_CONCURRENT_REQUESTS = 16
RETRY_AFTER = (b"retry-after", b"1")  # seconds: a scoring request takes milliseconds to about a second
ROUTES = frozenset({"/invocations", "/ping", "/health", "/version", "/model", "/metrics", "/reload"})
LOOPBACK_CLIENTS = frozenset({"127.0.0.1", "::1"})
# What a client mistake's answer tells it to send instead.
INVOCATIONS_HINT = ('{"dataframe_records": [{"pixels": [[...28 numbers...], ...]} or {"image": "<base64>"}]}, '
                    "or text/csv")
# uvicorn starts each worker as a new process that imports the app factory: the settings reach it as one
# JSON value in this environment variable (the only channel uvicorn's workers share with their parent).
SETTINGS_ENV = "FMNIST_SCORING_SETTINGS"


@dataclass(frozen=True)
class Settings:
    """Everything a scoring worker needs to build its app, decided once by entrypoints/serve.py."""
    model_uri: str                       # what the user asked for: a registry reference or a fixed model
    model_path: str                      # where it was downloaded before the workers started
    model_version: str | None = None     # the registry version that download is (None: not from the registry)
    follow_interval_s: float = FOLLOW_INTERVAL_S
    reload_trigger: str | None = None    # a file all workers watch: touched by any worker's /reload
    max_body_bytes: int = MAX_BODY_BYTES

    def to_env(self) -> dict[str, str]:
        return {SETTINGS_ENV: json.dumps(dataclasses.asdict(self))}

    @classmethod
    def from_env(cls) -> Settings:
        return cls(**json.loads(os.environ[SETTINGS_ENV]))


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
            return await send_json(send, 200, self.live.current.info)
        if route == ("/health", "GET"):
            return await send_json(send, 200, self.live.status())
        if route == ("/metrics", "GET"):
            body, content_type = metrics.exposition()
            return await send_bytes(send, 200, body, content_type.encode())
        if scope["path"] == "/reload":
            return await self._reload(scope, send)
        if scope["path"] == "/invocations" and self.scoring >= MAX_CONCURRENT_REQUESTS:
            return await send_json(send, 429, {
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
            return await send_json(send, 405, {"error_code": HTTPStatus.METHOD_NOT_ALLOWED.name,
                                                "message": "POST /reload"})
        if (scope.get("client") or ("",))[0] not in LOOPBACK_CLIENTS:
            return await send_json(send, 403, {"error_code": HTTPStatus.FORBIDDEN.name,
                                                "message": "/reload answers only on the server's own machine"})
        self.live.request_reload()  # the other workers
        await asyncio.to_thread(self.live.refresh, True)  # this one, before answering
        return await send_json(send, 200, self.live.status())


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
        if prediction.get("in_distribution") is False:
            metrics.OUT_OF_DISTRIBUTION.inc()


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
    """The whole scoring server around `live`, outermost first: metrics, body limit, well-formed requests,
    row counts, clean errors."""
    guarded = WellFormed(ScoredRows(CleanErrors(ScoringApp(live))), "/invocations", INVOCATIONS_HINT)
    return Observed(BodyLimit(guarded, max_body_bytes), "scoring", ROUTES)


def app_from_env():
    """uvicorn's factory: each worker process builds its own live model and app from serve.py's Settings."""
    settings = Settings.from_env()
    live = LiveModel(settings.model_uri, settings.model_path, settings.model_version, settings.follow_interval_s,
                     Path(settings.reload_trigger) if settings.reload_trigger else None)
    return create_app(live, settings.max_body_bytes)
