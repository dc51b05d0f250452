"""Promotion: pick the best run, and let its model into Production only through the champion/challenger gate.

Selection among runs uses validation accuracy only. The gate compares the challenger with the current
Production model on the 10k test set, through each model's own pyfunc (preprocessing included): it is
the one set that no run trained or selected on (validation splits differ per seed); where users have corrected
enough predictions, also on the held-out share of those (feedback.py). The rule itself is
`decide`, a pure function; `promote` gathers what it needs under the promotion lock and acts on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from fmnist_pyfunc import calibration, data, feedback, inference, registry
from fmnist_pyfunc.config import REGISTERED_MODEL_NAME, SELECTION_METRIC
from fmnist_pyfunc.prediction_log import Labelled
from fmnist_pyfunc.promotion_lock import promotion_lock
from fmnist_pyfunc.registry import PRODUCTION, PromotionError

# Test accuracy a challenger may lose against the champion when it is better on users' held-out corrections:
# learning a new kind of input may cost a little on the old kind, never more than this.
FEEDBACK_TEST_MARGIN = 0.005


@dataclass(frozen=True)
class Scores:
    """A model's accuracy and expected calibration error (15 bins) on the 10k test set, and its accuracy on
    users' held-out corrections (None: fewer than feedback.MIN_HOLDOUT of them)."""
    accuracy: float
    ece: float
    feedback_accuracy: float | None = None


@dataclass
class Decision:
    version: str
    promoted: bool
    reason: str
    challenger_accuracy: float | None = None
    champion_version: str | None = None
    champion_accuracy: float | None = None
    challenger_ece: float | None = None    # expected calibration error (15 bins) on the same test set
    champion_ece: float | None = None
    challenger_feedback_accuracy: float | None = None  # on users' held-out corrections, when there are enough
    champion_feedback_accuracy: float | None = None

    def summary(self) -> str:
        verdict = "PROMOTED to Production (alias champion)" if self.promoted else "NOT promoted"
        return f"{REGISTERED_MODEL_NAME} v{self.version}: {verdict}: {self.reason}"


def decide(version: str, challenger: Scores, champion_version: str | None, champion: Scores | None,
           force: bool = False) -> Decision:
    """The gate: a challenger replaces the champion only if it is strictly more accurate on the test set
    (a tie keeps the model users already have), or if forced; with no champion it goes in. Where users'
    held-out corrections are scored, it must instead be more accurate on them (or as accurate, and better on
    the test set) while losing at most FEEDBACK_TEST_MARGIN on the test set."""
    decision = Decision(version, promoted=True, reason="no model in Production yet",
                        challenger_accuracy=challenger.accuracy, challenger_ece=challenger.ece,
                        challenger_feedback_accuracy=challenger.feedback_accuracy, champion_version=champion_version)
    if champion_version is None:
        return decision
    if champion is None:
        raise ValueError(f"champion v{champion_version} needs its scores")
    decision.champion_accuracy, decision.champion_ece = champion.accuracy, champion.ece
    decision.champion_feedback_accuracy = champion.feedback_accuracy
    test = (f"challenger v{version} accuracy {challenger.accuracy:.4f} (ECE {challenger.ece:.4f}) vs champion "
            f"v{champion_version} {champion.accuracy:.4f} (ECE {champion.ece:.4f}) on the 10k test set")
    if challenger.feedback_accuracy is None or champion.feedback_accuracy is None:
        beats = challenger.accuracy > champion.accuracy
        verdict = "better" if beats else "not better"
    else:
        keeps_test = challenger.accuracy >= champion.accuracy - FEEDBACK_TEST_MARGIN
        gain = challenger.feedback_accuracy - champion.feedback_accuracy
        beats = keeps_test and (gain > 0 or (gain == 0 and challenger.accuracy > champion.accuracy))
        test += (f", {challenger.feedback_accuracy:.4f} vs {champion.feedback_accuracy:.4f} on users' held-out "
                 "corrections")
        verdict = ("better" if beats else "not better" if keeps_test
                   else f"loses more than {FEEDBACK_TEST_MARGIN:.1%} on the test set")
    decision.promoted = beats or force
    decision.reason = f"{test}: {verdict}" + (", forced" if force else "")
    return decision


