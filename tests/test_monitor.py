"""Unit tests of the drift statistics and the prediction log's store, on real Fashion-MNIST images."""

import time
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
import sqlalchemy as sa

from fmnist_pyfunc import metrics, monitor, prediction_log
from fmnist_pyfunc.seen import Seen


def _probabilities(labels: np.ndarray, confidence: float = 0.9) -> np.ndarray:
    """What a good classifier answers: most weight on the label."""
    p = np.full((len(labels), 10), (1 - confidence) / 9)
    p[np.arange(len(labels)), labels] = confidence
    return p


@pytest.fixture(scope="module")
def reference(dataset):
    return monitor.profile(dataset.train_images[:5000], _probabilities(dataset.train_labels[:5000]), None)


def _compare(reference, images, labels, confidence=0.9):
    return monitor.compare(reference, images, labels, _probabilities(labels, confidence).max(1), None)


def test_psi_is_zero_for_the_same_mix_and_finite_when_a_class_is_missing():
    """The population stability index of a mix with itself is 0; a class absent from the window counts with
    PSI_FLOOR instead of making it infinite; a mix of two classes against ten is far past PSI_ALERT."""
    even = np.full(10, 0.1)
    assert monitor.psi(even, even) == 0
    two = np.array([0.5, 0.5] + [0.0] * 8)
    assert monitor.PSI_ALERT < monitor.psi(even, two) < np.inf


def test_test_images_match_the_training_profile_and_inverted_or_one_class_streams_do_not(reference, dataset):
    """1,000 test images against a profile of 5,000 training images raise no alert; the same images inverted
    (dark garments on white: brightness and ink), or only trousers (class mix), do."""
    images, labels = dataset.test_images[:1000], dataset.test_labels[:1000]
    assert not _compare(reference, images, labels)["drifted"]
    inverted = _compare(reference, 255 - images, labels)
    assert inverted["statistics"]["brightness_ks_p"]["alert"] and inverted["statistics"]["ink_ks_p"]["alert"]
    trousers = labels == 1
    one_class = _compare(reference, images[trousers], labels[trousers])
    assert one_class["statistics"]["class_mix_psi"]["alert"] and one_class["drifted"]
    unsure = _compare(reference, images, labels, confidence=0.6)
    assert unsure["statistics"]["confidence_ks_p"]["alert"]


def test_too_few_predictions_raise_no_alert(reference, dataset):
    """Below MIN_ROWS the statistics are given but nothing alerts, however different the images."""
    n = monitor.MIN_ROWS - 1
    few = _compare(reference, 255 - dataset.test_images[:n], dataset.test_labels[:n])
    assert not few["enough_rows"] and not few["drifted"] and few["statistics"]["brightness_ks_p"]["value"] < 1e-6


def _seen(dataset, n: int, start: int = 0) -> Seen:
    labels = dataset.test_labels[start:start + n]
    return Seen(dataset.test_images[start:start + n], ["pixels"] * n, labels, _probabilities(labels), None)


def test_a_reserved_answer_holds_its_room_and_flush_waits_for_its_rows(tmp_path, dataset):
    """The server names an answer's id before sending it and queues its rows after: the reserved rows count
    against the queue, and a flush (what /feedback does for an id it cannot find yet) waits until they are
    queued and written."""
    log = prediction_log.PredictionLog(f"sqlite:///{tmp_path}/p.db", queue_rows=100)
    request_id = log.reserve(60)
    assert log.put({"name": "m", "version": "3", "run_id": "r"}, _seen(dataset, 41)) is None  # 60 + 41 > 100
    assert not log.flush(timeout_s=0.3)  # reserved, not yet queued
    log.fill(request_id, {"name": "m", "version": "3", "run_id": "r"}, _seen(dataset, 60))
    assert log.flush()
    assert len(prediction_log.recent(log.engine, 1000, "r")) == 60


