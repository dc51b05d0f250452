"""The prediction log: every scored image (or a sample), what the model answered, and users' corrections.

A real database through SQLAlchemy (which MLflow brings): by default a SQLite file `predictions.db` beside the
local tracking store's `mlflow.db`; in team mode the tracking store's PostgreSQL server, in tables of its own
(`fmnist_predictions`, `fmnist_feedback`). FMNIST_PREDICTION_LOG names any other SQLAlchemy URL, or `off`.

Writes leave the request path: the scoring server takes an id and room in a bounded in-memory queue for each
answer (`PredictionLog.reserve`), names the id in the answer and, once the answer is sent, queues its rows
(`fill`); one thread per worker writes what is queued in batches. When the store is slow or down the queue
fills and further rows are dropped and counted (`fmnist_prediction_log_dropped` in /metrics), a failed batch
too: a request never waits on the log and never fails because of it. What a `kill -9` of a worker can lose
is what its queue held: at most QUEUE_ROWS rows, in practice the last FLUSH_INTERVAL_S of answers. Several
workers (and servers) write to one store safely: every row has its own key, and SQLite runs in WAL mode with
a busy timeout.

Retention: rows older than `max_days` and beyond the newest `max_rows` are deleted (every PRUNE_INTERVAL_S, by
whichever worker gets there), except predictions that carry feedback: those are labelled data for retraining.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from fmnist_pyfunc import metrics, ood
from fmnist_pyfunc.config import (
    CLASS_NAMES,
    DEFAULT_TRACKING_URI,
    LOG_MAX_DAYS,
    LOG_MAX_ROWS,
    LOG_SAMPLE_RATE,
    PREDICTION_LOG_ENV,
    PREDICTION_LOG_FILE,
)
from fmnist_pyfunc.data import IMAGE_SIZE
from fmnist_pyfunc.seen import Seen

QUEUE_ROWS = 4096                   # rows a worker holds before dropping: ~4 full batches, ~3 MB of images
BATCH_ROWS = 512                    # rows per INSERT: one transaction, not one per row
FLUSH_INTERVAL_S = 0.2              # queued rows wait at most this long: what a kill -9 typically loses
SQLITE_BUSY_TIMEOUT_S = 5.0         # another worker's write in progress: wait, rather than fail the batch
PRUNE_INTERVAL_S = 600.0            # retention is enforced this often per worker (two DELETEs)
ERROR_LOG_INTERVAL_S = 60.0         # one warning a minute while the store is down, not one per batch

log = logging.getLogger(__name__)
METADATA = sa.MetaData()
PREDICTIONS = sa.Table(
    "fmnist_predictions", METADATA,
    sa.Column("id", sa.String(48), primary_key=True),                 # "<request id>-<row>"
    sa.Column("logged_at", sa.DateTime, nullable=False, index=True),  # UTC, naive (both stores compare alike)
    sa.Column("model_name", sa.String(200)),
    sa.Column("model_version", sa.String(32)),
    sa.Column("run_id", sa.String(64), index=True),
    sa.Column("input_kind", sa.String(8), nullable=False),            # "pixels" or "image"
    sa.Column("image", sa.LargeBinary, nullable=False),               # the 28x28 uint8 image the network saw
    sa.Column("class_index", sa.Integer, nullable=False),
    sa.Column("top_probability", sa.Float, nullable=False),
    sa.Column("in_distribution", sa.Boolean),                         # NULL: a model without the detector
    sa.Column("ood_score", sa.Float),
)
FEEDBACK = sa.Table(
    "fmnist_feedback", METADATA,
    sa.Column("prediction_id", sa.String(48), primary_key=True),      # one correction per prediction: the last
    sa.Column("label", sa.Integer, nullable=False),
    sa.Column("received_at", sa.DateTime, nullable=False),
)


class UnknownPrediction(LookupError):
    """No logged prediction has this id (never logged, sampled out, or past retention)."""


def default_url(tracking_uri: str | None = None) -> str:
    """Where the log goes unless FMNIST_PREDICTION_LOG says: beside a SQLite tracking store, in a PostgreSQL
    tracking store's own database, else `predictions.db` in the working directory."""
    configured = os.environ.get(PREDICTION_LOG_ENV)
    if configured:
        return configured
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    scheme = urlparse(tracking_uri).scheme
    if scheme.startswith("postgresql"):
        return tracking_uri.replace("postgresql://", "postgresql+psycopg://", 1)
    if scheme == "sqlite":
        database = Path(tracking_uri.split(":///", 1)[1]).resolve()
        return f"sqlite:///{database.parent / PREDICTION_LOG_FILE}"
    return f"sqlite:///{Path.cwd() / PREDICTION_LOG_FILE}"


