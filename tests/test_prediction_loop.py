"""The way back from serving, on the real scoring server (two uvicorn workers) and a real SQLite store: every
answered image is logged with an id the client gets, clean test images do not drift and non-clothing and phone
photos do, corrections round-trip through POST /feedback, and neither a kill -9, a restart nor a store that is
down costs an acknowledged row or a request."""

import json
import os
import re
import signal
import time

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
import sqlalchemy as sa

from fmnist_pyfunc import config, monitor, prediction_log, seen
from fmnist_pyfunc.contract import png_base64
from fmnist_testkit import harness, outliers, photos
from fmnist_testkit.images import encode

pytestmark = pytest.mark.e2e  # one worker runs this module (conftest.ONE_WORKER_MODULES)

WORKERS = 2
BATCH = 50              # images per request
CLEAN_IMAGES = 600      # test images streamed: above monitor.MIN_ROWS, under monitor.WINDOW_ROWS
SHIFTED_IMAGES = 300    # then this many of another kind: a third of the window
WRITE_WAIT_S = 10       # the log writes within FLUSH_INTERVAL_S; generous for a busy CI machine
KILL_AFTER_S = 5 * prediction_log.FLUSH_INTERVAL_S  # the last answers before a kill -9 may still be queued


def _pixels(images: np.ndarray) -> bytes:
    return json.dumps({"dataframe_records": [{"pixels": image.tolist()} for image in images]}).encode()


def _encoded(pictures) -> bytes:
    return json.dumps({"dataframe_records": [{"image": picture} for picture in pictures]}).encode()


def _score(url: str, body: bytes) -> requests.Response:
    response = requests.post(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"},
                             timeout=60)
    assert response.status_code == 200, response.text
    return response


def _logged_ids(log_url: str) -> set[str]:
    with prediction_log.connect(log_url).connect() as connection:
        return set(connection.execute(sa.select(prediction_log.PREDICTIONS.c.id)).scalars())


