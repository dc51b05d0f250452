"""Hyperparameter search with Optuna (TPE sampling, median pruning); every trial is an MLflow child run.

The study lives in Optuna storage (SQLite beside mlflow.db by default, PostgreSQL for teams), so a sweep
that is interrupted and started again with the same study name continues where it stopped. Trials left
RUNNING by a killed process are failed through Optuna's heartbeat, and their MLflow runs marked KILLED.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import mlflow
import optuna
import sqlalchemy.exc
import torch
from mlflow.tracking import MlflowClient

from fmnist_pyfunc import config, reporting, tracking
from fmnist_pyfunc import data as fdata

DEFAULT_STORAGE = "sqlite:///optuna.db"
DEFAULT_STUDY = "fmnist-sweep"
HEARTBEAT_SECONDS = 10     # a live worker refreshes its running trial this often (a thread, not per epoch)...
GRACE_SECONDS = 20         # ...so a trial silent for heartbeat + grace belongs to a dead worker: failed
STORAGE_CREATE_ATTEMPTS = 3  # a fresh shared database: one worker creates the schema, the others retry
MAX_FAILED_TRIALS = 3        # failed trials are replaced by new ones, this many per run: a systematic error stops
WAIT_FOR_WORKERS_S = 3600   # the promoting worker waits at most this long for others' last trials
WAIT_POLL_S = 5
PRUNER_STARTUP_TRIALS = 2  # trials that always run to the end, to give the median a baseline
PRUNER_WARMUP_EPOCHS = 3   # early epochs are noisy under a one-cycle schedule: never prune there


@dataclass(frozen=True)
class Preset:
    n_trials: int
    timeout_minutes: float  # no new trial starts after this; a running trial finishes
    fixed: dict             # training parameters every trial shares (on top of TRAIN_DEFAULTS)
    description: str


PRESETS = {
    # ~3-4 min per full trial on 2 CPU cores: 8 trials, pruning and the deadline keep it under 30 min.
    "default": Preset(n_trials=8, timeout_minutes=24, fixed={},
                      description="CNN width, lr, weight decay, label smoothing, dropout, augmentation"),
    # Demos and CI: 3 epochs on a 10k-image slice, ~10 s a trial.
    "quick": Preset(n_trials=6, timeout_minutes=5,
                    fixed={"epochs": 3, "max_train_samples": 10000, "val_size": 1000},
                    description="small CNNs on a 10k-image slice, 3 epochs"),
}


SEARCHED = ("width", "lr", "weight_decay", "label_smoothing", "dropout", "augment")


def suggest(trial: optuna.Trial, preset: str) -> dict:
    """The search space: the parameters that moved validation accuracy in our runs, in sensible ranges."""
    widths = [24, 32, 40] if preset == "default" else [8, 16]
    return {
        "width": trial.suggest_categorical("width", widths),
        "lr": trial.suggest_float("lr", 0.03, 0.3, log=True),
        "weight_decay": trial.suggest_float("weight_decay", 1e-4, 2e-3, log=True),
        "label_smoothing": trial.suggest_float("label_smoothing", 0.0, 0.15),
        "dropout": trial.suggest_float("dropout", 0.0, 0.3),
        "augment": trial.suggest_categorical("augment", ["flip", "flip_shift"]),
    }


def search_space_description(preset: str) -> dict:
    """The space as data, for the parent run (sampled from a throwaway trial's distributions)."""
    trial = optuna.create_study().ask()
    suggest(trial, preset)
    return {name: repr(dist) for name, dist in trial.distributions.items()}


def _mark_killed(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Optuna failed a stale trial (its worker died): close its MLflow run, and the dead worker's sweep run
    (the trial run's parent: each worker has its own), as KILLED too."""
    client = MlflowClient()
    run_id = trial.user_attrs.get("mlflow_run_id")
    if not run_id:
        return
    run = client.get_run(run_id)
    if run.info.status == "RUNNING":
        client.set_terminated(run_id, status="KILLED")
        client.set_tag(run_id, "optuna.state", "FAIL (worker killed)")
    parent_id = run.data.tags.get("mlflow.parentRunId")
    if parent_id and client.get_run(parent_id).info.status == "RUNNING":
        client.set_terminated(parent_id, status="KILLED")


def open_study(name: str, storage_url: str, seed: int) -> optuna.Study:
    # Heartbeats are marked experimental, but they are Optuna's documented way to fail a dead worker's trials.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning, message=".*heartbeat.*")
    for attempt in range(STORAGE_CREATE_ATTEMPTS):
        try:
            storage = optuna.storages.RDBStorage(storage_url, heartbeat_interval=HEARTBEAT_SECONDS,
                                                 grace_period=GRACE_SECONDS,
                                                 heartbeat_stale_trial_callback=_mark_killed)
            break
        # Workers started together race to create the schema: PostgreSQL reports the loser as a duplicate row
        # (IntegrityError) or, when both CREATE TABLE at once, as DuplicateTable (a ProgrammingError).
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            if attempt == STORAGE_CREATE_ATTEMPTS - 1:
                raise
            time.sleep(1 + attempt)
    return optuna.create_study(
        study_name=name, storage=storage, direction="maximize", load_if_exists=True,
        # constant_liar: parallel workers see each other's running trials, so they do not sample the same point.
        sampler=optuna.samplers.TPESampler(seed=seed, constant_liar=True),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=PRUNER_WARMUP_EPOCHS),
    )


class BudgetExhausted(RuntimeError):
    """Other workers have taken the study's last trial slots; this trial ends FAIL without a run."""


def _slot(trial: optuna.Trial) -> int:
    """This trial's place in the shared budget: trial numbers are handed out atomically by the storage,
    so the number minus the failed trials before it is the count of real trials up to this one."""
    failed = trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))
    return trial.number - sum(t.number < trial.number for t in failed)


