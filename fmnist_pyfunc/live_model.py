"""The model a scoring worker serves, kept in step with the registry.

A registry reference that can move (`models:/NAME/STAGE`, `models:/NAME@ALIAS`, `models:/NAME/latest`) is
re-resolved every `interval_s` seconds and whenever a reload is asked for. A new version is downloaded and
loaded by a background thread, must answer its own input example (in the worker's model thread, between
two forward passes: see batching.py), and is then swapped in with one assignment: requests in flight
finish on the model they started with, new ones get the new one, none waits on a load. A version that
fails any of these steps is not served: the old one keeps answering, `health`
says degraded and why, and the failure is counted (once per version). Rolling back is promoting the old
version again. Anything else (`models:/NAME/3`, `runs:/...`, a folder such as the image's export) is served
as is.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import mlflow
from mlflow.models import Model
from mlflow.pyfunc import scoring_server
from mlflow.tracking import MlflowClient

from fmnist_pyfunc import export, metrics, registry
from fmnist_pyfunc.config import FOLLOW_INTERVAL_S

TRIGGER_POLL_S = 0.5        # how often a worker looks for a reload request from another worker
LATEST = "latest"
REFERENCE = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<selector>[^/]+))")


@dataclass(frozen=True)
class Served:
    """One loaded model: the pyfunc model, MLflow's scoring app for it and what /model says about it."""
    model: object
    app: object
    info: dict
    headers: list = field(default_factory=list)
    reference: dict | None = None  # the validation profile drift is measured against (monitor.py); None: none logged
    with_detector: bool = False    # answers in_distribution and ood_score (models logged before it do not)


def moving_reference(uri: str) -> tuple[str, str] | None:
    """(name, "@alias" | stage | "latest") for a registry URI that can move to another version, else None."""
    match = REFERENCE.fullmatch(uri)
    if not match or (match["selector"] or "").isdigit():
        return None
    return match["name"], f"@{match['alias']}" if match["alias"] else match["selector"]


def resolve(name: str, selector: str):
    """The ModelVersion a moving reference points at now."""
    client = MlflowClient()
    if selector.startswith("@"):
        return client.get_model_version_by_alias(name, selector[1:])
    with registry.stages_quietly():
        versions = client.get_latest_versions(name, None if selector.lower() == LATEST else [selector])
    if not versions:
        raise LookupError(f"no version of {name} is in {selector}")
    return max(versions, key=lambda version: int(version.version))


def download_initial(uri: str) -> tuple[str, str | None]:
    """A local folder for the model and, for a registry URI, the version it is. The server does this once
    before its workers start, so a bad URI fails there with its reason, and every worker starts on the
    same version (a moving reference is pinned to the version it points at now)."""
    if Path(uri).is_dir():
        return str(Path(uri).resolve()), None
    version, reference = None, moving_reference(uri)
    if reference:
        version = str(resolve(*reference).version)
        uri = f"models:/{reference[0]}/{version}"
    elif match := REFERENCE.fullmatch(uri):
        version = match["selector"]
    return mlflow.artifacts.download_artifacts(artifact_uri=uri), version


def registered_info(name: str, version: str) -> dict:
    """name, version, stage, aliases, run id and metrics of a registered version."""
    with registry.stages_quietly():
        return {**registry.version_info(MlflowClient().get_model_version(name, version)), "name": name}


def fixed_info(uri: str, path: str) -> dict:
    """What is known of a model outside the registry: its run, and for the image's export (a folder with
    `model_info.json` beside it) the registered version it was exported from."""
    exported = Path(path).parent / export.EXPORT_INFO_FILE
    if Path(uri).is_dir() and exported.is_file():
        return json.loads(exported.read_text())
    return {"name": uri, "version": None, "run_id": Model.load(path).run_id}


