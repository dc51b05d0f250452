"""Shipping: export, the image's entrypoint outside Docker, Dockerfile/workflow lint, the build context."""

import ast
import fnmatch
import json
import os
import re
import signal
import subprocess
import sys
import tomllib

import mlflow
import pandas as pd
import pytest
import requests
import yaml
from conftest import BIN, REPO

from fmnist_pyfunc import config, export
from fmnist_pyfunc.contract import png_base64
from fmnist_testkit.harness import child_env, free_port, wait_until_up

NEVER_IN_IMAGE = (".venv", "mlruns", "mlflow.db", "optuna.db", "tests", ".git", "data")


def test_dockerfile_passes_hadolint():
    """The Dockerfile passes hadolint."""
    result = subprocess.run([str(BIN / "hadolint"), "Dockerfile"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_workflows_pass_actionlint():
    """The GitHub workflows pass actionlint."""
    result = subprocess.run([str(BIN / "actionlint")], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; '!' re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        core = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, core) or path.startswith(core + "/"):
            ignored = not negate
    return ignored


def test_build_context_is_exactly_what_the_dockerfile_copies():
    """Everything the Dockerfile copies or mounts is in the build context, and nothing private (data, runs, the
    venv, .git) is."""
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    copy_lines = re.findall(r"^COPY (?:--chown=\S+ )?(?!--from)(.+)$", (REPO / "Dockerfile").read_text(), re.M)
    copies = [source for line in copy_lines for source in line.split()[:-1]]  # the last word is the target
    assert copies, "no COPY found"
    for source in copies:
        assert not _ignored(source.rstrip("/"), patterns), f"{source} is copied but ignored"
    allowed = [p[1:].rstrip("/") for p in patterns if p.startswith("!")]
    for source in re.findall(r"--mount=type=bind,source=([^,\s]+)", (REPO / "Dockerfile").read_text()):
        assert any(path == source or path.startswith(source + "/") for path in allowed), f"{source}: mounted, empty"
    for path in NEVER_IN_IMAGE:
        assert _ignored(path, patterns), f"{path} would be sent to the Docker build"


def test_compose_runs_both_services_from_the_export():
    """compose's scoring service serves the export, the UI waits for it and calls it on the scoring port."""
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    scoring = compose["scoring"]["entrypoint"]
    assert "entrypoints.serve" in scoring and "export/model" in scoring
    assert compose["ui"]["environment"]["FMNIST_SCORING_URL"].endswith(f":{config.SCORING_PORT}")
    assert compose["ui"]["depends_on"]["scoring"]["condition"] == "service_healthy"


def test_compose_publishes_on_loopback_and_writes_no_password():
    """Every published port binds 127.0.0.1 unless HOST_IP says otherwise; the database publishes none;
    the password comes from the environment (.env), never from the file."""
    text = (REPO / "docker-compose.yml").read_text()
    compose = yaml.safe_load(text)["services"]
    for name, service in compose.items():
        for port in service.get("ports", []):
            assert port.startswith("${HOST_IP:-127.0.0.1}:"), (name, port)
    assert "ports" not in compose["postgres"]
    assert compose["postgres"]["environment"]["POSTGRES_PASSWORD"] == "${POSTGRES_PASSWORD:-}"
    assert "mlflow:mlflow@" not in text


def _makefile_default(name: str) -> str:
    return re.search(rf"^{name}\s*\?=\s*(\S+)", (REPO / "Makefile").read_text(), re.M).group(1)


def test_one_port_convention_everywhere():
    """Scoring server 5001 and UI 8000 (config.py) on the host and in the image: Makefile, Dockerfile,
    the image's entrypoint, compose and the UI's default upstream all say the same."""
    from entrypoints import container
    from webui import app

    assert (config.SCORING_PORT, config.UI_PORT, config.MLFLOW_UI_PORT) == (5001, 8000, 5000)
    assert _makefile_default("SCORING_PORT") == str(config.SCORING_PORT)
    assert _makefile_default("UI_PORT") == str(config.UI_PORT)
    assert _makefile_default("MLFLOW_UI_PORT") == str(config.MLFLOW_UI_PORT)
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^EXPOSE (.+)$", dockerfile, re.M).group(1).split() == [str(config.SCORING_PORT),
                                                                               str(config.UI_PORT)]
    assert f"127.0.0.1:{config.UI_PORT}/health" in dockerfile
    defaults = container.parser().parse_args([])
    assert (defaults.scoring_port, defaults.ui_port) == (config.SCORING_PORT, config.UI_PORT)
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    assert compose["scoring"]["ports"][0].endswith(f":{config.SCORING_PORT}")
    assert compose["ui"]["ports"][0].endswith(f":{config.UI_PORT}")
    assert compose["scoring"]["entrypoint"][-2:] == ["--port", str(config.SCORING_PORT)]
    assert compose["ui"]["entrypoint"][-2:] == ["--port", str(config.UI_PORT)]
    assert app.DEFAULT_SCORING_URL.endswith(f":{config.SCORING_PORT}")


def test_image_installs_exactly_pyprojects_dependencies():
    """The image's package list is pyproject's [project] dependencies (container/requirements.py), which
    hold no training-only package: the Dockerfile keeps no list of its own."""
    listed = subprocess.run([sys.executable, "container/requirements.py", "pyproject.toml"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert listed == project["dependencies"]
    assert not {"tqdm", "optuna", "torchvision", "matplotlib"} & {d.split("==")[0] for d in listed}
    assert not re.search(r"\w==\d", (REPO / "Dockerfile").read_text()), "the Dockerfile pins a version itself"


SERVING_MODULES = ("entrypoints.container", "entrypoints.serve", "entrypoints.ui", "entrypoints.export",
                   "fmnist_pyfunc.scoring", "fmnist_pyfunc.pyfunc_model", "webui.app")


def test_serving_imports_no_training_code():
    """What the image runs imports nothing of training (its loop, tqdm, optuna, torchvision, matplotlib's
    reports), so the image, which lacks those packages, starts."""
    script = (f"import importlib, sys\nfor m in {SERVING_MODULES!r}: importlib.import_module(m)\n"
              "print(' '.join(sorted(sys.modules)))")
    loaded = set(subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.split())
    # (not tqdm: MLflow imports it when present; the image test shows the image starts without it)
    training = {"fmnist_pyfunc.training", "fmnist_pyfunc.tracking", "fmnist_pyfunc.sweep", "fmnist_pyfunc.reporting",
                "fmnist_pyfunc.augment", "optuna", "torchvision"}
    assert not loaded & training


@pytest.mark.e2e
def test_export_and_container_entrypoint(production, tracking_uri, tmp_path, dataset):
    """Export is self-contained; the entrypoint serves it and the UI, both answer with the class the exported
    model gives in this process, both stop on SIGTERM, even with a client's idle keep-alive connection to the
    UI still open (the answer below holds one until it is collected)."""
    export.export_production(tmp_path / "export")
    info = json.loads((tmp_path / "export" / export.EXPORT_INFO_FILE).read_text())
    assert info["version"] == production and info["stage"] == "Production"
    store = tracking_uri.removeprefix("sqlite:///").rsplit("/", 1)[0]
    for path in (tmp_path / "export").rglob("*"):
        if path.is_file() and path.suffix in (".json", ".yaml", ".txt", "") and path.stat().st_size < 2**20:
            assert store not in path.read_text(errors="ignore"), f"{path} points into the tracking store"
    mlmodel = (tmp_path / "export" / export.EXPORT_MODEL_DIR / "MLmodel").read_text()
    assert not re.search(r":\s*/", mlmodel), "MLmodel holds an absolute path"

    exported = mlflow.pyfunc.load_model(str(tmp_path / "export" / export.EXPORT_MODEL_DIR))
    png = png_base64(dataset.test_images[0])
    expected = exported.predict(pd.DataFrame([{"pixels": dataset.test_images[0].tolist(), "image": None},
                                              {"pixels": None, "image": png}]))["class_name"].tolist()
    scoring_port, ui_port = free_port(), free_port()
    env = {k: v for k, v in child_env(tracking_uri).items() if k != "MLFLOW_TRACKING_URI"}  # no registry
    log = tmp_path / "container.log"
    process = subprocess.Popen([sys.executable, "-m", "entrypoints.container", "--export", str(tmp_path / "export"),
                                "--scoring-port", str(scoring_port), "--ui-port", str(ui_port), "--ui-workers", "1"],
                               cwd=tmp_path, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        wait_until_up(f"http://127.0.0.1:{ui_port}/health", process, log)
        body = {"dataframe_records": [{"pixels": dataset.test_images[0].tolist()}]}
        answer = requests.post(f"http://127.0.0.1:{scoring_port}/invocations", json=body, timeout=30)
        assert answer.status_code == 200 and answer.headers["X-Model-Version"] == production  # from model_info.json
        assert answer.json()["predictions"][0]["class_name"] == expected[0]
        ui_answer = requests.post(f"http://127.0.0.1:{ui_port}/predict", json={"images": [png]}, timeout=30)
        assert ui_answer.status_code == 200 and ui_answer.json()["results"][0]["class_name"] == expected[1]
        assert requests.get(f"http://127.0.0.1:{ui_port}/model_info", timeout=10).json()["version"] == production
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log.read_text()[-2000:]
    for port in (scoring_port, ui_port):
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/", timeout=2)
    assert not os.path.exists(tmp_path / "export" / "model.partial")


def test_compose_team_profile_runs_a_tracking_server_on_postgres():
    """compose's team profile runs the basic-auth tracking server on PostgreSQL (its password from the environment,
    never the command line) with proxied artifacts, started only once the database is healthy."""
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    tracking = compose["tracking"]
    command = " ".join(tracking["entrypoint"])
    assert tracking["profiles"] == ["team"] and "entrypoints.tracking_server" in command  # basic auth
    assert "postgresql://mlflow@postgres/" in command and "--artifacts-destination" in command
    assert tracking["environment"]["PGPASSWORD"] == "${POSTGRES_PASSWORD:-}"  # never in the command line
    assert tracking["depends_on"]["postgres"]["condition"] == "service_healthy"


def _imported_modules(path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    return names | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}


def test_the_library_imports_neither_its_clients_nor_the_harness():
    """fmnist_pyfunc/ is the product: it never imports the entry points, the UI, or the test kit, so
    there is no import circle and each room can change without the library noticing."""
    for path in sorted((REPO / "fmnist_pyfunc").glob("*.py")):
        outside = {m for m in _imported_modules(path) if m.split(".")[0] in (
            "entrypoints", "webui", "fmnist_testkit", "harness", "conftest", "tests", "benchmarks")}
        assert not outside, (path.name, outside)


def _library_imports(package: str) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports (`from pkg import a, b` and `from pkg.a import x`)."""
    graph = {}
    for path in sorted((REPO / package).glob("*.py")):
        tree = ast.parse(path.read_text())
        found = {node.module.split(".")[1] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                 and node.module and node.module.startswith(f"{package}.")}
        found |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                  and node.module == package for alias in node.names}
        graph[path.stem] = found
    return graph


@pytest.mark.parametrize("package", ["fmnist_pyfunc", "fmnist_testkit"])
def test_no_module_imports_one_that_imports_it_back(package):
    """The library's modules form layers: following imports from any module never leads back to it."""
    graph = _library_imports(package)

    def reaches(start: str, target: str, seen: set) -> bool:
        return any(m == target or (m not in seen and reaches(m, target, seen | {m})) for m in graph.get(start, ()))

    circles = [name for name in graph if reaches(name, name, set())]
    assert not circles, circles


def test_every_test_states_the_property_it_checks():
    """Each test function has a docstring: the property it checks, read before its code."""
    for path in sorted((REPO / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text())
        bare = [node.name for node in tree.body if isinstance(node, ast.FunctionDef)
                and node.name.startswith("test") and not ast.get_docstring(node)]
        assert not bare, (path.name, bare)


def test_a_changed_dependency_list_rebuilds_the_venv_layer():
    """The pip install layer comes after a COPY of pyproject.toml: every engine keys that layer's cache on the
    list's content (buildah does not key on bind mounts, which once reused a venv missing a new package)."""
    dockerfile = (REPO / "Dockerfile").read_text()
    copy = re.search(r"^COPY [^\n]*pyproject\.toml[^\n]*$", dockerfile, re.M)
    install = dockerfile.find("pip install")
    assert copy and copy.start() < install, "pyproject.toml must be COPYed before the pip install layer"
    assert "source=pyproject.toml" not in dockerfile