def make_objective(preset: str, dataset: fdata.FashionMNIST, parent_run_id: str, base: dict, n_trials: int,
                   worker: dict):
    """`worker["ran_last_slot"]` becomes True in the one worker whose trial fills the budget's last slot."""
    def objective(trial: optuna.Trial) -> float:
        slot = _slot(trial)
        if slot >= n_trials:  # several workers: the budget is exact, not per worker
            trial.study.stop()
            raise BudgetExhausted(f"the study's {n_trials} trials are taken")
        cfg = config.validate({**base, **suggest(trial, preset)})

        def report(epoch: int, metrics: dict) -> None:
            if "mlflow_run_id" not in trial.user_attrs:
                run_id = mlflow.active_run().info.run_id
                trial.set_user_attr("mlflow_run_id", run_id)
                mlflow.set_tags({"optuna.study": trial.study.study_name, "optuna.trial": trial.number})
            trial.report(metrics["val_accuracy"], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"val_accuracy {metrics['val_accuracy']:.4f} < median at epoch {epoch}")

        try:
            run_id = tracking.run_training(cfg, dataset, parent_run_id=parent_run_id, on_epoch=report,
                                           progress=False, run_name=f"trial-{trial.number}")
        except optuna.TrialPruned:
            run_id = trial.user_attrs.get("mlflow_run_id")
            if run_id:
                MlflowClient().set_terminated(run_id, status="KILLED")
                MlflowClient().set_tag(run_id, "optuna.state", "PRUNED")
            worker["ran_last_slot"] |= slot == n_trials - 1
            raise
        worker["ran_last_slot"] |= slot == n_trials - 1  # a failed trial frees its slot for the next one
        return MlflowClient().get_run(run_id).data.metrics[config.SELECTION_METRIC]

    return objective


def progress_printer(n_trials: int, started: float):
    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        done = [t for t in study.trials if t.state.is_finished()]
        value = f"{trial.value:.4f}" if trial.value is not None else "-"
        best = f"{study.best_value:.4f}" if any(t.value is not None for t in done) else "-"
        elapsed = time.time() - started
        mean = elapsed / max(1, len(done))
        left = max(0, n_trials - len(done))
        print(f"[sweep] trial {trial.number} {trial.state.name}: val_acc {value} | best {best} | "
              f"{len(done)}/{n_trials} done | {elapsed / 60:.1f} min elapsed, ~{left * mean / 60:.1f} min left",
              flush=True)
    return callback


