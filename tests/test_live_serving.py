"""Live serving on real servers and a real registry: the scoring server follows promotions without a restart
or a failed request, refuses a broken version, follows a rollback, names the model in every answer, and
both servers count what they did in /metrics."""

import asyncio
import json
import re
import threading
import time

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests

from fmnist_pyfunc import config, live_model, metrics, registry, scoring, tracking
from fmnist_pyfunc.pyfunc_model import WEIGHTS_ARTIFACT
from fmnist_testkit import harness, outliers
from fmnist_testkit.images import encode

pytestmark = pytest.mark.e2e  # one worker runs this module (conftest.ONE_WORKER_MODULES)

NAME = config.REGISTERED_MODEL_NAME
FOLLOW_S = 1.0           # the servers under test re-resolve Production this often
POLL_S = 0.2             # between two looks at /health or /metrics while waiting for a worker
SWITCH_DEADLINE_S = 30   # a download and load of a tiny model takes ~1-2 s; generous for a busy CI machine
# A promotion reaches every worker within one follow interval plus a download and load of the new version;
# the load's allowance covers a CI machine whose cores are shared with other test workers.
LOAD_ALLOWANCE_S = 15
UI_MODEL_CACHE_S = 5     # the UI caches /model this long (webui/app.py)
TINY = {"epochs": 1, "max_train_samples": 2000, "width": 8, "val_size": 500}


def _broken_version(good_version: str, tmp_path) -> str:
    """A new version whose weights artifact is garbage: it registers fine and fails to load."""
    folder = mlflow.artifacts.download_artifacts(f"models:/{NAME}/{good_version}", dst_path=str(tmp_path / "copy"))
    weights = next(p for p in (tmp_path / "copy").rglob("*") if p.is_file() and WEIGHTS_ARTIFACT in p.name)
    weights.write_bytes(b"not a state dict")
    with mlflow.start_run(run_name="broken") as run:
        mlflow.log_artifacts(folder, "model")
    return str(mlflow.register_model(f"runs:/{run.info.run_id}/model", NAME).version)


@pytest.fixture(scope="module")
def store(tmp_path_factory, tracking_uri, dataset):
    """A registry of its own with two tiny versions, v1 in Production."""
    root = tmp_path_factory.mktemp("live")
    uri = f"sqlite:///{root}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("live")
    versions = []
    for seed in (0, 1):
        run_id = tracking.run_training(config.validate({**TINY, "seed": seed}), dataset, progress=False)
        versions.append(str(mlflow.register_model(mlflow.get_run(run_id).data.tags["model_uri"], NAME).version))
    registry.crown(versions[0])
    yield uri, versions, root
    mlflow.set_tracking_uri(tracking_uri)


