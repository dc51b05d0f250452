"""One MLflow run of training: resolved config, provenance, per-epoch metrics, evaluation, the model.

Shared by the `train` entry point and every sweep trial, so both log exactly the same things.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow.data.code_dataset_source import CodeDatasetSource

from fmnist_pyfunc import calibration, contract, data, feedback, models, ood, prediction_log, reporting, training
from fmnist_pyfunc.config import MODEL_URI_TAG, SELECTION_METRIC
from fmnist_pyfunc.pyfunc_model import CONFIG_ARTIFACT, OOD_ARTIFACT, REFERENCE_ARTIFACT, SIGNATURE, WEIGHTS_ARTIFACT

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
MODEL_NAME_IN_RUN = "model"
SERVING_REQUIREMENTS = ("mlflow", "torch", "numpy", "pandas", "pillow")


def git_commit() -> str:
    """HEAD's commit, suffixed '-dirty' when tracked files have changes; 'unknown' outside git."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO_DIR, capture_output=True, text=True, check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def input_example(dataset: data.FashionMNIST) -> pd.DataFrame:
    """Both input kinds of the JSON contract, built from real test images."""
    return pd.DataFrame([
        {"pixels": dataset.test_images[0].tolist(), "image": None},
        {"pixels": None, "image": contract.png_base64(dataset.test_images[1])},
    ])


def log_pyfunc_model(result: training.TrainResult, cfg: dict, dataset: data.FashionMNIST,
                     detector: ood.Detector, profile: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        weights, config, outliers = Path(tmp, "weights.pt"), Path(tmp, "model_config.json"), Path(tmp, "ood.npz")
        reference = Path(tmp, "reference.json")
        detector.save(outliers)
        reference.write_text(json.dumps(profile))
        state = {k: v.detach().cpu() for k, v in result.model.state_dict().items()}
        torch.save(state, weights)
        config.write_text(json.dumps({**{k: cfg[k] for k in ("arch", "width", "depth", "dropout", "tta")},
                                      "temperature": result.temperature}))
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME_IN_RUN,
            python_model=str(PACKAGE_DIR / "model_code.py"),
            artifacts={WEIGHTS_ARTIFACT: str(weights), CONFIG_ARTIFACT: str(config), OOD_ARTIFACT: str(outliers),
                       REFERENCE_ARTIFACT: str(reference)},
            code_paths=[str(PACKAGE_DIR)],
            signature=SIGNATURE,
            input_example=input_example(dataset),
            pip_requirements=[f"{name}=={version(name)}" for name in SERVING_REQUIREMENTS],
        )
    # MLflow 3 stores models outside the run's artifacts: this tag is how registry and tests find it.
    mlflow.set_tag(MODEL_URI_TAG, info.model_uri)


def log_evaluation(result: training.TrainResult, cfg: dict, dataset: data.FashionMNIST,
                   detector: ood.Detector) -> float:
    """Evaluate once on the 10k test set exactly as the served model will (on the CPU, through
    `inference`); log the metrics, calibration before/after, the garments the detector accepts and the report
    artifacts."""
    raw, test = training.test_scores(result, dataset, cfg["tta"], detector)
    probabilities = test["probabilities"]
    predictions, confidence = probabilities.argmax(1), probabilities.max(1)
    matrix = reporting.confusion_matrix(dataset.test_labels, predictions)
    mlflow.log_metrics({"test_accuracy": test["accuracy"], "test_loss": test["loss"], "test_ece": test["ece"],
                        "test_ece_raw": raw["ece"], "temperature": result.temperature,
                        "val_ece": result.val_ece, "val_ece_raw": result.val_ece_raw,
                        "ood_test_accepted": test["ood_accepted"]})
    tables = {f"test, raw (ECE {raw['ece']:.2%})": calibration.reliability(raw["probabilities"], dataset.test_labels),
              f"test, T = {result.temperature:.3f} (ECE {test['ece']:.2%})":
                  calibration.reliability(probabilities, dataset.test_labels)}
    mlflow.log_dict(dict(zip(("raw", "calibrated"), tables.values(), strict=True)), "evaluation/reliability.json")
    mlflow.log_figure(reporting.plot_reliability(tables), "evaluation/reliability.png")
    mlflow.log_dict(reporting.per_class_scores(matrix), "evaluation/per_class_metrics.json")
    mlflow.log_figure(reporting.plot_confusion_matrix(matrix), "evaluation/confusion_matrix.png")
    mlflow.log_figure(reporting.plot_misclassified(dataset.test_images, dataset.test_labels, predictions, confidence),
                      "evaluation/misclassified.png")
    mlflow.log_figure(reporting.plot_learning_curves(result.history), "evaluation/learning_curves.png")
    reporting.plt.close("all")
    return test["accuracy"]


