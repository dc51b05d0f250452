"""Batch scoring on Spark: a folder or a table of images through MLflow's own `mlflow.pyfunc.spark_udf`.

    read_images -> checked -> score -> Parquet
Input: a folder of image files (read recursively with Spark's `binaryFile` source), or a Parquet or CSV table
with a column `path` (files the executors can open) or `image` (the encoded image: bytes in Parquet, base64 in
CSV), and any other columns, which are kept. Every row is first checked by the model's own input contract in a
pandas UDF (contract.py: format, size, a full decode), so a bad or unreadable file becomes a row with `error`
set and never fails a Spark task; the good rows go to the pyfunc model through `spark_udf` in batches of
UDF_BATCH_ROWS. Output: Parquet with `path` (or the table's columns), `class_index`, `class_name`,
`probabilities`, `in_distribution`, `ood_score`, `model_uri`, `model_version` and `error`. The check decodes
each image once more than serving does: the price of a job that cannot crash on one file.
"""

from __future__ import annotations

import base64
import os
import sys
import time
from pathlib import Path

import pandas as pd

from fmnist_pyfunc import contract

# Rows per call of the model: the UI's per-request maximum, which the model's per-request pixel budget admits
# even for phone photos (contract.MAX_REQUEST_PIXELS); tiny images lose little to the smaller batches.
UDF_BATCH_ROWS = 16
TASKS_PER_CORE = 4     # enough for the slow tasks to be balanced out, few enough that each runs thousands of rows
RESULT_TYPE = ("class_index long, class_name string, probabilities array<double>, in_distribution boolean, "
               "ood_score double")
OUTPUT_COLUMNS = ("class_index", "class_name", "probabilities", "in_distribution", "ood_score")
TABLE_FORMATS = {".parquet": "parquet", ".csv": "csv"}
MAX_ERROR_CHARS = 300


def session(master: str, conf: dict[str, str]):
    """A SparkSession whose Python workers run this interpreter (the venv with the model's dependencies)."""
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = (SparkSession.builder.master(master).appName("fmnist-score")
               .config("spark.sql.execution.arrow.maxRecordsPerBatch", str(UDF_BATCH_ROWS))
               .config("spark.ui.showConsoleProgress", "true")  # the progress bar on stderr
               # Spark runs a task per core already: torch's own thread pool in each would fight for them
               # (one thread each: 335 against 267 images/s on 2 cores, benchmarks/batch_scoring.py)
               .config("spark.executorEnv.OMP_NUM_THREADS", "1"))
    for key, value in conf.items():
        builder = builder.config(key, value)
    return builder.getOrCreate()


def read_images(spark, source: str):
    """A DataFrame with the column `image` (base64 text) beside the source's own columns (`path` for files)."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import StringType

    path = Path(source)
    if path.is_dir():
        files = spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(str(path))
        return files.select("path", F.base64("content").alias("image"))
    kind = TABLE_FORMATS.get(path.suffix.lower())
    if kind is None or not path.exists():
        raise ValueError(f"{source}: give a folder of images, or a .parquet or .csv table")
    table = spark.read.parquet(str(path)) if kind == "parquet" else spark.read.option("header", "true").csv(str(path))
    if "image" in table.columns:
        is_bytes = dict(table.dtypes)["image"] == "binary"
        return table.withColumn("image", F.base64("image")) if is_bytes else table
    if "path" not in table.columns:
        raise ValueError(f"{source}: the table needs a column `image` (encoded images) or `path` (image files)")
    return table.withColumn("image", F.pandas_udf(read_files, StringType())("path"))


def read_files(paths: pd.Series) -> pd.Series:
    """Each path's file as base64 text, or None where it cannot be read (the check reports it). Paths are those
    the executors can open: a local or shared filesystem (`file:` URIs too); give object stores as a folder."""
    encoded = []
    for path in paths:
        try:
            encoded.append(base64.b64encode(Path(str(path).removeprefix("file:")).read_bytes()).decode())
        except OSError:
            encoded.append(None)
    return pd.Series(encoded, dtype=object)


def check_rows(images: pd.Series) -> pd.Series:
    """Per row, None if the model will read it, else why not (the contract's own message)."""
    errors = []
    for encoded in images:
        if encoded is None:
            errors.append("the file could not be read")
            continue
        try:
            rows = contract.open_rows(pd.DataFrame({"image": [encoded]}))
            contract.decode_rows(rows, time.monotonic() + contract.MAX_REQUEST_SECONDS)
            errors.append(None)
        except (contract.InputError, contract.DeadlineExceeded) as exc:
            errors.append(str(exc).replace("row 0: ", "")[:MAX_ERROR_CHARS])
    return pd.Series(errors, dtype=object)


def score(spark, source: str, model_uri: str, model_version: str | None):
    """The scored DataFrame: the good rows' predictions and the bad rows' errors."""
    import mlflow
    from pyspark.sql import functions as F
    from pyspark.sql.types import StringType

    images = read_images(spark, source)
    # Spark packs small files a few dozen to a partition: 10,000 PNGs made 300+ tasks, each paying the Python
    # workers' start and the model's hand-over. A few tasks per core do the same work (merged, no shuffle).
    tasks = spark.sparkContext.defaultParallelism * TASKS_PER_CORE
    if images.rdd.getNumPartitions() > tasks:
        images = images.coalesce(tasks)
    checked = images.withColumn("error", F.pandas_udf(check_rows, StringType())("image")).cache()
    predict = mlflow.pyfunc.spark_udf(spark, model_uri, result_type=RESULT_TYPE, env_manager="local")
    keep = [c for c in images.columns if c != "image"]
    good = (checked.filter(F.col("error").isNull())
            .withColumn("prediction", predict(F.struct("image")))
            .select(*keep, *[F.col(f"prediction.{c}").alias(c) for c in OUTPUT_COLUMNS], "error"))
    bad = checked.filter(F.col("error").isNotNull()).select(
        *keep, *[F.lit(None).cast(t).alias(c) for c, t in zip(OUTPUT_COLUMNS, _output_types(), strict=True)],
        "error")
    return (good.unionByName(bad)
            .withColumn("model_uri", F.lit(model_uri)).withColumn("model_version", F.lit(model_version)))


def _output_types() -> list[str]:
    return [field.strip().split(" ", 1)[1] for field in RESULT_TYPE.split(",")]