def log_summary(study: optuna.Study, preset: str) -> str | None:
    """Log the search space, the trial table, a plot of the search and the best trial to the parent run."""
    mlflow.log_dict(search_space_description(preset), "sweep/search_space.json")
    trials = [t for t in study.trials if t.state.is_finished()]
    mlflow.log_dict([{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
                      "mlflow_run_id": t.user_attrs.get("mlflow_run_id")} for t in trials], "sweep/trials.json")
    figure = reporting.plot_sweep([(t.number, t.value, t.state.name, list(t.intermediate_values.values()))
                                   for t in trials])
    mlflow.log_figure(figure, "sweep/search.png")
    reporting.plt.close(figure)
    completed = [t for t in trials if t.value is not None]
    if not completed:
        return None
    best = study.best_trial
    mlflow.log_params({f"best_{k}": v for k, v in best.params.items()})
    mlflow.log_metrics({"best_val_accuracy": best.value, "trials_complete": len(completed),
                        "trials_pruned": sum(t.state.name == "PRUNED" for t in trials),
                        "trials_failed": sum(t.state.name == "FAIL" for t in trials)})
    mlflow.set_tag("best_run_id", best.user_attrs["mlflow_run_id"])
    return best.user_attrs["mlflow_run_id"]


def run_sweep(preset: str, n_trials: int, timeout_minutes: float, n_jobs: int, seed: int, storage: str,
              study_name: str, dataset: fdata.FashionMNIST) -> tuple[optuna.Study, str | None, bool]:
    """Run (or continue) the study inside the active MLflow run.

    Returns the study, the best run id, and whether this worker is the one that promotes."""
    chosen = PRESETS[preset]
    n_trials = n_trials or chosen.n_trials
    timeout_minutes = timeout_minutes or chosen.timeout_minutes
    base = {**config.TRAIN_DEFAULTS, **chosen.fixed, "seed": seed}  # one seed: all trials share the val split
    # In-process workers share this process's threads (torch honours OMP_NUM_THREADS for several processes).
    torch.set_num_threads(max(1, torch.get_num_threads() // n_jobs))
    study = open_study(study_name, storage, seed)
    parent = mlflow.active_run()
    mlflow.set_tags({"optuna.study": study_name, "optuna.storage": storage.split("@")[-1], "sweep.preset": preset,
                     "sweep.searches": chosen.description})
    if preset == "default" and not study.trials:
        study.enqueue_trial({k: base[k] for k in SEARCHED})  # the known-good defaults are trial 0
    counted = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    remaining = n_trials - len(study.get_trials(deepcopy=False, states=counted))
    print(f"[sweep] study {study_name!r}: {n_trials - remaining} of {n_trials} trials already done", flush=True)
    worker = {"ran_last_slot": False}
    if remaining > 0:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # MaxTrialsCallback counts every worker's trials, so parallel workers stop at the shared budget.
        study.optimize(make_objective(preset, dataset, parent.info.run_id, base, n_trials, worker),
                       n_trials=remaining + MAX_FAILED_TRIALS,
                       timeout=timeout_minutes * 60, n_jobs=n_jobs, catch=(Exception,),
                       callbacks=[optuna.study.MaxTrialsCallback(n_trials, states=counted),
                                  progress_printer(n_trials, time.time())])
    # Exactly one worker fills the budget's last slot: it alone promotes, once the others are done. A worker
    # that found the study complete, or stopped early (timeout) with no one else running, promotes too:
    # promotion is idempotent.
    budget_done = len(study.get_trials(deepcopy=False, states=counted)) >= n_trials
    others_running = bool(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))
    promoter = worker["ran_last_slot"] or remaining <= 0 or not (budget_done or others_running)
    if promoter:
        _wait_for_other_workers(study)
    return study, log_summary(study, preset), promoter


def _wait_for_other_workers(study: optuna.Study) -> None:
    deadline = time.time() + WAIT_FOR_WORKERS_S
    while study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)) and time.time() < deadline:
        print("[sweep] waiting for other workers' running trials before promoting", flush=True)
        # A running trial may belong to a killed worker: failed (and its run KILLED) once its heartbeat is stale.
        optuna.storages.fail_stale_trials(study)
        time.sleep(WAIT_POLL_S)
