"""Promotion: pick the best run, and let its model into Production only through the champion/challenger gate.

Selection among runs uses validation accuracy only. The gate compares the challenger with the current
Production model on the 10k test set, through each model's own pyfunc (preprocessing included): it is
the one set that no run trained or selected on (validation splits differ per seed). The rule itself is
`decide`, a pure function; `promote` gathers what it needs under the promotion lock and acts on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from fmnist_pyfunc import calibration, data, inference, registry
from fmnist_pyfunc.config import REGISTERED_MODEL_NAME, SELECTION_METRIC
from fmnist_pyfunc.promotion_lock import promotion_lock
from fmnist_pyfunc.registry import PRODUCTION, PromotionError


@dataclass(frozen=True)
class Scores:
    """A model's accuracy and expected calibration error (15 bins) on the 10k test set."""
    accuracy: float
    ece: float


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

    def summary(self) -> str:
        verdict = "PROMOTED to Production (alias champion)" if self.promoted else "NOT promoted"
        return f"{REGISTERED_MODEL_NAME} v{self.version}: {verdict}: {self.reason}"


def decide(version: str, challenger: Scores, champion_version: str | None, champion: Scores | None,
           force: bool = False) -> Decision:
    """The gate: a challenger replaces the champion only if it is strictly more accurate on the test set
    (a tie keeps the model users already have), or if forced; with no champion it goes in."""
    decision = Decision(version, promoted=True, reason="no model in Production yet",
                        challenger_accuracy=challenger.accuracy, challenger_ece=challenger.ece,
                        champion_version=champion_version)
    if champion_version is None:
        return decision
    if champion is None:
        raise ValueError(f"champion v{champion_version} needs its scores")
    beats = challenger.accuracy > champion.accuracy
    decision.champion_accuracy, decision.champion_ece = champion.accuracy, champion.ece
    decision.promoted = beats or force
    decision.reason = (f"challenger v{version} accuracy {challenger.accuracy:.4f} (ECE {challenger.ece:.4f}) vs "
                       f"champion v{champion_version} {champion.accuracy:.4f} (ECE {champion.ece:.4f}) on the 10k "
                       f"test set: {'better' if beats else 'not better'}" + (", forced" if force else ""))
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


def heldout_scores(model_uri: str, dataset: data.FashionMNIST) -> Scores:
    """Accuracy and calibration error of a registered model on the 10k test set, through its pyfunc interface,
    in the batches training's evaluation uses (so a run's test_accuracy is reproduced exactly)."""
    model = mlflow.pyfunc.load_model(model_uri)
    probabilities = []
    for start in range(0, len(dataset.test_images), inference.BATCH_SIZE):
        chunk = dataset.test_images[start:start + inference.BATCH_SIZE]
        answer = model.predict(pd.DataFrame({"pixels": list(chunk.astype(np.float32))}))
        probabilities.append(np.array(answer["probabilities"].tolist()))
    probabilities = np.concatenate(probabilities)
    return Scores(float((probabilities.argmax(1) == dataset.test_labels).mean()),
                  calibration.expected_calibration_error(probabilities, dataset.test_labels))


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
    challenger_scores = heldout_scores(f"models:/{REGISTERED_MODEL_NAME}/{version}", dataset)
    champion_scores = heldout_scores(f"models:/{REGISTERED_MODEL_NAME}/{champion}", dataset) if champion else None
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
              "challenger_test_ece": decision.challenger_ece, "champion_test_ece": decision.champion_ece}
    mlflow.log_metrics({k: v for k, v in scores.items() if v is not None})
