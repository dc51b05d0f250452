"""Drift: is what the served model is shown, and what it answers, still what it was trained and validated on?

At training time `profile` summarises the validation split as the model sees it and the profile is stored with
the model (artifact `reference`, JSON): the predicted class mix, the top probability, two input statistics
(each image's mean brightness and its share of ink) and the out-of-distribution score. The scoring server's
`GET /monitor` and `/metrics` compare the newest WINDOW_ROWS logged predictions of the served model with it
(`compare`), with standard tests (scipy):
  * class mix: the population stability index, sum (p - q) ln(p / q), alert above PSI_ALERT (the usual rule:
    below 0.1 stable, 0.1-0.2 moderate, above 0.2 a real shift), and Pearson's chi-square p-value beside it;
  * top probability, brightness, ink and the out-of-distribution score: the two-sample Kolmogorov-Smirnov test,
    alert when its p-value is below KS_ALERT_P (five tests at once: a false alarm about 1 window in 200);
  * the share of answers flagged as not clothing, alert above OOD_SHARE_ALERT (validation: 2.5 %).
The out-of-distribution score is computed from the network's features (ood.py), so its KS test is the test on
features. Fewer than MIN_ROWS predictions give the statistics but no alert: a few images say nothing.
"""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from scipy import stats

from fmnist_pyfunc import ood
from fmnist_pyfunc.config import CLASS_NAMES
from fmnist_pyfunc.data import IMAGE_SIZE, NUM_CLASSES

WINDOW_ROWS = 1000     # the newest predictions compared: a day of a small shop, ~1 MB of images to read
MIN_ROWS = 100         # below this no alert is raised
PSI_ALERT = 0.2
PSI_FLOOR = 1e-4       # a class missing on one side would make the index infinite
KS_ALERT_P = 0.001
OOD_SHARE_ALERT = 0.10 # 4x the validation split's refusals (ood.ACCEPT_SHARE accepts 97.5 %)
INK_LEVEL = 64         # of 255: a pixel this bright is part of the garment, not the dark background
DIGITS = 4             # decimals kept in the stored profile: ~100 KB of JSON for 5,000 validation images
HISTORY_ROWS = 5000    # the monitor page's plots cover the newest this many predictions ...
HISTORY_POINTS = 20    # ... in this many consecutive groups ...
GROUP_MIN_ROWS = 25    # ... of at least this many predictions: a share of fewer says little
KS_TESTS = ("confidence", "brightness", "ink", "ood_score")


def brightness(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).mean(1) / 255


def ink(images: np.ndarray) -> np.ndarray:
    return (images.reshape(len(images), -1) >= INK_LEVEL).mean(1)


def ood_share(ood_score: np.ndarray) -> float:
    """The share of answers flagged as not clothing."""
    return float((~ood.in_distribution(ood_score)).mean())


def class_mix(class_index: np.ndarray) -> np.ndarray:
    return np.bincount(class_index, minlength=NUM_CLASSES) / max(len(class_index), 1)


def _rounded(values: np.ndarray) -> list[float]:
    return np.round(np.asarray(values, dtype=np.float64), DIGITS).tolist()


def profile(images: np.ndarray, probabilities: np.ndarray, ood_score: np.ndarray | None) -> dict:
    """The reference a window is compared with: images (N, 28, 28) uint8 as the network saw them, calibrated
    probabilities (N, 10), the detector's scores (or None)."""
    return {"rows": len(images), "class_mix": _rounded(class_mix(probabilities.argmax(1))),
            "confidence": _rounded(probabilities.max(1)), "brightness": _rounded(brightness(images)),
            "ink": _rounded(ink(images)), "ood_score": None if ood_score is None else _rounded(ood_score)}


def psi(expected: np.ndarray, observed: np.ndarray) -> float:
    p, q = np.maximum(observed, PSI_FLOOR), np.maximum(expected, PSI_FLOOR)
    return float(((p - q) * np.log(p / q)).sum())


