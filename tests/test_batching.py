"""Serving at the model's speed: one parse per request, forward passes shared by concurrent requests with
unchanged answers and each request's own errors, no wait when idle, admission by queued work not by a
count of requests."""

import asyncio
import base64
import json
import re
import socket
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
import uvicorn
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_EXHAUSTED

from entrypoints import serve
from fmnist_pyfunc import batching, inference, invocations, live_model, scoring, transport
from fmnist_testkit import harness
from fmnist_testkit.images import image_bytes, upscaled

CLIENTS = 64  # concurrent single-image clients, as the burst


@pytest.fixture(scope="module")
def model(trained_run):
    return mlflow.pyfunc.load_model(trained_run.data.tags["model_uri"])


class Held:
    """A model whose calls wait for `release` once `hold` is set: requests queue behind the one in progress."""

    def __init__(self, model):
        self.model, self.metadata = model, getattr(model, "metadata", None)
        self.hold, self.release, self.sizes = threading.Event(), threading.Event(), []

    def predict(self, frame, params=None):
        self.sizes.append(len(frame))
        if self.hold.is_set():
            self.release.wait(30)
        return self.model.predict(frame, params=params)


def _rows(images) -> pd.DataFrame:
    return pd.DataFrame({"pixels": [image.tolist() for image in images]})


def _submit_behind_a_busy_model(batcher, held, frames):
    """The first frame's pass is in progress (held) while the others are submitted: they wait together."""
    held.hold.set()
    first = batcher.submit(held, frames[0], None)
    while not held.sizes:
        time.sleep(0.001)
    futures = [first, *(batcher.submit(held, frame, None) for frame in frames[1:])]
    held.hold.clear()
    held.release.set()
    return futures


@pytest.mark.e2e
def test_waiting_requests_share_one_pass_with_the_answers_each_would_get_alone(model, dataset):
    """40 requests that arrive while the model is busy are scored in one forward pass; each gets exactly its
    own rows of the answer, as when scored alone: classes and probabilities bit for bit, the out-of-distribution
    score to 1e-9 (float64 distances: in float32 it moved by ~1e-5 with the batch's size)."""
    images = dataset.test_images[:41]
    frames = [_rows(images[i:i + 1]) for i in range(40)] + [_rows(images[40:41].repeat(3, 0))]
    held = Held(model)
    results = [f.result(30) for f in _submit_behind_a_busy_model(batching.Batcher(arriving=lambda: 0), held, frames)]
    assert held.sizes == [1, 42], held.sizes  # the first alone, then the 39 others and the 3-row one together
    for frame, (answer, seen) in zip(frames, results, strict=True):
        alone = model.predict(frame)
        assert answer["class_index"].tolist() == alone["class_index"].tolist()
        assert answer["probabilities"].tolist() == alone["probabilities"].tolist()
        assert answer["in_distribution"].tolist() == alone["in_distribution"].tolist()
        np.testing.assert_allclose(answer["ood_score"], alone["ood_score"], rtol=1e-9, atol=1e-9)
        assert len(seen) == 1 and np.array_equal(seen[0].class_index, alone["class_index"])  # for the log


@pytest.mark.e2e
def test_a_bad_request_in_a_shared_pass_fails_alone(model, dataset):
    """A request with a bad row among waiting good ones gets its own error; the others their answers."""
    images = dataset.test_images[:6]
    frames = [_rows(images[i:i + 1]) for i in range(6)]
    frames[3] = pd.DataFrame({"pixels": [np.zeros((27, 28)).tolist()]})
    held = Held(model)
    futures = _submit_behind_a_busy_model(batching.Batcher(arriving=lambda: 0), held, frames)
    with pytest.raises(MlflowException, match=r"shape \(28, 28\)"):
        futures[3].result(30)
    for index in (0, 1, 2, 4, 5):
        assert futures[index].result(30)[0]["class_index"].tolist() == model.predict(frames[index])[
            "class_index"].tolist()


@pytest.mark.e2e
def test_an_idle_server_never_waits_and_a_busy_one_waits_at_most_the_maximum(model, dataset):
    """Alone, a request runs at once even with a long maximum wait; while other requests are still being
    parsed, the pass waits for them up to that maximum and no longer."""
    frame = _rows(dataset.test_images[:1])
    batching.Batcher(arriving=lambda: 0).submit(model, frame, None).result(30)  # warm-up
    idle = batching.Batcher(max_wait_s=2.0, arriving=lambda: 0)
    start = time.perf_counter()
    idle.submit(model, frame, None).result(30)
    assert time.perf_counter() - start < 1.0
    expecting = batching.Batcher(max_wait_s=0.5, arriving=lambda: 1)  # one more "in parsing" that never comes
    start = time.perf_counter()
    expecting.submit(model, frame, None).result(30)
    assert 0.45 <= time.perf_counter() - start < 1.5


