"""MLflow's `/invocations` protocol, with each request body parsed once.

MLflow 3.17.2's scoring server parses a JSON body with the standard library twice (`_parse_json_data`, then
`_split_data_and_params` on the raw bytes again), and its answer is written by `json.dump`; for 256 images
that is ~19 ms of parsing and ~4 ms of writing around a ~66 ms forward pass (measured on the EPYC with bf16).
Here the body is parsed once with orjson and MLflow's own functions take the parsed payload (each accepts a
dict as is), so every input form MLflow documents (dataframe_records, dataframe_split, inputs, instances,
Parquet) gives the same frame, the same answers and the same errors. CSV is parsed here: MLflow asks pandas
for one type per signature column and refuses `pixels`' AnyType for every CSV, even one of base64 images.
Nothing here knows the model beyond its signature.
"""

from __future__ import annotations

import io

import orjson
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import BAD_REQUEST
from mlflow.pyfunc import scoring_server as mlflow_server
from mlflow.pyfunc.utils.serving_data_parser import is_unified_llm_input
from mlflow.utils.proto_json_utils import MlflowInvalidInputException

from fmnist_pyfunc import transport

JSON, CSV, PARQUET = mlflow_server.CONTENT_TYPE_JSON, mlflow_server.CONTENT_TYPE_CSV, mlflow_server.CONTENT_TYPE_PARQUET
# A CSV cell can hold an image as base64 text, or 28x28 pixels as JSON text: "[[0, 0, ...], ...]".
JSON_CELL_COLUMNS = ("pixels",)


class UnsupportedMedia(ValueError):
    """A Content-Type this protocol does not take (HTTP 415); the message says which it does."""


def media_type(content_type: str) -> str:
    """The media type of a Content-Type header, or UnsupportedMedia for what MLflow's server refuses too: a
    charset other than UTF-8, or any other parameter."""
    mime, *parameters = [part.strip() for part in content_type.split(";")]
    values = {key.strip().lower(): value.strip() for key, _, value in (p.partition("=") for p in parameters)}
    if values.pop("charset", "utf-8").lower() != "utf-8":
        raise UnsupportedMedia("The scoring server only supports UTF-8")
    if values:
        raise UnsupportedMedia(f"Unrecognized content type parameters: {', '.join(values)}. "
                               f"{mlflow_server.SCORING_PROTOCOL_CHANGE_INFO}")
    if mime not in mlflow_server.CONTENT_TYPES:
        raise UnsupportedMedia(f"This predictor only supports the following content types: Types: "
                               f"{mlflow_server.CONTENT_TYPES}. Got '{content_type}'.")
    return mime


def loads(body: bytes) -> object:
    """The body as JSON, with MLflow's message for what is not JSON."""
    try:
        return transport.loads(body)
    except ValueError as exc:
        raise MlflowInvalidInputException(f"Ensure that input is a valid JSON formatted string. Error: '{exc!r}'"
                                          ) from None


def parse(body: bytes, content_type: str, model) -> tuple[object, dict | None, bool]:
    """The request -> (what `model.predict` takes, its params, whether the answer is unwrapped: MLflow's
    unified LLM format). MlflowException (400) for a malformed body; UnsupportedMedia for the wrong type."""
    mime = media_type(content_type)
    if mime == CSV:
        return parse_csv(body), None, False
    if mime == PARQUET:
        return mlflow_server.parse_parquet_input(io.BytesIO(body)), None, False
    payload = loads(body)
    if isinstance(payload, list):
        raise MlflowInvalidInputException(f"{mlflow_server.REQUIRED_INPUT_FORMAT}. Received a list.")
    if not isinstance(payload, dict):
        raise MlflowInvalidInputException(
            f"{mlflow_server.REQUIRED_INPUT_FORMAT}. Received unexpected input type '{type(payload)}.")
    parsed = mlflow_server._parse_json_data(payload, model.metadata, model.metadata.get_input_schema())  # a dict as is
    return parsed.data, parsed.params, parsed.is_unified_llm_input or is_unified_llm_input(payload)


def parse_csv(body: bytes) -> pd.DataFrame:
    """A CSV with a header row, every cell read as text (base64 images stay strings); `pixels` cells are JSON
    text. Empty cells are missing values, as the contract expects of the column a row does not use."""
    try:
        frame = pd.read_csv(io.BytesIO(body), dtype=str, encoding="utf-8")
        for column in set(JSON_CELL_COLUMNS) & set(frame.columns):
            frame[column] = [transport.loads(cell) if isinstance(cell, str) else cell for cell in frame[column]]
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        # JSON's errors and pandas' EmptyDataError are ValueErrors
        raise MlflowException(
            "Failed to parse input as a Pandas DataFrame. Ensure that the input is a valid CSV-formatted Pandas "
            f"DataFrame produced using the `pandas.DataFrame.to_csv()` method. Error: '{exc}'",
            error_code=BAD_REQUEST) from None
    return frame


def predict(model, data, params: dict | None):
    """`model.predict` as MLflow's server calls it: its own errors pass through, anything else is a 400."""
    try:
        return model.predict(data, params=params)
    except MlflowException:
        raise
    except Exception:
        raise MlflowException("Encountered an unexpected error while evaluating the model. Verify that the "
                              "serialized input Dataframe is compatible with the model for inference.",
                              error_code=BAD_REQUEST) from None


def records(frame: pd.DataFrame) -> list[dict]:
    """`frame.to_dict(orient="records")`, the same values (Series.tolist gives Python's types as to_dict
    does), at a fraction of its cost: to_dict spends ~0.7 ms on a one-row answer, more than parsing it."""
    columns = {name: frame[name].tolist() for name in frame.columns}
    return [dict(zip(columns, row, strict=True)) for row in zip(*columns.values(), strict=True)]


def dumps(predictions, unwrapped: bool = False) -> bytes:
    """The answer, as MLflow writes it ({"predictions": [records]}, or the records alone), with orjson."""
    if isinstance(predictions, pd.DataFrame):
        answer = records(predictions)
    else:
        answer = mlflow_server._get_jsonable_obj(predictions, pandas_orient="records")
    return orjson.dumps(answer if unwrapped else {"predictions": answer},
                        option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)
