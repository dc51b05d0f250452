"""The Open Inference Protocol (KServe V2, Triton's HTTP/REST API) for the served model, with the binary
tensor data extension: what Triton, KServe and their clients (`tritonclient`) speak.

    GET  /v2                                   server metadata
    GET  /v2/health/live, /v2/health/ready     200 while the worker runs / has a model
    GET  /v2/models/NAME[/versions/V]          model metadata: its input and output tensors
    GET  /v2/models/NAME[/versions/V]/ready
    POST /v2/models/NAME[/versions/V]/infer    one input tensor, in rows of images:
         "pixels"  UINT8 (0-255) or FP32 (0-255, or 0-1 as in docs/serving.md), shape [N, 28, 28] or [N, 784]
         "image"   BYTES [N] (or [N, 1]): encoded images; in JSON each element is base64 text
    -> "class_index" INT64 [N], "class_name" BYTES [N], "probabilities" FP32 [N, 10], and from models with the
       detector "in_distribution" BOOL [N], "ood_score" FP64 [N].
Binary data: the JSON header first, its length in the Inference-Header-Content-Length header, then each
binary tensor's bytes in order (little-endian; BYTES elements each after a 4-byte length); an input names
its size in `parameters.binary_data_size`; outputs come binary when `parameters.binary_data` (per output) or
`binary_data_output` (per request) is true. Errors are {"error": "<reason>"} (the scoring server adds its
usual fields). Rows go through the pyfunc model's own `predict`: the same contract, limits and answers
as /invocations.
"""

from __future__ import annotations

import base64
import math
import re
import struct
from dataclasses import dataclass

import numpy as np
import orjson
import pandas as pd

from fmnist_pyfunc import transport
from fmnist_pyfunc.data import IMAGE_SIZE, NUM_CLASSES

SERVER_NAME = "fmnist-scoring"
EXTENSIONS = ["binary_tensor_data"]
HEADER_LENGTH = "inference-header-content-length"
BINARY_SIZE = "binary_data_size"
BINARY_CONTENT_TYPE = "application/octet-stream"
PLATFORM = "mlflow_pyfunc"
PIXELS, IMAGE = "pixels", "image"
# The protocol's tensor types for pixels -> numpy's, little-endian as the binary extension sends them.
PIXEL_TYPES = {"UINT8": "<u1", "UINT16": "<u2", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP16": "<f2",
               "FP32": "<f4", "FP64": "<f8"}
LENGTH_PREFIX = struct.Struct("<I")  # each BYTES element's length, as the binary extension writes it
# name -> (datatype, numpy type, size of a row's tensor: None for one value); models without the detector
# answer the first three only.
OUTPUTS = {"class_index": ("INT64", "<i8", None), "class_name": ("BYTES", None, None),
           "probabilities": ("FP32", "<f4", NUM_CLASSES), "in_distribution": ("BOOL", "?", None),
           "ood_score": ("FP64", "<f8", None)}
DETECTOR_OUTPUTS = ("in_distribution", "ood_score")
PATH = re.compile(r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<action>/ready|/infer)?")