@pytest.mark.e2e
def test_every_forward_pass_of_a_worker_runs_in_its_one_model_thread(trained_run, dataset, monkeypatch):
    """The check of a loaded version, a batched request, a request run alone and one whose input is not a frame
    all run the network in the worker's model thread, none in the thread that loaded the model or asked: with a
    second thread running torch, libgomp holds more threads than CPUs, its idle threads then sleep between
    parallel regions, and every later pass was ~25 % slower."""
    threads, forward = [], inference.forward
    monkeypatch.setattr(inference, "forward",
                        lambda *args: threads.append(threading.current_thread().name) or forward(*args))
    path = mlflow.artifacts.download_artifacts(trained_run.data.tags["model_uri"])
    pixels = [image.tolist() for image in dataset.test_images[:3]]
    frame_body = json.dumps({"dataframe_records": [{"pixels": p} for p in pixels]}).encode()
    tensor_body = json.dumps({"inputs": {"pixels": pixels}}).encode()
    for batcher in (batching.Batcher(), batching.Batcher(0)):
        served = live_model.load_checked(path, {"name": "m", "version": "1", "run_id": "r"}, batcher.run)
        app = scoring.create_app(types.SimpleNamespace(current=served), batcher=batcher)
        for body in (frame_body, tensor_body):
            assert asyncio.run(_post(app, body))["status"] == 200
    assert len(threads) == 6 and set(threads) == {"batcher"}, threads


def _served(model) -> live_model.Served:
    return live_model.Served(model, None, {"name": "m", "version": None}, [(b"x-model-name", b"m")])


