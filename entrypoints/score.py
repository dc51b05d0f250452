"""Score a whole catalog of images on Spark, with the registry's model: a folder or a table in, Parquet out.

    python -m entrypoints.score --input photos/ --output scored.parquet
    python -m entrypoints.score --input catalog.parquet --output scored.parquet --master spark://host:7077
    mlflow run . -e score --env-manager local -P input=photos/ -P output=scored.parquet
Input: a folder of images (recursively), or a .parquet/.csv table with `path` (image files) or `image`
(bytes, or base64 in CSV). Output: one row per image with the class, the probabilities, the
out-of-distribution fields, the model URI and version, and `error` for a file the model cannot read (the job
never fails on one). fmnist_pyfunc/batch.py has the details; needs Java 17 and pyspark (`pip install -e
".[spark]"`, which `make test` installs).
"""

from __future__ import annotations

import argparse
import sys
import time

from fmnist_pyfunc import cli, config

DEFAULT_MASTER = "local[*]"


def _conf(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="a folder of images, or a .parquet or .csv table")
    parser.add_argument("--output", required=True, help="where to write the scored Parquet (replaced)")
    parser.add_argument("--model-uri", default=config.PRODUCTION_MODEL_URI, help="(default: %(default)s)")
    parser.add_argument("--master", default=DEFAULT_MASTER, help="Spark master (default: %(default)s)")
    parser.add_argument("--spark-conf", type=_conf, action="append", default=[], metavar="KEY=VALUE",
                        help="more Spark settings, e.g. spark.ui.enabled=false (repeatable)")
    args = parser.parse_args(argv)
    try:
        import pyspark  # noqa: F401  (only to say what is missing before any work)
    except ImportError:
        parser.error('pyspark is not installed: pip install -e ".[spark]" (make test installs it)')
    from mlflow.exceptions import MlflowException

    from fmnist_pyfunc import batch, live_model

    cli.use_tracking_store()
    try:
        version = live_model.download_initial(args.model_uri)[1]
    except (MlflowException, OSError, LookupError) as exc:
        parser.error(f"cannot load {args.model_uri} ({str(exc).splitlines()[0]}); train and promote a model first")
    if version:  # score one version throughout, whatever is promoted meanwhile
        args.model_uri = f"models:/{live_model.REFERENCE.fullmatch(args.model_uri)['name']}/{version}"
    spark = batch.session(args.master, dict(args.spark_conf))
    started = time.perf_counter()
    try:
        scored = batch.score(spark, args.input, args.model_uri, version)
        scored.write.mode("overwrite").parquet(args.output)
        written = spark.read.parquet(args.output)
        total, errors = written.count(), written.filter("error is not null").count()
    except ValueError as exc:
        parser.error(str(exc))
    finally:
        elapsed = time.perf_counter() - started
    spark.stop()
    print(f"scored {total - errors:,} images, {errors:,} unreadable (see `error`), in {elapsed:.1f} s with "
          f"{args.model_uri} -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
