"""The served model: an `mlflow.pyfunc.PythonModel` that carries its own preprocessing.

Logged with MLflow's models-from-code (`model_code.py`), so loading unpickles nothing of ours; the
weights are a plain state dict read with `torch.load(weights_only=True)`.

JSON contract of `/invocations` (one row per image, exactly one of the two columns per row):
    {"dataframe_records": [{"pixels": [[0, 0, ...28 values], ...28 rows]},
                           {"image": "<base64 image in one of contract.FORMATS>"}]}
Response: {"predictions": [{"class_index": 9, "class_name": "Ankle boot", "probabilities": [...10],
                             "in_distribution": true, "ood_score": 0.12}]}
`in_distribution` is false when the picture does not look like clothing (`ood.py`: `ood_score` above 1); the
class is then only the model's best guess. Models logged before the detector answer without both fields.
With "params": {"return_seen": true}, each prediction also carries "seen": the 28x28 image classified.
Whoever set `seen.WATCHER` around the call (the scoring server, for its prediction log) is handed what was
classified and answered; nobody else pays for it.
"""

from __future__ import annotations

import json
import time

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED
from mlflow.types.schema import AnyType, Array, ColSpec, DataType, ParamSchema, ParamSpec, Schema

from fmnist_pyfunc import admission, contract, inference, models, ood, seen
from fmnist_pyfunc.config import CLASS_NAMES

WEIGHTS_ARTIFACT = "weights"        # state dict, torch.save format
CONFIG_ARTIFACT = "model_config"    # JSON: arch, width, depth, dropout, tta, temperature
OOD_ARTIFACT = "ood"                # npz of plain arrays: the out-of-distribution detector (ood.py)
REFERENCE_ARTIFACT = "reference"    # JSON: the validation split's profile that drift is measured against (monitor.py)
# `pixels` is AnyType: MLflow's Array(Array(double)) rejects integer pixels and checks every value in
# Python (~250 ms for 256 images); our own checks in `contract` are vectorised and say more.
RETURN_SEEN_PARAM = "return_seen"  # off by default: 784 numbers more per row in every answer
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(AnyType(), "pixels", required=False), ColSpec(DataType.string, "image", required=False)]),
    outputs=Schema([ColSpec(DataType.long, "class_index"), ColSpec(DataType.string, "class_name"),
                    ColSpec(Array(DataType.double), "probabilities"),
                    ColSpec(DataType.boolean, "in_distribution", required=False),
                    ColSpec(DataType.double, "ood_score", required=False), ColSpec(AnyType(), "seen", required=False)]),
    params=ParamSchema([ParamSpec(RETURN_SEEN_PARAM, DataType.boolean, False)]),
)


class FashionMNISTClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        with open(context.artifacts[CONFIG_ARTIFACT]) as f:
            self.config = json.load(f)
        arch = self.config["arch"]
        self.network = models.build(arch, self.config["width"], self.config["depth"], self.config["dropout"])
        state = torch.load(context.artifacts[WEIGHTS_ARTIFACT], map_location="cpu", weights_only=True)
        self.network.load_state_dict(state)
        self.network.to(memory_format=models.memory_format(arch)).eval()
        self.bf16 = inference.serving_bf16()
        self.temperature = self.config.get("temperature", 1.0)  # models logged before calibration have none
        # Models logged before the detector have none: they answer without its two fields.
        self.detector = ood.load(context.artifacts[OOD_ARTIFACT]) if OOD_ARTIFACT in context.artifacts else None
        self.reference = None  # models logged before drift monitoring have none
        if REFERENCE_ARTIFACT in context.artifacts:
            with open(context.artifacts[REFERENCE_ARTIFACT]) as f:
                self.reference = json.load(f)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        """Classify each row; with params {"return_seen": true} also return `seen`, the 28x28 image (0-255)
        the network classified after preprocessing."""
        deadline = time.monotonic() + contract.MAX_REQUEST_SECONDS
        try:
            rows = contract.open_rows(model_input)
            with admission.admitted(contract.decoded_pixels(rows)):
                batch = contract.decode_rows(rows, deadline)
                outputs = inference.forward(self.network, batch, self.config["tta"], self.bf16)
        except contract.InputError as exc:
            raise MlflowException.invalid_parameter_value(str(exc)) from None
        except admission.Busy as exc:
            raise MlflowException(str(exc), error_code=RESOURCE_EXHAUSTED) from None
        except contract.DeadlineExceeded as exc:
            raise MlflowException(str(exc), error_code=DEADLINE_EXCEEDED) from None
        probabilities = inference.calibrated(outputs.logits, self.temperature)
        indices = probabilities.argmax(1)
        answer = {
            "class_index": indices.astype(np.int64),
            "class_name": [CLASS_NAMES[i] for i in indices],
            "probabilities": [row.astype(np.float64).tolist() for row in probabilities],
        }
        scores = self.detector.score(outputs) if self.detector is not None else None
        if scores is not None:
            answer.update(in_distribution=ood.in_distribution(scores), ood_score=scores)
        images = np.rint(batch).astype(np.uint8)
        if (params or {}).get(RETURN_SEEN_PARAM):
            answer["seen"] = [image.tolist() for image in images]
        seen.record(seen.Seen(images, ["pixels" if isinstance(row, np.ndarray) else "image" for row in rows],
                              indices, probabilities, scores))
        return pd.DataFrame(answer)  # built once: each added column costs as much as the detector
