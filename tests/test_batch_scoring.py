"""Batch scoring on Spark (`python -m entrypoints.score`, local[1]) with the session's Production model, on real
test images written as PNG files: exactly the classes the model gives the same files in process, and a file
that is not an image becomes a row with its reason, never a failed job."""

import subprocess

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import REPO

from fmnist_pyfunc import config
from fmnist_pyfunc.inference import BATCH_SIZE
from fmnist_testkit import harness
from fmnist_testkit.images import b64, png_files

pytestmark = pytest.mark.e2e  # one worker runs this module (conftest.ONE_WORKER_MODULES): one Spark at a time

N_FILES = 2000
N_TABLE = 50
# One core: the suite's other workers share the machine, and timing-sensitive tests (the sweep's Ctrl-C, two team
# workers) failed beside two Spark Python workers per test; local[2] is the benchmark's (docs/batch.md).
SPARK = ["--master", "local[1]", "--spark-conf", "spark.ui.enabled=false"]


def _score(tracking_uri: str, source, output) -> subprocess.CompletedProcess:
    command = [str(harness.BIN / "python"), "-m", "entrypoints.score", "--input", str(source), "--output",
               str(output), *SPARK]
    result = subprocess.run(command, cwd=REPO, env=harness.child_env(tracking_uri), capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _in_process(files: list) -> pd.DataFrame:
    """The Production model's answers for the files, in process, in batches it accepts."""
    model = mlflow.pyfunc.load_model(config.PRODUCTION_MODEL_URI)
    encoded = [b64(path.read_bytes()) for path in files]
    return pd.concat([model.predict(pd.DataFrame({"image": encoded[start:start + BATCH_SIZE]}))
                      for start in range(0, len(encoded), BATCH_SIZE)], ignore_index=True)


def test_a_folder_of_png_files_gets_the_in_process_classes_and_a_bad_file_an_error_row(production, tracking_uri,
                                                                                       dataset, tmp_path):
    """2,000 test images as PNG files plus one text file named .png, through Spark: 2,001 rows; every image's
    class equals in-process predict on the same file (probabilities within float noise), the version is the
    Production one, and the text file has no class and the contract's reason in `error`."""
    files = png_files(dataset.test_images[:N_FILES], tmp_path / "in")
    (tmp_path / "in" / "notes.png").write_text("not an image")
    result = _score(tracking_uri, tmp_path / "in", tmp_path / "out.parquet")
    assert f"scored {N_FILES:,} images, 1 unreadable" in result.stdout
    out = pd.read_parquet(tmp_path / "out.parquet")
    assert len(out) == N_FILES + 1 and set(out["model_version"]) == {production}
    bad = out[out["error"].notna()]
    assert bad["path"].str.endswith("notes.png").all() and bad["class_index"].isna().all()
    assert "not an image" in bad["error"].iloc[0]
    good = out[out["error"].isna()].assign(index=lambda d: d["path"].str.extract(r"(\d+)\.png$")[0].astype(int))
    good = good.sort_values("index")
    expected = _in_process(files)
    assert np.array_equal(good["class_index"].to_numpy(), expected["class_index"].to_numpy())
    assert np.allclose(np.stack(good["probabilities"]), np.stack(expected["probabilities"]), atol=1e-5)
    assert np.array_equal(good["in_distribution"].to_numpy(), expected["in_distribution"].to_numpy())


def test_a_parquet_table_of_image_bytes_keeps_its_columns(production, tracking_uri, dataset, tmp_path):
    """A Parquet table with `sku` and `image` (bytes) is scored row by row with its other columns kept; a
    truncated PNG in it gets an error row."""
    files = png_files(dataset.test_images[:N_TABLE], tmp_path / "png")
    rows = [{"sku": f"sku-{i}", "image": path.read_bytes()} for i, path in enumerate(files)]
    rows.append({"sku": "broken", "image": files[0].read_bytes()[:40]})
    pd.DataFrame(rows).to_parquet(tmp_path / "catalog.parquet")
    _score(tracking_uri, tmp_path / "catalog.parquet", tmp_path / "out.parquet")
    out = pd.read_parquet(tmp_path / "out.parquet").set_index("sku")
    assert out.loc["broken", "error"] and pd.isna(out.loc["broken", "class_index"])
    scored = out.drop("broken").loc[[f"sku-{i}" for i in range(N_TABLE)]]
    assert scored["class_index"].tolist() == _in_process(files)["class_index"].tolist()


def test_a_csv_of_paths_reads_each_file_and_reports_a_missing_one(production, tracking_uri, dataset, tmp_path):
    """A CSV table of file paths (plain and `file:` URIs) is scored from the files; a path that does not exist
    is an error row ("could not be read"), not a failed job."""
    files = png_files(dataset.test_images[:3], tmp_path / "png")
    table = pd.DataFrame({"sku": ["a", "b", "c", "gone"],
                          "path": [str(files[0]), f"file:{files[1]}", str(files[2]), str(tmp_path / "gone.png")]})
    table.to_csv(tmp_path / "catalog.csv", index=False)
    _score(tracking_uri, tmp_path / "catalog.csv", tmp_path / "out.parquet")
    out = pd.read_parquet(tmp_path / "out.parquet").set_index("sku")
    assert out.loc["gone", "error"] == "the file could not be read"
    assert out.loc[["a", "b", "c"], "class_index"].tolist() == _in_process(files)["class_index"].tolist()
