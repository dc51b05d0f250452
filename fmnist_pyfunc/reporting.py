"""Evaluation artifacts: confusion matrix, misclassified examples, per-class scores, learning curves,
reliability diagram."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: runs in CI and on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fmnist_pyfunc.config import CLASS_NAMES  # noqa: E402

MISCLASSIFIED_GRID = (5, 8)  # rows x columns of the grid of wrong test predictions
MISCLASSIFIED_CAPTION = 12   # image pixels above each image for its two caption lines (at fontsize 6)
MISCLASSIFIED_GAP = 4        # image pixels between neighbouring images
FIGURE_DPI = 110


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray) -> np.ndarray:
    matrix = np.zeros((len(CLASS_NAMES), len(CLASS_NAMES)), dtype=np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def per_class_scores(matrix: np.ndarray) -> dict:
    """Precision, recall and F1 per class from a confusion matrix (rows = true labels)."""
    true_pos = np.diag(matrix).astype(float)
    precision = true_pos / np.maximum(matrix.sum(0), 1)
    recall = true_pos / np.maximum(matrix.sum(1), 1)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    return {name: {"precision": round(float(p), 4), "recall": round(float(r), 4), "f1": round(float(f), 4),
                   "support": int(s)}
            for name, p, r, f, s in zip(CLASS_NAMES, precision, recall, f1, matrix.sum(1), strict=True)}


def plot_confusion_matrix(matrix: np.ndarray):
    fig, ax = plt.subplots(figsize=(7.5, 6.5), dpi=FIGURE_DPI)
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(CLASS_NAMES)), CLASS_NAMES, rotation=45, ha="right")
    ax.set_yticks(range(len(CLASS_NAMES)), CLASS_NAMES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = matrix.max() / 2
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                color="white" if count > threshold else "black")
    ax.set_title("Test-set confusion matrix")
    fig.tight_layout()
    return fig


def plot_misclassified(images: np.ndarray, labels: np.ndarray, predictions: np.ndarray, confidence: np.ndarray):
    """The most confidently wrong test predictions, captioned 'true -> predicted (p)'. One picture with the
    images laid out in a grid, not one axes per image: every run logs this, and 40 axes laid out by
    matplotlib cost five times as much CPU."""
    wrong = np.flatnonzero(labels != predictions)
    wrong = wrong[np.argsort(-confidence[wrong])]
    rows, cols = MISCLASSIFIED_GRID
    side = images.shape[1]
    cell_w, cell_h = side + MISCLASSIFIED_GAP, side + MISCLASSIFIED_CAPTION + MISCLASSIFIED_GAP
    canvas = np.full((rows * cell_h, cols * cell_w), 255, np.uint8)
    fig, ax = plt.subplots(figsize=(cols * 1.6, rows * 1.8), dpi=FIGURE_DPI)
    for k, idx in enumerate(wrong[: rows * cols]):
        row, col = divmod(k, cols)
        top, left = row * cell_h + MISCLASSIFIED_CAPTION, col * cell_w + MISCLASSIFIED_GAP // 2
        canvas[top:top + side, left:left + side] = images[idx]
        ax.text(left + side / 2, top - 1, f"{CLASS_NAMES[labels[idx]]}\n-> {CLASS_NAMES[predictions[idx]]} "
                f"({confidence[idx]:.2f})", ha="center", va="bottom", fontsize=6)
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.axis("off")
    ax.set_title("Most confident test mistakes (true -> predicted)")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.94)
    return fig


def plot_learning_curves(history: list[dict]):
    epochs = np.arange(1, len(history) + 1)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4), dpi=FIGURE_DPI)
    for split in ("train", "val"):
        ax_loss.plot(epochs, [h[f"{split}_loss"] for h in history], marker="o", label=split)
        ax_acc.plot(epochs, [h[f"{split}_accuracy"] for h in history], marker="o", label=split)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss (train: augmented, label-smoothed)")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def plot_reliability(tables: dict[str, list[dict]]):
    """Accuracy against confidence per bin (`calibration.reliability` tables, one per label): a calibrated
    model's bars sit on the diagonal."""
    fig, axes = plt.subplots(1, len(tables), figsize=(5 * len(tables), 4.5), dpi=FIGURE_DPI, squeeze=False)
    for ax, (label, table) in zip(axes[0], tables.items(), strict=True):
        filled = [row for row in table if row["count"]]
        width = table[0]["high"] - table[0]["low"]
        ax.bar([row["low"] for row in filled], [row["accuracy"] for row in filled], width=width, align="edge",
               edgecolor="black", alpha=0.7, label="accuracy")
        ax.plot([row["confidence"] for row in filled], [row["accuracy"] for row in filled], "o", color="C3",
                label="mean confidence")
        ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top class)", ylabel="accuracy", title=label)
        ax.legend(loc="upper left")
    fig.tight_layout()
    return fig


def plot_sweep(trials: list[tuple[int, float | None, str, list[float]]]):
    """Left: each trial's best validation accuracy and the running best. Right: per-epoch curves."""
    fig, (ax_trials, ax_curves) = plt.subplots(1, 2, figsize=(11, 4), dpi=FIGURE_DPI)
    done = [(n, v) for n, v, _, _ in trials if v is not None]
    if done:
        numbers, values = zip(*done, strict=True)
        ax_trials.scatter(numbers, values, label="complete trial")
        ax_trials.plot(numbers, np.maximum.accumulate(values), color="C1", label="best so far")
    for n, _, state, curve in trials:
        ax_curves.plot(range(1, len(curve) + 1), curve, alpha=0.8, linestyle="--" if state == "PRUNED" else "-",
                       label=f"trial {n} ({state.lower()})")
    ax_trials.set(xlabel="trial", ylabel="best validation accuracy", title="Search progress")
    ax_curves.set(xlabel="epoch", ylabel="validation accuracy", title="Trials (dashed: pruned)")
    for ax in (ax_trials, ax_curves):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return fig
