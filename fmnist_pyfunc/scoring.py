"""The scoring server: MLflow's own `/invocations` app (what `mlflow models serve` runs) on a live model, guarded.

MLflow's app serves one model for the life of the process, reads any request body whole into memory and,
on some errors, answers with the whole body echoed back or a Python stack trace. Around it:
  * `ScoringApp` serves whatever `LiveModel` holds now (it follows the registry, see live_model.py), adds
    X-Model-Name / X-Model-Version / X-Model-Run-Id to every answer, and answers GET /model (what is
    served), GET /health (ok or degraded, and why), GET /metrics (Prometheus) and POST /reload (loopback
    only: check the registry now);
  * it counts each answer's rows by input kind and predicted class and, with the prediction log on
    (prediction_log.py), queues them for it and names them in the X-Prediction-Id header; GET /monitor
    compares the newest logged predictions with the model's reference (monitor.py: also in /metrics),
    POST /feedback stores a user's correction of one;
  * the generic guards of `asgi_guards.py` around all of it: a body limit, 4xx instead of 500 for
    malformed requests, clean error answers, request metrics.
`entrypoints/serve.py` runs it with uvicorn (one `Settings` for every worker); `mlflow models serve` serves
the same model the same way, only without any of this.
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import json
import os
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qs

from fmnist_pyfunc import metrics, monitor, ood, prediction_log, seen
from fmnist_pyfunc.asgi_guards import BodyLimit, CleanErrors, Observed, WellFormed, send_bytes, send_json
from fmnist_pyfunc.config import (
    CLASS_NAMES,
    FOLLOW_INTERVAL_S,
    LOG_MAX_DAYS,
    LOG_MAX_ROWS,
    LOG_SAMPLE_RATE,
    PREDICTION_ID_HEADER,
    PREDICTION_LOG_OFF,
)
from fmnist_pyfunc.live_model import LiveModel, first_line
from fmnist_pyfunc.prediction_log import PredictionLog
from fmnist_pyfunc.transport import MAX_BODY_BYTES

# Scoring requests one worker works on at once; MLflow's app runs each in a thread of a pool of
# min(32, cores + 4), and ones beyond the pool would queue unseen. Past the cap: 429 and Retry-After.
MAX_CONCURRENT_REQUESTS = 16
RETRY_AFTER = (b"retry-after", b"1")  # seconds: a scoring request takes milliseconds to about a second
ROUTES = frozenset({"/invocations", "/ping", "/health", "/version", "/model", "/metrics", "/reload", "/monitor",
                    "/feedback"})
LOOPBACK_CLIENTS = frozenset({"127.0.0.1", "::1"})
# What a client mistake's answer tells it to send instead.
INVOCATIONS_HINT = ('{"dataframe_records": [{"pixels": [[...28 numbers...], ...]} or {"image": "<base64>"}]}, '
                    "or text/csv")
MAX_PREDICTION_ID_CHARS = 48  # prediction_log.PREDICTIONS.c.id's width
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
    log_url: str = PREDICTION_LOG_OFF  # the prediction log: a SQLAlchemy URL, or "off"
    log_sample_rate: float = LOG_SAMPLE_RATE
    log_max_rows: int = LOG_MAX_ROWS
    log_max_days: float = LOG_MAX_DAYS

    def to_env(self) -> dict[str, str]:
        return {SETTINGS_ENV: json.dumps(dataclasses.asdict(self))}

    @classmethod
    def from_env(cls) -> Settings:
        return cls(**json.loads(os.environ[SETTINGS_ENV]))


class ScoringApp:
    """MLflow's app for whatever model `live` holds at the moment a request arrives, plus our routes; each
    answered /invocations request is counted and, with a `log`, queued for the prediction log."""

    def __init__(self, live: LiveModel, log: PredictionLog | None = None):
        self.live, self.log = live, log
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
            if self.log is not None:
                body += await asyncio.to_thread(self._monitor_exposition)
            return await send_bytes(send, 200, body, content_type.encode())
        if route == ("/monitor", "GET"):
            return await self._monitor(scope, send)
        if scope["path"] == "/feedback":
            return await self._feedback(scope, receive, send)
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
        sink: list[seen.Seen] = []  # what the model saw and answered, filled by its predict (seen.py)
        watching = seen.WATCHER.set(sink)

        def done():
            self.scoring -= counted["on"]
            counted["on"] = False

        async def with_model_headers(message):
            if message["type"] == "http.response.start":
                busy = [RETRY_AFTER] if message["status"] == 429 else []  # the model's decoding budget
                logged = self._logged(served, sink) if message["status"] == 200 else []
                message = {**message, "headers": [*message.get("headers", []), *served.headers, *busy, *logged]}
            elif not message.get("more_body"):
                done()
            await send(message)

        try:
            await served.app(scope, receive, with_model_headers)
        finally:
            seen.WATCHER.reset(watching)
            done()
        if sink:
            asyncio.get_running_loop().run_in_executor(None, count_seen, sink)

    def _logged(self, served, sink: list[seen.Seen]) -> list:
        """Queue the answer's rows for the prediction log (before the client has the answer, so an
        acknowledged prediction is at least queued); the header naming its id, or none."""
        if self.log is None or len(sink) != 1 or not self.log.sampled():
            return []
        request_id = self.log.put({k: served.info.get(k) for k in ("name", "version", "run_id")}, sink[0])
        return [(PREDICTION_ID_HEADER.lower().encode(), request_id.encode())] if request_id else []

    async def _monitor(self, scope, send):
        if self.log is None:
            return await send_json(send, 503, {"error_code": HTTPStatus.SERVICE_UNAVAILABLE.name,
                                               "message": "the prediction log is off: nothing to monitor"})
        try:
            window = window_rows(scope.get("query_string", b""))
        except ValueError as exc:
            return await send_json(send, 400, {"error_code": HTTPStatus.BAD_REQUEST.name, "message": str(exc)})
        try:
            return await send_json(send, 200, await asyncio.to_thread(self._report, window))
        except Exception as exc:  # the store is down: say so, the scoring routes go on
            return await send_json(send, 503, {"error_code": HTTPStatus.SERVICE_UNAVAILABLE.name,
                                               "message": f"the prediction log cannot be read: {first_line(exc)}"})

    def _report(self, window: int = monitor.WINDOW_ROWS) -> dict:
        served = self.live.current
        rows = prediction_log.recent(self.log.engine, monitor.HISTORY_ROWS, served.info.get("run_id"))
        return monitor.report(served.reference, served.info, rows, prediction_log.feedback_accuracy(self.log.engine),
                              window)

    def _monitor_exposition(self) -> bytes:
        try:
            return monitor.exposition(self._report())
        except Exception:  # a scrape while the store is down still gets every other metric
            return b""

    async def _feedback(self, scope, receive, send):
        if scope["method"] != "POST":
            return await send_json(send, 405, {"error_code": HTTPStatus.METHOD_NOT_ALLOWED.name,
                                               "message": 'POST /feedback {"prediction_id": "...", "label": ...}'})
        if self.log is None:
            return await send_json(send, 503, {"error_code": HTTPStatus.SERVICE_UNAVAILABLE.name,
                                               "message": "the prediction log is off: feedback needs it"})
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        status, answer = await asyncio.to_thread(self._store_feedback, bytes(body))
        return await send_json(send, status, answer)

    def _store_feedback(self, body: bytes) -> tuple[int, dict]:
        try:
            prediction_id, label = parse_feedback(body)
        except ValueError as exc:
            return 400, {"error_code": HTTPStatus.BAD_REQUEST.name, "message": str(exc)}
        for attempt in range(2):  # the prediction may still be in this worker's queue: write it, look again
            try:
                return 200, prediction_log.add_feedback(self.log.engine, prediction_id, label)
            except prediction_log.UnknownPrediction:
                if attempt == 0:
                    self.log.flush()
            except Exception as exc:
                return 503, {"error_code": HTTPStatus.SERVICE_UNAVAILABLE.name,
                             "message": f"the prediction log cannot take feedback now: {first_line(exc)}"}
        return 404, {"error_code": HTTPStatus.NOT_FOUND.name,
                     "message": f"no logged prediction has id {prediction_id!r} (sampled out, past retention, "
                                "or not from this server)"}

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


def window_rows(query: bytes) -> int:
    """GET /monitor?rows=N: compare the newest N predictions (default monitor.WINDOW_ROWS)."""
    values = parse_qs(query.decode("latin-1")).get("rows")
    if not values:
        return monitor.WINDOW_ROWS
    if not values[0].isdigit() or not monitor.MIN_ROWS <= int(values[0]) <= monitor.HISTORY_ROWS:
        raise ValueError(f"rows must be a whole number from {monitor.MIN_ROWS} to {monitor.HISTORY_ROWS}")
    return int(values[0])


def parse_feedback(body: bytes) -> tuple[str, int]:
    """{"prediction_id": "<id>", "label": <class index or name>} -> (id, class index); ValueError says what
    is wrong."""
    usage = 'send {"prediction_id": "<the id from the X-Prediction-Id header>-<row>", "label": <0-9 or class name>}'
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"not JSON: {usage}") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("prediction_id"), str) or "label" not in payload:
        raise ValueError(usage)
    prediction_id = payload["prediction_id"]
    if not 0 < len(prediction_id) <= MAX_PREDICTION_ID_CHARS:
        raise ValueError(f"prediction_id must be 1-{MAX_PREDICTION_ID_CHARS} characters")
    return prediction_id, prediction_log.parse_label(payload["label"])


def count_seen(sink: list[seen.Seen]) -> None:
    """Rows by input kind and predicted class, and those flagged not clothing, from what the model saw."""
    for answered in sink:
        for kind in answered.kinds:
            metrics.IMAGES.labels(kind).inc()
        for index in answered.class_index:
            metrics.PREDICTED.labels(CLASS_NAMES[index]).inc()
        if answered.ood_score is not None:
            metrics.OUT_OF_DISTRIBUTION.inc(int((~ood.in_distribution(answered.ood_score)).sum()))


def create_app(live: LiveModel, max_body_bytes: int = MAX_BODY_BYTES, log: PredictionLog | None = None):
    """The whole scoring server around `live` (logging to `log`, if any), outermost first: metrics, body limit,
    well-formed requests, clean errors."""
    guarded = WellFormed(CleanErrors(ScoringApp(live, log)), "/invocations", INVOCATIONS_HINT)
    return Observed(BodyLimit(guarded, max_body_bytes), "scoring", ROUTES)


def app_from_env():
    """uvicorn's factory: each worker process builds its own live model and app from serve.py's Settings."""
    settings = Settings.from_env()
    live = LiveModel(settings.model_uri, settings.model_path, settings.model_version, settings.follow_interval_s,
                     Path(settings.reload_trigger) if settings.reload_trigger else None)
    log = None
    if settings.log_url != PREDICTION_LOG_OFF:
        log = PredictionLog(settings.log_url, settings.log_sample_rate, settings.log_max_rows,
                            settings.log_max_days)
        atexit.register(log.flush)  # a restart or SIGTERM writes what is queued; only a kill -9 loses it
    return create_app(live, settings.max_body_bytes, log)
