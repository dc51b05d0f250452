"""Models-from-code entry: MLflow copies this file into the logged model and runs it on load."""

import mlflow

from fmnist_pyfunc.pyfunc_model import FashionMNISTClassifier

mlflow.models.set_model(FashionMNISTClassifier())
