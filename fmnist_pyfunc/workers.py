"""Several sweep workers on one Optuna study: an exact shared budget, one promotion, dead workers cleaned up.

Workers (processes, possibly on several machines) share nothing but the study's storage. Optuna hands out
trial numbers atomically, so a trial's place in the budget follows from its number; the worker whose trial
fills the last place promotes, after waiting for the others' running trials. A worker that dies leaves a
RUNNING trial whose heartbeat goes stale: Optuna fails it, and `mark_killed` closes its MLflow runs.
"""

from __future__ import annotations

import time

import optuna
from mlflow.tracking import MlflowClient

WAIT_FOR_WORKERS_S = 3600   # the promoting worker waits at most this long for others' last trials
WAIT_POLL_S = 5
COUNTED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)  # what uses up the budget


class BudgetExhausted(RuntimeError):
    """Other workers have taken the study's last trial slots; this trial ends FAIL without a run."""


class SharedBudget:
    """`n_trials` counted trials across all workers of a study, and whether this worker filled the last one."""

    def __init__(self, n_trials: int):
        self.n_trials = n_trials
        self.filled_last_slot = False

    def claim(self, trial: optuna.Trial) -> int:
        """This trial's slot (0-based); raises BudgetExhausted, and stops this worker, past the budget.

        Trial numbers are atomic; the number minus the failed trials before it counts the real trials up
        to this one (a failed trial frees its slot for the next)."""
        failed = trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))
        slot = trial.number - sum(t.number < trial.number for t in failed)
        if slot >= self.n_trials:
            trial.study.stop()
            raise BudgetExhausted(f"the study's {self.n_trials} trials are taken")
        return slot

    def finished(self, slot: int) -> None:
        """A trial ended COMPLETE or PRUNED: it used its slot for good."""
        self.filled_last_slot |= slot == self.n_trials - 1

    def is_promoter(self, study: optuna.Study, had_work: bool) -> bool:
        """Exactly one worker fills the last slot: it promotes. A worker that found the study complete, or
        stopped early (timeout) with no one else running, promotes too: promotion is idempotent."""
        budget_done = len(study.get_trials(deepcopy=False, states=COUNTED)) >= self.n_trials
        others_running = bool(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))
        return self.filled_last_slot or not had_work or not (budget_done or others_running)


def wait_for_other_workers(study: optuna.Study) -> None:
    deadline = time.time() + WAIT_FOR_WORKERS_S
    while study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)) and time.time() < deadline:
        print("[sweep] waiting for other workers' running trials before promoting", flush=True)
        # A running trial may belong to a killed worker: failed (and its run KILLED) once its heartbeat is stale.
        optuna.storages.fail_stale_trials(study)
        time.sleep(WAIT_POLL_S)


def mark_killed(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
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
