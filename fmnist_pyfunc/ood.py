"""Does the picture look like a Fashion-MNIST garment at all? An out-of-distribution score the served model
carries, so every way of serving it answers "not clothing" the same way.

Three signals, each strong where the others are weak (benchmarks/ood.py measured each alone and together;
docs/training.md, Knowing what it does not know, gives the table):
  * energy, -T log sum exp(logits / T) with the calibration temperature T (Liu et al., 2020): low for
    anything the classifier recognises; catches digits and photos, misses shapes and noise;
  * relative Mahalanobis distance of the last conv stage's channel means (Ren et al., 2021): the distance to
    the nearest class's Gaussian (one shared covariance, Lee et al., 2018) minus the distance to one Gaussian
    of all classes; catches text and natural photos;
  * Mahalanobis distance of per-stage channel statistics (each conv stage's channel means and standard
    deviations): texture no garment has; catches noise, flat colours and shapes.
Each is put on the validation split's scale (median 0, 97.5th percentile 1) and the three are summed. The
Gaussians are fitted on the training split only; the validation split sets the scales and the threshold, which
accepts ACCEPT_SHARE of its garments. The score is reported so that a typical validation garment scores 0 and
the threshold is 1: above 1 the picture is answered as not clothing.

Stored with the model as one .npz of plain arrays (read with allow_pickle=False); fitted in numpy (float64),
scored in torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fmnist_pyfunc.inference import Outputs

ACCEPT_SHARE = 0.975   # of validation garments accepted: a garment is refused 1 time in 40, and a picture
                       # that is not clothing far more often (README, figures)
FIT_IMAGES = 20_000    # training images the Gaussians are fitted on: ~45x the 448 stage statistics of the
                       # default network, plenty for a shared covariance; all 55k cost 3x the time for nothing
EIGEN_FLOOR = 1e-6     # of the mean variance: dead ReLU channels have none, and must not divide by zero
TYPICAL_QUANTILE = 0.5 # a component's validation median maps to 0 ...
SCALE_QUANTILE = 0.975 # ... and this validation quantile to 1, so the three weigh alike
COMPONENTS = ("energy", "relative_mahalanobis", "stage_statistics")
THRESHOLD = 1.0        # the reported score at the threshold (see the module's docstring)


def in_distribution(scores: np.ndarray) -> np.ndarray:
    return scores <= THRESHOLD


@dataclass(frozen=True)
class Gaussians:
    """Gaussians with one shared covariance, stored whitened: after `x @ whitening.T` distances are Euclidean."""
    means: torch.Tensor      # (K, D) float32, already whitened
    whitening: torch.Tensor  # (D, D) float32

    def distance(self, x: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance (float64) of each row of x (N, D) to the nearest of the K means. In
        float64: in float32 the expanded square loses ~1e-5 to cancellation, and how much depends on the
        matrix kernel, i.e. on how many rows are scored together; a served image's score must not depend on
        which requests shared its forward pass (batching.py). No slower at these sizes."""
        z = x.double() @ self.whitening.double().T
        means = self.means.double()
        return ((z * z).sum(1, keepdim=True) - 2 * z @ means.T + (means * means).sum(1)).amin(1)


def fit_gaussians(x: torch.Tensor, labels: np.ndarray) -> Gaussians:
    """One Gaussian per label value with the covariance they share (pooled within-label scatter), fitted in
    float64."""
    x = x.double().numpy()
    classes = np.unique(labels)
    means = np.stack([x[labels == c].mean(0) for c in classes])
    centred = x - means[np.searchsorted(classes, labels)]
    variances, vectors = np.linalg.eigh(centred.T @ centred / len(x))
    variances = np.maximum(variances, EIGEN_FLOOR * max(variances.mean(), np.finfo(np.float64).tiny))
    whitening = (vectors / np.sqrt(variances)).T
    return Gaussians(torch.from_numpy((means @ whitening.T).astype(np.float32)),
                     torch.from_numpy(np.ascontiguousarray(whitening, dtype=np.float32)))


