"""The sweep's search space and its reading of failures, without training anything."""

import dataclasses
import time

import mlflow
import optuna
import pytest
import requests
import sqlalchemy.exc
from mlflow.exceptions import MlflowException

from entrypoints import sweep as sweep_cli
from fmnist_pyfunc import config, sweep, sweep_plan


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


def test_default_presets_first_trial_is_the_tuned_defaults_inside_its_space():
    """The default preset's trial 0 is TRAIN_DEFAULTS' searched values, every one inside the space it searches
    (Optuna would otherwise sample what it was asked to enqueue); width and epochs are the plan's, not searched."""
    preset = sweep.PRESETS["default"]
    trial = sweep.first_trial(preset)
    space = sweep.search_space(preset)
    assert set(trial) == set(space) and not {"width", "epochs"} & set(space)
    for key, distribution in space.items():
        assert distribution._contains(distribution.to_internal_repr(trial[key])), key


# One trial's cost per width, as measured (s an epoch, s to evaluate): the 2-core AVX2-only EPYC, and a CPU
# 3.5x faster (the 2-core EPYC with native bf16 runs the default network ~3-4x faster).
AVX2 = {48: sweep_plan.Cost(118, 60), 40: sweep_plan.Cost(84, 50), 32: sweep_plan.Cost(53, 40)}
FAST = {width: sweep_plan.Cost(c.epoch_s / 3.5, c.evaluation_s / 3.5) for width, c in AVX2.items()}


def _default_plan(costs: dict, budget_minutes: float) -> sweep_plan.Plan:
    preset = sweep.PRESETS["default"]
    return sweep_plan.plan(budget_minutes * 60, costs, preset.epochs, preset.min_trials, preset.max_trials,
                           preset.warmup_epochs)


def _fits(plan: sweep_plan.Plan) -> bool:
    """One full trial and min_trials - 1 that reach the pruner and are evaluated fit the planned share."""
    needed = plan.cost.trial_s(plan.epochs) + (plan.min_trials - 1) * plan.shortest_trial_s()
    return needed <= plan.budget_s * sweep_plan.PLAN_SHARE


@pytest.mark.parametrize("costs", [AVX2, FAST], ids=["avx2", "fast"])
def test_the_plan_leaves_room_for_three_configurations_on_every_machine(costs):
    """On the slowest and a fast CPU alike, one full trial and two that reach the pruner's first epoch and are
    evaluated fit the default budget, at the preset's epochs (at least `train`'s 14)."""
    preset = sweep.PRESETS["default"]
    plan = _default_plan(costs, preset.budget_minutes)
    assert _fits(plan) and plan.n_trials >= preset.min_trials == 3
    assert preset.epochs[0] <= plan.epochs <= preset.epochs[1] and plan.width in preset.widths


def test_a_faster_machine_searches_more_with_a_wider_network_not_sooner():
    """The same budget buys the widest network at the most epochs and more trials on a fast CPU; the slow one
    gets a narrower network: neither sweep ends early or late by design."""
    slow, fast = _default_plan(AVX2, 28), _default_plan(FAST, 28)
    assert (slow.width, fast.width) == (32, 48) and fast.epochs == sweep.PRESETS["default"].epochs[1]
    assert fast.n_trials > slow.n_trials >= 3
    assert not _fits(dataclasses.replace(slow, epochs=slow.epochs + 1))  # the most epochs that fit, not fewer


def test_the_trials_planned_fill_the_budget_when_later_ones_are_pruned_at_their_first_chance():
    """The plan holds as many trials as fit when every one after the first is pruned as soon as the pruner may
    act (unevaluated): counting them as evaluated would end the study with the budget left idle on a fast CPU.
    A preset whose trials are never pruned counts them in full."""
    plan = _default_plan(FAST, 28)
    full, pruned = plan.cost.trial_s(plan.epochs), (plan.warmup_epochs + 1) * plan.cost.epoch_s
    assert full + (plan.n_trials - 1) * pruned <= plan.budget_s < full + plan.n_trials * pruned
    quick = sweep.PRESETS["quick"]
    cost = sweep_plan.Cost(epoch_s=5, evaluation_s=10)
    assert sweep_plan.pruned_trial_s(cost, quick.epochs[1], quick.warmup_epochs) == cost.trial_s(quick.epochs[1])


def test_a_budget_too_small_for_any_trial_says_what_it_needs():
    """When not even one-epoch trials of the narrowest network fit, the plan refuses, naming the minutes needed;
    a budget between that and the preset's smallest shape trains fewer epochs at the narrowest width."""
    with pytest.raises(sweep_plan.BudgetTooSmall, match=r"at least \d+ min"):
        _default_plan(AVX2, 2)
    short = _default_plan(AVX2, 12)
    assert short.width == 32 and 1 <= short.epochs < sweep.PRESETS["default"].epochs[0] and _fits(short)


def test_the_deadline_cuts_a_trial_at_the_last_epoch_that_leaves_time_for_the_owed_configurations():
    """A trial stops after an epoch when one more epoch and the evaluation would end past the deadline less the
    time the configurations still owed need; never after its last planned epoch."""
    cost = sweep_plan.Cost(epoch_s=10, evaluation_s=5)
    plan = sweep_plan.Plan(width=32, epochs=10, n_trials=3, min_trials=3, cost=cost, warmup_epochs=3, budget_s=300)
    deadline = sweep_plan.Deadline(time.time() + 100, plan)  # 100 s left; a trial needs 4 x 10 + 5 to be tried
    assert plan.shortest_trial_s() == 45
    assert deadline.ends_after(epoch=0, epoch_s=10, slot=0)      # 10 + 5 > 100 - 2 x 45
    assert not deadline.ends_after(epoch=0, epoch_s=10, slot=1)  # 10 + 5 <= 100 - 45
    assert deadline.ends_after(epoch=0, epoch_s=60, slot=1)      # this trial's epochs are slower than planned
    assert not deadline.ends_after(epoch=0, epoch_s=60, slot=2)  # the last owed configuration: 60 + 5 <= 100
    assert not deadline.ends_after(epoch=9, epoch_s=500, slot=2)  # its last epoch: nothing left to cut
    assert deadline.may_start() and not sweep_plan.Deadline(time.time() + 44, plan).may_start()


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


def test_progress_counts_down_the_budget_and_says_when_no_trial_can_start(capsys):
    """After a trial, the line gives the budget left while another trial fits, and says why none starts once
    a trial could no longer reach its pruning point and be evaluated: never a count of trials to come."""
    study = optuna.create_study(direction="maximize")
    study.optimize(lambda trial: 0.9, n_trials=1)
    plan = sweep_plan.Plan(width=32, epochs=10, n_trials=8, min_trials=3, cost=sweep_plan.Cost(10, 20),
                           warmup_epochs=3, budget_s=600)
    sweep.progress_printer(sweep_plan.Deadline(time.time() + 300, plan))(study, study.trials[0])
    assert "5.0 min of the budget left" in capsys.readouterr().out
    sweep.progress_printer(sweep_plan.Deadline(time.time() + 50, plan))(study, study.trials[0])
    assert "no new trial: 0.8 min left, and a trial needs 1.0" in capsys.readouterr().out