def compare(reference: dict, images: np.ndarray, class_index: np.ndarray, confidence: np.ndarray,
            ood_score: np.ndarray | None) -> dict:
    """The window's statistics against `reference`, each with its threshold and whether it alerts."""
    n = len(images)
    expected = np.maximum(np.asarray(reference["class_mix"]), PSI_FLOOR)
    expected /= expected.sum()
    counts = np.bincount(class_index, minlength=NUM_CLASSES)
    checks = {"class_mix_psi": (psi(expected, counts / max(n, 1)), PSI_ALERT, "above"),
              "class_mix_chi2_p": (float(stats.chisquare(counts, expected * n).pvalue) if n else 1.0, None, None)}
    window = {"confidence": confidence, "brightness": brightness(images), "ink": ink(images), "ood_score": ood_score}
    for name in KS_TESTS:
        if window[name] is None or reference.get(name) is None or not n:
            continue
        test = stats.ks_2samp(window[name], np.asarray(reference[name]))
        checks[f"{name}_ks"] = (float(test.statistic), None, None)
        checks[f"{name}_ks_p"] = (float(test.pvalue), KS_ALERT_P, "below")
    if ood_score is not None and n:
        checks["ood_share"] = (ood_share(ood_score), OOD_SHARE_ALERT, "above")
    statistics = {}
    for name, (value, threshold, side) in checks.items():
        past = threshold is not None and (value > threshold if side == "above" else value < threshold)
        alert = n >= MIN_ROWS and past
        statistics[name] = {"value": value, "threshold": threshold, "alert_when": side, "alert": bool(alert)}
    return {"rows": n, "enough_rows": n >= MIN_ROWS, "drifted": any(s["alert"] for s in statistics.values()),
            "statistics": statistics}


def history(reference: dict, at: list, images: np.ndarray, class_index: np.ndarray, confidence: np.ndarray,
            ood_score: np.ndarray | None) -> list[dict]:
    """The plots' points: consecutive groups of predictions (oldest first), each with its end time, class mix,
    mean confidence, share not clothing and class-mix PSI against the reference."""
    points = []
    groups = max(1, min(HISTORY_POINTS, len(images) // GROUP_MIN_ROWS))
    for part in np.array_split(np.arange(len(images)), groups):
        mix = class_mix(class_index[part])
        points.append({"until": at[part[-1]].isoformat(timespec="seconds"), "rows": len(part),
                       "class_mix": _rounded(mix), "confidence": float(confidence[part].mean()),
                       "brightness": float(brightness(images[part]).mean()),
                       "ood_share": None if ood_score is None else ood_share(ood_score[part]),
                       "class_mix_psi": psi(np.asarray(reference["class_mix"]), mix)})
    return points


def report(reference: dict | None, model: dict, rows: list, feedback: list[dict],
           window_rows: int = WINDOW_ROWS) -> dict:
    """GET /monitor: the served model, its newest `window_rows` predictions against its reference, the plots'
    history and the accuracy on users' feedback per version. `rows` are logged predictions of that model,
    oldest first."""
    images = np.frombuffer(b"".join(row.image for row in rows), dtype=np.uint8).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
    class_index = np.array([row.class_index for row in rows], dtype=np.int64)
    confidence = np.array([row.top_probability for row in rows], dtype=np.float64)
    scores = [row.ood_score for row in rows]
    ood_score = None if not rows or None in scores else np.array(scores, dtype=np.float64)
    window = slice(-window_rows, None)
    answer = {"model": {k: model.get(k) for k in ("name", "version", "run_id")}, "feedback": feedback,
              "thresholds": {"psi": PSI_ALERT, "ks_p": KS_ALERT_P, "ood_share": OOD_SHARE_ALERT,
                             "window_rows": window_rows, "min_rows": MIN_ROWS},
              "class_names": list(CLASS_NAMES), "reference": reference is not None}
    if reference is None:  # a model logged before monitoring: what it was shown, but nothing to compare with
        return {**answer, "rows": len(rows), "drifted": False, "statistics": {}, "history": []}
    drift = compare(reference, images[window], class_index[window], confidence[window],
                    None if ood_score is None else ood_score[window])
    at = [row.logged_at for row in rows]
    return {**answer, **drift, "history": history(reference, at, images, class_index, confidence, ood_score)
            if rows else []}


def exposition(report: dict) -> bytes:
    """The report as Prometheus gauges (Prometheus text format), made fresh at each scrape."""
    registry = CollectorRegistry()
    statistic = Gauge("fmnist_drift_statistic", "Drift statistics of the newest logged predictions against the "
                      "model's validation profile", ["statistic"], registry=registry)
    alert = Gauge("fmnist_drift_alert", "1 where a drift statistic is past its threshold", ["statistic"],
                  registry=registry)
    Gauge("fmnist_drifted", "1 when any drift statistic alerts", registry=registry).set(report["drifted"])
    Gauge("fmnist_drift_window_rows", "Logged predictions in the compared window", registry=registry).set(
        report["rows"])
    for name, value in report["statistics"].items():
        statistic.labels(name).set(value["value"])
        if value["threshold"] is not None:
            alert.labels(name).set(value["alert"])
    accuracy = Gauge("fmnist_feedback_accuracy", "Share of users' corrections where the model was right",
                     ["version"], registry=registry)
    total = Gauge("fmnist_feedback_total", "Corrections received from users", ["version"], registry=registry)
    for row in report["feedback"]:
        accuracy.labels(str(row["version"])).set(row["accuracy"])
        total.labels(str(row["version"])).set(row["feedback"])
    return generate_latest(registry)
