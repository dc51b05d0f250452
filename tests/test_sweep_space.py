"""The sweep's search space and its reading of failures, without training anything."""

import time

import mlflow
import optuna
import pytest
import requests
import sqlalchemy.exc
from mlflow.exceptions import MlflowException

from entrypoints import sweep as sweep_cli
from fmnist_pyfunc import config, sweep


@pytest.mark.parametrize("name", sorted(sweep.PRESETS))
def test_every_suggestion_is_a_valid_training_config_inside_the_space(name):
    """Sampled parameters stay inside the declared distributions and pass config.validate on top of the
    preset's fixed values: the logged space is the one searched."""
    preset = sweep.PRESETS[name]
    space = sweep.search_space(preset)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        params = sweep.suggest(study.ask(), preset)
        assert set(params) == set(space)
        assert all(space[key]._contains(space[key].to_internal_repr(value)) for key, value in params.items())
        config.validate({**config.TRAIN_DEFAULTS, **preset.fixed, **params})


def test_default_presets_first_trial_is_the_tuned_defaults_widened_inside_its_space():
    """The default preset's trial 0 is TRAIN_DEFAULTS' searched values with its own changes (a wider network),
    every one of them inside the space it searches: Optuna would otherwise sample what it was asked to enqueue."""
    preset = sweep.PRESETS["default"]
    trial = sweep.first_trial(preset)
    space = sweep.search_space(preset)
    assert set(trial) == set(space) and trial["width"] > config.TRAIN_DEFAULTS["width"]
    for key, distribution in space.items():
        assert distribution._contains(distribution.to_internal_repr(trial[key])), key


@pytest.mark.parametrize("error, lost", [
    (MlflowException("API request to http://127.0.0.1:5000/api/2.0/mlflow/runs/get failed with exception "
                     "HTTPConnectionPool: Max retries exceeded"), True),
    (MlflowException("API request to endpoint /api/2.0/mlflow/runs/create failed with error code 503 != 200"), True),
    (MlflowException("Run 'abc' not found", error_code="RESOURCE_DOES_NOT_EXIST"), False),
    (requests.exceptions.ConnectionError("connection refused"), True),
    (sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection")), True),
    (ValueError("a bug"), False),
])
def test_only_an_unreachable_backend_is_reported_as_lost(error, lost):
    """The sweep tells the user to resume later only when the storage or tracking server is unreachable; any
    other MLflow error (a bad run id, a permission) surfaces as itself."""
    assert sweep_cli.lost_backend(error) is lost


def test_a_storage_url_with_a_password_is_refused_before_anything_runs(tracking_uri, capsys):
    """A PostgreSQL password in --storage would be logged as a run parameter: refused (exit 2) before any
    data or run, pointing to PGPASSWORD and ~/.pgpass."""
    with pytest.raises(SystemExit) as exit_:
        sweep_cli.main(["--storage", "postgresql://optuna:s3cret@127.0.0.1:1/optuna", "--experiment", "never"])
    assert exit_.value.code == 2
    assert "PGPASSWORD" in capsys.readouterr().err and mlflow.get_experiment_by_name("never") is None


def test_progress_counts_down_to_the_deadline_not_to_the_whole_trial_budget(capsys):
    """After a trial, the time left is bounded by the deadline (plus the one trial that may still start before
    it), and after the deadline the sweep says no trial will start: a 30-minute sweep never announces 87 more."""
    study = optuna.create_study(direction="maximize")
    study.optimize(lambda trial: 0.9, n_trials=1)
    now = time.time()
    sweep.progress_printer(8, now - 60, timeout_s=300)(study, study.trials[0])  # 1 min a trial, 4 min to go
    assert "~5.0 min left" in capsys.readouterr().out
    sweep.progress_printer(8, now - 600, timeout_s=300)(study, study.trials[0])
    assert "no new trial after the deadline" in capsys.readouterr().out
