"""Faults: a scoring server that dies and comes back, two promotions at once, bad parameters and a broken
dataset under `mlflow run`. Nothing is lost and nothing is left half-done."""

import gzip
import re
import shutil
import subprocess
import sys
import time

import mlflow
import optuna
import pytest
import requests
import sqlalchemy
from conftest import TINY_TRAIN, mlflow_run

from fmnist_pyfunc import config, data, promotion, promotion_lock, registry, sweep
from fmnist_pyfunc.contract import png_base64
from fmnist_testkit import harness
from fmnist_testkit.harness import child_env

pytestmark = pytest.mark.e2e


def _predict(ui_url: str, dataset) -> requests.Response:
    return requests.post(f"{ui_url}/predict", json={"images": [png_base64(dataset.test_images[0])]}, timeout=60)


def test_ui_answers_503_while_the_scoring_server_is_down_and_recovers_by_itself(production, tracking_uri, tmp_path,
                                                                                 dataset):
    """With the scoring server killed, the UI answers 503 (and /health 503); once it is back on the same port, the
    UI answers 200 without a restart."""
    port = harness.free_port()
    scoring_url = f"http://127.0.0.1:{port}"
    env = child_env(tracking_uri)

    def start_scoring(name: str):
        return harness.start(harness.scoring_command(config.PRODUCTION_MODEL_URI, config.LOOPBACK, port), env,
                             f"{scoring_url}/ping", tmp_path / name)

    scoring = start_scoring("serve-1.log")
    ui_port = harness.free_port()
    ui_url = f"http://127.0.0.1:{ui_port}"
    ui = harness.start(harness.ui_command(config.LOOPBACK, ui_port, workers=1), {**env, "FMNIST_SCORING_URL":
                       scoring_url}, f"{ui_url}/health", tmp_path / "ui.log")
    try:
        assert _predict(ui_url, dataset).status_code == 200
        scoring.kill()  # not a clean stop: the keep-alive connection the UI holds goes dead too
        scoring.wait()
        response = _predict(ui_url, dataset)
        assert response.status_code == 503 and "not reachable" in response.json()["message"]
        health = requests.get(f"{ui_url}/health", timeout=10)
        assert health.status_code == 503 and health.json()["scoring_server"] == "unreachable"

        scoring = start_scoring("serve-2.log")  # back on the same port; the UI is not restarted
        assert _predict(ui_url, dataset).status_code == 200
        assert requests.get(f"{ui_url}/health", timeout=10).json() == {"ui": "ok", "scoring_server": "ok"}
    finally:
        harness.stop(ui)
        harness.stop(scoring)


