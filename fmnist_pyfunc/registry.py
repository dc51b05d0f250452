"""Model Registry: pick the best run, register it, and promote it through a champion/challenger gate.

Selection among runs uses validation accuracy only. The gate compares the challenger with the current
Production model on the 10k test set, through each model's own pyfunc (preprocessing included): it is
the one set that no run trained or selected on (validation splits differ per seed).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import yaml
from mlflow.entities import ViewType
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from fmnist_pyfunc import calibration, data, inference
from fmnist_pyfunc.config import MODEL_URI_TAG, REGISTERED_MODEL_NAME, SELECTION_METRIC

PRODUCTION = "Production"
ARCHIVED = "Archived"
STAGING = "Staging"
CHAMPION_ALIAS = "champion"
EXPORT_MODEL_DIR = "model"            # inside the export folder: the model folder the scoring server loads
EXPORT_INFO_FILE = "model_info.json"  # beside the model: what the scoring server's /model says of it
# One promotion at a time. The lock is a registered model of its own: creating one is atomic in every
# MLflow store (unique name), local SQLite and a shared tracking server alike.
LOCK_MODEL_NAME = f"{REGISTERED_MODEL_NAME}.promotion-lock"
LOCK_WAIT_S = 600    # a promotion evaluates two models on 10k images (~20 s on 2 cores): room for a queue
LOCK_STALE_S = 900   # a lock this old was left by a killed promoter: taken over
LOCK_POLL_S = 1.0


class PromotionError(RuntimeError):
    """Nothing to promote (no such run, no finished run with a model); the message says why."""


@dataclass
class Decision:
    version: str
    promoted: bool
    reason: str
    challenger_accuracy: float | None = None
    champion_version: str | None = None
    champion_accuracy: float | None = None
    challenger_ece: float | None = None    # expected calibration error (15 bins) on the same test set
    champion_ece: float | None = None

    def summary(self) -> str:
        verdict = "PROMOTED to Production (alias champion)" if self.promoted else "NOT promoted"
        return f"{REGISTERED_MODEL_NAME} v{self.version}: {verdict}: {self.reason}"


@contextmanager
def stages_quietly():
    """Stages are deprecated in MLflow 3 but still the documented contract here: hide only that warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*[Ss]tage.*")
        yield


def best_run(experiment: str | None = None, parent_run_id: str | None = None) -> str:
    """Id of the finished run with the highest validation accuracy (in an experiment, or a sweep's children)."""
    client = MlflowClient()
    if parent_run_id:
        experiment_ids = [client.get_run(parent_run_id).info.experiment_id]
        query = f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'FINISHED'"
    else:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise PromotionError(f"experiment {experiment!r} does not exist")
        experiment_ids, query = [found.experiment_id], "attributes.status = 'FINISHED'"
    runs = client.search_runs(experiment_ids, f"{query} and metrics.{SELECTION_METRIC} > 0",
                              run_view_type=ViewType.ACTIVE_ONLY, order_by=[f"metrics.{SELECTION_METRIC} DESC"],
                              max_results=1)
    if not runs:
        raise PromotionError(f"no finished run with {SELECTION_METRIC} in {parent_run_id or experiment!r}")
    return runs[0].info.run_id


def heldout_scores(model_uri: str, dataset: data.FashionMNIST) -> tuple[float, float]:
    """Accuracy and calibration error of a registered model on the 10k test set, through its pyfunc interface,
    in the batches training's evaluation uses (so a run's test_accuracy is reproduced exactly)."""
    model = mlflow.pyfunc.load_model(model_uri)
    probabilities = []
    for start in range(0, len(dataset.test_images), inference.BATCH_SIZE):
        chunk = dataset.test_images[start:start + inference.BATCH_SIZE]
        answer = model.predict(pd.DataFrame({"pixels": list(chunk.astype(np.float32))}))
        probabilities.append(np.array(answer["probabilities"].tolist()))
    probabilities = np.concatenate(probabilities)
    return (float((probabilities.argmax(1) == dataset.test_labels).mean()),
            calibration.expected_calibration_error(probabilities, dataset.test_labels))


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
                     " Input: 28x28 pixels (0-255) or base64 PNG/JPEG; output: class index, name, probabilities."))
    return version