def energy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """-T log sum exp(logits / T): lower is more familiar."""
    return -temperature * torch.logsumexp(logits / temperature, 1)


@dataclass(frozen=True)
class Detector:
    classes: Gaussians          # the network's embedding (inference.Outputs), one Gaussian per class
    everything: Gaussians       # the embedding, all classes as one
    stages: Gaussians | None    # per-stage channel statistics, per class (None: a network without conv stages)
    temperature: float
    centre: np.ndarray          # (3,) each component's validation median
    scale: np.ndarray           # (3,) each component's validation SCALE_QUANTILE minus its median
    typical: float              # the summed components' validation median: scores 0
    threshold: float            # their validation ACCEPT_SHARE quantile: scores 1

    @torch.inference_mode()
    def components(self, outputs: Outputs) -> np.ndarray:
        """(N, 3) raw signals, larger = less like the training garments; a network without stages gives 0.
        In torch, on the pool of threads the network used: numpy's BLAS beside it would fight that pool for
        the cores (a single image took twice as long)."""
        embedding = outputs.embedding
        stage = (self.stages.distance(outputs.stats) if self.stages is not None
                 else torch.zeros(len(embedding), dtype=torch.float64))
        return torch.stack([energy(outputs.logits, self.temperature).double(),
                            self.classes.distance(embedding) - self.everything.distance(embedding), stage], 1).numpy()

    def score(self, outputs: Outputs) -> np.ndarray:
        """(N,) float64: 0 for a typical validation garment, above 1 out of distribution."""
        summed = ((self.components(outputs) - self.centre) / self.scale).sum(1)
        return (summed - self.typical) / (self.threshold - self.typical)

    def save(self, path: Path) -> None:
        arrays = {"class_means": self.classes.means.numpy(), "class_whitening": self.classes.whitening.numpy(),
                  "all_means": self.everything.means.numpy(), "all_whitening": self.everything.whitening.numpy(),
                  "temperature": self.temperature, "centre": self.centre, "scale": self.scale,
                  "typical": self.typical, "threshold": self.threshold}
        if self.stages is not None:
            arrays.update(stage_means=self.stages.means.numpy(), stage_whitening=self.stages.whitening.numpy())
        with open(path, "wb") as f:
            np.savez(f, **arrays)


def load(path: str | Path) -> Detector:
    with np.load(path, allow_pickle=False) as a:
        def gaussians(name: str) -> Gaussians:
            return Gaussians(torch.from_numpy(a[f"{name}_means"]), torch.from_numpy(a[f"{name}_whitening"]))

        return Detector(classes=gaussians("class"), everything=gaussians("all"),
                        stages=gaussians("stage") if "stage_means" in a else None,
                        temperature=float(a["temperature"]), centre=a["centre"], scale=a["scale"],
                        typical=float(a["typical"]), threshold=float(a["threshold"]))


def fit(train: Outputs, train_labels: np.ndarray, val: Outputs, temperature: float) -> Detector:
    """Gaussians from the training split's network outputs; scales and threshold from the validation split's."""
    stages = fit_gaussians(train.stats, train_labels) if train.stats.shape[1] else None
    draft = Detector(fit_gaussians(train.embedding, train_labels),
                     fit_gaussians(train.embedding, np.zeros_like(train_labels)),
                     stages, temperature, np.zeros(len(COMPONENTS)), np.ones(len(COMPONENTS)), 0.0, 1.0)
    raw = draft.components(val).astype(np.float64)
    centre = np.quantile(raw, TYPICAL_QUANTILE, axis=0)
    scale = np.maximum(np.quantile(raw, SCALE_QUANTILE, axis=0) - centre, np.finfo(np.float32).eps)
    summed = ((raw - centre) / scale).sum(1)
    typical, threshold = float(np.quantile(summed, TYPICAL_QUANTILE)), float(np.quantile(summed, ACCEPT_SHARE))
    return Detector(draft.classes, draft.everything, stages, temperature, centre, scale, typical,
                    max(threshold, typical + np.finfo(np.float32).eps))