def test_two_promotions_at_once_leave_exactly_one_champion(private_store, tmp_path):
    """Two `promote` processes started together on different runs, without --force: they take turns (the
    registry lock), so the first finds Production empty and the second's gate compares against the first's
    version; exactly one version ends in Production with the alias, the other is Archived (it won) or was
    never promoted (it lost), and the lock is gone."""
    for name in ("first", "second"):
        mlflow_run("train", {**TINY_TRAIN, "epochs": "1", "seed": str(len(name))}, private_store, "race",
                   tmp_path)
    run_ids = [r.info.run_id for r in mlflow.search_runs(experiment_names=["race"], output_format="list")]
    promoters = [subprocess.Popen([sys.executable, "-m", "entrypoints.promote", "--run-id", run_id],
                                  cwd=tmp_path, env=child_env(private_store),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for run_id in run_ids]
    outputs = [p.communicate(timeout=600)[0] for p in promoters]
    assert all(p.returncode == 0 for p in promoters), outputs
    first = next(o for o in outputs if "no model in Production yet" in o)
    first_version = re.search(r"fashion-mnist-cnn v(\d+): PROMOTED", first).group(1)
    second = outputs[1 - outputs.index(first)]
    assert f"vs champion v{first_version} " in second, second  # the gate saw the first promotion
    stages = registry.stages()
    assert sorted(stages.values()) in (["Archived", "Production"], ["None", "Production"]), stages
    assert stages[registry.champion()] == "Production"
    assert (stages[first_version] == "Production") == ("NOT promoted" in second)
    assert not mlflow.MlflowClient().search_registered_models(f"name = '{promotion_lock.LOCK_MODEL_NAME}'")


def test_a_promotion_killed_half_way_is_repaired_by_the_next(private_store, tmp_path, dataset):
    """A version moved to Production whose alias was never set (the promoter died in between): promoting
    it again finishes the job instead of reporting "already in Production"."""
    mlflow_run("train", {**TINY_TRAIN, "epochs": "1"}, private_store, "half", tmp_path)
    run_id = mlflow.search_runs(experiment_names=["half"], output_format="list")[0].info.run_id
    version = registry.register(run_id)
    with registry.stages_quietly():
        mlflow.MlflowClient().transition_model_version_stage(config.REGISTERED_MODEL_NAME, version, "Production")
    decision = promotion.promote(run_id, dataset)
    assert not decision.promoted and registry.stages()[version] == "Production" and registry.champion() == version


def test_a_stale_promotion_lock_is_taken_over(private_store, monkeypatch):
    """A promoter killed while holding the lock does not block promotions for ever."""
    client = mlflow.MlflowClient()
    client.create_registered_model(promotion_lock.LOCK_MODEL_NAME, tags={"since": "0", "holder": "killed-1"})
    monkeypatch.setattr(promotion_lock, "LOCK_WAIT_S", 5)
    with promotion_lock.promotion_lock():
        holder = client.get_registered_model(promotion_lock.LOCK_MODEL_NAME).tags["holder"]
        assert holder != "killed-1"
    assert not client.search_registered_models(f"name = '{promotion_lock.LOCK_MODEL_NAME}'")
    assert client.get_registered_model(f"{promotion_lock.LOCK_MODEL_NAME}.taken-over.killed-1")


def test_two_waiters_that_saw_the_same_stale_lock_take_it_over_once(private_store):
    """Waiters A and B both saw the killed promoter's stale lock. A takes it over and holds a fresh lock of
    its own; B, acting late on what it saw, must fail rather than move A's lock; and a promoter whose lock was
    taken over does not delete its successor's on release."""
    client = mlflow.MlflowClient()
    client.create_registered_model(promotion_lock.LOCK_MODEL_NAME, tags={"since": "0", "holder": "killed-1"})
    assert promotion_lock.take_over(client, "killed-1")
    client.create_registered_model(promotion_lock.LOCK_MODEL_NAME, tags={"since": str(time.time()), "holder": "a"})
    assert not promotion_lock.take_over(client, "killed-1")
    promotion_lock.release(client, "killed-1")
    assert client.get_registered_model(promotion_lock.LOCK_MODEL_NAME).tags["holder"] == "a"
    promotion_lock.release(client, "a")
    assert not client.search_registered_models(f"name = '{promotion_lock.LOCK_MODEL_NAME}'")


@pytest.mark.parametrize("entry_point, params, words", [
    ("train", {"epochs": "-1"}, "epochs"),
    ("train", {"arch": "vgg"}, "arch"),
    ("train", {"batch_size": "0"}, "batch_size"),
    ("sweep", {"n_trials": "-2"}, "--n-trials"),
    ("sweep", {"preset": "huge"}, "invalid choice"),
    ("promote", {"run_id": "0123456789abcdef"}, "not found"),
])
def test_bad_parameters_under_mlflow_run_fail_fast_and_leave_no_finished_run(tracking_uri, tmp_path, entry_point,
                                                                             params, words):
    """`mlflow run` creates its run before our code starts: a refused parameter must end it FAILED."""
    experiment = "bad-" + "-".join(f"{key}={value}" for key, value in params.items())
    result = mlflow_run(entry_point, params, tracking_uri, experiment, tmp_path, check=False)
    assert result.returncode != 0 and words in result.stderr, result.stderr[-2000:]
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    assert runs and all(r.info.status == "FAILED" for r in runs)


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_a_broken_dataset_is_reported_before_any_run(tracking_uri, tmp_path, dataset, damage):
    """A missing or corrupt data file stops training with the file's name and exit code 2 before any experiment or
    run exists."""
    folder = tmp_path / "fmnist"
    shutil.copytree(dataset.source, folder)
    victim = folder / data.FILES["test_labels"][0]
    if damage == "missing":
        victim.unlink()
    else:
        victim.write_bytes(gzip.compress(b"\x00" * 100))
    env = {**child_env(tracking_uri), data.DATA_DIR_ENV: str(folder)}
    result = subprocess.run([sys.executable, "-m", "entrypoints.train", "--experiment", f"broken-{damage}"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and victim.name in result.stderr and "Traceback" not in result.stderr
    assert mlflow.get_experiment_by_name(f"broken-{damage}") is None


@pytest.mark.parametrize("error", [sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError])
def test_a_worker_that_loses_the_schema_creation_race_retries(tmp_path, monkeypatch, error):
    """Two workers opening a fresh shared study at once: the one whose CREATE TABLE loses (PostgreSQL reports a
    duplicate row or DuplicateTable) retries and opens the study the winner created, instead of failing."""
    calls = []

    class LosesOnce(optuna.storages.RDBStorage):
        def __init__(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                raise error("CREATE TABLE studies", {}, Exception('relation "studies" already exists'))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", LosesOnce)
    study = sweep.open_study("race", f"sqlite:///{tmp_path}/optuna.db", seed=0, warmup_epochs=1)
    assert study.study_name == "race" and len(calls) == 2