def redacted(url: str) -> str:
    """A store's URL without its credentials, fit for logs and run metadata."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rsplit('@', 1)[-1]}"


def connect(url: str) -> Engine:
    """An engine on `url`, the tables created if missing (by any number of processes at once)."""
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})

        @sa.event.listens_for(engine, "connect")
        def _wal(connection, _):
            connection.execute("PRAGMA journal_mode=WAL")  # readers never block the writers
            # No fsync per commit (the WAL is synced at checkpoints): a power cut may lose the last moments' rows,
            # never the file. Each commit's fsync cost the writer ~2-3 ms per batch of answers on the cores the
            # forward passes run on.
            connection.execute("PRAGMA synchronous=NORMAL")
    else:
        engine = sa.create_engine(url, pool_pre_ping=True)
    # Another worker may create a table between our check and our CREATE: once per table at most, so one more
    # attempt than there are tables always ends with all of them (a CI run lost the race on both tables).
    for attempt in range(len(METADATA.tables) + 1):
        try:
            METADATA.create_all(engine, checkfirst=True)
            return engine
        except sa.exc.DBAPIError:
            if attempt == len(METADATA.tables):
                raise


@dataclass(frozen=True)
class Answered:
    """One answered request, as queued: turned into rows by the writer thread, off the request path."""
    request_id: str
    at: datetime
    model: dict             # name, version, run_id
    seen: Seen


def rows_of(entry: Answered) -> list[dict]:
    s = entry.seen
    top = s.probabilities.max(1)
    inside = None if s.ood_score is None else ood.in_distribution(s.ood_score)
    return [{"id": f"{entry.request_id}-{i}", "logged_at": entry.at, "model_name": entry.model.get("name"),
             "model_version": entry.model.get("version"), "run_id": entry.model.get("run_id"),
             "input_kind": s.kinds[i], "image": s.images[i].tobytes(), "class_index": int(s.class_index[i]),
             "top_probability": float(top[i]),
             "in_distribution": None if inside is None else bool(inside[i]),
             "ood_score": None if s.ood_score is None else float(s.ood_score[i])}
            for i in range(len(s.images))]


class PredictionLog:
    """A worker's writer: `put` queues, a daemon thread writes. The store is opened by that thread, so a store
    that is down at start-up costs the server nothing but dropped rows until it is back."""

    def __init__(self, url: str, sample_rate: float = LOG_SAMPLE_RATE, max_rows: int = LOG_MAX_ROWS,
                 max_days: float = LOG_MAX_DAYS, queue_rows: int = QUEUE_ROWS):
        self.url, self.sample_rate, self.max_rows, self.max_days = url, sample_rate, max_rows, max_days
        self.queue_rows = queue_rows
        self._pending: deque[Answered] = deque()
        self._queued = 0                      # rows in _pending
        self._ready = threading.Condition()
        self._engine: Engine | None = None
        self._last_error_at = 0.0
        self._pruned_at = 0.0
        threading.Thread(target=self._write_forever, name="prediction-log", daemon=True).start()

    def sampled(self) -> bool:
        return self.sample_rate >= 1 or random.random() < self.sample_rate

    def put(self, model: dict, seen: Seen) -> str | None:
        """Queue one answered request (`reserve`, then `fill`); its id, or None when the queue is full."""
        request_id = self.reserve(len(seen.images))
        if request_id is not None:
            self.fill(request_id, model, seen)
        return request_id

    def reserve(self, rows: int) -> str | None:
        """An id for an answer of `rows` rows, their room held in the queue until `fill` queues them (`flush`
        waits for them too); None when the queue is full (the rows are counted as dropped). Never blocks on
        the store."""
        with self._ready:
            if self._queued + rows > self.queue_rows:
                metrics.LOG_DROPPED.inc(rows)
                return None
            self._queued += rows
        return uuid.uuid4().hex

    def fill(self, request_id: str, model: dict, seen: Seen) -> None:
        """Queue the rows `reserve` made room for under `request_id`."""
        with self._ready:
            self._pending.append(Answered(request_id, datetime.now(UTC).replace(tzinfo=None), model, seen))
            self._ready.notify()

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until what is queued or reserved now has been written (or dropped); whether it was, within
        `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        with self._ready:
            self._ready.notify()
            while self._queued and time.monotonic() < deadline:
                self._ready.wait(FLUSH_INTERVAL_S)
            return not self._queued

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = connect(self.url)
        return self._engine

    def _take(self) -> list[Answered]:
        with self._ready:
            if not self._pending:
                self._ready.wait(FLUSH_INTERVAL_S)
            taken, rows = [], 0
            while self._pending and rows < BATCH_ROWS:
                taken.append(self._pending.popleft())
                rows += len(taken[-1].seen.images)
            return taken

    def _write_forever(self) -> None:
        while True:
            taken = self._take()
            rows = [row for entry in taken for row in rows_of(entry)]
            try:
                if rows:
                    with self.engine.begin() as connection:
                        connection.execute(PREDICTIONS.insert(), rows)
                    metrics.LOG_WRITTEN.inc(len(rows))
                if time.monotonic() - self._pruned_at > PRUNE_INTERVAL_S:
                    self._pruned_at = time.monotonic()
                    prune(self.engine, self.max_rows, self.max_days)
            except Exception as exc:  # the store is down or refused the batch: count it, keep serving
                metrics.LOG_DROPPED.inc(len(rows))
                self._warn(exc)
            finally:
                with self._ready:
                    self._queued -= len(rows)
                    self._ready.notify_all()

    def _warn(self, exc: Exception) -> None:
        if time.monotonic() - self._last_error_at > ERROR_LOG_INTERVAL_S:
            self._last_error_at = time.monotonic()
            log.warning("prediction log %s: rows dropped (%s)", redacted(self.url), str(exc).splitlines()[0])


def prune(engine: Engine, max_rows: int, max_days: float) -> int:
    """Delete predictions older than `max_days` or beyond the newest `max_rows`, keeping any with feedback. A
    request's rows share their time, so a request is kept or deleted whole."""
    cutoff = datetime.now(UTC).replace(tzinfo=None) - timedelta(days=max_days)
    with engine.begin() as connection:
        newest_kept = connection.execute(sa.select(PREDICTIONS.c.logged_at).order_by(PREDICTIONS.c.logged_at.desc())
                                         .offset(max_rows - 1).limit(1)).scalar()
        if newest_kept is not None:
            cutoff = max(cutoff, newest_kept)
        unlabelled = ~PREDICTIONS.c.id.in_(sa.select(FEEDBACK.c.prediction_id))
        older = PREDICTIONS.c.logged_at < cutoff
        return connection.execute(PREDICTIONS.delete().where(older & unlabelled)).rowcount


