"""Hyperparameter search with Optuna (TPE sampling, median pruning); every trial is an MLflow child run.

The study lives in Optuna storage (SQLite beside mlflow.db by default, PostgreSQL for teams), so a sweep
that is interrupted and started again with the same study name continues where it stopped. Trials left
RUNNING by a killed process are failed through Optuna's heartbeat, and their MLflow runs marked KILLED.
How several workers share one study is `workers.py`'s job; this module is the search itself.
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
from optuna.distributions import CategoricalDistribution, FloatDistribution

from fmnist_pyfunc import config, data, reporting, tracking, workers

DEFAULT_STORAGE = "sqlite:///optuna.db"
DEFAULT_STUDY = "fmnist-sweep"
HEARTBEAT_SECONDS = 10     # a live worker refreshes its running trial this often (a thread, not per epoch)...
GRACE_SECONDS = 20         # ...so a trial silent for heartbeat + grace belongs to a dead worker: failed
STORAGE_CREATE_ATTEMPTS = 3  # a fresh shared database: one worker creates the schema, the others retry
MAX_FAILED_TRIALS = 3        # failed trials are replaced by new ones, this many per run: a systematic error stops
PRUNER_STARTUP_TRIALS = 2  # trials that always run to the end, to give the median a baseline
PRUNER_WARMUP_EPOCHS = 3   # early epochs are noisy under a one-cycle schedule: never prune there


@dataclass(frozen=True)
class Preset:
    n_trials: int
    timeout_minutes: float  # no new trial starts after this; a running trial finishes
    fixed: dict             # training parameters every trial shares (on top of TRAIN_DEFAULTS)
    widths: tuple           # the CNN widths searched: the one searched parameter whose range depends on the budget
    first_trial_changes: dict | None  # trial 0: TRAIN_DEFAULTS' searched values with these changes (None: no trial 0)
    description: str


PRESETS = {
    # Longer and wider than `train`, which is already tuned for 14 epochs at width 32 (sweeping around it found
    # nothing better). Width bought more than epochs (docs/training.md, Sweep and promotion, has the runs), so
    # trial 0 is width 48. A trial started before the deadline runs to its end: a second one starts only if
    # trial 0 ended before it.
    "default": Preset(n_trials=8, timeout_minutes=14, fixed={"epochs": 24}, widths=(32, 40, 48),
                      first_trial_changes={"width": 48},
                      description="24 epochs: width, batch size, lr, weight decay, label smoothing, dropout, "
                                  "augmentation"),
    # Demos and CI: 3 epochs on a 10k-image slice, seconds a trial (the defaults are not tuned for this budget).
    "quick": Preset(n_trials=6, timeout_minutes=5, fixed={"epochs": 3, "max_train_samples": 10000, "val_size": 1000},
                    widths=(8, 16), first_trial_changes=None,
                    description="small CNNs on a 10k-image slice, 3 epochs"),
}


def search_space(preset: Preset) -> dict[str, optuna.distributions.BaseDistribution]:
    """The parameters that moved validation accuracy in our runs, in sensible ranges."""
    return {
        "width": CategoricalDistribution(preset.widths),
        "batch_size": CategoricalDistribution((128, 256)),  # smaller: more, noisier steps per epoch
        "lr": FloatDistribution(0.05, 0.4, log=True),
        "weight_decay": FloatDistribution(1e-4, 2e-3, log=True),
        "label_smoothing": FloatDistribution(0.0, 0.15),
        "dropout": FloatDistribution(0.0, 0.3),
        "augment": CategoricalDistribution(("flip", "photo", "flip_shift")),
    }


def suggest(trial: optuna.Trial, preset: Preset) -> dict:
    params = {}
    for name, distribution in search_space(preset).items():
        if isinstance(distribution, CategoricalDistribution):
            params[name] = trial.suggest_categorical(name, distribution.choices)
        else:
            params[name] = trial.suggest_float(name, distribution.low, distribution.high, log=distribution.log)
    return params


def first_trial(preset: Preset) -> dict:
    return {**{name: config.TRAIN_DEFAULTS[name] for name in search_space(preset)}, **preset.first_trial_changes}


def open_study(name: str, storage_url: str, seed: int) -> optuna.Study:
    # Heartbeats are marked experimental, but they are Optuna's documented way to fail a dead worker's trials.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning, message=".*heartbeat.*")
    for attempt in range(STORAGE_CREATE_ATTEMPTS):
        try:
            storage = optuna.storages.RDBStorage(storage_url, heartbeat_interval=HEARTBEAT_SECONDS,
                                                 grace_period=GRACE_SECONDS,
                                                 heartbeat_stale_trial_callback=workers.mark_killed)
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


def make_objective(preset: Preset, dataset: data.FashionMNIST, parent_run_id: str, base: dict,
                   budget: workers.SharedBudget):
    def objective(trial: optuna.Trial) -> float:
        slot = budget.claim(trial)  # several workers: the budget is exact, not per worker
        cfg = config.validate({**base, **suggest(trial, preset)})

        def started(run_id: str) -> None:  # at once: a worker killed in the first epoch leaves a findable run
            trial.set_user_attr("mlflow_run_id", run_id)
            mlflow.set_tags({"optuna.study": trial.study.study_name, "optuna.trial": trial.number})

        def report(epoch: int, metrics: dict) -> None:
            trial.report(metrics["val_accuracy"], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"val_accuracy {metrics['val_accuracy']:.4f} < median at epoch {epoch}")

        try:
            run_id = tracking.run_training(cfg, dataset, parent_run_id=parent_run_id, on_epoch=report,
                                           progress=False, run_name=f"trial-{trial.number}", on_start=started)
        except optuna.TrialPruned:
            run_id = trial.user_attrs.get("mlflow_run_id")
            if run_id:
                MlflowClient().set_terminated(run_id, status="KILLED")
                MlflowClient().set_tag(run_id, "optuna.state", "PRUNED")
            budget.finished(slot)
            raise
        budget.finished(slot)
        return MlflowClient().get_run(run_id).data.metrics[config.SELECTION_METRIC]

    return objective


def progress_printer(n_trials: int, started: float, timeout_s: float):
    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        done = [t for t in study.trials if t.state.is_finished()]
        value = f"{trial.value:.4f}" if trial.value is not None else "-"
        best = f"{study.best_value:.4f}" if any(t.value is not None for t in done) else "-"
        elapsed = time.time() - started
        mean = elapsed / max(1, len(done))
        left = max(0, n_trials - len(done))
        # The deadline, not the trial budget, usually ends a sweep: after it no trial starts.
        outlook = ("no new trial after the deadline" if left and elapsed >= timeout_s else
                   f"~{min(left * mean, timeout_s - elapsed + mean) / 60:.1f} min left")
        print(f"[sweep] trial {trial.number} {trial.state.name}: val_acc {value} | best {best} | "
              f"{len(done)}/{n_trials} done | {elapsed / 60:.1f} min elapsed, {outlook}", flush=True)
    return callback


def log_summary(study: optuna.Study, preset: Preset) -> str | None:
    """Log the search space, the trial table, a plot of the search and the best trial to the parent run."""
    mlflow.log_dict({name: repr(d) for name, d in search_space(preset).items()}, "sweep/search_space.json")
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


def run_sweep(preset_name: str, n_trials: int, timeout_minutes: float, n_jobs: int, seed: int, storage: str,
              study_name: str, dataset: data.FashionMNIST) -> tuple[optuna.Study, str | None, bool]:
    """Run (or continue) the study inside the active MLflow run.

    Returns the study, the best run id, and whether this worker is the one that promotes."""
    preset = PRESETS[preset_name]
    budget = workers.SharedBudget(n_trials or preset.n_trials)
    timeout_minutes = timeout_minutes or preset.timeout_minutes
    base = {**config.TRAIN_DEFAULTS, **preset.fixed, "seed": seed}  # one seed: all trials share the val split
    # In-process workers share this process's threads (torch honours OMP_NUM_THREADS for several processes).
    torch.set_num_threads(max(1, torch.get_num_threads() // n_jobs))
    study = open_study(study_name, storage, seed)
    mlflow.set_tags({"optuna.study": study_name, "optuna.storage": storage.split("@")[-1], "sweep.preset": preset_name,
                     "sweep.searches": preset.description})
    if preset.first_trial_changes is not None and not study.trials:
        study.enqueue_trial(first_trial(preset))
    remaining = budget.n_trials - len(study.get_trials(deepcopy=False, states=workers.COUNTED))
    print(f"[sweep] study {study_name!r}: {budget.n_trials - remaining} of {budget.n_trials} trials already done",
          flush=True)
    if remaining > 0:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # MaxTrialsCallback counts every worker's trials, so parallel workers stop at the shared budget.
        study.optimize(make_objective(preset, dataset, mlflow.active_run().info.run_id, base, budget),
                       n_trials=remaining + MAX_FAILED_TRIALS,
                       timeout=timeout_minutes * 60, n_jobs=n_jobs, catch=(Exception,),
                       callbacks=[optuna.study.MaxTrialsCallback(budget.n_trials, states=workers.COUNTED),
                                  progress_printer(budget.n_trials, time.time(), timeout_minutes * 60)])
    promoter = budget.is_promoter(study, had_work=remaining > 0)
    if promoter:
        workers.wait_for_other_workers(study)
    return study, log_summary(study, preset), promoter