async def _post(app, body: bytes, content_type: bytes = b"application/json", path: str = "/invocations") -> dict:
    sent = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    await app({"type": "http", "path": path, "method": "POST", "client": ("127.0.0.1", 1),
               "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]},
              receive, send)
    return {"status": sent[0]["status"], "headers": dict(sent[0]["headers"]),
            "body": b"".join(m.get("body", b"") for m in sent[1:])}


def test_admission_counts_queued_rows_not_requests(model, dataset):
    """A burst of 100 single-image requests all wait their turn (the old cap refused all beyond 16); past
    the bound on queued rows a request gets 429 with Retry-After, and is accepted once the queue drains,
    even if it alone is larger than the bound; the model's own 'busy' is a 429 with Retry-After too."""
    held = Held(model)
    one = json.dumps({"dataframe_records": [{"pixels": dataset.test_images[0].tolist()}]}).encode()
    twenty = json.dumps({"dataframe_records": [{"pixels": i.tolist()} for i in dataset.test_images[:20]]}).encode()

    async def scenario():
        app = scoring.ScoringApp(types.SimpleNamespace(current=_served(held)), max_queued_rows=8)
        burst_app = scoring.ScoringApp(types.SimpleNamespace(current=_served(model)))
        burst = await asyncio.gather(*(_post(burst_app, one) for _ in range(100)))
        held.hold.set()
        waiting = [asyncio.create_task(_post(app, one)) for _ in range(8)]
        while app.queued_rows < 8:
            await asyncio.sleep(0.01)
        refused = await _post(app, one)
        held.hold.clear()
        held.release.set()
        return burst, refused, await asyncio.gather(*waiting), await _post(app, twenty)

    burst, refused, accepted, alone = asyncio.run(scenario())
    assert [r["status"] for r in burst] == [200] * 100
    assert refused["status"] == 429 and refused["headers"][b"retry-after"] == b"1"
    assert b"rows to score already" in refused["body"]
    assert [r["status"] for r in accepted] == [200] * 8 and alone["status"] == 200

    class Busy:
        metadata = model.metadata

        def predict(self, frame, params=None):
            raise MlflowException("decoding budget in use", error_code=RESOURCE_EXHAUSTED)

    busy = asyncio.run(_post(scoring.ScoringApp(types.SimpleNamespace(current=_served(Busy()))), one))
    assert busy["status"] == 429 and busy["headers"][b"retry-after"] == b"1"


def test_a_body_is_parsed_once_and_every_mlflow_form_and_csv_is_answered(model, dataset, monkeypatch):
    """dataframe_records, dataframe_split, inputs, instances and CSV (base64 images, or pixels as JSON text)
    give the in-process answers, each body read by one JSON parse and never by MLflow's own parser."""
    images = dataset.test_images[:4]
    expected = model.predict(_rows(images))["class_index"].tolist()
    pixels = [image.tolist() for image in images]
    pngs = [base64.b64encode(image_bytes(upscaled(image))).decode() for image in images]
    bodies = {
        "dataframe_records": json.dumps({"dataframe_records": [{"pixels": p} for p in pixels]}).encode(),
        "dataframe_split": json.dumps({"dataframe_split": {"columns": ["pixels"], "data": [[p] for p in pixels]}}
                                      ).encode(),
        "inputs": json.dumps({"inputs": {"pixels": pixels}}).encode(),
        "instances": json.dumps({"instances": [{"pixels": p} for p in pixels]}).encode(),
    }
    parses, loads = [], transport.loads
    monkeypatch.setattr(transport, "loads", lambda body: parses.append(1) or loads(body))
    monkeypatch.setattr(invocations.mlflow_server, "json", None)  # MLflow's parser, if called, fails
    app = scoring.create_app(types.SimpleNamespace(current=_served(model)), batcher=batching.Batcher(0))
    for form, body in bodies.items():
        parses.clear()
        answer = asyncio.run(_post(app, body))
        assert answer["status"] == 200, (form, answer["body"][:300])
        assert [p["class_index"] for p in json.loads(answer["body"])["predictions"]] == expected, form
        assert len(parses) == 1, form
    csv_images = pd.DataFrame({"image": pngs}).to_csv(index=False).encode()
    answer = asyncio.run(_post(app, csv_images, b"text/csv"))
    assert answer["status"] == 200, answer["body"][:300]
    from_images = [p["class_index"] for p in json.loads(answer["body"])["predictions"]]
    assert from_images == model.predict(pd.DataFrame({"image": pngs}))["class_index"].tolist()
    csv_pixels = pd.DataFrame({"pixels": [json.dumps(p) for p in pixels]}).to_csv(index=False).encode()
    answer = asyncio.run(_post(app, csv_pixels, b"text/csv; charset=utf-8"))
    assert [p["class_index"] for p in json.loads(answer["body"])["predictions"]] == expected
    for bad, content_type, status in ((b"pixels\n[[1, 2", b"text/csv", 400), (b"", b"text/csv", 400),
                                      (csv_images, b"text/csv; charset=latin-1", 415),
                                      (bodies["inputs"], b"application/xml", 415)):
        answer = asyncio.run(_post(app, bad, content_type))
        assert answer["status"] == status, (bad[:20], answer["body"][:300])
        assert set(json.loads(answer["body"])) == {"error_code", "message"}


def _batch_passes(scoring_url: str) -> tuple[float, float]:
    """(forward passes, passes of one row) from /metrics' fmnist_batch_rows histogram."""
    text = requests.get(f"{scoring_url}/metrics", timeout=10).text
    total = float(re.search(r"^fmnist_batch_rows_count (\S+)$", text, re.M)[1])
    single = float(re.search(r'^fmnist_batch_rows_bucket\{le="1.0"\} (\S+)$', text, re.M)[1])
    return total, single


@pytest.mark.e2e
def test_64_concurrent_clients_are_all_answered_in_shared_passes(scoring_url, dataset):
    """64 clients sending 256 single-image requests at once: every request answered 200 with its own
    image's class (as when sent alone), and the server scored them in passes of several rows."""
    images = dataset.test_images[:CLIENTS]
    bodies = [json.dumps({"dataframe_records": [{"pixels": image.tolist()}]}) for image in images]
    alone = [requests.post(f"{scoring_url}/invocations", data=body, headers={"Content-Type": "application/json"},
                           timeout=60).json()["predictions"][0]["class_index"] for body in bodies]
    passes_before, singles_before = _batch_passes(scoring_url)

    def client(index: int) -> list[tuple[int, int]]:
        session = requests.Session()
        answers = []
        for _ in range(4):
            response = session.post(f"{scoring_url}/invocations", data=bodies[index],
                                    headers={"Content-Type": "application/json"}, timeout=60)
            answers.append((response.status_code, response.json()["predictions"][0]["class_index"]
                            if response.status_code == 200 else None))
        return answers

    with ThreadPoolExecutor(CLIENTS) as pool:
        answers = list(pool.map(client, range(CLIENTS)))
    assert all(status == 200 and answer == alone[i] for i, got in enumerate(answers) for status, answer in got)
    passes, singles = _batch_passes(scoring_url)
    assert passes - passes_before < 4 * CLIENTS and passes - passes_before > singles - singles_before


def test_several_workers_answer_without_waiting_for_a_delayed_ack(monkeypatch):
    """With several workers the listening socket has TCP_NODELAY, and so has each connection it accepts:
    uvicorn's own socket lacked it, an answer's headers and body went as two packets and every request
    waited ~40 ms for the client's delayed ACK (one image: 52 ms p50 with 2 workers, ~10 ms with 1)."""
    sockets = []

    class Supervisor:  # uvicorn's Multiprocess, without starting the workers
        def __init__(self, config, sockets: list):
            self.sockets = sockets

        def run(self):
            sockets.extend(self.sockets)

    monkeypatch.setattr(serve, "Multiprocess", Supervisor)
    serve.run_uvicorn(uvicorn.Config("fmnist_pyfunc.scoring:app_from_env", factory=True, host="127.0.0.1",
                                     port=harness.free_port(), workers=2))
    (listening,) = sockets
    listening.listen()
    with socket.create_connection(listening.getsockname()):
        accepted, _ = listening.accept()
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        accepted.close()
    listening.close()
