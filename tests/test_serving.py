"""Serving end to end: the real scoring server of the Production model, and the UI in front of it."""

import base64
import socket
import subprocess
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests

from fmnist_pyfunc import config
from fmnist_pyfunc.contract import png_base64
from fmnist_testkit import harness
from fmnist_testkit.harness import child_env, free_port
from fmnist_testkit.images import rows_of_each_kind

pytestmark = pytest.mark.e2e
N_IMAGES = 300  # real test images checked through each path
PHOTO_SIDE = 112  # px: the JPEG rows are photo-sized


def _invoke(scoring_url: str, records: list[dict]) -> requests.Response:
    return requests.post(f"{scoring_url}/invocations", json={"dataframe_records": records}, timeout=60)


def test_server_answers_ping_and_version(scoring_url):
    """The scoring server answers MLflow's /ping and /version."""
    assert requests.get(f"{scoring_url}/ping", timeout=5).status_code == 200
    assert requests.get(f"{scoring_url}/version", timeout=5).text.strip() == mlflow.__version__


def _served(scoring_url: str, rows: list[dict]) -> pd.DataFrame:
    response = _invoke(scoring_url, rows)
    assert response.status_code == 200, response.text[:500]
    return pd.DataFrame(response.json()["predictions"])


def _assert_same_answers(served: pd.DataFrame, expected: pd.DataFrame, kind: str) -> None:
    """Same classes, same in_distribution flags, same out-of-distribution scores."""
    assert np.array_equal(served["class_index"], expected["class_index"]), kind
    assert np.array_equal(served["in_distribution"].astype(bool), expected["in_distribution"].astype(bool)), kind
    np.testing.assert_allclose(served["ood_score"], expected["ood_score"], rtol=1e-6, atol=1e-6, err_msg=kind)


def test_every_input_kind_through_invocations_matches_in_process_predict(scoring_url, trained_run, dataset):
    """Raw pixels and PNG/JPEG images over HTTP give the in-process pyfunc's answers (class, in_distribution,
    ood_score), at the model's accuracy."""
    images, labels = dataset.test_images[:N_IMAGES], dataset.test_labels[:N_IMAGES]
    model = mlflow.pyfunc.load_model(trained_run.data.tags["model_uri"])
    test_accuracy = trained_run.data.metrics["test_accuracy"]
    for kind, rows in rows_of_each_kind(images, PHOTO_SIDE).items():
        served = _served(scoring_url, rows)
        _assert_same_answers(served, model.predict(pd.DataFrame(rows)), kind)
        tolerance = 0.05 if kind == "pixels" else 0.12  # a few images change by a re-centring pixel
        assert (served["class_index"] == labels).mean() >= test_accuracy - tolerance, kind