def current_production() -> str | None:
    client = MlflowClient()
    with stages_quietly():
        try:
            versions = client.get_latest_versions(REGISTERED_MODEL_NAME, stages=[PRODUCTION])
        except mlflow.exceptions.MlflowException:
            return None  # the registered model does not exist yet
    return str(versions[0].version) if versions else None


def _move_to_production(client: MlflowClient, version: str) -> None:
    """`version` to Production, every other Production/Staging version to Archived.

    Not `archive_existing_versions=True`: in MLflow 3.17 it compares an integer column with the string
    version, which PostgreSQL rejects ("operator does not exist: integer <> character varying")."""
    with stages_quietly():
        client.transition_model_version_stage(REGISTERED_MODEL_NAME, version, PRODUCTION)
        for other in client.search_model_versions(f"name = '{REGISTERED_MODEL_NAME}'"):
            if other.current_stage in (PRODUCTION, STAGING) and str(other.version) != str(version):
                client.transition_model_version_stage(REGISTERED_MODEL_NAME, other.version, ARCHIVED)


def _stale_holder(client: MlflowClient) -> str | None:
    """The holder token of the lock if it is stale (its promoter was killed), else None."""
    try:
        tags = client.get_registered_model(LOCK_MODEL_NAME).tags
    except mlflow.exceptions.MlflowException:
        return None  # released meanwhile
    return tags.get("holder", "") if time.time() - float(tags.get("since", "0")) > LOCK_STALE_S else None


def take_over(client: MlflowClient, stale_holder: str) -> bool:
    """Move the stale lock of `stale_holder` aside, atomically: renamed to a tombstone named after that holder.
    Of several waiters that saw the same stale lock only one rename succeeds; a waiter acting late finds the
    tombstone's name taken (or no lock) and fails instead of moving the next holder's fresh lock. Tombstones
    are kept for that reason: one small registered model per killed promoter."""
    try:
        client.rename_registered_model(LOCK_MODEL_NAME, f"{LOCK_MODEL_NAME}.taken-over.{stale_holder}")
        return True
    except mlflow.exceptions.MlflowException:
        return False


@contextmanager
def promotion_lock():
    """Hold the registry's promotion lock: concurrent promoters wait their turn, so each one's gate sees the
    Production version the previous one left, and stages and alias are never written by two at once."""
    client = MlflowClient()
    deadline = time.monotonic() + LOCK_WAIT_S
    holder = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"  # unique: tombstones are named so
    while True:
        try:
            client.create_registered_model(LOCK_MODEL_NAME, tags={"since": str(time.time()), "holder": holder},
                                           description=f"Held while a promotion of {REGISTERED_MODEL_NAME} runs.")
            break
        except mlflow.exceptions.MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        stale = _stale_holder(client)
        if stale is not None and take_over(client, stale):
            continue
        if time.monotonic() > deadline:
            raise PromotionError(f"another promotion has held {LOCK_MODEL_NAME!r} for over {LOCK_WAIT_S} s; "
                                 f"if none is running, delete that registered model")
        time.sleep(LOCK_POLL_S)
    try:
        yield
    finally:
        _release(client, holder)


def _release(client: MlflowClient, holder: str) -> None:
    """Delete the lock only if it is still ours: if this promotion outlived LOCK_STALE_S and was taken over,
    the lock now belongs to someone else."""
    try:
        if client.get_registered_model(LOCK_MODEL_NAME).tags.get("holder") == holder:
            client.delete_registered_model(LOCK_MODEL_NAME)
    except mlflow.exceptions.MlflowException:
        pass  # gone already


def promote(run_id: str, dataset: data.FashionMNIST, force: bool = False) -> Decision:
    """Register `run_id`'s model and make it Production + champion if it beats the current Production."""
    with promotion_lock():
        return _promote(run_id, dataset, force)


def _crown(client: MlflowClient, version: str) -> None:
    """Production stage, others archived, champion alias: idempotent, so re-running it repairs a promotion
    that was killed half-way."""
    _move_to_production(client, version)
    client.set_registered_model_alias(REGISTERED_MODEL_NAME, CHAMPION_ALIAS, version)


