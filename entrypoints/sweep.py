"""Search hyperparameters with Optuna (each trial an MLflow child run), then promote the best model.

    python -m entrypoints.sweep                      # default preset: 28 min of trials on any machine, then promotion
    python -m entrypoints.sweep --preset quick       # 2 minutes, for demos and CI
    mlflow run . -e sweep --env-manager local -P preset=quick
Interrupt it (Ctrl-C) and start it again with the same --study: it continues where it stopped.
"""

from __future__ import annotations

import argparse
import sys

import mlflow
import optuna
import requests
import sqlalchemy.engine
import sqlalchemy.exc
from mlflow.exceptions import MlflowException

from fmnist_pyfunc import cli, config, data, promotion, sweep, sweep_plan

# What a dead PostgreSQL (Optuna's storage) or tracking server surfaces as, from Optuna, SQLAlchemy or requests.
LOST_BACKEND_ERRORS = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError,
                       optuna.exceptions.StorageInternalError, requests.exceptions.ConnectionError)
# MLflow's REST client wraps a tracking server it cannot reach, or one that answers 5xx, in an MlflowException
# whose message starts so; any other MlflowException is a real error, reported as such.
MLFLOW_REST_FAILURE = "API request to "


def lost_backend(exc: Exception) -> bool:
    return isinstance(exc, LOST_BACKEND_ERRORS) or (
        isinstance(exc, MlflowException) and str(exc).startswith(MLFLOW_REST_FAILURE))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(sweep.PRESETS), default="default",
                        help="search space and budget (default: %(default)s)")
    parser.add_argument("--n-trials", type=int, default=0,
                        help="trials to complete in the study, across restarts and workers (default: as many as the "
                             "budget holds, at most the preset's: " + ", ".join(
                                 f"{name} {preset.max_trials}" for name, preset in sweep.PRESETS.items()) + ")")
    parser.add_argument("--budget-minutes", type=float, default=0,
                        help="wall time for the trials and their evaluation, on any machine; promotion follows "
                             "(default: the preset's: " + ", ".join(f"{name} {preset.budget_minutes:g}"
                                                                    for name, preset in sweep.PRESETS.items()) + ")")
    parser.add_argument("--n-jobs", type=int, default=1, help="parallel trials in this process (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=config.TRAIN_DEFAULTS["seed"],
                        help="sampler seed and the trials' training seed (default: %(default)s)")
    parser.add_argument("--storage", default=sweep.DEFAULT_STORAGE,
                        help="Optuna storage URL, e.g. postgresql://user@host/db (default: %(default)s)")
    parser.add_argument("--study", default=sweep.DEFAULT_STUDY, help="Optuna study name (default: %(default)s)")
    parser.add_argument("--promote", type=cli.parse_bool, default=True,
                        help="promote the best trial's model at the end (default: %(default)s)")
    cli.add_experiment_argument(parser)
    args = parser.parse_args(argv)
    if args.n_trials < 0 or args.budget_minutes < 0 or args.n_jobs < 1:
        parser.error("--n-trials and --budget-minutes must be >= 0 and --n-jobs >= 1")
    if sqlalchemy.engine.make_url(args.storage).password:
        parser.error("--storage holds a password, which would be kept as a run parameter for everyone to read: "
                     "drop it from the URL and set PGPASSWORD, or put it in ~/.pgpass (PostgreSQL reads both)")
    try:
        dataset = data.load()
    except data.DataError as exc:
        parser.error(str(exc))
    cli.use_tracking_store()
    cli.use_experiment(args.experiment)
    try:
        return sweep_and_promote(args, dataset)
    except sweep_plan.BudgetTooSmall as exc:
        print(f"[sweep] {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if not lost_backend(exc):
            raise
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        print(f"[sweep] lost the study storage or the tracking server: {reason}\n[sweep] every finished trial is "
              "kept; start the same command again once it is back to resume the study", file=sys.stderr)
        return 1


def sweep_and_promote(args: argparse.Namespace, dataset: data.FashionMNIST) -> int:
    with mlflow.start_run(run_name=f"sweep-{args.study}"):
        study, best_run_id, promoter = sweep.run_sweep(args.preset, args.n_trials, args.budget_minutes, args.n_jobs,
                                             args.seed, args.storage, args.study, dataset)
        if best_run_id is None:
            print("[sweep] no trial completed; nothing to promote", file=sys.stderr)
            return 1
        print(f"[sweep] best trial {study.best_trial.number}: val_accuracy {study.best_value:.4f}, run {best_run_id}")
        if not promoter:  # several workers share the study: the one that ran its last trial promotes
            print("[sweep] another worker finishes this study and promotes its best trial")
        elif args.promote:
            decision = promotion.promote(best_run_id, dataset)
            promotion.log_decision(decision)
            print(decision.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