def test_plain_mlflow_models_serve_answers_as_our_scoring_server(production, scoring_url, tracking_uri, dataset,
                                                                tmp_path):
    """MLflow's own `mlflow models serve -m models:/fashion-mnist-cnn/Production --env-manager local`, as the
    docs give it, loads the Production model (without unpickling) and answers pixels, PNG and JPEG rows exactly
    as our scoring server does, out-of-distribution fields included: the model needs none of our server's code."""
    port = free_port()
    command = harness.plain_mlflow_command(config.PRODUCTION_MODEL_URI, config.LOOPBACK, port)
    env = child_env(tracking_uri)  # as the scoring_server fixture's, so both serve the same store
    env["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"
    plain_url = f"http://{config.LOOPBACK}:{port}"
    with harness.running(command, env, f"{plain_url}/ping", tmp_path / "plain.log"):
        for kind, rows in rows_of_each_kind(dataset.test_images[:N_IMAGES], PHOTO_SIDE).items():
            _assert_same_answers(_served(plain_url, rows), _served(scoring_url, rows), kind)


def test_bad_request_is_400_with_a_clear_message(scoring_url, dataset):
    """A wrongly shaped pixel row is a 400 naming the expected shape; the server then answers a good request."""
    response = _invoke(scoring_url, [{"pixels": np.zeros((27, 28)).tolist()}])
    assert response.status_code == 400 and "shape (28, 28)" in response.json()["message"]
    assert _invoke(scoring_url, [{"pixels": dataset.test_images[0].tolist()}]).status_code == 200


def _upload(ui_url: str, files: list[tuple[str, bytes]]) -> requests.Response:
    """A form upload as the page makes it: with the page's CSRF cookie and token."""
    return harness.ui_session(ui_url).post(f"{ui_url}/predict", timeout=60,
                                        files=[("files", (name, data, "image/png")) for name, data in files])


def test_ui_predicts_real_images_through_the_scoring_server(ui_url, dataset, trained_run):
    """16 real test images uploaded to the UI come back with ten probabilities each, about as accurate as the
    model's test accuracy."""
    images, labels = dataset.test_images[:16], dataset.test_labels[:16]
    response = _upload(ui_url, [(f"{i}.png", base64.b64decode(png_base64(img))) for i, img in enumerate(images)])
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 16 and all(len(r["probabilities"]) == 10 for r in results)
    accuracy = np.mean([r["class_index"] == label for r, label in zip(results, labels, strict=True)])
    assert accuracy >= trained_run.data.metrics["test_accuracy"] - 0.25  # 16 images: a coarse check


def test_ui_health_model_info_and_page(ui_url, production):
    """The UI's /health sees the scoring server, /model_info names the Production version with its alias and
    metrics, and the page renders with the gallery."""
    assert requests.get(f"{ui_url}/health", timeout=10).json() == {"ui": "ok", "scoring_server": "ok"}
    info = requests.get(f"{ui_url}/model_info", timeout=10).json()
    assert info["name"] == config.REGISTERED_MODEL_NAME and info["version"] == production
    assert info["stage"] == "Production" and info["alias"] == "champion" and "test_accuracy" in info["metrics"]
    page = requests.get(ui_url, timeout=10).text
    assert "Fashion-MNIST classifier" in page and "/samples/0.png" in page


@pytest.mark.parametrize("files, status, message", [
    ([], 400, "no file"),
    ([("empty.png", b"")], 400, "empty"),
    ([("notes.png", b"plain text, not an image")], 400, "not an image in an accepted format"),
    ([("x.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)], 400, "x.png"),
])
def test_ui_bad_uploads_get_4xx_and_a_clear_message(ui_url, files, status, message):
    """Each bad upload gets the expected 4xx and message, never a traceback."""
    response = _upload(ui_url, files)
    assert response.status_code == status and message in response.json()["message"]
    assert "Traceback" not in response.text


def test_ui_without_scoring_server_answers_503(tracking_uri, tmp_path, dataset):
    """With no scoring server listening, /predict and /health answer 503 in the UI's own words."""
    from webui.app import create_app

    client = create_app(scoring_url=f"http://127.0.0.1:{free_port()}").test_client()
    response = client.post("/predict", json={"images": [png_base64(dataset.test_images[0])]})
    assert response.status_code == 503 and "not reachable" in response.get_json()["message"]
    assert client.get("/health").status_code == 503


def test_ui_with_a_scoring_server_slower_than_its_timeout_answers_504(dataset):
    """A scoring server that accepts but never answers gives 504 after the UI's upstream timeout."""
    from webui.app import create_app

    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        client = create_app(scoring_url=f"http://127.0.0.1:{silent.getsockname()[1]}",
                            upstream_timeout_s=0.5).test_client()
        response = client.post("/predict", json={"images": [png_base64(dataset.test_images[0])]})
    assert response.status_code == 504 and "did not answer in time" in response.get_json()["message"]


def test_ui_never_imports_torch(tmp_path):
    """Building the UI app imports no torch: the UI stays light and knows nothing of the model."""
    code = "import sys, webui.app; webui.app.create_app(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr
