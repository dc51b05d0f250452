"""Hyperparameter search with Optuna (TPE sampling, median pruning); every trial is an MLflow child run.

The sweep keeps a time budget on any machine: it measures the machine, sizes the trials to fit, and ends
a trial at an epoch boundary when the deadline comes (`sweep_plan.py`).
The study lives in Optuna storage (SQLite beside mlflow.db by default, PostgreSQL for teams), so a sweep
that is interrupted and started again with the same study name continues where it stopped. Trials left
RUNNING by a killed process are failed through Optuna's heartbeat, and their MLflow runs marked KILLED.
How several workers share one study is `workers.py`'s job; this module is the search itself.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass

import mlflow
import optuna
import sqlalchemy.exc
import torch
from mlflow.tracking import MlflowClient
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from fmnist_pyfunc import config, data, reporting, sweep_plan, tracking, workers

DEFAULT_STORAGE = "sqlite:///optuna.db"
DEFAULT_STUDY = "fmnist-sweep"
HEARTBEAT_SECONDS = 10     # a live worker refreshes its running trial this often (a thread, not per epoch)...
GRACE_SECONDS = 20         # ...so a trial silent for heartbeat + grace belongs to a dead worker: failed
STORAGE_CREATE_ATTEMPTS = 3  # a fresh shared database: one worker creates the schema, the others retry
MAX_FAILED_TRIALS = 3        # failed trials are replaced by new ones, this many per run: a systematic error stops
PRUNER_STARTUP_TRIALS = 1  # trials that always run to the end: trial 0, the baseline later ones must keep up with
PLAN_ATTR = "plan"         # the study's user attribute that keeps its trial shape


@dataclass(frozen=True)
class Preset:
    budget_minutes: float  # the search's wall time on any machine: trials with their evaluation (promotion follows)
    widths: tuple          # CNN widths, widest first: the plan takes the widest whose trials fit (sweep_plan.py)
    epochs: tuple          # (fewest, most) epochs of a trial, as the budget allows on this machine
    min_trials: int        # configurations the budget leaves room for on any machine
    max_trials: int        # the most trials a study runs when not told (n_trials 0): the deadline ends it sooner
    warmup_epochs: int     # epochs the pruner never acts in: a trial runs at least warmup_epochs + 1
    fixed: dict            # training parameters every trial shares (on top of TRAIN_DEFAULTS)
    defaults_first: bool   # trial 0 is TRAIN_DEFAULTS' searched values: the tuned baseline the pruner compares with
    description: str


PRESETS = {
    # Longer and wider than `train`, which is already tuned for 14 epochs at width 32 (sweeping around it found
    # nothing better); width bought more than epochs (docs/training.md, Sweep and promotion). Trial 0, the tuned
    # defaults in the planned shape, runs in full. 28 min of trials and ~1 min of promotion keep `make sweep`
    # within half an hour on the slowest 2-core CPU we know. A trial behind trial 0 after 2 epochs is pruned, so
    # on the slowest machine each configuration tried costs 2 epochs and trial 0 keeps the rest of the budget
    # (docs/training.md, Sweep and promotion). A faster machine spends the rest on more of them: 21 were planned
    # on the bf16 EPYC (a cap of 12 left it 9 minutes idle).
    "default": Preset(budget_minutes=28, widths=(48, 40, 32), epochs=(14, 24), min_trials=3, max_trials=40,
                      warmup_epochs=1, fixed={}, defaults_first=True,
                      description="batch size, lr, weight decay, label smoothing, dropout, augmentation at the "
                                  "widest network the budget allows"),
    # Demos and CI: 3 epochs on a 10k-image slice, ~15 s a trial on 2 idle cores (the defaults are not tuned for
    # it); nothing is pruned (warmup_epochs = epochs): every trial is a logged model. Two configurations at least:
    # on cores shared with three other test workers a trial costs ~2x, and three of them did not fit 2 minutes.
    "quick": Preset(budget_minutes=2, widths=(16, 8), epochs=(3, 3), min_trials=2, max_trials=6, warmup_epochs=3,
                    fixed={"max_train_samples": 10000, "val_size": 1000}, defaults_first=False,
                    description="small CNNs on a 10k-image slice, 3 epochs"),
}


def search_space(preset: Preset) -> dict[str, optuna.distributions.BaseDistribution]:
    """The parameters that moved validation accuracy in our runs, in sensible ranges. Width and epochs are not
    searched: the budget sets them on each machine, so that every trial costs the same (sweep_plan.py)."""
    return {
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
    return {name: config.TRAIN_DEFAULTS[name] for name in search_space(preset)}


def open_study(name: str, storage_url: str, seed: int, warmup_epochs: int) -> optuna.Study:
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
        pruner=optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=warmup_epochs),
    )


def make_objective(preset: Preset, dataset: data.FashionMNIST, parent_run_id: str, base: dict,
                   budget: workers.SharedBudget, deadline: sweep_plan.Deadline):
    def objective(trial: optuna.Trial) -> float:
        slot = budget.claim(trial)  # several workers: the budget is exact, not per worker
        cfg = config.validate({**base, **suggest(trial, preset)})

        def started(run_id: str) -> None:  # at once: a worker killed in the first epoch leaves a findable run
            trial.set_user_attr("mlflow_run_id", run_id)
            mlflow.set_tags({"optuna.study": trial.study.study_name, "optuna.trial": trial.number})

        def report(epoch: int, metrics: dict) -> bool:
            trial.report(metrics["val_accuracy"], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"val_accuracy {metrics['val_accuracy']:.4f} < median at epoch {epoch}")
            if not deadline.ends_after(epoch, metrics["epoch_seconds"], slot):
                return False
            cut = f"after epoch {epoch + 1} of {cfg['epochs']}"
            trial.set_user_attr("cut_by_deadline", cut)
            mlflow.set_tag("sweep.cut_by_deadline", cut)
            print(f"[sweep] trial {trial.number}: the deadline is near, so it stops {cut} and is evaluated with "
                  "its best epoch", flush=True)
            return True

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


def progress_printer(deadline: sweep_plan.Deadline):
    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        done = [t for t in study.trials if t.state.is_finished()]
        value = f"{trial.value:.4f}" if trial.value is not None else "-"
        best = f"{study.best_value:.4f}" if any(t.state == TrialState.COMPLETE for t in done) else "-"
        left = max(0.0, deadline.left_s()) / 60
        outlook = (f"{left:.1f} min of the budget left" if deadline.may_start() else
                   f"no new trial: {left:.1f} min left, and a trial needs "
                   f"{deadline.plan.shortest_trial_s() / 60:.1f} to reach its pruning point and be evaluated")
        print(f"[sweep] trial {trial.number} {trial.state.name}: val_acc {value} | best {best} | "
              f"{len(done)} done | {outlook}", flush=True)
    return callback


def keep_deadline(deadline: sweep_plan.Deadline):
    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if not deadline.may_start():
            study.stop()
    return callback


def plan_for(study: optuna.Study, preset: Preset, base: dict, dataset: data.FashionMNIST, deadline_at: float,
             n_trials: int, n_jobs: int) -> sweep_plan.Plan:
    """The study's trial shape, planned by its first worker on its machine and kept in the study, so that all
    its trials (resumed, or run by other workers) train the same network for the same epochs and compare;
    each worker measures its own machine for its own deadline."""
    def cost_of(width: int) -> sweep_plan.Cost:
        return sweep_plan.measure(config.validate({**base, "width": width}), dataset)

    # Parallel trials share the machine (each measured with its share of the threads) and the budget.
    min_trials = math.ceil(min(preset.min_trials, n_trials or preset.min_trials) / n_jobs)
    shape = study.user_attrs.get(PLAN_ATTR)
    if shape is None:
        costs = {width: cost_of(width) for width in preset.widths}
        plan = sweep_plan.plan(deadline_at - time.time(), costs, preset.epochs, min_trials, preset.max_trials,
                               preset.warmup_epochs)
        plan = dataclasses.replace(plan, n_trials=min(preset.max_trials, plan.n_trials * n_jobs))
        study.set_user_attr(PLAN_ATTR, {"width": plan.width, "epochs": plan.epochs, "n_trials": plan.n_trials})
    else:
        cost = cost_of(shape["width"])
        plan = sweep_plan.Plan(**shape, min_trials=min_trials, cost=cost, warmup_epochs=preset.warmup_epochs,
                               budget_s=deadline_at - time.time())
    return dataclasses.replace(plan, n_trials=n_trials or plan.n_trials)


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
    # A pruned trial has a value too (its last epoch's): only complete ones are candidates.
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    if not completed:
        return None
    best = study.best_trial
    mlflow.log_params({f"best_{k}": v for k, v in best.params.items()})
    mlflow.log_metrics({"best_val_accuracy": best.value, "trials_complete": len(completed),
                        "trials_pruned": sum(t.state.name == "PRUNED" for t in trials),
                        "trials_failed": sum(t.state.name == "FAIL" for t in trials),
                        "trials_cut": sum("cut_by_deadline" in t.user_attrs for t in trials)})
    mlflow.set_tag("best_run_id", best.user_attrs["mlflow_run_id"])
    return best.user_attrs["mlflow_run_id"]


def run_sweep(preset_name: str, n_trials: int, budget_minutes: float, n_jobs: int, seed: int, storage: str,
              study_name: str, dataset: data.FashionMNIST) -> tuple[optuna.Study, str | None, bool]:
    """Run (or continue) the study inside the active MLflow run, within `budget_minutes` (0: the preset's).

    Returns the study, the best run id, and whether this worker is the one that promotes."""
    preset = PRESETS[preset_name]
    budget_s = (budget_minutes or preset.budget_minutes) * 60
    started = time.time()
    base = {**config.TRAIN_DEFAULTS, **preset.fixed, "seed": seed}  # one seed: all trials share the val split
    # In-process workers share this process's threads (torch honours OMP_NUM_THREADS for several processes).
    torch.set_num_threads(max(1, torch.get_num_threads() // n_jobs))
    study = open_study(study_name, storage, seed, preset.warmup_epochs)
    plan = plan_for(study, preset, base, dataset, started + budget_s, n_trials, n_jobs)
    print(plan.describe(), flush=True)
    deadline = sweep_plan.Deadline(started + budget_s, plan)
    base = {**base, "width": plan.width, "epochs": plan.epochs}
    # The plan's count is an estimate from a few timed steps: on a machine faster than timed (a sweep on AVX512
    # kernels trained at 44 s an epoch against the 56 s measured) the study would stop at it with the budget left
    # idle. The deadline ends the search.
    budget = workers.SharedBudget(n_trials or preset.max_trials)
    mlflow.set_tags({"optuna.study": study_name, "optuna.storage": storage.split("@")[-1], "sweep.preset": preset_name,
                     "sweep.searches": preset.description,
                     "sweep.plan": f"{plan.n_trials} trials of {plan.epochs} epochs at width {plan.width}"})
    mlflow.log_dict({**dataclasses.asdict(plan), "cpu": torch.backends.cpu.get_cpu_capability()}, "sweep/plan.json")
    if preset.defaults_first and not study.trials:
        study.enqueue_trial(first_trial(preset))
    remaining = budget.n_trials - len(study.get_trials(deepcopy=False, states=workers.COUNTED))
    print(f"[sweep] study {study_name!r}: {budget.n_trials - remaining} of {budget.n_trials} trials already done",
          flush=True)
    if remaining > 0 and deadline.may_start():
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # MaxTrialsCallback counts every worker's trials, so parallel workers stop at the shared budget.
        study.optimize(make_objective(preset, dataset, mlflow.active_run().info.run_id, base, budget, deadline),
                       n_trials=remaining + MAX_FAILED_TRIALS, timeout=deadline.left_s(), n_jobs=n_jobs,
                       catch=(Exception,),
                       callbacks=[optuna.study.MaxTrialsCallback(budget.n_trials, states=workers.COUNTED),
                                  keep_deadline(deadline), progress_printer(deadline)])
    mlflow.log_metric("sweep_seconds", time.time() - started)
    promoter = budget.is_promoter(study, had_work=remaining > 0)
    if promoter:
        workers.wait_for_other_workers(study)
    return study, log_summary(study, preset), promoter
