"""Export: the Production model as a self-contained folder (MLflow model format) plus what /model says of it.
This is what the image serves (`make export`, `make image`)."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import yaml
from mlflow.tracking import MlflowClient

from fmnist_pyfunc import registry
from fmnist_pyfunc.config import REGISTERED_MODEL_NAME

EXPORT_MODEL_DIR = "model"            # inside the export folder: the model folder the scoring server loads
EXPORT_INFO_FILE = "model_info.json"  # beside the model: what the scoring server's /model says of it


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
    version = registry.current_production()
    if version is None:
        raise registry.PromotionError(f"no version of {REGISTERED_MODEL_NAME} is in {registry.PRODUCTION}: "
                                      "run promote first")
    model_dir, staging = destination / EXPORT_MODEL_DIR, destination / f"{EXPORT_MODEL_DIR}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    mlflow.artifacts.download_artifacts(f"models:/{REGISTERED_MODEL_NAME}/{version}", dst_path=str(staging))
    _drop_absolute_paths(staging / "MLmodel")
    shutil.rmtree(model_dir, ignore_errors=True)  # the old export goes only once the new one is complete
    staging.rename(model_dir)
    with registry.stages_quietly():
        model_version = MlflowClient().get_model_version(REGISTERED_MODEL_NAME, version)
    info = {**registry.version_info(model_version), "exported_at": datetime.now(UTC).isoformat(timespec="seconds")}
    (destination / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2))
    return info
