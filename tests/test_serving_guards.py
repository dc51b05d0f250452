"""The scoring server's ASGI guards on their own: the body limit on streamed bodies, clean error bodies, the
bound on bodies held at once; a worker's settings and its heap."""

import asyncio
import gc
import json
import types

from fmnist_pyfunc import asgi_guards, scoring
from fmnist_pyfunc.config import PREDICTION_LOG_OFF

LIMIT = 1000


def _call(headers: list, chunks: list[bytes]) -> tuple[list, list]:
    """BodyLimit around an app that answers ok, on one request whose body arrives in `chunks`.
    Returns the messages sent and the bodies the app saw."""
    incoming = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent, seen = [], []

    async def receive():
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    async def inner(scope, receive, send):
        seen.append((await receive())["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    asyncio.run(asgi_guards.BodyLimit(inner, LIMIT)({"type": "http", "headers": headers}, receive, send))
    return sent, seen


def test_chunked_body_over_the_limit_is_refused_without_reaching_the_app():
    """A chunked body (no Content-Length) is counted as it arrives and refused with 413 once over the limit; the app
    never sees it."""
    sent, seen = _call([], [b"x" * 400] * 3)  # no Content-Length: counted as it arrives
    assert sent[0]["status"] == 413 and not seen
    assert json.loads(sent[1]["body"])["error_code"] == "REQUEST_ENTITY_TOO_LARGE"


def test_declared_length_over_the_limit_is_refused_before_reading():
    """A Content-Length over the limit is refused with 413 before any body is read."""
    sent, seen = _call([(b"content-length", str(LIMIT + 1).encode())], [b"x"])
    assert sent[0]["status"] == 413 and not seen


def test_body_at_the_limit_reaches_the_app_whole():
    """A body of exactly the limit, in chunks, reaches the app whole."""
    sent, seen = _call([], [b"x" * 500, b"y" * 500])
    assert sent[0]["status"] == 200 and seen == [b"x" * 500 + b"y" * 500]


def test_clean_error_keeps_mlflow_reason_only():
    """Error answers keep MLflow's reason only: no echoed input, no stack trace, at most MAX_ERROR_CHARS."""
    predict_error = {"error_code": "INVALID_PARAMETER_VALUE",
                     "message": "Failed to predict data '   pixels\n0  [[1]]'. \nError: row 0: bad shape"}
    assert asgi_guards.clean_error(400, json.dumps(predict_error).encode()) == {
        "error_code": "INVALID_PARAMETER_VALUE", "message": "row 0: bad shape"}
    unexpected = {"error_code": "BAD_REQUEST", "message": "Encountered an unexpected error",
                  "stack_trace": "Traceback (most recent call last): ..."}
    assert "stack_trace" not in asgi_guards.clean_error(400, json.dumps(unexpected).encode())
    assert asgi_guards.clean_error(504, b"Request processing time exceeded limit") == {
        "error_code": "GATEWAY_TIMEOUT", "message": "Request processing time exceeded limit"}
    long = asgi_guards.clean_error(400, json.dumps({"message": "x" * 10_000}).encode())["message"]
    assert len(long) == asgi_guards.MAX_ERROR_CHARS + len("...")


def test_bodies_held_at_once_are_bounded_and_the_next_one_is_told_to_retry():
    """While requests hold `max_held_bytes` of bodies, one more gets 429 with Retry-After before its body is
    read; once they are answered, it passes, and one body alone over the budget (within the body limit) too."""
    release = asyncio.Event()

    async def inner(scope, receive, send):
        await receive()
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    app = asgi_guards.BodyLimit(inner, LIMIT, max_held_bytes=2 * 600)

    async def scenario():
        held = [asyncio.create_task(_post(app, 600)) for _ in range(2)]
        await asyncio.sleep(0.01)
        refused = await asyncio.wait_for(_post(app, 600), timeout=5)
        release.set()
        return refused, await asyncio.gather(*held), await _post(app, 600)

    refused, held, after = asyncio.run(scenario())
    assert refused["status"] == 429 and refused["headers"][b"retry-after"] == b"1"
    assert [r["status"] for r in held] == [200, 200] and after["status"] == 200
    lone = asgi_guards.BodyLimit(inner, LIMIT, max_held_bytes=100)
    assert asyncio.run(_post(lone, 600))["status"] == 200


async def _post(app, size: int) -> dict:
    """One request with a body of `size` bytes, declared: the answer's status and headers."""
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"x" * size, "more_body": False}

    async def send(message):
        sent.append(message)

    await app({"type": "http", "headers": [(b"content-length", str(size).encode())]}, receive, send)
    return {"status": sent[0]["status"], "headers": dict(sent[0]["headers"])}


def test_serving_settings_reach_every_worker_whole(monkeypatch):
    """What serve.py decides (model, download, version, follow interval, reload trigger, body limit) is what
    each uvicorn worker reads back, through one environment variable."""
    settings = scoring.Settings("models:/m/Production", "/tmp/model", "7", 2.5, "/tmp/reload", 1234)
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)
    assert scoring.Settings.from_env() == settings
    unregistered = scoring.Settings("export/model", "export/model")
    monkeypatch.setenv(scoring.SETTINGS_ENV, unregistered.to_env()[scoring.SETTINGS_ENV])
    assert scoring.Settings.from_env() == unregistered and unregistered.model_version is None


def test_a_scoring_worker_exempts_what_it_loaded_from_full_collections(monkeypatch):
    """A worker built by app_from_env freezes the heap it has loaded, so that Python's full collections (each
    ~0.3 s with the GIL held, over ~470,000 objects) no longer walk it; garbage made later is still collected."""
    live = types.SimpleNamespace(run=None)
    monkeypatch.setattr(scoring, "LiveModel", lambda *args: live)
    monkeypatch.setenv(scoring.SETTINGS_ENV, scoring.Settings("models:/m/Production", "/tmp/model",
                                                              log_url=PREDICTION_LOG_OFF).to_env()[scoring.SETTINGS_ENV])
    gc.unfreeze()
    try:
        tracked = len(gc.get_objects())
        app = scoring.app_from_env()
        assert app.app.app.app.app.live is live  # the scoring app, inside its guards
        assert gc.get_freeze_count() >= tracked // 2, (gc.get_freeze_count(), tracked)
        cycle = []
        cycle.append(cycle)
        del cycle
        assert gc.collect() >= 1  # objects made after the freeze are still collected
    finally:
        gc.unfreeze()