def recent(engine: Engine, limit: int, run_id: str | None = None) -> list[sa.Row]:
    """The newest `limit` predictions (of one model's run, if given), oldest first."""
    query = sa.select(PREDICTIONS).order_by(PREDICTIONS.c.logged_at.desc()).limit(limit)
    if run_id is not None:
        query = query.where(PREDICTIONS.c.run_id == run_id)
    with engine.connect() as connection:
        return list(reversed(connection.execute(query).all()))


def parse_label(label) -> int:
    """A class index (0-9) or a class name as the API returns it."""
    if isinstance(label, bool):
        raise ValueError("label must be a class index 0-9 or a class name")
    if isinstance(label, int) and 0 <= label < len(CLASS_NAMES):
        return label
    if isinstance(label, str) and label in CLASS_NAMES:
        return CLASS_NAMES.index(label)
    raise ValueError(f"label must be a class index 0-{len(CLASS_NAMES) - 1} or one of {list(CLASS_NAMES)}, "
                     f"got {label!r}")


def add_feedback(engine: Engine, prediction_id: str, label: int) -> dict:
    """Store `label` as the right class of a logged prediction (replacing an earlier correction); what it
    predicted and whether that was right."""
    with engine.begin() as connection:
        predicted = connection.execute(sa.select(PREDICTIONS.c.class_index)
                                       .where(PREDICTIONS.c.id == prediction_id)).scalar()
        if predicted is None:
            raise UnknownPrediction(prediction_id)
        connection.execute(FEEDBACK.delete().where(FEEDBACK.c.prediction_id == prediction_id))
        connection.execute(FEEDBACK.insert().values(prediction_id=prediction_id, label=label,
                                                    received_at=datetime.now(UTC).replace(tzinfo=None)))
    return {"prediction_id": prediction_id, "label": CLASS_NAMES[label], "predicted": CLASS_NAMES[predicted],
            "correct": predicted == label}


def feedback_accuracy(engine: Engine) -> list[dict]:
    """Per model version: corrections received and the share the model had right."""
    joined = FEEDBACK.join(PREDICTIONS, FEEDBACK.c.prediction_id == PREDICTIONS.c.id)
    right = sa.func.sum(sa.case((FEEDBACK.c.label == PREDICTIONS.c.class_index, 1), else_=0))
    query = (sa.select(PREDICTIONS.c.model_version, sa.func.count(), right).select_from(joined)
             .group_by(PREDICTIONS.c.model_version).order_by(PREDICTIONS.c.model_version))
    with engine.connect() as connection:
        return [{"version": version, "feedback": n, "accuracy": correct / n}
                for version, n, correct in connection.execute(query)]


@dataclass(frozen=True)
class Labelled:
    """Users' corrections as training data: the images the network saw and the labels users gave."""
    ids: list[str]
    images: np.ndarray   # (N, 28, 28) uint8
    labels: np.ndarray   # (N,) int64


def labelled(engine: Engine) -> Labelled:
    """Every prediction with feedback, in id order (so a snapshot's digest is stable)."""
    query = (sa.select(PREDICTIONS.c.id, PREDICTIONS.c.image, FEEDBACK.c.label)
             .select_from(FEEDBACK.join(PREDICTIONS, FEEDBACK.c.prediction_id == PREDICTIONS.c.id))
             .order_by(PREDICTIONS.c.id))
    with engine.connect() as connection:
        rows = connection.execute(query).all()
    images = np.frombuffer(b"".join(row.image for row in rows), dtype=np.uint8).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
    return Labelled([row.id for row in rows], images.copy(), np.array([row.label for row in rows], dtype=np.int64))
