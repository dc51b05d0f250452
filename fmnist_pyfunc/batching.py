"""Adaptive batching: concurrent requests to one scoring worker share forward passes.

One thread per worker runs the model. A request's rows wait in a queue while the model is busy; when it is
free it takes everything waiting (up to `max_rows` rows, same model and params) and runs one `predict` over
all of it, then hands each request its own rows of the answer. Under load the batches grow by themselves;
when the server is idle a request runs at once: the thread waits up to `max_wait_s` for more only while
other requests are still being read and parsed (`arriving`), never for requests that may never come.
A request larger than `max_rows` runs alone (`max_rows` 0: every request alone). If a combined `predict`
fails (one request's bad row fails the whole frame), each request is run alone, so each gets exactly its own
answer or error.

Nothing else in the worker runs the model, not even the check of a newly loaded version (`run`: between two
passes). torch's CPU kernels run on libgomp (OpenMP), which gives each thread that starts a parallel region
a pool of threads of its own; once a process holds more of them than it has CPUs, libgomp's idle threads
stop spinning (1,000 spins instead of 300,000) and sleep after every region, and each region then waits
for them to wake. One forward pass in a second thread (the check, run where the model was loaded) made
every later pass slower: 256 images took 29-38 ms in the server against 23-29 ms in-process.

Answers are those of unbatched requests: the same classes and probabilities, bit for bit (the network's
outputs for a row do not depend on the rows beside it), and the same out-of-distribution score to ~1e-14
(its distances are computed in float64 for that reason, ood.py: in float32 they differed by ~1e-5).
"""

from __future__ import annotations

import collections
import functools
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import pandas as pd

from fmnist_pyfunc import invocations, metrics, seen
from fmnist_pyfunc.config import BATCH_MAX_ROWS, BATCH_MAX_WAIT_S


@dataclass(eq=False)  # a job is itself: the queue removes it by identity
class Job:
    model: object = None     # a request's pyfunc model (a promotion may swap it meanwhile)
    frame: pd.DataFrame | None = None  # a request's rows, which may share a pass with others'; None: a call
    params: dict | None = None
    call: Callable | None = None  # instead of a request: a function run alone in the model thread
    future: Future = field(default_factory=Future)  # -> (answer frame, [seen.Seen]), or the call's result

    @property
    def rows(self) -> int:
        return 0 if self.frame is None else len(self.frame)

    def joins(self, other: Job) -> bool:
        return (self.frame is not None and other.frame is not None and self.model is other.model
                and self.params == other.params)

    def run_alone(self):
        return self.call() if self.call else predict_watched(self.model, self.frame, self.params)


def predict_watched(model, frame, params) -> tuple[pd.DataFrame, list[seen.Seen]]:
    """`predict` with what the model saw collected (seen.py), in the calling thread."""
    sink: list[seen.Seen] = []
    token = seen.WATCHER.set(sink)
    try:
        return invocations.predict(model, frame, params), sink
    finally:
        seen.WATCHER.reset(token)


class Batcher:
    """The queue and the thread of one worker; `submit` from any thread, the answer comes in the future."""

    def __init__(self, max_rows: int = BATCH_MAX_ROWS, max_wait_s: float = BATCH_MAX_WAIT_S, arriving=lambda: 0):
        self.max_rows, self.max_wait_s, self.arriving = max_rows, max_wait_s, arriving
        self.queue: collections.deque[Job] = collections.deque()
        self.ready = threading.Condition()
        threading.Thread(target=self._serve, name="batcher", daemon=True).start()

    def submit(self, model, frame: pd.DataFrame, params: dict | None) -> Future:
        """A request's rows, to be predicted with others' where they can join."""
        return self._queue(Job(model, frame, params))

    def call(self, fn: Callable, *args) -> Future:
        """`fn(*args)` in the model thread, alone (a request whose input is not a frame)."""
        return self._queue(Job(call=functools.partial(fn, *args)))

    def run(self, fn: Callable, *args):
        """`fn(*args)` in the model thread, waited for: how a new model version answers its check."""
        return self.call(fn, *args).result()

    def _queue(self, job: Job) -> Future:
        with self.ready:
            self.queue.append(job)
            metrics.QUEUED_ROWS.inc(job.rows)
            self.ready.notify()
        return job.future

    def _serve(self) -> None:
        while True:
            jobs = self._next_batch()
            metrics.QUEUED_ROWS.dec(sum(job.rows for job in jobs))
            # a request that timed out while queued has been cancelled: nobody waits for its answer
            jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]
            try:
                self._run(jobs)
            except Exception as exc:  # a bug must fail these requests, not stop the thread every later one waits on
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)

    def _next_batch(self) -> list[Job]:
        """The oldest job and every waiting job that can join it, waiting up to max_wait_s for ones in parsing."""
        with self.ready:
            while not self.queue:
                self.ready.wait()
            jobs = [self.queue.popleft()]
            rows, deadline = jobs[0].rows, time.monotonic() + self.max_wait_s
            while jobs[0].frame is not None and rows < self.max_rows:
                for job in [job for job in self.queue if job.joins(jobs[0])]:
                    if rows + job.rows <= self.max_rows:
                        self.queue.remove(job)
                        jobs.append(job)
                        rows += job.rows
                left = deadline - time.monotonic()
                if left <= 0 or not self.arriving():
                    break
                self.ready.wait(left)
            return jobs

    def _run(self, jobs: list[Job]) -> None:
        if not jobs:  # all cancelled while queued
            return
        first = jobs[0]
        if len(jobs) > 1:
            try:
                answer, sink = predict_watched(first.model, pd.concat([j.frame for j in jobs], ignore_index=True),
                                               first.params)
            except Exception:  # one request's bad row: each is answered on its own, with its own error
                pass
            else:
                metrics.BATCH_ROWS.observe(len(answer))
                start = 0
                for job in jobs:
                    end = start + job.rows
                    job.future.set_result((answer.iloc[start:end].reset_index(drop=True),
                                           [s.rows(start, end) for s in sink]))
                    start = end
                return
        for job in jobs:
            try:
                result = job.run_alone()
            except Exception as exc:
                job.future.set_exception(exc)
            else:
                if job.frame is not None:
                    metrics.BATCH_ROWS.observe(job.rows)
                job.future.set_result(result)
