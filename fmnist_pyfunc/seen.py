"""What the model saw and answered, handed to whoever asked for it around one call of `predict`.

The scoring server sets `WATCHER` to a list for the span of one request (scoring.py): the model appends one
`Seen` per call, in the request's own context (MLflow's app runs `predict` in a thread that copies it), so
concurrent requests never see each other's rows. Nobody else sets it, and then `record` costs nothing: the
promotion gate, batch scoring and `mlflow models serve` are unaffected.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Seen:
    images: np.ndarray                    # (N, 28, 28) uint8: what the network classified, after preprocessing
    kinds: list[str]                      # per row "pixels" or "image": how it was sent
    class_index: np.ndarray               # (N,) int64
    probabilities: np.ndarray             # (N, 10) float32, calibrated
    ood_score: np.ndarray | None = None   # (N,) float64; None from a model without the detector

    def rows(self, start: int, end: int) -> Seen:
        """Rows start..end-1: one request's part of a batch that several shared (batching.py)."""
        return Seen(self.images[start:end], self.kinds[start:end], self.class_index[start:end],
                    self.probabilities[start:end], None if self.ood_score is None else self.ood_score[start:end])


WATCHER: ContextVar[list | None] = ContextVar("fmnist_seen", default=None)


def record(seen: Seen) -> None:
    sink = WATCHER.get()
    if sink is not None:
        sink.append(seen)
