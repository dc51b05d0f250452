"""The promotion rule and best-run selection, without training anything: the gate as a pure function, and
selection on runs whose validation and test rankings disagree."""

import mlflow
import pytest

from fmnist_pyfunc import promotion
from fmnist_pyfunc.config import SELECTION_METRIC
from fmnist_pyfunc.promotion import Scores, decide

CHAMPION = Scores(accuracy=0.90, ece=0.02)


def test_a_more_accurate_challenger_replaces_the_champion_without_force():
    """A challenger strictly more accurate on the test set is promoted over an existing champion, unforced."""
    decision = decide("7", Scores(0.91, 0.05), "3", CHAMPION)
    assert decision.promoted and "better" in decision.reason and "not better" not in decision.reason
    assert (decision.champion_version, decision.champion_accuracy, decision.challenger_accuracy) == ("3", 0.90, 0.91)


@pytest.mark.parametrize("accuracy", [0.89, 0.90], ids=["worse", "tied"])
def test_a_challenger_that_is_not_more_accurate_keeps_the_champion(accuracy):
    """A less accurate challenger, or an equally accurate one (users keep the model they have), is rejected,
    whatever its calibration."""
    decision = decide("7", Scores(accuracy, 0.001), "3", CHAMPION)
    assert not decision.promoted and "not better" in decision.reason


def test_force_promotes_a_worse_challenger_and_says_so():
    """--force overrides the comparison, and the reason records both the comparison and the override."""
    decision = decide("7", Scores(0.50, 0.30), "3", CHAMPION, force=True)
    assert decision.promoted and decision.reason.endswith("not better, forced")


def test_the_first_model_goes_in_unopposed():
    """With nothing in Production, any challenger is promoted, and no champion scores are invented."""
    decision = decide("1", Scores(0.10, 0.50), None, None)
    assert decision.promoted and decision.reason == "no model in Production yet"
    assert decision.champion_accuracy is None and decision.champion_ece is None


def test_a_champion_without_scores_is_an_error():
    """The rule never compares against a champion it has no scores for."""
    with pytest.raises(ValueError, match="needs its scores"):
        decide("7", Scores(0.91, 0.05), "3", None)


FEEDBACK_CHAMPION = Scores(accuracy=0.90, ece=0.02, feedback_accuracy=0.60)
MARGIN = promotion.FEEDBACK_TEST_MARGIN


@pytest.mark.parametrize(("test", "on_feedback", "promoted"), [
    (0.90 - MARGIN, 0.70, True),            # better on corrections, test within the margin
    (0.90 - 2 * MARGIN, 0.90, False),       # better on corrections, but loses too much on the test set
    (0.91, 0.60, True),                     # as good on corrections, better on the test set
    (0.95, 0.59, False),                    # worse on corrections, however good on the test set
], ids=["feedback-gain", "test-loss", "tie-test-gain", "feedback-loss"])
def test_with_held_out_corrections_the_gate_judges_on_them_within_a_test_margin(test, on_feedback, promoted):
    """Where both models are scored on users' held-out corrections, the challenger must do better on them (or as
    well, and better on the test set) without losing more than FEEDBACK_TEST_MARGIN on the test set."""
    decision = decide("7", Scores(test, 0.02, on_feedback), "3", FEEDBACK_CHAMPION)
    assert decision.promoted is promoted, decision.reason
    assert "held-out corrections" in decision.reason and decision.champion_feedback_accuracy == 0.60
    if test < 0.90 - MARGIN:
        assert "loses more than 0.5% on the test set" in decision.reason


def _run(experiment: str, val: float, test: float, status: str = "FINISHED") -> str:
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.log_metrics({SELECTION_METRIC: val, "test_accuracy": test})
    if status != "FINISHED":
        mlflow.MlflowClient().set_terminated(run.info.run_id, status)
    return run.info.run_id


def test_best_run_ranks_by_validation_accuracy_never_by_test_accuracy(private_store):
    """Of runs whose validation and test rankings disagree, the best by validation is chosen (ranking by test
    accuracy would leak the gate's held-out set into selection); a failed run is never chosen, however good."""
    experiment = mlflow.create_experiment("selection")
    best_on_validation = _run(experiment, val=0.93, test=0.90)
    _run(experiment, val=0.92, test=0.95)
    _run(experiment, val=0.99, test=0.99, status="FAILED")
    assert promotion.best_run("selection") == best_on_validation
    with mlflow.start_run(experiment_id=experiment) as parent:
        pass
    with pytest.raises(promotion.PromotionError, match="no finished run"):
        promotion.best_run(parent_run_id=parent.info.run_id)
