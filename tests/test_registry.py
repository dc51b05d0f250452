"""The promotion gate: better challengers win, worse ones do not, --force overrides, old versions archive."""


import mlflow
import pytest
from mlflow.tracking import MlflowClient

from fmnist_pyfunc import config, promotion, registry, tracking

pytestmark = pytest.mark.e2e  # one worker runs this module (conftest.ONE_WORKER_MODULES)
NAME = config.REGISTERED_MODEL_NAME
# Two real but cheap models of clearly different quality (~15 s together on 2 cores).
WEAK = {"epochs": 1, "max_train_samples": 1280, "width": 4, "val_size": 1000, "lr": 0.01}
STRONG = {"epochs": 2, "max_train_samples": 6000, "width": 16, "val_size": 1000}


@pytest.fixture(scope="module")
def own_store(tracking_uri, tmp_path_factory):
    """A registry of this module's own: the gate's assertions need to know every version in it."""
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path_factory.mktemp('gate')}/mlflow.db")
    yield
    mlflow.set_tracking_uri(tracking_uri)


@pytest.fixture(scope="module")
def runs(own_store, dataset):
    mlflow.set_experiment("gate")
    return {name: tracking.run_training(config.validate(cfg), dataset, progress=False, run_name=name)
            for name, cfg in (("weak", WEAK), ("strong", STRONG))}


def test_gate(runs, dataset):
    """Strong first, then weak (rejected), then weak with force (promoted, strong archived), then strong again
    without force (better than the champion: promoted back); idempotent."""
    client = MlflowClient()
    first = promotion.promote(runs["strong"], dataset)
    assert first.promoted and registry.current_production() == first.version
    assert str(client.get_model_version_by_alias(NAME, registry.CHAMPION_ALIAS).version) == first.version

    rejected = promotion.promote(runs["weak"], dataset)
    assert not rejected.promoted
    assert rejected.challenger_accuracy < rejected.champion_accuracy
    assert registry.current_production() == first.version and registry.stages()[rejected.version] == "None"

    again = promotion.promote(runs["strong"], dataset)
    assert not again.promoted and again.version == first.version and "already" in again.reason
    assert len(client.search_model_versions(f"name = '{NAME}'")) == 2  # nothing registered twice

    forced = promotion.promote(runs["weak"], dataset, force=True)
    assert forced.promoted and forced.version == rejected.version
    stages = registry.stages()
    assert stages[first.version] == registry.ARCHIVED and stages[forced.version] == registry.PRODUCTION
    assert str(client.get_model_version_by_alias(NAME, registry.CHAMPION_ALIAS).version) == forced.version
    with registry.stages_quietly():
        loaded = mlflow.pyfunc.load_model(f"models:/{NAME}/Production")
    assert loaded.metadata.run_id == runs["weak"]

    version = client.get_model_version(NAME, forced.version)
    assert {"val_accuracy", "test_accuracy", "run_id", "git_commit", "data_checksum"} <= set(version.tags)
    assert "test accuracy" in version.description

    back = promotion.promote(runs["strong"], dataset)
    assert back.promoted and back.version == first.version and back.champion_version == forced.version
    assert back.challenger_accuracy > back.champion_accuracy
    stages = registry.stages()
    assert stages[first.version] == registry.PRODUCTION and stages[forced.version] == registry.ARCHIVED
    assert registry.champion() == first.version


def test_best_run_is_chosen_by_validation_accuracy(runs):
    """best_run() picks the strong run of the two trained ones (test_promotion checks the ranking itself on
    runs whose validation and test rankings disagree)."""
    assert promotion.best_run("gate") == runs["strong"]


def test_unknown_run_is_a_clear_error(private_store, dataset):
    """Promoting a run id that does not exist is a PromotionError saying so."""
    with pytest.raises(registry.PromotionError, match="not found"):
        promotion.promote("0123456789abcdef", dataset)
