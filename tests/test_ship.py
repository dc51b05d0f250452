"""Shipping: export, the image's entrypoint outside Docker, Dockerfile/workflow lint, the build context."""

import fnmatch
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import requests
import yaml
from conftest import BIN, REPO, project_env

from fmnist_pyfunc import registry
from fmnist_pyfunc.preprocessing import png_base64
from fmnist_pyfunc.servers import free_port, wait_until_up

NEVER_IN_IMAGE = (".venv", "mlruns", "mlflow.db", "optuna.db", "tests", ".git", "data")


def test_dockerfile_passes_hadolint():
    result = subprocess.run([str(BIN / "hadolint"), "Dockerfile"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_workflows_pass_actionlint():
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
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    copies = re.findall(r"^COPY (?:--chown=\S+ )?(?!--from)(\S+)", (REPO / "Dockerfile").read_text(), re.M)
    assert copies, "no COPY found"
    for source in copies:
        assert not _ignored(source.rstrip("/"), patterns), f"{source} is copied but ignored"
    for path in NEVER_IN_IMAGE:
        assert _ignored(path, patterns), f"{path} would be sent to the Docker build"


def test_compose_runs_both_services_from_the_export():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    scoring = compose["scoring"]["entrypoint"]
    assert "entrypoints.serve" in scoring and "export/model" in scoring
    assert compose["ui"]["environment"]["FMNIST_SCORING_URL"].endswith(":8000")
    assert compose["ui"]["depends_on"]["scoring"]["condition"] == "service_healthy"


@pytest.mark.e2e
def test_export_and_container_entrypoint(production, tracking_uri, tmp_path, dataset):
    """Export is self-contained; the entrypoint serves it and the UI, both answer, both stop on SIGTERM."""
    registry.export_production(tmp_path / "export")
    info = json.loads((tmp_path / "export" / registry.EXPORT_INFO_FILE).read_text())
    assert info["version"] == production and info["stage"] == "Production"
    store = tracking_uri.removeprefix("sqlite:///").rsplit("/", 1)[0]
    for path in (tmp_path / "export").rglob("*"):
        if path.is_file() and path.suffix in (".json", ".yaml", ".txt", "") and path.stat().st_size < 2**20:
            assert store not in path.read_text(errors="ignore"), f"{path} points into the tracking store"
    mlmodel = (tmp_path / "export" / registry.EXPORT_MODEL_DIR / "MLmodel").read_text()
    assert not re.search(r":\s*/", mlmodel), "MLmodel holds an absolute path"

    scoring_port, ui_port = free_port(), free_port()
    env = {k: v for k, v in project_env(tracking_uri).items() if k != "MLFLOW_TRACKING_URI"}  # no registry
    log = tmp_path / "container.log"
    process = subprocess.Popen([sys.executable, "-m", "entrypoints.container", "--export", str(tmp_path / "export"),
                                "--scoring-port", str(scoring_port), "--ui-port", str(ui_port), "--ui-workers", "1"],
                               cwd=tmp_path, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        wait_until_up(f"http://127.0.0.1:{ui_port}/health", process, log)
        body = {"dataframe_records": [{"pixels": dataset.test_images[0].tolist()}]}
        assert requests.post(f"http://127.0.0.1:{scoring_port}/invocations", json=body, timeout=30).status_code == 200
        api_body = {"images": [png_base64(dataset.test_images[0])]}
        assert requests.post(f"http://127.0.0.1:{ui_port}/predict", json=api_body, timeout=30).status_code == 200
        assert requests.get(f"http://127.0.0.1:{ui_port}/model_info", timeout=10).json()["version"] == production
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log.read_text()[-2000:]
    for port in (scoring_port, ui_port):
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/", timeout=2)
    assert not os.path.exists(tmp_path / "export" / "model.partial")


def test_compose_team_profile_runs_a_tracking_server_on_postgres():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    tracking = compose["tracking"]
    assert tracking["profiles"] == ["team"] and "postgresql://" in " ".join(tracking["entrypoint"])
    assert "--artifacts-destination" in tracking["entrypoint"]
    assert tracking["depends_on"]["postgres"]["condition"] == "service_healthy"
