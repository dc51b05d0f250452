"""Shared fixtures: the real dataset, an isolated tracking store, and one tiny trained model."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import mlflow
import pytest

from fmnist_pyfunc import config
from fmnist_testkit import harness
from fmnist_testkit.harness import child_env, free_port

REPO = Path(__file__).resolve().parents[1]
# The smallest training run that still exercises every code path: ~20 s on 2 CPU cores.
TINY_TRAIN = {"epochs": "2", "max_train_samples": "6000", "width": "16", "val_size": "1000",
              "lr": "0.1", "augment": "flip"}  # the defaults' lr 0.2 and photo augmentation need more steps


def pytest_configure(config):
    """Under pytest-xdist (make test), the cores are shared between the workers: each worker, and every
    process it starts (`mlflow run`, the servers read OMP_NUM_THREADS), uses its share of them instead of
    all of them, so N workers do not run N times the threads the machine has."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


# The longest test files, longest first (docs/reliability.md gives their costs): started first, so that no
# worker picks one up when the others are nearly done. Everything else follows in file order.
LONGEST_FIRST = ("test_container_image.py", "test_team.py", "test_sweep.py", "test_faults.py", "test_live_serving.py",
                 "test_browser.py", "test_prediction_loop.py", "test_train_e2e.py", "test_registry.py", "test_ood.py")


# Modules whose module-scoped fixtures are expensive (a registry of trained versions and four server processes,
# two trained runs, a browser, the detector's small model) or whose tests build on each other (the image, then
# the Kubernetes Deployment on it) or that load the machine (Spark) run on one worker, which builds them once;
# every other test is scheduled alone.
ONE_WORKER_MODULES = ("test_live_serving.py", "test_registry.py", "test_browser.py", "test_ood.py",
                      "test_prediction_loop.py", "test_container_image.py", "test_batch_scoring.py")


def pytest_xdist_make_scheduler(config, log):
    """`--dist loadscope` (make test) with scopes of our choosing: a module of ONE_WORKER_MODULES is one unit of
    work, any other test is a unit of its own. (pytest-xdist's own `xdist_group` mark does not take effect
    under pytest 9, whose node ids it can no longer rewrite.)"""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModulesWithSharedFixtures(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if Path(module).name in ONE_WORKER_MODULES else nodeid

    return ModulesWithSharedFixtures(config, log)


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: file order within each rank


@pytest.fixture(scope="session")
def dataset():
    from fmnist_pyfunc import data

    return data.load(download=False)


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory) -> str:
    """A private SQLite store per test session; nothing touches the user's mlflow.db."""
    root = tmp_path_factory.mktemp("mlflow")
    os.chdir(root)  # runs logged in-process put their artifacts in ./mlruns: keep them out of the repo
    uri = f"sqlite:///{root}/mlflow.db"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    return uri


@pytest.fixture
def private_store(tmp_path, tracking_uri) -> str:
    """A tracking store and registry of the test's own, for assertions about everything in them."""
    store = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(store)
    yield store
    mlflow.set_tracking_uri(tracking_uri)


def mlflow_run(entry_point: str, params: dict, tracking_uri: str, experiment: str, cwd: Path,
               check: bool = True) -> subprocess.CompletedProcess:
    """`mlflow run . -e <entry_point> --env-manager local -P k=v ...` as a user types it."""
    command = [str(harness.BIN / "mlflow"), "run", str(REPO), "-e", entry_point,
               "--env-manager", "local", "--experiment-name", experiment]
    for key, value in params.items():
        command += ["-P", f"{key}={value}"]
    result = subprocess.run(command, cwd=cwd, env=child_env(tracking_uri), capture_output=True, text=True,
                            timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="session")
def trained_run(tracking_uri, tmp_path_factory):
    """One `mlflow run . -e train` with a tiny budget; returns the finished run."""
    mlflow_run("train", TINY_TRAIN, tracking_uri, "e2e-train", tmp_path_factory.mktemp("cwd"))
    runs = mlflow.search_runs(experiment_names=["e2e-train"], output_format="list")
    assert len(runs) == 1
    return runs[0]


# --- servers: the real scoring server and the UI, started once per test worker ---

BIN = harness.BIN


@pytest.fixture(scope="session")
def production(trained_run, dataset):
    """The tiny trained model, promoted to Production (forced: other tests may have promoted others)."""
    from fmnist_pyfunc import promotion, registry

    decision = promotion.promote(trained_run.info.run_id, dataset, force=True)
    assert registry.current_production() == decision.version
    return decision.version


@pytest.fixture(scope="session")
def scoring_server(production, tracking_uri, tmp_path_factory):
    """The scoring server process (`python -m entrypoints.serve`, as `make serve`) and its URL."""
    port = free_port()
    env = child_env(tracking_uri)
    env["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"  # the model must load without unpickling
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with harness.running(harness.scoring_command(config.PRODUCTION_MODEL_URI, config.LOOPBACK, port), env,
                         f"http://127.0.0.1:{port}/ping", log) as process:
        yield process, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def scoring_url(scoring_server) -> str:
    return scoring_server[1]


@pytest.fixture(scope="session")
def ui_server(scoring_url, tracking_uri, tmp_path_factory):
    """The UI process (gunicorn, as `make ui`) in front of the session's scoring server, and its URL."""
    port = free_port()
    env = child_env(tracking_uri)
    env["FMNIST_SCORING_URL"] = scoring_url
    log = tmp_path_factory.mktemp("ui") / "ui.log"
    with harness.running(harness.ui_command(config.LOOPBACK, port, workers=1), env,
                         f"http://127.0.0.1:{port}/health", log) as process:
        yield process, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def ui_url(ui_server) -> str:
    return ui_server[1]
