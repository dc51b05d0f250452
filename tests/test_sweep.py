"""`sweep`: Optuna trials are linked MLflow child runs, the best is promoted, an interrupted sweep resumes."""

import signal
import subprocess
import sys
import time

import mlflow
import optuna
import pandas as pd
import pytest
from conftest import mlflow_run

from fmnist_pyfunc import config, registry, sweep, sweep_plan, workers
from fmnist_testkit.harness import child_env

pytestmark = pytest.mark.e2e

SMALL_BUDGET_MINUTES = sweep.PRESETS["quick"].budget_minutes  # 2-6 trials of width 8-16 on 2 busy cores
BUDGET_SLACK_S = 10         # the trials may end this late: an estimate's error within one short trial
AMPLE_BUDGET_MINUTES = 30   # far above what the other tests' trials need: they are not about the budget


def test_sweep_keeps_its_budget_links_children_and_promotes_the_best(private_store, tmp_path, dataset):
    """A quick sweep under `mlflow run`, given 2 minutes and room for 20 trials, ends its trials within the budget
    (plus an epoch's slack); it tried more than one configuration, each a finished child run with every training
    parameter and a model; the parent names the best child, its plots and its plan; Production then loads it."""
    storage = f"sqlite:///{tmp_path}/optuna.db"
    mlflow_run("sweep", {"preset": "quick", "n_trials": 20, "budget_minutes": SMALL_BUDGET_MINUTES,
                         "storage": storage, "study": "e2e"}, private_store, "e2e-sweep", tmp_path)
    runs = mlflow.search_runs(experiment_names=["e2e-sweep"], output_format="list")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    trials_s = (max(c.info.end_time for c in children) - parent.info.start_time) / 1000
    assert trials_s <= SMALL_BUDGET_MINUTES * 60 + BUDGET_SLACK_S, f"{len(children)} trials took {trials_s:.0f} s"
    assert len({c.data.params["lr"] for c in children}) == len(children) >= sweep.PRESETS["quick"].min_trials
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert all(c.info.status == "FINISHED" and "model_uri" in c.data.tags for c in children)
    assert all(set(config.TRAIN_DEFAULTS) <= set(c.data.params) for c in children)
    top = max(r.data.metrics["best_val_accuracy"] for r in children)
    best = [r.info.run_id for r in children if r.data.metrics["best_val_accuracy"] == top]  # ties are possible
    assert parent.data.tags["best_run_id"] in best, {r.info.run_id: r.data.metrics["best_val_accuracy"]
                                                     for r in children}
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id, "sweep")}
    assert {"sweep/search.png", "sweep/search_space.json", "sweep/trials.json", "sweep/plan.json"} <= artifacts
    assert parent.data.tags["promotion.promoted"] == "true"  # an empty registry: the best is promoted
    with registry.stages_quietly():
        model = mlflow.pyfunc.load_model(config.PRODUCTION_MODEL_URI)
    assert model.metadata.run_id == parent.data.tags["best_run_id"]
    frame = pd.DataFrame({"pixels": list(dataset.test_images[:50].astype(float))})
    assert (model.predict(frame)["class_index"].to_numpy() == dataset.test_labels[:50]).mean() > 0.5


