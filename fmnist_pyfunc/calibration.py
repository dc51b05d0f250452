"""Honest probabilities: temperature scaling (Guo et al., 2017) fitted on the validation split.

Label smoothing trains the network to be under-confident: its mean confidence is well below its accuracy
(docs/training.md, Honest probabilities, gives both). Dividing the logits by one temperature T, fitted to
minimise the validation negative log-likelihood, fixes the confidence and leaves every prediction (the
argmax) unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

ECE_BINS = 15              # the usual choice in the calibration literature: comparable figures
TEMPERATURE_RANGE = (0.05, 20.0)  # a fitted T outside this means broken logits, not a calibration
FIT_STEPS = 200            # L-BFGS iterations on one scalar: converges in a few dozen


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 minimising cross-entropy(logits / T, labels); optimised as log T, so it stays positive."""
    log_t = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=FIT_STEPS, line_search_fn="strong_wolfe")
    logits, labels = logits.float().clone(), labels.long()  # a clone: inference-mode tensors take no grad

    def loss():
        optimizer.zero_grad()
        value = F.cross_entropy(logits / log_t.exp(), labels)
        value.backward()
        return value

    optimizer.step(loss)
    return float(np.clip(log_t.exp().item(), *TEMPERATURE_RANGE))


def reliability(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Per confidence bin (equal width on [0, 1]): count, mean confidence and accuracy of the top class."""
    confidence, correct = probabilities.max(1), probabilities.argmax(1) == labels
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    return [{"low": b / bins, "high": (b + 1) / bins, "count": int((which == b).sum()),
             "confidence": float(confidence[which == b].mean()) if (which == b).any() else None,
             "accuracy": float(correct[which == b].mean()) if (which == b).any() else None}
            for b in range(bins)]


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Mean |accuracy - confidence| over the confidence bins, weighted by each bin's share of the images."""
    table = reliability(probabilities, labels, bins)
    return float(sum(row["count"] * abs(row["accuracy"] - row["confidence"]) for row in table if row["count"])
                 / len(labels))