def best_run(experiment: str | None = None, parent_run_id: str | None = None) -> str:
    """Id of the finished run with the highest validation accuracy (in an experiment, or a sweep's children)."""
    client = MlflowClient()
    if parent_run_id:
        experiment_ids = [client.get_run(parent_run_id).info.experiment_id]
        query = f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'FINISHED'"
    else:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise PromotionError(f"experiment {experiment!r} does not exist")
        experiment_ids, query = [found.experiment_id], "attributes.status = 'FINISHED'"
    runs = client.search_runs(experiment_ids, f"{query} and metrics.{SELECTION_METRIC} > 0",
                              run_view_type=ViewType.ACTIVE_ONLY, order_by=[f"metrics.{SELECTION_METRIC} DESC"],
                              max_results=1)
    if not runs:
        raise PromotionError(f"no finished run with {SELECTION_METRIC} in {parent_run_id or experiment!r}")
    return runs[0].info.run_id


def _probabilities(model, images: np.ndarray) -> np.ndarray:
    """A pyfunc model's probabilities for `images`, in the batches training's evaluation uses."""
    probabilities = []
    for start in range(0, len(images), inference.BATCH_SIZE):
        chunk = images[start:start + inference.BATCH_SIZE]
        answer = model.predict(pd.DataFrame({"pixels": list(chunk.astype(np.float32))}))
        probabilities.append(np.array(answer["probabilities"].tolist()))
    return np.concatenate(probabilities)


def heldout_scores(model_uri: str, dataset: data.FashionMNIST, corrections: Labelled | None = None) -> Scores:
    """Accuracy and calibration error of a registered model on the 10k test set, through its pyfunc interface
    (so a run's test_accuracy is reproduced exactly), and its accuracy on `corrections` if given."""
    model = mlflow.pyfunc.load_model(model_uri)
    probabilities = _probabilities(model, dataset.test_images)
    on_feedback = None
    if corrections is not None:
        on_feedback = float((_probabilities(model, corrections.images).argmax(1) == corrections.labels).mean())
    return Scores(float((probabilities.argmax(1) == dataset.test_labels).mean()),
                  calibration.expected_calibration_error(probabilities, dataset.test_labels), on_feedback)


def promote(run_id: str, dataset: data.FashionMNIST, force: bool = False) -> Decision:
    """Register `run_id`'s model and make it Production + champion if it beats the current Production."""
    with promotion_lock():
        return _promote(run_id, dataset, force)


def _promote(run_id: str, dataset: data.FashionMNIST, force: bool) -> Decision:
    version = registry.register(run_id)
    champion = registry.current_production()
    if champion == version:
        registry.crown(version)
        return Decision(version, promoted=False, reason=f"version {version} is already in {PRODUCTION}")
    corrections = feedback.gate_holdout() if champion else None
    challenger_scores = heldout_scores(f"models:/{REGISTERED_MODEL_NAME}/{version}", dataset, corrections)
    champion_scores = (heldout_scores(f"models:/{REGISTERED_MODEL_NAME}/{champion}", dataset, corrections)
                       if champion else None)
    decision = decide(version, challenger_scores, champion, champion_scores, force)
    MlflowClient().set_model_version_tag(REGISTERED_MODEL_NAME, version, "promotion_decision",
                                         ("promoted: " if decision.promoted else "rejected: ") + decision.reason)
    if decision.promoted:
        registry.crown(version)
    return decision


def log_decision(decision: Decision) -> None:
    """Record the decision and both scores in the active MLflow run."""
    mlflow.set_tags({"promotion.version": decision.version, "promotion.promoted": str(decision.promoted).lower(),
                     "promotion.reason": decision.reason})
    scores = {"challenger_test_accuracy": decision.challenger_accuracy,
              "champion_test_accuracy": decision.champion_accuracy,
              "challenger_test_ece": decision.challenger_ece, "champion_test_ece": decision.champion_ece,
              "challenger_feedback_accuracy": decision.challenger_feedback_accuracy,
              "champion_feedback_accuracy": decision.champion_feedback_accuracy}
    mlflow.log_metrics({k: v for k, v in scores.items() if v is not None})
