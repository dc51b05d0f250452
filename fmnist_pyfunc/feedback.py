"""Users' corrections as data: what `train -P feedback=true` learns from and what the promotion gate judges on.

Every logged prediction that carries feedback (prediction_log.py) is one labelled image: the 28x28 image the
network saw, and the class the user picked. A fixed share of them is held out, chosen by a hash of the
prediction's id, so the same correction is on the same side in every run and in the gate whatever else arrives;
the rest is added to the training split only (never to validation, whose accuracy selects runs, nor to the
test set), each image FEEDBACK_COPIES times per epoch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmnist_pyfunc import prediction_log
from fmnist_pyfunc.config import PREDICTION_LOG_OFF
from fmnist_pyfunc.prediction_log import Labelled

HOLDOUT_SHARE = 0.3     # of corrections kept for evaluation: the gate's feedback set
HASH_BUCKETS = 1000     # resolution of that share
# Copies of each corrected image per training epoch: a few hundred corrections among 55,000 images would be
# too rare to learn their kind. Measured on 280 sideways phone photos (width-32 network, 20k images, 6 epochs,
# 2 seeds): 2 copies took held-out accuracy on them from ~10 % to ~69 % at -0.2..+0.3 points of test accuracy;
# 4 learnt no more and cost up to 0.7 points (docs/monitoring.md).
FEEDBACK_COPIES = 2
MIN_HOLDOUT = 20        # held-out corrections below this are too few to judge a model on: the gate ignores them


class NoFeedback(LookupError):
    """The prediction log holds no corrections (or cannot be read)."""


@dataclass(frozen=True)
class Snapshot:
    """The corrections at the time a run started, split for training and evaluation; `url` is the store."""
    url: str
    train: Labelled
    holdout: Labelled


def held_out(prediction_id: str) -> bool:
    bucket = int.from_bytes(hashlib.sha256(prediction_id.encode()).digest()[:8], "big") % HASH_BUCKETS
    return bucket < HOLDOUT_SHARE * HASH_BUCKETS


def _subset(labelled: Labelled, keep: np.ndarray) -> Labelled:
    return Labelled([i for i, k in zip(labelled.ids, keep, strict=True) if k], labelled.images[keep],
                    labelled.labels[keep])


def snapshot(url: str | None = None) -> Snapshot:
    """Every correction in the prediction log at `url` (default: beside the tracking store), split."""
    url = url or prediction_log.default_url()
    store = prediction_log.redacted(url)
    if url == PREDICTION_LOG_OFF or (url.startswith("sqlite:///") and not Path(url.split(":///", 1)[1]).is_file()):
        raise NoFeedback(f"there is no prediction log at {store}: serve the model with the log on first")
    try:
        labelled = prediction_log.labelled(prediction_log.connect(url))
    except Exception as exc:
        raise NoFeedback(f"cannot read the prediction log {store}: {str(exc).splitlines()[0]}") from None
    if not labelled.ids:
        raise NoFeedback(f"the prediction log {store} holds no feedback yet: correct some predictions in the UI "
                         "(or POST /feedback) first")
    keep = np.array([held_out(i) for i in labelled.ids], dtype=bool)
    return Snapshot(url, _subset(labelled, ~keep), _subset(labelled, keep))


def gate_holdout(url: str | None = None) -> Labelled | None:
    """The held-out corrections the promotion gate judges on, or None where there are fewer than MIN_HOLDOUT."""
    try:
        holdout = snapshot(url).holdout
    except NoFeedback:
        return None
    return holdout if len(holdout.ids) >= MIN_HOLDOUT else None


def training_extra(snap: Snapshot) -> tuple[np.ndarray, np.ndarray]:
    """The corrected training images and labels, FEEDBACK_COPIES times over, for `training.train`."""
    return np.tile(snap.train.images, (FEEDBACK_COPIES, 1, 1)), np.tile(snap.train.labels, FEEDBACK_COPIES)