def _promote(run_id: str, dataset: data.FashionMNIST, force: bool) -> Decision:
    version = register(run_id)
    champion = current_production()
    if champion == version:
        _crown(MlflowClient(), version)
        return Decision(version, promoted=False, reason=f"version {version} is already in {PRODUCTION}")
    uri = f"models:/{REGISTERED_MODEL_NAME}/{version}"
    decision = Decision(version, promoted=True, reason="no model in Production yet", champion_version=champion)
    decision.challenger_accuracy, decision.challenger_ece = heldout_scores(uri, dataset)
    if champion is not None:
        champion_uri = f"models:/{REGISTERED_MODEL_NAME}/{champion}"
        decision.champion_accuracy, decision.champion_ece = heldout_scores(champion_uri, dataset)
        beats = decision.challenger_accuracy > decision.champion_accuracy
        decision.promoted = beats or force
        comparison = (f"challenger v{version} accuracy {decision.challenger_accuracy:.4f} (ECE "
                      f"{decision.challenger_ece:.4f}) vs champion v{champion} {decision.champion_accuracy:.4f} "
                      f"(ECE {decision.champion_ece:.4f}) on the 10k test set")
        decision.reason = f"{comparison}: {'better' if beats else 'not better'}" + (", forced" if force else "")
    client = MlflowClient()
    client.set_model_version_tag(REGISTERED_MODEL_NAME, version, "promotion_decision",
                                 ("promoted: " if decision.promoted else "rejected: ") + decision.reason)
    if decision.promoted:
        _crown(client, version)
    return decision


def version_info(model_version: ModelVersion) -> dict:
    """What the UI shows about a registered version: name, version, stage, alias, run, metrics."""
    metrics = MlflowClient().get_run(model_version.run_id).data.metrics if model_version.run_id else {}
    return {"name": REGISTERED_MODEL_NAME, "version": str(model_version.version), "stage": model_version.current_stage,
            "alias": CHAMPION_ALIAS if CHAMPION_ALIAS in model_version.aliases else None,
            "aliases": list(model_version.aliases),
            "run_id": model_version.run_id, "description": model_version.description,
            "metrics": {k: metrics[k] for k in ("test_accuracy", "test_ece", SELECTION_METRIC) if k in metrics}}


def _drop_absolute_paths(mlmodel: Path) -> None:
    """MLmodel records where things came from (the run's artifact folder, the logging machine's files).
    Loading uses only the relative paths, so the export keeps those alone and points nowhere outside."""
    spec = yaml.safe_load(mlmodel.read_text())
    spec.pop("artifact_path", None)
    pyfunc = spec["flavors"]["python_function"]
    if "model_code_path" in pyfunc:  # MLflow loads it by basename from the model folder
        pyfunc["model_code_path"] = Path(pyfunc["model_code_path"]).name
    for artifact in pyfunc.get("artifacts", {}).values():
        artifact["uri"] = artifact["path"]
    mlmodel.write_text(yaml.safe_dump(spec, sort_keys=False))


def export_production(destination: Path) -> dict:
    """Write the Production model (MLflow model format, self-contained) and its metadata to `destination`."""
    version = current_production()
    if version is None:
        raise PromotionError(f"no version of {REGISTERED_MODEL_NAME} is in {PRODUCTION}: run promote first")
    model_dir, staging = destination / EXPORT_MODEL_DIR, destination / f"{EXPORT_MODEL_DIR}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    mlflow.artifacts.download_artifacts(f"models:/{REGISTERED_MODEL_NAME}/{version}", dst_path=str(staging))
    _drop_absolute_paths(staging / "MLmodel")
    shutil.rmtree(model_dir, ignore_errors=True)  # the old export goes only once the new one is complete
    staging.rename(model_dir)
    with stages_quietly():
        model_version = MlflowClient().get_model_version(REGISTERED_MODEL_NAME, version)
    info = {**version_info(model_version), "exported_at": datetime.now(UTC).isoformat(timespec="seconds")}
    (destination / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2))
    return info


def log_decision(decision: Decision) -> None:
    """Record the decision and both scores in the active MLflow run."""
    mlflow.set_tags({"promotion.version": decision.version, "promotion.promoted": str(decision.promoted).lower(),
                     "promotion.reason": decision.reason})
    scores = {"challenger_test_accuracy": decision.challenger_accuracy,
              "champion_test_accuracy": decision.champion_accuracy,
              "challenger_test_ece": decision.challenger_ece, "champion_test_ece": decision.champion_ece}
    mlflow.log_metrics({k: v for k, v in scores.items() if v is not None})