def test_a_trial_the_deadline_cuts_is_a_logged_usable_candidate(tracking_uri, tmp_path, dataset):
    """A trial whose next epoch would not end before the deadline stops at that epoch boundary: it completes
    with its best epoch's validation accuracy, says where it was cut, and logs a model that loads and predicts."""
    preset = sweep.PRESETS["quick"]
    base = {**config.TRAIN_DEFAULTS, **preset.fixed, "width": preset.widths[-1], "epochs": preset.epochs[1]}
    cost = sweep_plan.Cost(epoch_s=1.0, evaluation_s=1.0)
    plan = sweep_plan.Plan(width=base["width"], epochs=base["epochs"], n_trials=1, min_trials=1, cost=cost,
                           warmup_epochs=preset.warmup_epochs, budget_s=1.0)
    mlflow.set_experiment("e2e-cut")
    study = optuna.create_study(direction="maximize")
    with mlflow.start_run() as parent:
        objective = sweep.make_objective(preset, dataset, parent.info.run_id, base, workers.SharedBudget(1),
                                         sweep_plan.Deadline(time.time() + 1.0, plan))
        study.optimize(objective, n_trials=1)
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert trial.user_attrs["cut_by_deadline"] == f"after epoch 1 of {base['epochs']}"
    run = mlflow.get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["sweep.cut_by_deadline"] == trial.user_attrs["cut_by_deadline"]
    assert len(mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_accuracy")) == 1
    assert trial.value == run.data.metrics[config.SELECTION_METRIC]
    model = mlflow.pyfunc.load_model(run.data.tags[config.MODEL_URI_TAG])
    frame = pd.DataFrame({"pixels": list(dataset.test_images[:200].astype(float))})
    assert (model.predict(frame)["class_index"].to_numpy() == dataset.test_labels[:200]).mean() > 0.5


def _sweep_command(storage: str, n_trials: int) -> list[str]:
    return [sys.executable, "-m", "entrypoints.sweep", "--preset", "quick", "--n-trials", str(n_trials),
            "--budget-minutes", str(AMPLE_BUDGET_MINUTES), "--storage", storage, "--study", "resume",
            "--experiment", "e2e-resume"]


def _as_from_a_terminal() -> None:
    """A user's Ctrl-C reaches the sweep; a test run started in the background of a script (`.ci/run &`) would
    hand it SIGINT ignored, which Python keeps, and the Ctrl-C would never arrive."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_interrupted_sweep_resumes_without_losing_trials(private_store, tmp_path, stop):
    """Stopped during trial 1 (Ctrl-C or kill -9): trial 0's run is kept, trial 1 ends failed and its run is not
    left RUNNING, the registry is untouched; the same command completes the budget and then promotes."""
    store = private_store
    storage = f"sqlite:///{tmp_path}/optuna.db"
    process = subprocess.Popen(_sweep_command(storage, 3), cwd=tmp_path, env=child_env(store),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               preexec_fn=_as_from_a_terminal)
    deadline = time.time() + 300
    for line in process.stdout:
        if "trial 0 COMPLETE" in line:
            break
        assert time.time() < deadline, "first trial never completed"
    time.sleep(2)  # into trial 1
    process.send_signal(stop)
    process.communicate(timeout=120)

    first = mlflow.search_runs(experiment_names=["e2e-resume"], output_format="list")
    finished_before = {r.info.run_id for r in first
                       if r.info.status == "FINISHED" and "mlflow.parentRunId" in r.data.tags}
    assert len(finished_before) == 1
    assert registry.stages() == {}
    if stop == signal.SIGKILL:  # nothing ran to close trial 1: its heartbeat goes stale after the grace period
        time.sleep(sweep.HEARTBEAT_SECONDS + sweep.GRACE_SECONDS + 1)

    result = subprocess.run(_sweep_command(storage, 3), cwd=tmp_path, env=child_env(store),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "1 of 3 trials already done" in result.stdout
    after = mlflow.search_runs(experiment_names=["e2e-resume"], output_format="list")
    finished = {r.info.run_id for r in after if r.info.status == "FINISHED" and "mlflow.parentRunId" in r.data.tags}
    assert finished_before < finished and len(finished) == 3
    assert not [r for r in after if r.info.status == "RUNNING"]
    trials = optuna.load_study(study_name="resume", storage=storage).trials
    assert trials[1].state == optuna.trial.TrialState.FAIL
    assert list(registry.stages().values()) == ["Production"]


def test_a_failing_trial_is_recorded_and_the_sweep_goes_on(tracking_uri, tmp_path, dataset, monkeypatch):
    """A trial that raises ends FAIL; the sweep still completes its budget with the other trials."""
    from fmnist_pyfunc import tracking

    real, calls = tracking.run_training, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated crash in the first trial")
        return real(*args, **kwargs)

    monkeypatch.setattr(tracking, "run_training", flaky)
    mlflow.set_experiment("e2e-flaky")
    with mlflow.start_run():
        study, best_run_id, _ = sweep.run_sweep("quick", 2, AMPLE_BUDGET_MINUTES, 1, 0,
                                                f"sqlite:///{tmp_path}/optuna.db", "flaky", dataset)
    states = sorted(t.state.name for t in study.trials)
    assert states == ["COMPLETE", "COMPLETE", "FAIL"] and best_run_id is not None


def test_a_machine_faster_than_measured_searches_past_the_plans_estimate(tracking_uri, tmp_path, dataset, monkeypatch):
    """The plan's trial count comes from a few timed steps; when trials run faster than those promised (a
    machine's speed drifts by tens of percent), the study does not stop at that estimate with the budget left
    idle: it runs trials while one still fits before the deadline, up to the preset's bound."""
    preset = sweep.PRESETS["quick"]
    measured = sweep_plan.Cost(epoch_s=2.0, evaluation_s=2.0)  # a 3-epoch trial: 8 s as timed, ~0.1 s as run
    monkeypatch.setattr(sweep_plan, "measure", lambda cfg, ds: measured)

    def fast_objective(preset, dataset, parent_run_id, base, budget, deadline):
        def objective(trial: optuna.Trial) -> float:
            slot = budget.claim(trial)
            trial.set_user_attr("mlflow_run_id", parent_run_id)
            time.sleep(0.1)
            budget.finished(slot)
            return 0.5 + slot / 100
        return objective

    monkeypatch.setattr(sweep, "make_objective", fast_objective)
    mlflow.set_experiment("e2e-faster")
    with mlflow.start_run() as parent:
        study, best_run_id, promoter = sweep.run_sweep("quick", 0, 0.5, 1, 0, f"sqlite:///{tmp_path}/optuna.db",
                                                       "faster", dataset)
    planned = int(mlflow.get_run(parent.info.run_id).data.tags["sweep.plan"].split()[0])
    assert planned < preset.max_trials
    assert len(study.trials) == preset.max_trials and best_run_id == parent.info.run_id and promoter