def test_the_log_writes_queued_requests_and_drops_what_its_queue_cannot_hold(tmp_path, dataset):
    """Queued answers are written with their images and classes; a request that does not fit the queue is
    dropped at once and counted, never waited for."""
    log = prediction_log.PredictionLog(f"sqlite:///{tmp_path}/p.db", queue_rows=100)
    model = {"name": "m", "version": "3", "run_id": "r"}
    request_id = log.put(model, _seen(dataset, 60))
    dropped_before = metrics.LOG_DROPPED._value.get()
    started = time.perf_counter()
    assert log.put(model, _seen(dataset, 101)) is None  # more than the whole queue holds
    assert time.perf_counter() - started < 0.05 and metrics.LOG_DROPPED._value.get() == dropped_before + 101
    assert log.flush()
    rows = {row.id: row for row in prediction_log.recent(log.engine, 1000, "r")}
    assert len(rows) == 60 and rows[f"{request_id}-5"].model_version == "3"
    assert np.array_equal(np.frombuffer(rows[f"{request_id}-5"].image, np.uint8).reshape(28, 28),
                          dataset.test_images[5])
    assert rows[f"{request_id}-5"].class_index == dataset.test_labels[5]


def test_retention_deletes_old_and_excess_rows_but_keeps_labelled_ones(tmp_path, dataset):
    """prune() removes rows past max_days and beyond the newest max_rows, except those carrying feedback."""
    engine = prediction_log.connect(f"sqlite:///{tmp_path}/p.db")
    now = datetime.now(UTC).replace(tzinfo=None)
    ages = {"old-0": 100, "old-1": 100, "mid-0": 2, "mid-1": 1, "new-0": 0}
    with engine.begin() as connection:
        connection.execute(prediction_log.PREDICTIONS.insert(), [
            {"id": key, "logged_at": now - timedelta(days=days), "input_kind": "pixels",
             "image": dataset.test_images[0].tobytes(), "class_index": 0, "top_probability": 0.9}
            for key, days in ages.items()])
    prediction_log.add_feedback(engine, "old-1", 3)
    prediction_log.add_feedback(engine, "mid-0", 3)
    prediction_log.prune(engine, max_rows=2, max_days=30)
    with engine.connect() as connection:
        kept = set(connection.execute(sa.select(prediction_log.PREDICTIONS.c.id)).scalars())
    assert kept == {"old-1", "mid-0", "mid-1", "new-0"}


def test_labels_are_class_indices_or_names():
    """0-9 or a class name as the API writes it; anything else is refused with the accepted values."""
    assert prediction_log.parse_label(3) == 3 and prediction_log.parse_label("Ankle boot") == 9
    for bad in (10, -1, "ankle boot", True, 2.0, None):
        with pytest.raises(ValueError, match="class index 0-9"):
            prediction_log.parse_label(bad)


def test_the_log_goes_beside_the_tracking_store_unless_configured(monkeypatch, tmp_path):
    """SQLite tracking store -> predictions.db beside it; PostgreSQL -> the same database (its own tables);
    FMNIST_PREDICTION_LOG wins."""
    monkeypatch.delenv(prediction_log.PREDICTION_LOG_ENV, raising=False)
    assert prediction_log.default_url(f"sqlite:///{tmp_path}/mlflow.db") == f"sqlite:///{tmp_path}/predictions.db"
    assert prediction_log.default_url("postgresql://u:p@db:5432/mlflow") == "postgresql+psycopg://u:p@db:5432/mlflow"
    monkeypatch.setenv(prediction_log.PREDICTION_LOG_ENV, "off")
    assert prediction_log.default_url("sqlite:///x/mlflow.db") == "off"


def test_a_sqlite_log_is_written_ahead_without_a_sync_per_commit(tmp_path):
    """Every connection of a SQLite log is in WAL mode (readers never block the writers) with synchronous NORMAL:
    commits are not synced one by one (a power cut may lose the last moments' rows, never the file)."""
    engine = prediction_log.connect(f"sqlite:///{tmp_path}/predictions.db")
    with engine.connect() as one, engine.connect() as other:
        for connection in (one, other):
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL (FULL is 2)


def test_the_sample_rate_logs_that_share_of_requests(tmp_path, monkeypatch):
    """--log-sample-rate r logs about r of the requests (1: every one, 0: none)."""
    values = iter(np.random.default_rng(0).random(10_000))
    monkeypatch.setattr(prediction_log.random, "random", lambda: next(values))
    rates = {}
    for rate in (0.0, 0.25, 1.0):
        log = prediction_log.PredictionLog(f"sqlite:///{tmp_path}/p{rate}.db", sample_rate=rate)
        rates[rate] = np.mean([log.sampled() for _ in range(2000)])
    assert rates[0.0] == 0 and abs(rates[0.25] - 0.25) < 0.03 and rates[1.0] == 1
