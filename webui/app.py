"""Flask upload UI. It never loads torch or the model: every prediction goes to the scoring server.

    python -m entrypoints.ui          (what `make ui` runs: gunicorn 'webui.app:create_app()')
Configuration (environment): FMNIST_SCORING_URL (default http://127.0.0.1:5001). What model answers is the
scoring server's to say: /model_info relays its GET /model, and each prediction carries the X-Model-*
headers of the answer it came in, so the page can never name another model than the one that answered.
GET /metrics: Prometheus text format (fmnist_pyfunc/metrics.py). GET /monitor: the drift page (plots of what
the model is shown and answers, from the scoring server's GET /monitor, relayed as /monitor.json).

POST /feedback {"prediction_id": "...", "label": <class index or name>} relays a user's correction to the
scoring server's prediction log, under the same CSRF rule as /predict (the page sends its token).

POST /predict takes either
  * the page's form upload (multipart/form-data, field `files`), which must carry the page's CSRF token
    (header X-CSRF-Token or field csrf_token) matching its cookie: a double-submit token. Another site can
    make a browser post a form here, but can neither read the token nor send the SameSite=Strict cookie;
  * the JSON API, `{"images": ["<base64 image>", ...]}` with Content-Type application/json, which needs
    no cookie: browsers send JSON across sites only after a CORS preflight, and this app allows none.
"""

from __future__ import annotations

import base64
import hmac
import os
import secrets
import time
from collections.abc import Callable
from functools import partial
from http import HTTPStatus
from pathlib import Path

import numpy as np
import requests
from flask import Flask, Response, g, jsonify, render_template, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from fmnist_pyfunc import config, contract, metrics, transport  # no torch, no MLflow: numpy, Pillow, prometheus_client
from webui import samples

DEFAULT_SCORING_URL = f"http://{config.LOOPBACK}:{config.SCORING_PORT}"
MAX_FILES = 16                        # images per request: one scoring call, well under its 1,024-row limit
MAX_FILE_BYTES = 5 * 2**20            # 5 MiB per image: phone photos fit, anything larger is not a photo
# All files of one request. As base64 (x4/3) they must fit the scoring server's body limit
# (transport.MAX_BODY_BYTES, 32 MiB): 20 MiB -> 26.7 MiB.
MAX_REQUEST_BYTES = 20 * 2**20
CSRF_COOKIE = "fmnist_csrf"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
UPSTREAM_TIMEOUT_S = 10.0             # a healthy server answers a 16-image batch in well under a second
HEALTH_TIMEOUT_S = 2.0
MODEL_INFO_TTL_S = 5.0                # the page polls /model_info; the scoring server follows within 10 s
MODEL_HEADERS = {"name": "X-Model-Name", "version": "X-Model-Version", "run_id": "X-Model-Run-Id"}
ROUTES = frozenset({"/", "/predict", "/feedback", "/monitor", "/monitor.json", "/model_info", "/health", "/metrics",
                    "/samples/<int:index>.png"})
MAX_FEEDBACK_BYTES = 1024                 # {"prediction_id": <48 characters>, "label": <a class name>}


