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
import collections
import dataclasses
import gc
import json
import os
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qs

import numpy as np
import pandas as pd
from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
from mlflow.exceptions import MlflowException
from mlflow.version import VERSION as MLFLOW_VERSION

from fmnist_pyfunc import batching, contract, invocations, metrics, monitor, ood, open_inference, prediction_log, seen
from fmnist_pyfunc.admission import MAX_IN_FLIGHT_PIXELS
from fmnist_pyfunc.asgi_guards import RETRY_AFTER, BodyLimit, CleanErrors, Observed, WellFormed, send_bytes, send_json
from fmnist_pyfunc.config import (
    BATCH_MAX_ROWS,
    BATCH_MAX_WAIT_S,
    CLASS_NAMES,
    FOLLOW_INTERVAL_S,
    LOG_MAX_DAYS,
    LOG_MAX_ROWS,
    LOG_SAMPLE_RATE,
    MAX_QUEUED_ROWS,
    PREDICTION_ID_HEADER,
    PREDICTION_LOG_OFF,
    REGISTERED_MODEL_NAME,
)
from fmnist_pyfunc.live_model import LiveModel, first_line
from fmnist_pyfunc.prediction_log import PredictionLog
from fmnist_pyfunc.transport import MAX_BODY_BYTES

# Bodies up to this size are parsed on the event loop (~20 us for one image): a thread hop costs more.
INLINE_PARSE_BYTES = 64 * 2**10
ROUTES = frozenset({"/invocations", "/ping", "/health", "/version", "/model", "/metrics", "/reload", "/monitor",
                    "/feedback", "/v2", "/v2/health", "/v2/models", "/v2/models/infer"})
V2 = "/v2"
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
    batch_max_rows: int = BATCH_MAX_ROWS  # 0: no batching, each request its own forward pass
    batch_max_wait_s: float = BATCH_MAX_WAIT_S
    max_queued_rows: int = MAX_QUEUED_ROWS

    def to_env(self) -> dict[str, str]:
        return {SETTINGS_ENV: json.dumps(dataclasses.asdict(self))}

    @classmethod
    def from_env(cls) -> Settings:
        return cls(**json.loads(os.environ[SETTINGS_ENV]))


