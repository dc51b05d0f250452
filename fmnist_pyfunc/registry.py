"""Model Registry: register a run's model, read and set who is in Production (stage + alias `champion`).

Stages are deprecated in MLflow 3 but are still this project's documented contract
(`models:/fashion-mnist-cnn/Production` must load), so every stage call goes through `stages_quietly`, and
the one way to crown a version is `crown`: the promotion gate, tests and benchmarks all call it.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from fmnist_pyfunc import contract
from fmnist_pyfunc.config import MODEL_URI_TAG, REGISTERED_MODEL_NAME, SELECTION_METRIC

PRODUCTION = "Production"
ARCHIVED = "Archived"
STAGING = "Staging"
CHAMPION_ALIAS = "champion"


class PromotionError(RuntimeError):
    """Nothing to register, promote or export (no such run, no finished run with a model, nothing in
    Production); the message says why."""


@contextmanager
def stages_quietly():
    """Stages are deprecated in MLflow 3 but still the documented contract here: hide only that warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*[Ss]tage.*")
        yield


def register(run_id: str) -> str:
    """The model version of `run_id`, registering it only the first time (so promote is idempotent)."""
    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException as exc:
        raise PromotionError(f"run {run_id!r} not found") from exc
    if run.info.status != "FINISHED" or MODEL_URI_TAG not in run.data.tags:
        raise PromotionError(f"run {run_id} is {run.info.status} without a logged model; only finished runs qualify")
    existing = client.search_model_versions(f"name = '{REGISTERED_MODEL_NAME}' and run_id = '{run_id}'")
    if existing:
        return str(existing[0].version)
    # Versions are strings everywhere here: MLflow's SQL store gives ints, its REST client strings.
    version = str(mlflow.register_model(run.data.tags[MODEL_URI_TAG], REGISTERED_MODEL_NAME).version)
    metrics, tags = run.data.metrics, run.data.tags
    test_accuracy, test_ece = (metrics.get(key, float("nan")) for key in ("test_accuracy", "test_ece"))
    for key, value in {"run_id": run_id, "val_accuracy": f"{metrics[SELECTION_METRIC]:.4f}",
                       "test_accuracy": f"{test_accuracy:.4f}", "test_ece": f"{test_ece:.4f}",
                       "git_commit": tags.get("git_commit", "unknown"),
                       "data_checksum": tags.get("data_checksum", "unknown")}.items():
        client.set_model_version_tag(REGISTERED_MODEL_NAME, version, key, value)
    params = run.data.params
    client.update_model_version(
        REGISTERED_MODEL_NAME, version,
        description=(f"Fashion-MNIST classifier ({params.get('arch')}, width {params.get('width')}, depth "
                     f"{params.get('depth')}, {params.get('epochs')} epochs) from run {run_id}. Validation accuracy "
                     f"{metrics[SELECTION_METRIC]:.4f}, test accuracy {test_accuracy:.4f}, test calibration error "
                     f"(ECE, 15 bins) {test_ece:.4f} at temperature {metrics.get('temperature', 1.0):.3f}."
                     f" Input: 28x28 pixels (0-255) or a base64 image ({contract.ACCEPTED}); output: class "
                     "index, name, probabilities."))
    return version


def current_production() -> str | None:
    client = MlflowClient()
    with stages_quietly():
        try:
            versions = client.get_latest_versions(REGISTERED_MODEL_NAME, stages=[PRODUCTION])
        except mlflow.exceptions.MlflowException:
            return None  # the registered model does not exist yet
    return str(versions[0].version) if versions else None


def crown(version: str, client: MlflowClient | None = None) -> None:
    """`version` to Production, every other Production/Staging version to Archived, and the alias champion.
    Idempotent, so re-running it repairs a promotion that was killed half-way.

    Not `archive_existing_versions=True`: in MLflow 3.17 it compares an integer column with the string
    version, which PostgreSQL rejects ("operator does not exist: integer <> character varying")."""
    client = client or MlflowClient()
    with stages_quietly():
        client.transition_model_version_stage(REGISTERED_MODEL_NAME, version, PRODUCTION)
        for other in client.search_model_versions(f"name = '{REGISTERED_MODEL_NAME}'"):
            if other.current_stage in (PRODUCTION, STAGING) and str(other.version) != str(version):
                client.transition_model_version_stage(REGISTERED_MODEL_NAME, other.version, ARCHIVED)
    client.set_registered_model_alias(REGISTERED_MODEL_NAME, CHAMPION_ALIAS, version)


def stages() -> dict[str, str]:
    """Every version of the registered model and its stage ("None" for none)."""
    with stages_quietly():
        versions = MlflowClient().search_model_versions(f"name = '{REGISTERED_MODEL_NAME}'")
    return {str(v.version): v.current_stage for v in versions}


def champion() -> str:
    """The version that carries the alias champion."""
    return str(MlflowClient().get_model_version_by_alias(REGISTERED_MODEL_NAME, CHAMPION_ALIAS).version)


def version_info(model_version: ModelVersion) -> dict:
    """What the UI shows about a registered version: name, version, stage, alias, run, metrics."""
    metrics = MlflowClient().get_run(model_version.run_id).data.metrics if model_version.run_id else {}
    return {"name": REGISTERED_MODEL_NAME, "version": str(model_version.version), "stage": model_version.current_stage,
            "alias": CHAMPION_ALIAS if CHAMPION_ALIAS in model_version.aliases else None,
            "aliases": list(model_version.aliases),
            "run_id": model_version.run_id, "description": model_version.description,
            "metrics": {k: metrics[k] for k in ("test_accuracy", "test_ece", SELECTION_METRIC) if k in metrics}}