def _wait_for(ids: set[str], log_url: str) -> set[str]:
    deadline = time.monotonic() + WRITE_WAIT_S
    while (missing := ids - _logged_ids(log_url)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return missing


def _ids(response: requests.Response, rows: int) -> set[str]:
    request_id = response.headers[config.PREDICTION_ID_HEADER]
    return {f"{request_id}-{row}" for row in range(rows)}


@pytest.fixture(scope="module")
def server(production, tracking_uri, tmp_path_factory):
    """The scoring server on the Production model with a prediction log of its own; (process, url, log URL)."""
    root = tmp_path_factory.mktemp("loop")
    log_url = f"sqlite:///{root}/predictions.db"
    port = harness.free_port()
    command = [*harness.scoring_command(config.PRODUCTION_MODEL_URI, config.LOOPBACK, port, WORKERS),
               "--prediction-log", log_url]
    env = harness.child_env(tracking_uri)
    url = f"http://127.0.0.1:{port}"
    process = harness.start(command, env, f"{url}/ping", root / "serve.log")
    state = {"process": process, "url": url, "log_url": log_url, "command": command, "env": env, "root": root}
    yield state
    harness.stop(state["process"])


def test_the_model_reports_what_it_saw_only_to_whoever_watches(production, dataset):
    """In-process, the pyfunc's predict hands the scoring server each row's input kind and the 28x28 image it
    classified (seen.py), in the caller's context only: without a watcher it records nothing."""
    model = mlflow.pyfunc.load_model(config.PRODUCTION_MODEL_URI)
    frame = pd.DataFrame({"pixels": [dataset.test_images[0].tolist(), None],
                          "image": [None, png_base64(dataset.test_images[1])]})
    sink = []
    watching = seen.WATCHER.set(sink)
    try:
        answer = model.predict(frame)
    finally:
        seen.WATCHER.reset(watching)
    (what,) = sink
    assert what.kinds == ["pixels", "image"] and what.images.dtype == np.uint8
    assert np.array_equal(what.images[0], dataset.test_images[0])
    assert what.class_index.tolist() == answer["class_index"].tolist()
    model.predict(frame)
    assert len(sink) == 1


def test_every_answered_image_is_logged_with_the_id_its_client_got(server, dataset):
    """Each row of an answer is in the log under "<X-Prediction-Id>-<row>", with the 28x28 image the network saw,
    its class and confidence and the model's identity."""
    images = dataset.test_images[:BATCH]
    response = _score(server["url"], _pixels(images))
    ids = _ids(response, BATCH)
    assert not _wait_for(ids, server["log_url"])
    engine = prediction_log.connect(server["log_url"])
    with engine.connect() as connection:
        rows = {row.id: row for row in connection.execute(sa.select(prediction_log.PREDICTIONS)
                                                          .where(prediction_log.PREDICTIONS.c.id.in_(ids)))}
    answers = response.json()["predictions"]
    for row_index, answer in enumerate(answers):
        row = rows[f"{response.headers[config.PREDICTION_ID_HEADER]}-{row_index}"]
        assert np.array_equal(np.frombuffer(row.image, np.uint8).reshape(28, 28), images[row_index])
        assert row.class_index == answer["class_index"]
        assert row.top_probability == pytest.approx(max(answer["probabilities"]))
        assert row.in_distribution == answer["in_distribution"] and row.input_kind == "pixels"
        assert row.model_version == response.headers["X-Model-Version"]


def test_clean_test_images_do_not_drift_and_non_clothing_or_photos_do(server, dataset):
    """600 test images keep every drift statistic below its threshold; then 300 non-clothing pictures push the
    window past them (out-of-distribution share and score), and 300 casual phone photos of real test garments
    (GET /monitor?rows=300) past those of confidence and features. /metrics carries /monitor's verdict."""
    url = server["url"]
    for start in range(BATCH, BATCH + CLEAN_IMAGES, BATCH):  # after the first test's rows: all clean test images
        _score(url, _pixels(dataset.test_images[start:start + BATCH]))
    time.sleep(1)
    clean = requests.get(f"{url}/monitor", timeout=60).json()
    assert clean["rows"] >= CLEAN_IMAGES and clean["enough_rows"] and clean["reference"]
    assert not clean["drifted"], {k: v for k, v in clean["statistics"].items() if v["alert"]}
    assert re.search(r"^fmnist_drifted 0\.0$", requests.get(f"{url}/metrics", timeout=60).text, re.M)

    for start in range(0, SHIFTED_IMAGES, BATCH):
        family = list(outliers.FAMILIES.values())[start // BATCH % len(outliers.FAMILIES)]
        _score(url, _encoded([encode(picture) for picture in family(BATCH, start)]))
    time.sleep(1)
    shifted = requests.get(f"{url}/monitor", timeout=60).json()
    alerts = {name for name, value in shifted["statistics"].items() if value["alert"]}
    assert shifted["drifted"] and {"ood_share", "ood_score_ks_p"} <= alerts, alerts
    metrics = requests.get(f"{url}/metrics", timeout=60).text
    assert re.search(r"^fmnist_drifted 1\.0$", metrics, re.M)
    assert re.search(r'^fmnist_drift_alert\{statistic="ood_share"\} 1\.0$', metrics, re.M)
    assert len(shifted["history"]) == monitor.HISTORY_POINTS and shifted["history"][-1]["ood_share"] > 0.5

    garments = dataset.test_images[2000:2000 + SHIFTED_IMAGES]
    for start in range(0, SHIFTED_IMAGES, BATCH):
        _score(url, _encoded([photos.encoded(photos.render(g, photos.TOGETHER, start + i))
                              for i, g in enumerate(garments[start:start + BATCH])]))
    time.sleep(1)
    photographed = requests.get(f"{url}/monitor?rows={SHIFTED_IMAGES}", timeout=60).json()
    alerts = {name for name, value in photographed["statistics"].items() if value["alert"]}
    # Preprocessing makes photos look like the dataset (brightness and ink stay put); the network's answers and
    # features show them: lower confidence, higher out-of-distribution scores.
    assert photographed["rows"] == SHIFTED_IMAGES and {"confidence_ks_p", "ood_score_ks_p"} <= alerts, alerts


def test_feedback_round_trips_and_bad_feedback_gets_a_clear_4xx(server, dataset):
    """POST /feedback stores a correction beside its prediction (the last one counts) and /metrics gives the
    accuracy on feedback per model version; an unknown id is 404, a bad label or body 400, GET 405."""
    url = server["url"]
    response = _score(url, _pixels(dataset.test_images[:2]))
    first, second = sorted(_ids(response, 2))
    predicted = response.json()["predictions"][0]["class_index"]
    wrong = (predicted + 1) % 10

    def send(body) -> requests.Response:
        return requests.post(f"{url}/feedback", data=body if isinstance(body, bytes) else json.dumps(body),
                             headers={"Content-Type": "application/json"}, timeout=30)

    answer = send({"prediction_id": first, "label": config.CLASS_NAMES[predicted]})  # at once: maybe still queued
    assert answer.status_code == 200 and answer.json()["correct"] is True
    answer = send({"prediction_id": first, "label": wrong})  # changed their mind: the last correction counts
    assert answer.json() == {"prediction_id": first, "label": config.CLASS_NAMES[wrong],
                             "predicted": config.CLASS_NAMES[predicted], "correct": False}
    assert send({"prediction_id": second, "label": int(dataset.test_labels[1])}).status_code == 200
    labelled = prediction_log.labelled(prediction_log.connect(server["log_url"]))
    assert dict(zip(labelled.ids, labelled.labels.tolist(), strict=True))[first] == wrong

    assert send({"prediction_id": "no-such-id", "label": 1}).status_code == 404
    for bad in ({"prediction_id": first, "label": 10}, {"prediction_id": first, "label": "Hat"},
                {"prediction_id": first}, {"label": 3}, b"not json", {"prediction_id": first, "label": True}):
        answer = send(bad)
        assert answer.status_code == 400 and answer.json()["error_code"] == "BAD_REQUEST", (bad, answer.text)
    assert requests.get(f"{url}/feedback", timeout=30).status_code == 405
    version = response.headers["X-Model-Version"]
    metrics = requests.get(f"{url}/metrics", timeout=60).text
    assert re.search(rf'^fmnist_feedback_total\{{version="{version}"\}} 2\.0$', metrics, re.M), metrics
    assert re.search(rf'^fmnist_feedback_accuracy\{{version="{version}"\}} 0\.5$', metrics, re.M)


def test_acknowledged_rows_survive_a_kill_9_of_a_worker_and_a_restart(server, dataset):
    """Rows answered before a worker is killed with SIGKILL are in the log (what its queue still held is at most
    QUEUE_ROWS rows), the surviving worker and the server restarted on the same store go on logging."""
    url = server["url"]
    acknowledged = set()
    for start in range(0, 10 * BATCH, BATCH):
        acknowledged |= _ids(_score(url, _pixels(dataset.test_images[start:start + BATCH])), BATCH)
    workers = [pid for pid in harness.process_tree(server["process"].pid)
               if "spawn_main" in harness.command_line(pid)]
    assert len(workers) == WORKERS, [harness.command_line(pid) for pid in workers]
    time.sleep(KILL_AFTER_S)  # the documented bound: rows answered more than a few flush intervals ago are written
    os.kill(workers[0], signal.SIGKILL)
    missing = _wait_for(acknowledged, server["log_url"])
    assert len(missing) <= prediction_log.QUEUE_ROWS and not missing  # the writers had KILL_AFTER_S: nothing queued
    after_kill = _ids(_score(url, _pixels(dataset.test_images[:BATCH])), BATCH)
    assert not _wait_for(after_kill, server["log_url"])

    harness.stop(server["process"])
    server["process"] = harness.start(server["command"], server["env"], f"{url}/ping", server["root"] / "again.log")
    restarted = _ids(_score(url, _pixels(dataset.test_images[:BATCH])), BATCH)
    assert not _wait_for(acknowledged | after_kill | restarted, server["log_url"])


def test_a_store_that_is_down_never_fails_a_request(production, tracking_uri, tmp_path, dataset):
    """With the log pointed at a PostgreSQL server that is not there, every scoring request still succeeds, the
    lost rows are counted in /metrics, and /monitor and /feedback say why they cannot answer (503)."""
    port = harness.free_port()
    down = f"postgresql+psycopg://nobody@127.0.0.1:{harness.free_port()}/nothing"
    command = [*harness.scoring_command(config.PRODUCTION_MODEL_URI, config.LOOPBACK, port), "--prediction-log", down]
    url = f"http://127.0.0.1:{port}"
    with harness.running(command, harness.child_env(tracking_uri), f"{url}/ping", tmp_path / "serve.log"):
        for start in range(0, 5 * BATCH, BATCH):
            _score(url, _pixels(dataset.test_images[start:start + BATCH]))
        deadline = time.monotonic() + WRITE_WAIT_S
        while time.monotonic() < deadline:
            dropped = re.search(r"^fmnist_prediction_log_dropped_total (\S+)$",
                                requests.get(f"{url}/metrics", timeout=30).text, re.M)
            if dropped and float(dropped[1]) == 5 * BATCH:
                break
            time.sleep(0.2)
        assert dropped and float(dropped[1]) == 5 * BATCH
        answer = requests.get(f"{url}/monitor", timeout=30)
        assert answer.status_code == 503 and "cannot be read" in answer.json()["message"]
        answer = requests.post(f"{url}/feedback", json={"prediction_id": "x-0", "label": 1}, timeout=30)
        assert answer.status_code == 503