class UploadError(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message, self.status = message, status


def error_answer(status: int, message: str):
    """Both servers answer every error as {"error_code", "message"}; the code is the HTTP status' name."""
    return jsonify(error_code=HTTPStatus(status).name, message=message), status


def _check_image(name: str, payload: bytes) -> None:
    """Refuse what the model would refuse (not a complete image, a decompression bomb) before sending it."""
    if len(payload) > MAX_FILE_BYTES:
        raise UploadError(f"{name}: larger than {MAX_FILE_BYTES // 2**20} MiB", 413)
    try:
        contract.open_image(payload, name)
    except contract.InputError as exc:
        raise UploadError(str(exc)) from None


def _check_csrf() -> None:
    """Form posts must repeat the token of their cookie (double submit); JSON API calls need none."""
    if request.mimetype == "application/json":
        return
    cookie = request.cookies.get(CSRF_COOKIE, "")
    sent = request.headers.get(CSRF_HEADER) or request.form.get(CSRF_FIELD, "")
    if not cookie or not hmac.compare_digest(cookie.encode(), sent.encode()):
        raise UploadError("missing or stale CSRF token: reload the page and try again", 403)


def _decode(encoded, name: str) -> bytes:
    try:
        return contract.decode_base64(encoded, name)
    except contract.InputError as exc:
        raise UploadError(str(exc)) from None


def _json_uploads() -> list[tuple[str, Callable[[], bytes]]]:
    depth = transport.json_depth(request.get_data(cache=True))
    if depth > transport.MAX_JSON_DEPTH:
        raise UploadError(f"JSON nested {depth} levels deep (at most {transport.MAX_JSON_DEPTH}): send "
                          '{"images": ["<base64 image>", ...]}')
    body = request.get_json(silent=True)
    images = body.get("images") if isinstance(body, dict) else None
    if not isinstance(images, list) or not images:
        raise UploadError('send JSON {"images": ["<base64 image or data URL>", ...]} with at least one image')
    names = [f"image {index + 1}" for index in range(len(images))]
    return [(name, partial(_decode, encoded, name)) for name, encoded in zip(names, images, strict=True)]


def _form_uploads() -> list[tuple[str, Callable[[], bytes]]]:
    files = [f for f in request.files.getlist("files") if f is not None]
    if not files or all(not f.filename for f in files):
        raise UploadError(f"no file uploaded: choose one or more images ({contract.ACCEPTED})")
    # The client's filename is only ever echoed back (escaped by the page), never used as a path.
    names = [Path(f.filename or "").name[:100] or f"file {index + 1}" for index, f in enumerate(files)]
    return [(name, partial(f.read, MAX_FILE_BYTES + 1)) for name, f in zip(names, files, strict=True)]


def _read_uploads() -> list[tuple[str, bytes]]:
    """The request's images, from the JSON API or the form, each checked; nothing read beyond the limits."""
    json_api = request.mimetype == "application/json"
    pending = _json_uploads() if json_api else _form_uploads()
    if len(pending) > MAX_FILES:
        noun = "images" if json_api else "files"
        raise UploadError(f"{len(pending)} {noun}: at most {MAX_FILES} per request", 413)
    uploads = []
    for name, read in pending:
        payload = read()
        _check_image(name, payload)
        uploads.append((name, payload))
    return uploads


def _score(session: requests.Session, scoring_url: str, images: list[bytes],
           timeout_s: float) -> tuple[list[dict], dict, str | None]:
    """The predictions, the model that made them (from the answer's X-Model-* headers) and the id the
    prediction log gave them (None when the scoring server logged nothing)."""
    body = {"dataframe_records": [{"image": base64.b64encode(img).decode()} for img in images],
            "params": {"return_seen": True}}  # the 28x28 image the model classified, shown beside each upload
    try:
        response = session.post(f"{scoring_url}/invocations", json=body, timeout=timeout_s)
    except requests.Timeout:
        raise UploadError("the model server did not answer in time; try again in a moment", 504) from None
    except requests.ConnectionError:
        raise UploadError("the model server is not reachable right now; try again in a moment", 503) from None
    if response.status_code == 400:
        raise UploadError("the model could not read one of these images", 422)
    if response.status_code in (429, 504):  # the scoring server's work limits: its message says which
        raise UploadError(_upstream_message(response), response.status_code)
    if response.status_code != 200:
        raise UploadError("the model server failed to answer; try again in a moment", 502)
    model = {key: response.headers.get(header) for key, header in MODEL_HEADERS.items()}
    return response.json()["predictions"], model, response.headers.get(config.PREDICTION_ID_HEADER)


def _upstream_message(response: requests.Response) -> str:
    try:
        return str(response.json()["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return "the model server is busy; try again in a moment"


def _seen_png(prediction: dict) -> str | None:
    """The 28x28 image the model classified, as a data URL the page can show (None from older models)."""
    seen = prediction.get("seen")
    if seen is None:
        return None
    return "data:image/png;base64," + contract.png_base64(np.asarray(seen, dtype=np.uint8))


def _served_model(session: requests.Session, scoring_url: str) -> dict | None:
    """The scoring server's GET /model, or None when it cannot say."""
    try:
        response = session.get(f"{scoring_url}/model", timeout=HEALTH_TIMEOUT_S)
    except requests.RequestException:
        return None
    return response.json() if response.status_code == 200 else None


def _observe(app: Flask) -> None:
    """Requests by route and status, latency and request bytes, as the scoring server counts them."""

    @app.before_request
    def started():
        g.started = time.perf_counter()

    @app.after_request
    def observed(response):
        rule = request.url_rule.rule if request.url_rule else request.path
        route = metrics.route_label(rule, ROUTES)
        metrics.REQUESTS.labels("ui", route, str(response.status_code)).inc()
        metrics.LATENCY.labels("ui", route).observe(time.perf_counter() - g.get("started", time.perf_counter()))
        metrics.REQUEST_BYTES.labels("ui", route).inc(request.content_length or 0)
        return response


def create_app(scoring_url: str | None = None, upstream_timeout_s: float = UPSTREAM_TIMEOUT_S) -> Flask:
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES
    scoring_url = (scoring_url or os.environ.get("FMNIST_SCORING_URL", DEFAULT_SCORING_URL)).rstrip("/")
    gallery = samples.load_gallery()
    upstream = requests.Session()  # keep-alive to the scoring server: no TCP handshake per prediction
    info_cache: dict = {"at": 0.0, "value": None}
    _observe(app)

    @app.errorhandler(UploadError)
    def upload_error(err: UploadError):
        return error_answer(err.status, err.message)

    @app.errorhandler(HTTPException)
    def http_error(err: HTTPException):
        if isinstance(err, RequestEntityTooLarge):
            return error_answer(413, f"upload larger than {MAX_REQUEST_BYTES // 2**20} MiB in total")
        return error_answer(err.code, err.description)

    @app.errorhandler(Exception)
    def unexpected(err: Exception):
        app.logger.exception("unexpected error")  # details go to the log, never to the user
        return error_answer(500, "internal error")

    @app.get("/")
    def index():
        token = request.cookies.get(CSRF_COOKIE) or secrets.token_urlsafe(32)
        page = app.make_response(render_template("index.html", samples=gallery, max_files=MAX_FILES,
                                                 max_file_mib=MAX_FILE_BYTES // 2**20, csrf_token=token,
                                                 accepted=contract.ACCEPTED, media_types=contract.MEDIA_TYPES))
        page.set_cookie(CSRF_COOKIE, token, httponly=True, samesite="Strict")
        return page

    @app.post("/predict")
    def predict():
        _check_csrf()
        uploads = _read_uploads()
        predictions, model, logged = _score(upstream, scoring_url, [payload for _, payload in uploads],
                                            upstream_timeout_s)
        results = [{"filename": name, "class_index": p["class_index"], "class_name": p["class_name"],
                    "prediction_id": f"{logged}-{row}" if logged else None,  # None: not logged, no feedback
                    "probability": max(p["probabilities"]), "probabilities": p["probabilities"],
                    # null from a model logged before the out-of-distribution detector
                    "in_distribution": p.get("in_distribution"), "ood_score": p.get("ood_score"),
                    "seen": _seen_png(p)}
                   for row, ((name, _), p) in enumerate(zip(uploads, predictions, strict=True))]
        return jsonify(results=results, class_names=config.CLASS_NAMES, model=model)

    @app.post("/feedback")
    def feedback():
        _check_csrf()
        body = request.get_data(cache=True)
        if len(body) > MAX_FEEDBACK_BYTES or request.mimetype != "application/json":
            raise UploadError('send JSON {"prediction_id": "...", "label": <class index or name>}', 400)
        return _relay(upstream.post, f"{scoring_url}/feedback", data=body,
                      headers={"Content-Type": "application/json"})

    @app.get("/monitor")
    def monitor_page():
        return render_template("monitor.html")

    @app.get("/monitor.json")
    def monitor_json():
        return _relay(upstream.get, f"{scoring_url}/monitor")

    def _relay(method, url: str, **kwargs):
        """The scoring server's JSON answer and status as they are; 503 when it cannot be reached."""
        try:
            response = method(url, timeout=upstream_timeout_s, **kwargs)
            return jsonify(response.json()), response.status_code
        except requests.RequestException:
            return error_answer(503, "the model server is not reachable right now; try again in a moment")
        except ValueError:
            return error_answer(502, "the model server gave an answer that is not JSON")

    @app.get("/samples/<int:index>.png")
    def sample_image(index: int):
        if not 0 <= index < len(gallery):
            return error_answer(404, "no such sample")
        return gallery[index]["png"], 200, {"Content-Type": "image/png", "Cache-Control": "max-age=86400"}

    @app.get("/model_info")
    def model_info():
        if time.monotonic() - info_cache["at"] > MODEL_INFO_TTL_S or info_cache["value"] is None:
            info = _served_model(upstream, scoring_url)
            if info is None:
                return error_answer(503, "the scoring server cannot say which model it serves right now")
            info_cache.update(at=time.monotonic(), value=info)
        return jsonify(info_cache["value"])

    @app.get("/metrics")
    def prometheus_metrics():
        body, content_type = metrics.exposition()
        return Response(body, content_type=content_type)

    @app.get("/health")
    def health():
        try:
            upstream_ok = requests.get(f"{scoring_url}/ping", timeout=HEALTH_TIMEOUT_S).status_code == 200
        except requests.RequestException:
            upstream_ok = False
        status = {"ui": "ok", "scoring_server": "ok" if upstream_ok else "unreachable"}
        return jsonify(status), 200 if upstream_ok else 503

    return app
