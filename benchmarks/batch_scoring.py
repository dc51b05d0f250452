"""Batch scoring throughput: Spark (`entrypoints/score.py`'s path, local[2]) against in-process `predict`.

    python benchmarks/batch_scoring.py                    # the Production model of MLFLOW_TRACKING_URI
    python benchmarks/batch_scoring.py --tiny --images 2000

Writes --images real test images as PNG files, then times, in one run: the in-process pyfunc `predict` on the
same files (base64 in the `image` column, in batches of batch.UDF_BATCH_ROWS and of 1,000), and Spark reading
the folder, checking every file and scoring it through `mlflow.pyfunc.spark_udf` to Parquet (session start
excluded, then included). Prints images/s and the ratios.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import mlflow
import pandas as pd
from serve_speed import tiny_registry

from fmnist_pyfunc import batch, cli, config, data, live_model
from fmnist_testkit.images import b64, png_files

LARGE_BATCH = 1000


def in_process(model_uri: str, files: list[Path], rows: int) -> float:
    model = mlflow.pyfunc.load_model(model_uri)
    encoded = [b64(path.read_bytes()) for path in files]
    model.predict(pd.DataFrame({"image": encoded[:rows]}))  # warm-up
    started = time.perf_counter()
    for start in range(0, len(encoded), rows):
        model.predict(pd.DataFrame({"image": encoded[start:start + rows]}))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-uri", default=config.PRODUCTION_MODEL_URI, help="(default: %(default)s)")
    parser.add_argument("--tiny", action="store_true", help="a tiny default-width model in a throwaway registry")
    parser.add_argument("--images", type=int, default=10_000, help="test images to score (default: %(default)s)")
    parser.add_argument("--master", default="local[2]", help="Spark master (default: %(default)s)")
    args = parser.parse_args()
    ds = data.load()
    if args.tiny:
        tiny_registry(ds)
    cli.use_tracking_store()
    version = live_model.download_initial(args.model_uri)[1]
    model_uri = args.model_uri if version is None else f"models:/{config.REGISTERED_MODEL_NAME}/{version}"
    folder = Path(tempfile.mkdtemp(prefix="fmnist-batch-bench-"))
    files = png_files(ds.test_images[:args.images], folder / "in")
    small = in_process(model_uri, files, batch.UDF_BATCH_ROWS)
    large = in_process(model_uri, files, LARGE_BATCH)
    started = time.perf_counter()
    spark = batch.session(args.master, {"spark.ui.enabled": "false", "spark.ui.showConsoleProgress": "false"})
    session_s = time.perf_counter() - started
    batch.score(spark, str(folder / "in"), model_uri, version).write.mode("overwrite").parquet(str(folder / "out"))
    spark_s = time.perf_counter() - started - session_s
    scored = spark.read.parquet(str(folder / "out")).filter("error is null").count()
    spark.stop()
    n = len(files)
    print(f"{n:,} PNG files of real test images, {model_uri}, Spark {args.master}:")
    print(f"  in-process predict, {batch.UDF_BATCH_ROWS} rows a call: {n / small:8.0f} img/s ({small:.1f} s)")
    print(f"  in-process predict, {LARGE_BATCH} rows a call:  {n / large:8.0f} img/s ({large:.1f} s)")
    print(f"  Spark, read + check + spark_udf + Parquet: {n / spark_s:8.0f} img/s ({spark_s:.1f} s; session start "
          f"{session_s:.1f} s more), {scored:,} scored")
    print(f"  Spark / in-process ({batch.UDF_BATCH_ROWS} rows): x{small / spark_s:.2f}; "
          f"/ in-process ({LARGE_BATCH} rows): x{large / spark_s:.2f}")


if __name__ == "__main__":
    main()
