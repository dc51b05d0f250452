"""The image, built and run for real: `make image-test` (and `make test`, so every CI run) does this.

Costs ~6-8 min on 2 cores offline (wheelhouse ~3.5 GB of CUDA-build torch wheels, build, start, checks,
compose); a second run reuses the wheel cache and the engine's layers.
"""

import os
import shutil
import subprocess
import sys
import time

import pytest
import requests
import yaml
from conftest import REPO
from test_kubernetes import K8S, render

from fmnist_pyfunc import config, export
from fmnist_testkit import harness

IMAGE_TAG = "localhost/fmnist:image-test"   # not fmnist:latest: the user's own image stays
# The one place a run may opt out: GitHub's `ci` test job runs inside a container, where no engine can run
# one; its `image` job runs this test on the runner itself.
SKIP_ENV = "FMNIST_SKIP_IMAGE_TEST"

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2400),
              pytest.mark.skipif(os.environ.get(SKIP_ENV) == "1", reason=f"{SKIP_ENV}=1: no container engine here")]


def _run(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)
    print(result.stdout[-4000:], result.stderr[-4000:], sep="\n")
    return result


def test_image_builds_runs_and_answers_as_the_model_in_process(production, tmp_path):
    """From a freshly trained, promoted and exported model: the image builds offline, comes up healthy,
    answers pixels, PNG and photo JPEG exactly as the model does in process, through /invocations and the
    UI (API and CSRF form); runs as non-root on a read-only root; SIGTERM -> exit 0 within 10 s; the
    compose file's services answer."""
    folder = tmp_path / "export"
    export.export_production(folder)
    offline = ["--offline"] if os.environ.get("FMNIST_IMAGE_ONLINE") != "1" else []
    built = _run("container/build.py", "--export", str(folder), "--tag", IMAGE_TAG, *offline)
    assert built.returncode == 0, built.stderr[-3000:]
    smoke = _run("container/smoke.py", "--export", str(folder), "--tag", IMAGE_TAG)
    assert smoke.returncode == 0, smoke.stdout[-3000:] + smoke.stderr[-3000:]
    assert "cold start" in smoke.stdout and "compose: ui -> scoring" in smoke.stdout


def test_the_rendered_scoring_deployment_runs_under_podman_kube_play(dataset, tmp_path):
    """deploy/k8s/base's scoring Deployment as `kubectl kustomize` renders it, on the image the test above built,
    runs under `podman kube play` (non-root, read-only root, the emptyDir /tmp) and answers /invocations with the
    model baked into the image. podman runs Pods and Deployments only: the test gives it one replica and a host
    port (it has no Services; every replica would bind the same port), and it does not run the probes, the
    Service, the PodDisruptionBudget or the autoscaler (docs/kubernetes.md)."""
    if not shutil.which("podman"):
        pytest.skip("podman is not installed: the image job on GitHub's runners uses docker, which has no kube play")
    deployment = next(doc for doc in render(K8S / "base") if doc["kind"] == "Deployment"
                      and doc["metadata"]["name"] == "fmnist-scoring")
    port = harness.free_port()
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["image"] = IMAGE_TAG
    container["ports"][0].update(hostPort=port, hostIP=config.LOOPBACK)
    deployment["spec"]["replicas"] = 1
    manifest = tmp_path / "scoring.yaml"
    manifest.write_text(yaml.safe_dump(deployment))
    env = {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(REPO / "container" / "podman.conf"))}

    def podman(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["podman", *args], env=env, capture_output=True, text=True, timeout=300)

    played = podman("kube", "play", str(manifest))
    try:
        assert played.returncode == 0, played.stderr[-3000:]
        url = f"http://{config.LOOPBACK}:{port}"
        deadline = time.monotonic() + harness.STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(1)
        answer = requests.post(f"{url}/invocations", json={"dataframe_records": [
            {"pixels": image.tolist()} for image in dataset.test_images[:4]]}, timeout=60)
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["predictions"]) == 4 and answer.headers["X-Model-Name"]
        assert requests.get(f"{url}/health", timeout=10).json()["status"] == "ok"
    finally:
        logs = podman("pod", "logs", "--tail", "40", f"{deployment['metadata']['name']}-pod")
        print(logs.stdout[-3000:], logs.stderr[-2000:])
        podman("kube", "down", str(manifest))