@pytest.fixture(scope="module")
def servers(store):
    """A scoring server with two workers following Production every FOLLOW_S, and the UI in front of it."""
    uri, _, root = store
    env = harness.child_env(uri, MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false")
    with harness.scoring_and_ui(config.PRODUCTION_MODEL_URI, env, root, scoring_workers=2, ui_workers=2,
                                scoring_args=("--follow-interval-s", str(FOLLOW_S))) as pair:
        yield pair.scoring_url, pair.ui_url


class Client(threading.Thread):
    """Scores one image after another until stopped; keeps every answer's status, X-Model-Version and the
    probabilities it gave. Its session keeps one connection alive, so one worker answers all of its requests."""

    def __init__(self, url: str, pixels: list):
        super().__init__(daemon=True)
        self.url, self.body, self.answers, self.running = url, {"dataframe_records": [{"pixels": pixels}]}, [], True

    def run(self):
        with requests.Session() as session:
            while self.running:
                try:
                    response = session.post(f"{self.url}/invocations", json=self.body, timeout=30)
                    probabilities = (response.json()["predictions"][0]["probabilities"]
                                     if response.status_code == 200 else None)
                    self.answers.append((response.status_code, response.headers.get("X-Model-Version"),
                                         probabilities))
                except requests.RequestException as exc:
                    self.answers.append((type(exc).__name__, None, None))

    def wait_for(self, version: str, timeout_s: float = SWITCH_DEADLINE_S) -> float:
        """Seconds until the last 20 answers all came from `version`."""
        started = time.time()
        while time.time() - started < timeout_s:
            recent = self.answers[-20:]
            if len(recent) == 20 and all(v == version for _, v, _ in recent):
                return time.time() - started
            time.sleep(0.2)
        raise AssertionError(f"still answering {sorted(set(v for _, v, _ in self.answers[-20:]))}, not v{version}")

    def versions(self) -> list:
        return [version for _, version, _ in self.answers]


def _expected_probabilities(versions: list[str], pixels) -> dict[str, list[float]]:
    """What each version answers for `pixels` in this process."""
    frame = pd.DataFrame({"pixels": [pixels]})
    return {v: mlflow.pyfunc.load_model(f"models:/{NAME}/{v}").predict(frame)["probabilities"][0] for v in versions}


def _answers_match_their_versions(client: Client, expected: dict[str, list[float]]) -> None:
    """Every answer is the answer of the version its header names: the switch is in the model, not the label."""
    assert len({tuple(np.round(p, 4)) for p in expected.values()}) == len(expected), "versions must differ"
    for status, version, probabilities in client.answers:
        assert status == 200 and np.allclose(probabilities, expected[version], atol=1e-5), version


def _metric(url: str, name: str, **labels) -> float:
    """The sum of a metric's samples whose labels include `labels`, from GET /metrics."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    total = 0.0
    for match in re.finditer(rf"^{name}(?:{{(.*?)}})? (\S+)$", text, re.M):
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


def _until(fetch, done, failure: str, timeout_s: float = SWITCH_DEADLINE_S):
    """The first value of fetch() that is done(), within `timeout_s`."""
    deadline = time.time() + timeout_s
    while not done(value := fetch()):
        assert time.time() < deadline, failure
        time.sleep(POLL_S)
    return value


def _serving(url: str, version: str) -> None:
    """Until both workers serve `version` (whatever an earlier test left in Production; the second worker
    may still be starting)."""
    _until(lambda: _metric(url, "fmnist_model_info", version=version), lambda workers: workers >= 2,
           f"the workers never both served v{version}", timeout_s=harness.STARTUP_TIMEOUT_S)


def test_a_promotion_reaches_every_worker_without_a_failed_request(servers, store, dataset):
    """While a client scores continuously, promoting v2 switches both workers' answers to v2's answers (not
    only their header) within the follow interval plus a load, with zero failed requests; /model and the UI
    name the version that answered."""
    scoring_url, ui_url = servers
    _, (v1, v2), _ = store
    registry.crown(v1)
    _serving(scoring_url, v1)
    reloads_before = _metric(scoring_url, "fmnist_model_reloads_total")
    pixels = dataset.test_images[0].tolist()
    client = Client(scoring_url, pixels)
    client.start()
    try:
        client.wait_for(v1)
        registry.crown(v2)
        took = client.wait_for(v2)
    finally:
        client.running = False
        client.join()
    statuses = [status for status, _, _ in client.answers]
    assert statuses.count(200) == len(statuses) >= 40, sorted(set(map(str, statuses)))  # two windows of 20
    _answers_match_their_versions(client, _expected_probabilities([v1, v2], pixels))
    assert took <= FOLLOW_S + LOAD_ALLOWANCE_S, f"the switch took {took:.1f} s"
    versions = client.versions()
    # A reconnecting client could reach the other worker, which may lag by one follow interval.
    assert versions[versions.index(v2):].count(v1) <= 2 * 20, "a worker went back to v1"
    _until(lambda: _metric(scoring_url, "fmnist_model_info", version=v2), lambda workers: workers >= 2,
           "a worker never switched to v2")  # including the worker the client did not reach
    print(f"{len(statuses)} requests, switched to v{v2} {took:.1f} s after the last v{v1}-only window")
    info = requests.get(f"{scoring_url}/model", timeout=10).json()
    assert (info["name"], info["version"], info["stage"]) == (NAME, v2, "Production")
    assert registry.CHAMPION_ALIAS in info["aliases"] and info["signature"]["inputs"] and info["loaded_at"]
    answer = requests.post(f"{ui_url}/predict", json={"images": [_png(dataset)]}, timeout=30).json()
    assert answer["model"]["version"] == v2 and answer["model"]["name"] == NAME and answer["model"]["run_id"]
    _until(lambda: requests.get(f"{ui_url}/model_info", timeout=10).json()["version"], lambda v: v == v2,
           "the UI's header never named v2", timeout_s=UI_MODEL_CACHE_S + SWITCH_DEADLINE_S)
    assert _metric(scoring_url, "fmnist_model_reloads_total") - reloads_before == 2  # each worker, once
    assert _metric(scoring_url, "fmnist_model_info", version=v2) == 2


def _first_health(url: str, status: str, failure: str) -> dict:
    """The first /health answer with `status`. Each worker keeps its own health and sees a promotion at its
    own next poll, so the answer after this one may still come from a worker that has not looked yet."""
    return _until(lambda: requests.get(f"{url}/health", timeout=10).json(), lambda h: h["status"] == status,
                  failure)


def test_a_broken_version_is_refused_and_a_rollback_is_followed(servers, store, dataset, tmp_path):
    """A version whose weights are garbage is never served: answers stay on the old version, /health says
    degraded and why, the failure is counted; promoting v1 again (a rollback) is followed and heals /health."""
    scoring_url, _ = servers
    _, (v1, v2), _ = store
    registry.crown(v2)
    _serving(scoring_url, v2)
    failures_before = _metric(scoring_url, "fmnist_model_reload_failures_total")
    broken = _broken_version(v2, tmp_path)
    pixels = dataset.test_images[1].tolist()
    client = Client(scoring_url, pixels)
    client.start()
    try:
        registry.crown(broken)
        health = _first_health(scoring_url, "degraded", "never reported the broken version")
        assert f"v{broken} is not served" in health["reason"] and health["model"]["version"] == v2
        forced = requests.post(f"{scoring_url}/reload", timeout=60)  # asking again does not make it load
        assert forced.status_code == 200 and forced.json()["status"] == "degraded"
        _until(lambda: _metric(scoring_url, "fmnist_model_reload_failures_total") - failures_before,
               lambda refused: refused >= 2, "a worker never refused the broken version")  # both workers
        assert set(client.versions()) == {v2}
        registry.crown(v1)
        client.wait_for(v1)
    finally:
        client.running = False
        client.join()
    assert all(status == 200 for status, _, _ in client.answers)
    _answers_match_their_versions(client, _expected_probabilities([v1, v2], pixels))
    _first_health(scoring_url, "ok", "still degraded after the rollback")


COUNTED = {  # name -> (server, metric, labels)
    "ok": ("scoring", "fmnist_http_requests_total", {"route": "/invocations", "status": "200"}),
    "bad": ("scoring", "fmnist_http_requests_total", {"route": "/invocations", "status": "400"}),
    "images": ("scoring", "fmnist_images_scored_total", {"kind": "image"}),
    "pixels": ("scoring", "fmnist_images_scored_total", {"kind": "pixels"}),
    "classes": ("scoring", "fmnist_predicted_class_total", {}),
    "ood": ("scoring", "fmnist_out_of_distribution_total", {}),
    "bytes": ("scoring", "fmnist_http_request_bytes_total", {"route": "/invocations"}),
    "timed": ("scoring", "fmnist_http_request_seconds_count", {"route": "/invocations"}),
    "ui": ("ui", "fmnist_http_requests_total", {"server": "ui", "route": "/predict", "status": "200"}),
}


def _counts(urls: dict) -> dict:
    return {key: _metric(urls[server], name, **labels) for key, (server, name, labels) in COUNTED.items()}


def _flagged(answers: list[dict]) -> int:
    return sum(answer["in_distribution"] is False for answer in answers)


def test_metrics_count_the_requests_sent(servers, dataset):
    """/metrics moves by exactly the requests sent: answers by route and status, rows by input kind, predicted
    classes, answers flagged as not clothing, request bytes, on the scoring server and on the UI, summed over
    their worker processes."""
    scoring_url, ui_url = servers
    urls = {"scoring": scoring_url, "ui": ui_url}
    before, sent, flagged = _counts(urls), 0, 0
    shapes = [{"image": encode(picture)} for picture in outliers.shapes(5, 0)]  # not clothing
    for i in range(5):
        rows = [{"image": _png(dataset, i)}, {"pixels": dataset.test_images[i].tolist()},
                {"pixels": dataset.test_images[i + 1].tolist()}, shapes[i]]
        body = json.dumps({"dataframe_records": rows}).encode()
        sent += len(body)
        response = requests.post(f"{scoring_url}/invocations", data=body, timeout=30,
                                 headers={"Content-Type": "application/json"})
        assert response.status_code == 200
        flagged += _flagged(response.json()["predictions"])
    bad = {"dataframe_records": [{"pixels": [[1]]}]}
    assert requests.post(f"{scoring_url}/invocations", json=bad, timeout=30).status_code == 400
    for i in range(3):  # each one image, scored through the scoring server
        response = requests.post(f"{ui_url}/predict", json={"images": [_png(dataset, i)]}, timeout=30)
        assert response.status_code == 200
        flagged += _flagged(response.json()["results"])
    # Rows and classes are counted after each answer has gone out: wait until the last of them is.
    _until(lambda: _counts(urls)["classes"] - before["classes"], lambda counted: counted >= 20 + 3,
           "the scored rows were never counted")
    after = _counts(urls)
    moved = {key: after[key] - before[key] for key in COUNTED}
    assert {k: moved[k] for k in ("ok", "bad", "images", "pixels", "classes", "ood", "ui")} == {
        "ok": 5 + 3, "bad": 1, "images": 10 + 3, "pixels": 10, "classes": 20 + 3, "ood": flagged, "ui": 3}
    assert flagged >= 1  # the shapes: the count is of something
    assert moved["bytes"] >= sent and moved["timed"] == 5 + 3 + 1


def _png(dataset, index: int = 0) -> str:
    from fmnist_pyfunc.contract import png_base64

    return png_base64(dataset.test_images[index])


@pytest.mark.parametrize("uri, reference", [
    ("models:/fashion-mnist-cnn/Production", ("fashion-mnist-cnn", "Production")),
    ("models:/fashion-mnist-cnn@champion", ("fashion-mnist-cnn", "@champion")),
    ("models:/fashion-mnist-cnn/latest", ("fashion-mnist-cnn", "latest")),
    ("models:/fashion-mnist-cnn/3", None),
    ("runs:/0123456789abcdef/model", None),
    ("export/model", None),
])
def test_only_references_that_can_move_are_followed(uri, reference):
    """A stage, an alias or `latest` is followed; a version number, a run or a folder is served as is."""
    assert live_model.moving_reference(uri) == reference


def test_reload_answers_only_on_the_servers_own_machine():
    """POST /reload from another address is 403 and touches nothing; GET /reload is 405."""
    sent = []

    async def send(message):
        sent.append(message)

    async def call(method: str, client: str):
        sent.clear()
        scope = {"type": "http", "path": "/reload", "method": method, "client": (client, 4242), "headers": []}
        await scoring.ScoringApp(live=None)(scope, None, send)
        return sent[0]["status"]

    assert asyncio.run(call("POST", "10.1.2.3")) == 403
    assert asyncio.run(call("GET", "127.0.0.1")) == 405


def test_unknown_paths_share_one_metrics_label():
    """A scanner's URLs are counted under one route label, not one time series each."""
    assert metrics.route_label("/no/such/path", scoring.ROUTES) == metrics.OTHER_ROUTE