def log_feedback(snapshot: feedback.Snapshot) -> None:
    """The corrections a run learns from and is evaluated on, as MLflow dataset inputs (digest, row count)."""
    source = CodeDatasetSource({"prediction_log": prediction_log.redacted(snapshot.url)})
    for part, context in ((snapshot.train, "training"), (snapshot.holdout, "evaluation")):
        name = "feedback" if context == "training" else "feedback-holdout"
        mlflow.log_input(mlflow.data.from_numpy(part.images, source=source, targets=part.labels, name=name),
                         context=context)
    mlflow.log_params({"feedback_train_rows": len(snapshot.train.ids),
                       "feedback_holdout_rows": len(snapshot.holdout.ids), "feedback_copies": feedback.FEEDBACK_COPIES})


def run_training(cfg: dict, dataset: data.FashionMNIST, parent_run_id: str | None = None,
                 on_epoch: Callable[[int, dict], bool | None] | None = None, progress: bool = True,
                 run_name: str | None = None, on_start: Callable[[str], None] | None = None,
                 corrections: feedback.Snapshot | None = None) -> str:
    """Train with `cfg` inside an MLflow run (a child of `parent_run_id` if given); return the run id.
    With `corrections` (cfg["feedback"]), their training part joins the training split and their held-out
    part is scored (`feedback_holdout_accuracy`).

    An exception (a pruned or failed trial, Ctrl-C) leaves the run marked FAILED/KILLED, never FINISHED.
    """
    with mlflow.start_run(run_name=run_name, parent_run_id=parent_run_id, nested=parent_run_id is not None) as run:
        if on_start is not None:
            on_start(run.info.run_id)
        device = training.resolve_device(cfg["device"])
        # Under `mlflow run` the project has logged the -P values already, as typed ("1e-1", "true").
        logged = run.data.params
        mlflow.log_params({k: v for k, v in {**cfg, "resolved_device": str(device)}.items() if k not in logged})
        mlflow.set_tags({"git_commit": git_commit(), "data_checksum": dataset.checksum,
                         "data_source": str(dataset.source), "torch_version": torch.__version__})
        mlflow.log_dict(cfg, "config.json")

        def log_epoch(epoch: int, metrics: dict) -> bool | None:
            mlflow.log_metrics(metrics, step=epoch)
            return on_epoch(epoch, metrics) if on_epoch is not None else None

        extra = None
        if corrections is not None:
            log_feedback(corrections)
            extra = feedback.training_extra(corrections)
        result = training.train(cfg, dataset, on_epoch=log_epoch, progress=progress, extra=extra)
        mlflow.log_metrics({
            SELECTION_METRIC: result.best_val_accuracy,
            "best_epoch": result.best_epoch,
            "train_seconds": result.train_seconds,
            "num_parameters": models.count_parameters(result.model),
        })
        if corrections is not None and corrections.holdout.ids:
            holdout = corrections.holdout
            mlflow.log_metric("feedback_holdout_accuracy",
                              training.accuracy(result, holdout.images, holdout.labels, cfg["tta"]))
        val = training.validation_outputs(result, dataset, cfg["tta"])  # once: the detector's and drift's
        detector = training.fit_ood(result, dataset, cfg["tta"], cfg["seed"], val)
        log_evaluation(result, cfg, dataset, detector)
        log_pyfunc_model(result, cfg, dataset, detector, training.reference_profile(result, dataset, val, detector))
        return run.info.run_id
