"""The Open Inference Protocol (KServe V2 / Triton REST) on the scoring server, checked with a client nobody
here wrote (`tritonclient[http]`), JSON and binary tensor data, against /invocations' answers."""

import base64
import json

import numpy as np
import pandas as pd
import pytest
import requests
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from fmnist_pyfunc import config, open_inference
from fmnist_testkit.images import image_bytes, photo_jpeg, upscaled

N_IMAGES = 64
NAME = config.REGISTERED_MODEL_NAME


def _client(scoring_url: str) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(url=scoring_url.removeprefix("http://"))


def _invocations(scoring_url: str, rows: list[dict]) -> pd.DataFrame:
    response = requests.post(f"{scoring_url}/invocations", json={"dataframe_records": rows}, timeout=60)
    assert response.status_code == 200, response.text[:300]
    return pd.DataFrame(response.json()["predictions"])


def _assert_same(result: triton.InferResult, expected: pd.DataFrame) -> None:
    """class_index, class_name, probabilities and the detector's fields are /invocations' answers."""
    assert np.array_equal(result.as_numpy("class_index"), expected["class_index"])
    names = [n.decode() if isinstance(n, bytes) else n for n in result.as_numpy("class_name")]  # binary: bytes
    assert names == expected["class_name"].tolist()
    np.testing.assert_allclose(result.as_numpy("probabilities"), np.array(expected["probabilities"].tolist()),
                               rtol=1e-6, atol=1e-7)  # FP32 on the wire: /invocations writes float64
    assert np.array_equal(result.as_numpy("in_distribution"), expected["in_distribution"].astype(bool))
    np.testing.assert_allclose(result.as_numpy("ood_score"), expected["ood_score"], rtol=1e-6, atol=1e-6)


@pytest.mark.e2e
def test_tritonclient_sees_a_live_ready_server_and_the_models_tensors(scoring_url, production):
    """Server and model metadata, liveness and readiness, as Triton's client reads them."""
    client = _client(scoring_url)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(NAME) and client.is_model_ready(NAME, str(production))
    assert not client.is_model_ready(NAME, "999") and not client.is_model_ready("another-model")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    metadata = client.get_model_metadata(NAME)
    assert metadata["versions"] == [str(production)]
    assert {i["name"]: (i["datatype"], i["shape"]) for i in metadata["inputs"]} == {
        "pixels": ("UINT8", [-1, 28, 28]), "image": ("BYTES", [-1])}
    assert [o["name"] for o in metadata["outputs"]] == list(open_inference.OUTPUTS)


@pytest.mark.e2e
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_pixel_tensors_give_the_invocations_answers(scoring_url, dataset, binary):
    """UINT8 pixels [N, 28, 28] and FP32 pixels on the 0-1 scale, sent as JSON or binary tensor data (outputs
    likewise), give exactly /invocations' answers for the same images."""
    images = dataset.test_images[:N_IMAGES]
    expected = _invocations(scoring_url, [{"pixels": image.tolist()} for image in images])
    client = _client(scoring_url)
    outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in open_inference.OUTPUTS]
    for values, datatype in ((images, "UINT8"), (images.astype(np.float32) / 255, "FP32")):
        tensor = triton.InferInput("pixels", list(values.shape), datatype)
        tensor.set_data_from_numpy(values, binary_data=binary)
        result = client.infer(NAME, [tensor], outputs=outputs, request_id="r-1")
        _assert_same(result, expected)
        assert result.get_response()["id"] == "r-1" and result.get_response()["model_name"] == NAME


@pytest.mark.e2e
def test_encoded_images_as_bytes_tensors_give_the_invocations_answers(scoring_url, dataset):
    """A BYTES tensor of PNG and JPEG files (binary) or of their base64 text (JSON) is answered as the same
    images in /invocations' `image` column; with no outputs named, all come back binary."""
    images = dataset.test_images[:16]
    files = [image_bytes(upscaled(image)) for image in images[:8]]
    files += [base64.b64decode(photo_jpeg(image)) for image in images[8:]]
    expected = _invocations(scoring_url, [{"image": base64.b64encode(f).decode()} for f in files])
    client = _client(scoring_url)
    tensor = triton.InferInput("image", [len(files)], "BYTES")
    tensor.set_data_from_numpy(np.array(files, dtype=object), binary_data=True)
    _assert_same(client.infer(NAME, [tensor]), expected)
    text = triton.InferInput("image", [len(files), 1], "BYTES")
    text.set_data_from_numpy(np.array([[base64.b64encode(f)] for f in files], dtype=object), binary_data=False)
    _assert_same(client.infer(NAME, [text]), expected)