class ProtocolError(ValueError):
    """A request the protocol cannot answer; `status` is its HTTP status."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class InferRequest:
    frame: pd.DataFrame               # one row per image, as the pyfunc model takes it
    outputs: list[tuple[str, bool]]   # the outputs asked for, each with whether it goes binary
    id: str | None


def server_metadata(version: str) -> dict:
    return {"name": SERVER_NAME, "version": version, "extensions": EXTENSIONS}


def output_names(with_detector: bool) -> list[str]:
    return [name for name in OUTPUTS if with_detector or name not in DETECTOR_OUTPUTS]


def model_metadata(name: str, version: str | None, with_detector: bool) -> dict:
    outputs = [{"name": output, "datatype": OUTPUTS[output][0],
                "shape": [-1, OUTPUTS[output][2]] if OUTPUTS[output][2] else [-1]}
               for output in output_names(with_detector)]
    return {"name": name, "versions": [version] if version else [], "platform": PLATFORM,
            "inputs": [{"name": PIXELS, "datatype": "UINT8", "shape": [-1, IMAGE_SIZE, IMAGE_SIZE]},
                       {"name": IMAGE, "datatype": "BYTES", "shape": [-1]}],
            "outputs": outputs}


def parse_infer(body: bytes, header_length: bytes | None, with_detector: bool) -> InferRequest:
    """An inference request, JSON or JSON + binary data -> the rows and what to answer; ProtocolError says
    what is wrong."""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise ProtocolError(f"Inference-Header-Content-Length {header_length.decode('latin-1')!r} is not a "
                                f"length within the body of {len(body)} bytes")
        split = int(header_length)
        header, binary = body[:split], memoryview(body)[split:]
    else:
        header, binary = body, memoryview(b"")
    try:
        request = transport.loads(header)
    except ValueError as exc:
        raise ProtocolError(f"the request header is not JSON ({exc})") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list) or len(request["inputs"]) != 1:
        raise ProtocolError(f'send one input tensor: {{"inputs": [{{"name": "{PIXELS}", "datatype": "UINT8", '
                            f'"shape": [N, 28, 28], "data": [...]}}]}} or "{IMAGE}" (BYTES [N])')
    frame, used = input_frame(request["inputs"][0], binary)
    if used != len(binary):
        raise ProtocolError(f"the body has {len(binary)} bytes of binary data, the inputs name {used}")
    return InferRequest(frame, requested_outputs(request, with_detector), _request_id(request))


def _request_id(request: dict) -> str | None:
    value = request.get("id")
    return value if isinstance(value, str) else None


def requested_outputs(request: dict, with_detector: bool) -> list[tuple[str, bool]]:
    parameters = request.get("parameters") if isinstance(request.get("parameters"), dict) else {}
    binary = bool(parameters.get("binary_data_output", False))
    asked = request.get("outputs")
    known = output_names(with_detector)
    if asked is None:
        return [(name, binary) for name in known]
    if not isinstance(asked, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in asked):
        raise ProtocolError('"outputs" must be a list of {"name": ...}')
    chosen = []
    for output in asked:
        if output["name"] not in known:
            raise ProtocolError(f"unknown output {output['name']!r}; this model answers {', '.join(known)}")
        parameters = output.get("parameters") if isinstance(output.get("parameters"), dict) else {}
        chosen.append((output["name"], bool(parameters.get("binary_data", binary))))
    return chosen


def input_frame(tensor, binary: memoryview) -> tuple[pd.DataFrame, int]:
    """One input tensor -> (the model's rows, the bytes of binary data it used)."""
    if not isinstance(tensor, dict) or tensor.get("name") not in (PIXELS, IMAGE):
        name = tensor.get("name") if isinstance(tensor, dict) else None
        raise ProtocolError(f"unknown input {name!r}: send '{PIXELS}' (UINT8 or FP32 [N, 28, 28]) or "
                            f"'{IMAGE}' (BYTES [N] of encoded images)")
    name, datatype, shape = tensor["name"], tensor.get("datatype"), tensor.get("shape")
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ProtocolError(f"input {name!r}: 'shape' must be a list of sizes, e.g. [N, 28, 28]")
    parameters = tensor.get("parameters") if isinstance(tensor.get("parameters"), dict) else {}
    size = parameters.get(BINARY_SIZE)
    if size is not None and (not isinstance(size, int) or not 0 <= size <= len(binary)):
        raise ProtocolError(f"input {name!r}: binary_data_size {size!r} exceeds the {len(binary)} bytes of "
                            "binary data")
    if size is None and "data" not in tensor:
        raise ProtocolError(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
    raw = binary[:size] if size is not None else None
    if name == PIXELS:
        return pd.DataFrame({PIXELS: list(pixel_tensor(datatype, shape, tensor.get("data"), raw))}), size or 0
    return pd.DataFrame({IMAGE: image_tensor(datatype, shape, tensor.get("data"), raw)}), size or 0


def pixel_tensor(datatype, shape: list[int], data, raw: memoryview | None) -> np.ndarray:
    """(N, 28, 28) pixels of the given type, from JSON data (flat or nested) or raw little-endian bytes."""
    if datatype not in PIXEL_TYPES:
        raise ProtocolError(f"input 'pixels': datatype {datatype!r} is not a number type; send UINT8 (0-255) or "
                            "FP32")
    image = IMAGE_SIZE * IMAGE_SIZE
    if shape[1:] not in ([IMAGE_SIZE, IMAGE_SIZE], [image]):
        raise ProtocolError(f"input 'pixels': shape {shape} must be [N, 28, 28] or [N, 784]")
    dtype = np.dtype(PIXEL_TYPES[datatype])
    if raw is not None:
        if len(raw) != math.prod(shape) * dtype.itemsize:
            raise ProtocolError(f"input 'pixels': {len(raw)} bytes of binary data for shape {shape} of {datatype} "
                                f"(that is {math.prod(shape) * dtype.itemsize} bytes)")
        values = np.frombuffer(raw, dtype)
    else:
        try:
            values = np.asarray(data, dtype)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ProtocolError(f"input 'pixels': data is not a list of {datatype} numbers ({exc})") from None
        if values.size != math.prod(shape):
            raise ProtocolError(f"input 'pixels': {values.size} values for shape {shape}")
    return values.reshape(shape[0], IMAGE_SIZE, IMAGE_SIZE)


def image_tensor(datatype, shape: list[int], data, raw: memoryview | None) -> list[str]:
    """BYTES [N] or [N, 1] of encoded images -> base64 text per row, as the model's `image` column takes it."""
    if datatype != "BYTES" or math.prod(shape[1:]) != 1:
        raise ProtocolError(f"input 'image' must be BYTES of shape [N] (or [N, 1]), got {datatype} {shape}")
    rows = shape[0]
    if raw is None:
        if not isinstance(data, list) or len(data) != rows or not all(isinstance(v, str) for v in data):
            raise ProtocolError(f"input 'image': JSON data must be {rows} strings of base64 images (or send the "
                                "files' bytes as binary data)")
        return data
    images, offset = [], 0
    for _ in range(rows):
        if offset + LENGTH_PREFIX.size > len(raw):
            raise ProtocolError(f"input 'image': binary data ends after {len(images)} of {rows} elements")
        (length,) = LENGTH_PREFIX.unpack_from(raw, offset)
        offset += LENGTH_PREFIX.size
        if offset + length > len(raw):
            raise ProtocolError(f"input 'image': element {len(images)} is cut short")
        images.append(base64.b64encode(raw[offset:offset + length]).decode("ascii"))
        offset += length
    if offset != len(raw):
        raise ProtocolError(f"input 'image': {len(raw) - offset} bytes after the {rows} elements")
    return images


def output_tensor(name: str, predictions: pd.DataFrame) -> np.ndarray:
    datatype, dtype, _ = OUTPUTS[name]
    column = predictions[name]
    if datatype == "BYTES":
        return np.array([str(value).encode() for value in column], dtype=object)
    if name == "probabilities":
        return np.array(column.tolist(), dtype=dtype).reshape(len(column), NUM_CLASSES)
    return column.to_numpy(dtype=dtype)


def serialize_bytes(values: np.ndarray) -> bytes:
    return b"".join(LENGTH_PREFIX.pack(len(v)) + v for v in values)


def infer_response(request: InferRequest, predictions: pd.DataFrame, name: str, version: str | None
                   ) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]]:
    """The answer's body, content type and other headers: JSON, or a JSON header + binary outputs."""
    outputs, chunks = [], []
    for output, binary in request.outputs:
        values = output_tensor(output, predictions)
        entry = {"name": output, "datatype": OUTPUTS[output][0], "shape": list(values.shape)}
        if binary:
            chunk = serialize_bytes(values) if values.dtype == object else values.tobytes()
            entry["parameters"] = {BINARY_SIZE: len(chunk)}
            chunks.append(chunk)
        else:
            entry["data"] = ([v.decode() for v in values] if values.dtype == object else values.reshape(-1).tolist())
        outputs.append(entry)
    answer = {"model_name": name, "model_version": version or "", "outputs": outputs}
    if request.id is not None:
        answer["id"] = request.id
    header = orjson.dumps(answer)
    if not chunks:
        return header, b"application/json", []
    length = (HEADER_LENGTH.encode(), str(len(header)).encode())
    return header + b"".join(chunks), BINARY_CONTENT_TYPE.encode(), [length]