class Refused(Exception):
    """A scoring request answered with an error before it reached the model: its status, error code, reason
    and extra headers."""

    def __init__(self, status: int, message: str, headers: list | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers or []


class ScoringApp:
    """Our routes, and for scoring, MLflow's `/invocations` protocol and the Open Inference Protocol on whatever
    model `live` holds when a request arrives: each body parsed once, rows admitted by queued work, forward
    passes shared between concurrent requests (batching.py; batch_max_rows 0: each its own), every answer counted
    and, with a `log`, queued for the prediction log. MLflow's app answers /ping, /version and the rest."""

    def __init__(self, live: LiveModel, log: PredictionLog | None = None, batcher: batching.Batcher | None = None,
                 max_queued_rows: int = MAX_QUEUED_ROWS):
        self.live, self.log, self.max_queued_rows = live, log, max_queued_rows
        self.parsing = 0      # scoring requests being read and parsed (the batcher waits for them)
        self.batcher = batcher or batching.Batcher()  # the worker's model thread (the live model's checks use it)
        self.batcher.arriving = lambda: self.parsing
        # rows and decoded pixels accepted and not yet answered (one event loop per worker: no lock needed)
        self.queued_rows = self.queued_pixels = 0
        self.timeout_s = MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get()  # as MLflow's own app: then 504

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":  # lifespan: MLflow's app has nothing to start
            return await self.live.current.app(scope, receive, send)
        route = (scope["path"], scope["method"])
        if route == ("/invocations", "POST"):
            return await self._score(scope, receive, send, self._invocation)
        if scope["path"] == V2 or scope["path"].startswith(V2 + "/"):
            return await self._v2(scope, receive, send)
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
        return await self.live.current.app(scope, receive, send)

    @staticmethod
    def _invocation(body: bytes, headers: dict, served):
        """MLflow's protocol: (the model's input, params, how to answer: predictions -> (body, content type,
        other headers))."""
        data, params, unwrapped = invocations.parse(body, headers.get(b"content-type", b"").decode("latin-1"),
                                                    served.model)
        return data, params, lambda predictions: (invocations.dumps(predictions, unwrapped), b"application/json", [])

    async def _score(self, scope, receive, send, parse):
        """Read, parse (once), admit by rows, predict (batched), answer with the model's headers and, for a
        logged answer, its prediction id; errors as {"error_code", "message"} (the guards clean them)."""
        served = self.live.current  # this request's model, whatever is swapped in meanwhile
        try:
            body = await read_body(receive)
            self.parsing += 1
            try:
                headers = dict(scope["headers"])
                if len(body) <= INLINE_PARSE_BYTES:
                    data, params, respond, pixels = parsed(parse, body, headers, served)
                else:
                    data, params, respond, pixels = await asyncio.to_thread(parsed, parse, body, headers, served)
            finally:
                self.parsing -= 1
            predictions, sink = await self._predict(served, data, params, pixels)
            answer, content_type, answer_headers = respond(predictions)
        except Exception as exc:
            status, payload, extra = error_answer(exc)
            return await send_json(send, status, payload, [*served.headers, *extra])
        request_id = self._reserve(sink)
        named = [(PREDICTION_ID_HEADER.lower().encode(), request_id.encode())] if request_id else []
        try:
            await send_bytes(send, 200, answer, content_type, [*answer_headers, *served.headers, *named])
        finally:
            if request_id:
                self.log.fill(request_id, {k: served.info.get(k) for k in ("name", "version", "run_id")}, sink[0])
        if sink:
            asyncio.get_running_loop().run_in_executor(None, count_seen, sink)

    async def _predict(self, served, data, params, pixels: int):
        """The model's answer and what it saw, once the request's work (`pixels` to decode) is admitted."""
        rows = len(data) if isinstance(data, pd.DataFrame) else 1
        if self.queued_rows and self.queued_rows + rows > self.max_queued_rows:
            raise Refused(429, f"this worker has {self.queued_rows:,} rows to score already (at most "
                               f"{self.max_queued_rows:,}); retry in a moment", [RETRY_AFTER])
        if self.queued_pixels and self.queued_pixels + pixels > MAX_IN_FLIGHT_PIXELS:
            raise Refused(429, f"this worker has {self.queued_pixels:,} pixels to decode already; retry in a "
                               "moment", [RETRY_AFTER])
        self.queued_rows += rows
        self.queued_pixels += pixels
        try:
            if isinstance(data, pd.DataFrame):
                future = self.batcher.submit(served.model, data, params)
            else:
                future = self.batcher.call(batching.predict_watched, served.model, data, params)
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout_s)
        finally:
            self.queued_rows -= rows
            self.queued_pixels -= pixels

    async def _v2(self, scope, receive, send):
        """The Open Inference Protocol (open_inference.py) on the model served now."""
        served, path, method = self.live.current, scope["path"], scope["method"]
        name, version = v2_identity(served)
        if path in (V2, V2 + "/health/live", V2 + "/health/ready"):
            if method != "GET":
                return await send_json(send, 405, {"error_code": HTTPStatus.METHOD_NOT_ALLOWED.name,
                                                   "message": f"GET {path}"})
            answers = {V2: open_inference.server_metadata(MLFLOW_VERSION), V2 + "/health/live": {"live": True},
                       V2 + "/health/ready": {"ready": True}}
            return await send_json(send, 200, answers[path], served.headers)
        match = open_inference.PATH.fullmatch(path)
        if not match:
            return await send_json(send, 404, {"error_code": HTTPStatus.NOT_FOUND.name,
                                               "message": f"no route {path}: see GET /v2 and /v2/models/{name}"})
        if match["name"] != name or match["version"] not in (None, version):
            asked = match["name"] + (f" version {match['version']}" if match["version"] else "")
            return await send_json(send, 404, {"error_code": HTTPStatus.NOT_FOUND.name, "message": (
                f"{asked} is not served here; this server serves {name}" + (f" version {version}" if version else ""))})
        expected = "POST" if match["action"] == "/infer" else "GET"
        if method != expected:
            return await send_json(send, 405, {"error_code": HTTPStatus.METHOD_NOT_ALLOWED.name,
                                               "message": f"{expected} {path}"})
        if match["action"] is None:
            return await send_json(send, 200, open_inference.model_metadata(name, version, served.with_detector),
                                   served.headers)
        if match["action"] == "/ready":
            return await send_json(send, 200, {"name": name, "ready": True}, served.headers)

        def parse(body: bytes, headers: dict, served):
            request = open_inference.parse_infer(body, headers.get(open_inference.HEADER_LENGTH.encode()),
                                                 served.with_detector)
            return request.frame, None, lambda predictions: open_inference.infer_response(
                request, predictions, name, version)

        return await self._score(scope, receive, send, parse)

    def _reserve(self, sink: list[seen.Seen]) -> str | None:
        """The prediction log's id for this answer (None: not logged), its rows' room held in the log's queue;
        they are queued once the answer is sent, and /feedback's flush waits for them. Queued before sending,
        the log writer's Python (~5 ms per 256 rows) held the GIL while the answer went out: +3-5 ms each."""
        if self.log is None or len(sink) != 1 or not self.log.sampled():
            return None
        return self.log.reserve(len(sink[0].images))

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
        status, answer = await asyncio.to_thread(self._store_feedback, await read_body(receive))
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


def parsed(parse, body: bytes, headers: dict, served):
    """A protocol's `parse`, and the decoded pixels its rows will cost (what admission counts besides rows)."""
    data, params, respond = parse(body, headers, served)
    return data, params, respond, contract.frame_pixels(data) if isinstance(data, pd.DataFrame) else 0


async def read_body(receive) -> bytes:
    body = bytearray()
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return bytes(body)


def error_answer(exc: Exception) -> tuple[int, dict, list]:
    """A scoring request's failure -> (status, {"error_code", "message"}, extra headers)."""
    if isinstance(exc, (Refused, open_inference.ProtocolError)):
        headers = getattr(exc, "headers", [])  # a Refused request may say when to retry
        return exc.status, {"error_code": HTTPStatus(exc.status).name, "message": str(exc)}, headers
    if isinstance(exc, invocations.UnsupportedMedia):
        return 415, {"error_code": HTTPStatus.UNSUPPORTED_MEDIA_TYPE.name, "message": str(exc)}, []
    if isinstance(exc, TimeoutError):
        return 504, {"error_code": HTTPStatus.GATEWAY_TIMEOUT.name,
                     "message": "Request processing time exceeded limit"}, []
    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        return status, {"error_code": exc.error_code, "message": exc.message}, [RETRY_AFTER] if status == 429 else []
    raise exc


def v2_identity(served) -> tuple[str, str | None]:
    """The model's name and version in the Open Inference Protocol's paths: the registered ones, or for a model
    from outside the registry (a run, a folder) the project's model name and no version."""
    version = served.info.get("version")
    return (str(served.info["name"]) if version else REGISTERED_MODEL_NAME), (str(version) if version else None)


def route_label(path: str) -> str:
    """/metrics' route label: the Open Inference Protocol's paths by kind (model names and versions vary)."""
    if path.startswith(V2 + "/models/"):
        return "/v2/models/infer" if path.endswith("/infer") else "/v2/models"
    if path.startswith(V2 + "/health"):
        return "/v2/health"
    return metrics.route_label(path, ROUTES)


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
    """Rows by input kind and predicted class, and those flagged not clothing, from what the model saw: one
    update per label (each is a locked write to a shared file with several workers)."""
    for answered in sink:
        for kind, count in collections.Counter(answered.kinds).items():
            metrics.IMAGES.labels(kind).inc(count)
        for index, count in enumerate(np.bincount(answered.class_index, minlength=len(CLASS_NAMES))):
            if count:
                metrics.PREDICTED.labels(CLASS_NAMES[index]).inc(int(count))
        if answered.ood_score is not None:
            flagged = int((~ood.in_distribution(answered.ood_score)).sum())
            if flagged:
                metrics.OUT_OF_DISTRIBUTION.inc(flagged)


def v2_error_shape(scope, error: dict) -> dict:
    """The Open Inference Protocol's errors are {"error": "<reason>"}: added beside our two fields."""
    return {**error, "error": error["message"]} if route_label(scope["path"]).startswith(V2) else error


def create_app(live: LiveModel, max_body_bytes: int = MAX_BODY_BYTES, log: PredictionLog | None = None,
               batcher: batching.Batcher | None = None, max_queued_rows: int = MAX_QUEUED_ROWS):
    """The whole scoring server around `live` (logging to `log`, if any; its forward passes in `batcher`'s
    thread), outermost first: metrics, clean errors, body limit, well-formed requests."""
    app = ScoringApp(live, log, batcher, max_queued_rows)
    guarded = BodyLimit(WellFormed(app, "/invocations", INVOCATIONS_HINT), max_body_bytes)
    return Observed(CleanErrors(guarded, v2_error_shape), "scoring", route_label)


def app_from_env():
    """uvicorn's factory: each worker process builds its own live model and app from serve.py's Settings."""
    settings = Settings.from_env()
    batcher = batching.Batcher(settings.batch_max_rows, settings.batch_max_wait_s)  # first: the check runs in it
    live = LiveModel(settings.model_uri, settings.model_path, settings.model_version, batcher.run,
                     settings.follow_interval_s, Path(settings.reload_trigger) if settings.reload_trigger else None)
    log = None
    if settings.log_url != PREDICTION_LOG_OFF:
        log = PredictionLog(settings.log_url, settings.log_sample_rate, settings.log_max_rows,
                            settings.log_max_days)
        atexit.register(log.flush)  # a restart or SIGTERM writes what is queued; only a kill -9 loses it
    app = create_app(live, settings.max_body_bytes, log, batcher, settings.max_queued_rows)
    settle_heap()
    return app


def settle_heap() -> None:
    """Exempt what the worker has loaded (libraries and the model: ~470,000 objects it keeps for life) from
    Python's full collections: each walked all of it with the GIL held, ~0.34 s in which no request moved, and
    the first burst of 64 clients met one (its p99 ~2x the next burst's). Later collections walk only what came
    after: requests' garbage, and the versions the server swaps in. The first version, if its objects hold
    reference cycles, stays in memory after a swap: one model, a few MB."""
    gc.collect()
    gc.freeze()