@pytest.mark.e2e
def test_bad_infer_requests_get_the_protocols_error_and_the_server_goes_on(scoring_url, dataset, production):
    """Wrong shapes, sizes, names, datatypes and versions get 4xx with {"error": reason} (tritonclient raises
    it); a row the model's contract refuses too; the model identity headers come with every answer."""
    infer = f"{scoring_url}/v2/models/{NAME}/infer"
    image = dataset.test_images[0]

    def pixels(shape, data, datatype="UINT8") -> dict:
        return {"inputs": [{"name": "pixels", "datatype": datatype, "shape": shape, "data": data}]}

    cases = {
        "wrong shape": (pixels([1, 27, 28], [0] * 27 * 28), 400, "must be [N, 28, 28]"),
        "too few values": (pixels([2, 28, 28], image.reshape(-1).tolist()), 400, "784 values for shape"),
        "out of UINT8's range": (pixels([1, 28, 28], [300] * 784), 400, "UINT8"),
        "text": (pixels([1, 28, 28], ["a"] * 784, "BYTES"), 400, "not a number type"),
        "unknown input": ({"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1], "data": [0]}]}, 400,
                          "unknown input 'x'"),
        "unknown output": ({**pixels([1, 28, 28], image.reshape(-1).tolist()), "outputs": [{"name": "logits"}]},
                           400, "unknown output 'logits'"),
        "not base64": ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]}, 400,
                       "not valid base64"),
        "NaN pixels": (pixels([1, 28, 28], [0.5] * 783 + [float("nan")], "FP32"), 400, "NaN"),
    }
    for name, (body, status, words) in cases.items():
        response = requests.post(infer, data=json.dumps(body), timeout=30)
        assert response.status_code == status, (name, response.text)
        assert words in response.json()["error"], (name, response.json())
        assert response.headers["X-Model-Version"] == str(production), name
    binary = requests.post(infer, data=b'{"inputs": []}' + bytes(10), headers={"Inference-Header-Content-Length": "99"})
    assert binary.status_code == 400 and "Inference-Header-Content-Length" in binary.json()["error"]
    for path, status in ((f"/v2/models/{NAME}/versions/999/infer", 404), ("/v2/models/other/infer", 404),
                         (f"/v2/models/{NAME}/infer/more", 404)):
        response = requests.post(scoring_url + path, json=pixels([1, 28, 28], image.reshape(-1).tolist()))
        assert response.status_code == status and "error" in response.json(), path
    assert requests.get(infer, timeout=5).status_code == 405
    with pytest.raises(InferenceServerException, match="must be"):
        tensor = triton.InferInput("pixels", [1, 28], "UINT8")
        tensor.set_data_from_numpy(np.zeros((1, 28), np.uint8))
        _client(scoring_url).infer(NAME, [tensor])
    good = requests.post(infer, json=pixels([1, 28, 28], image.reshape(-1).tolist()), timeout=30)
    assert good.status_code == 200 and good.headers[config.PREDICTION_ID_HEADER]


def test_binary_bodies_are_read_as_the_extension_lays_them_out():
    """Parsing alone: a JSON header then raw tensors; sizes that do not add up are refused; a BYTES tensor's
    elements each follow a 4-byte little-endian length; an answer's binary outputs read back in tritonclient."""
    images = np.arange(2 * 784, dtype=np.uint8).reshape(2, 28, 28)
    header = json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [2, 784],
                                     "parameters": {"binary_data_size": images.nbytes}}]}).encode()
    request = open_inference.parse_infer(header + images.tobytes(), str(len(header)).encode(), True)
    assert np.array_equal(np.stack(request.frame["pixels"]), images)
    with pytest.raises(open_inference.ProtocolError, match="binary data"):
        open_inference.parse_infer(header + images.tobytes() + b"x", str(len(header)).encode(), True)
    files = [b"\x89PNG first", b"second"]
    raw = b"".join(len(f).to_bytes(4, "little") + f for f in files)
    header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()
    frame = open_inference.parse_infer(header + raw, str(len(header)).encode(), True).frame
    assert [base64.b64decode(v) for v in frame["image"]] == files
    too_long = raw[:len(raw) - len(files[1]) - 4] + (len(files[1]) + 1).to_bytes(4, "little") + files[1]
    with pytest.raises(open_inference.ProtocolError, match="cut short"):
        open_inference.parse_infer(header + too_long, str(len(header)).encode(), True)
    predictions = pd.DataFrame({"class_index": [3, 9], "class_name": ["Dress", "Ankle boot"],
                                "probabilities": [[0.1] * 10, [0.2] * 10], "in_distribution": [True, False],
                                "ood_score": [0.5, 1.5]})
    asked = open_inference.InferRequest(None, [("class_name", True), ("probabilities", True), ("ood_score", False)],
                                        "x")
    body, _, headers = open_inference.infer_response(asked, predictions, NAME, "4")
    length = int(dict(headers)[open_inference.HEADER_LENGTH.encode()])
    result = triton.InferResult.from_response_body(body, header_length=length)
    assert result.as_numpy("class_name").tolist() == [b"Dress", b"Ankle boot"]
    assert result.as_numpy("probabilities").shape == (2, 10) and result.as_numpy("ood_score").tolist() == [0.5, 1.5]
