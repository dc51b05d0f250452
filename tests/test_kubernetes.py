"""The Kubernetes manifests (deploy/k8s), offline: both kustomizations render with kubectl's kustomize, every
object validates against the Kubernetes 1.32 schemas, and what a cluster operator relies on is there. That the
rendered scoring Deployment really runs is tested with the image (tests/test_container_image.py)."""

import re
import shutil
import subprocess

import kubernetes_validate
import pytest
import yaml
from conftest import REPO

K8S = REPO / "deploy" / "k8s"
KUBERNETES_VERSION = "1.32.0"  # the kubectl installed here; the schemas ship with kubernetes-validate
OVERLAYS = {"base": K8S / "base", "team": K8S / "overlays" / "team"}


def render(folder) -> list[dict]:
    """`kubectl kustomize <folder>`, as documents."""
    if not shutil.which("kubectl"):
        pytest.fail("kubectl is missing (it brings kustomize): see docs/kubernetes.md")
    out = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, check=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def _objects(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in docs}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_object_validates_against_the_kubernetes_schemas(overlay):
    """Each object of the rendered kustomization is valid Kubernetes 1.32 (strict: no unknown fields), and the
    set is complete: scoring and UI Deployments and Services, the PodDisruptionBudget and the autoscaler."""
    docs = render(OVERLAYS[overlay])
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    kinds = set(_objects(docs))
    assert {("Deployment", "fmnist-scoring"), ("Service", "fmnist-scoring"), ("Deployment", "fmnist-ui"),
            ("Service", "fmnist-ui"), ("PodDisruptionBudget", "fmnist-scoring"),
            ("HorizontalPodAutoscaler", "fmnist-scoring")} <= kinds


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_locked_down_with_probes_and_resources(overlay):
    """Every container: non-root, read-only root filesystem, no privilege escalation, all capabilities dropped,
    readiness and liveness probes, CPU and memory requests and limits; /tmp is the only writable place."""
    for (kind, name), doc in _objects(render(OVERLAYS[overlay])).items():
        if kind != "Deployment":
            continue
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] and not pod["automountServiceAccountToken"], name
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"], name
            assert security["capabilities"]["drop"] == ["ALL"], name
            assert {"readinessProbe", "livenessProbe"} <= set(container), name
            assert set(container["resources"]) == {"requests", "limits"}, name
            assert [m["mountPath"] for m in container["volumeMounts"]] == ["/tmp"], name


def test_the_base_serves_the_baked_model_and_the_team_overlay_follows_the_registry_with_secrets():
    """The base serves the image's export; the team overlay serves models:/.../Production from the tracking
    server named in its ConfigMap, with the passwords from a Secret it only refers to (none in the manifests)."""
    base, team = (_objects(render(OVERLAYS[name])) for name in ("base", "team"))

    def scoring(objects):
        return objects[("Deployment", "fmnist-scoring")]["spec"]["template"]["spec"]["containers"][0]

    assert scoring(base)["args"][:2] == ["--model-uri", "export/model"]
    assert scoring(team)["args"][:2] == ["--model-uri", "models:/fashion-mnist-cnn/Production"]
    secrets = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in scoring(team)["env"] if "valueFrom" in e}
    assert secrets == {"MLFLOW_TRACKING_USERNAME": "fmnist-team", "MLFLOW_TRACKING_PASSWORD": "fmnist-team",
                       "PGPASSWORD": "fmnist-team"}
    config_map = next(doc for (kind, _), doc in team.items() if kind == "ConfigMap")
    assert set(config_map["data"]) == {"MLFLOW_TRACKING_URI", "FMNIST_PREDICTION_LOG"}
    assert not any(re.search(r"//[^/@]*:[^/@]*@", value) for value in config_map["data"].values())  # no user:pass@
    assert not any(kind == "Secret" for kind, _ in team)
    ui = base[("Deployment", "fmnist-ui")]["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "FMNIST_SCORING_URL", "value": "http://fmnist-scoring:5001"} in ui["env"]