def load_checked(path: str, info: dict, run) -> Served:
    """Load the model at `path` and make it answer its own input example (through `run`) before anyone else asks."""
    model = scoring_server.load_model_with_mlflow_config(path)
    example = model.metadata.load_input_example(path)
    if example is not None and len(run(model.predict, example)) != len(example):
        raise ValueError("the model's answer to its input example has the wrong length")
    signature = model.metadata.signature
    info = {**info, "source": path, "loaded_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "signature": signature.to_dict() if signature else None}
    headers = [(b"x-model-name", str(info["name"]).encode()), (b"x-model-run-id", str(info.get("run_id")).encode())]
    if info.get("version"):
        headers.append((b"x-model-version", str(info["version"]).encode()))
    python_model = model.unwrap_python_model()
    return Served(model, scoring_server.init(model), info, headers, getattr(python_model, "reference", None),
                  getattr(python_model, "detector", None) is not None)


class LiveModel:
    """`current` is what this worker serves; a daemon thread keeps it in step with a moving reference."""

    def __init__(self, uri: str, path: str, version: str | None, run, interval_s: float = FOLLOW_INTERVAL_S,
                 trigger: Path | None = None):
        """`run(fn, *args)`: where a loaded model answers its check (the scoring worker's model thread)."""
        self.uri, self.interval_s, self.trigger, self.run = uri, interval_s, trigger, run
        self.reference = moving_reference(uri)
        name = self.reference[0] if self.reference else (REFERENCE.fullmatch(uri) or {"name": None})["name"]
        info = registered_info(name, version) if version else fixed_info(uri, path)
        self.current = load_checked(path, info, run)
        self.health = {"status": "ok", "reason": None}
        self._refused: str | None = None  # a version that failed: not retried until asked or replaced
        self._download: str | None = None  # the folder of the version swapped in last (for /model's `source`)
        self._lock = threading.Lock()     # one check at a time per worker (thread and /reload)
        self._publish(None)
        if self.reference and interval_s > 0:
            threading.Thread(target=self._follow, name="follow-registry", daemon=True).start()

    def status(self) -> dict:
        return {**self.health, "uri": self.uri, "follows_registry": self.reference is not None,
                "model": {k: self.current.info.get(k) for k in ("name", "version", "run_id")}}

    def request_reload(self) -> None:
        """Ask every worker of this server (they all watch the trigger file) to check now."""
        if self.trigger:
            self.trigger.touch()

    def refresh(self, force: bool = False) -> None:
        """Check the reference once; load and swap in a new version. `force` retries a refused version."""
        if not self.reference:
            return
        with self._lock:
            try:
                target = str(resolve(*self.reference).version)
            except Exception as exc:  # registry unreachable: keep serving what we have, and say so
                self.health = {"status": "degraded", "reason": f"cannot resolve {self.uri}: {first_line(exc)}"}
                return
            if target == self.current.info.get("version"):
                self.health, self._refused = {"status": "ok", "reason": None}, None
                return
            if target == self._refused and not force:
                return
            try:
                served = self._load_version(target)
            except Exception as exc:
                self._refused = target
                self.health = {"status": "degraded", "reason": f"{self.reference[0]} v{target} is not "
                               f"served ({first_line(exc)}); still serving v{self.current.info.get('version')}"}
                metrics.RELOAD_FAILURES.inc()
                return
            previous, self.current = self.current, served
            self.health, self._refused = {"status": "ok", "reason": None}, None
            metrics.RELOADS.inc()
            self._publish(previous)

    def _load_version(self, version: str) -> Served:
        """Download and load a version into a folder of its own; the served model is then in memory, so the
        previous version's folder goes on success, and this one's on failure."""
        name = self.reference[0]
        folder = tempfile.mkdtemp(prefix=f"fmnist-{name}-v{version}-")
        try:
            path = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=folder)
            served = load_checked(path, registered_info(name, version), self.run)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        if self._download:
            shutil.rmtree(self._download, ignore_errors=True)
        self._download = folder
        return served

    def _publish(self, previous: Served | None) -> None:
        if previous is not None:
            metrics.MODEL.labels(*_labels(previous.info)).set(0)
        metrics.MODEL.labels(*_labels(self.current.info)).set(1)

    def _follow(self) -> None:
        seen, checked = _mtime(self.trigger), time.monotonic()
        while True:
            time.sleep(TRIGGER_POLL_S)
            asked = _mtime(self.trigger) != seen
            if asked or time.monotonic() - checked >= self.interval_s:
                seen, checked = _mtime(self.trigger), time.monotonic()
                self.refresh(force=asked)


def _labels(info: dict) -> tuple[str, str, str]:
    return str(info.get("name")), str(info.get("version") or ""), str(info.get("run_id") or "")


def _mtime(path: Path | None) -> float | None:
    try:
        return path.stat().st_mtime_ns if path else None
    except OSError:
        return None


def first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]
