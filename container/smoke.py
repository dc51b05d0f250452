"""Smoke-test the image as a user runs it; exit 1 with the failed check's reason, else print its figures.

    python container/smoke.py --tag fmnist:latest --export export       # make image-test, release.yml
Starts the image read-only with its ports on loopback, waits for its HEALTHCHECK, then sends real test
images as raw pixels, base64 PNG and photo-style JPEG to /invocations and to the UI (JSON API, and the
form with its CSRF token), and expects exactly the classes and in_distribution flags the exported model gives
in this process.
Checks every process runs as the image's non-root uid, the root filesystem refuses writes, and SIGTERM
stops it in time with exit code 0; then brings up the compose file's two services and asks them once.
"""

from __future__ import annotations

import argparse
import base64
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build  # noqa: E402  (container/build.py: the engine and its settings)

from fmnist_pyfunc import config, data  # noqa: E402
from fmnist_testkit import harness  # noqa: E402
from fmnist_testkit.images import rows_of_each_kind  # noqa: E402

N_IMAGES = 16            # real test images per input kind: the UI's per-request limit
APP_UID = 10001          # the Dockerfile's `useradd --uid`
STOP_GRACE_S = 10        # `docker stop`'s default grace: SIGTERM must end the container within it
START_TIMEOUT_S = 300    # a cold start imports torch and MLflow: ~15 s here, slow disks more
HEALTH_POLL_S = 2
REQUEST_TIMEOUT_S = 60
PHOTO_SIZE = 224         # px: a photo-style upload is larger than the 28x28 the model sees
COMPOSE_FILE = build.REPO / "docker-compose.yml"


class CheckFailed(Exception):
    pass


def check(ok: bool, what: str) -> None:
    if not ok:
        raise CheckFailed(what)
    print(f"ok   {what}", flush=True)


def inputs_and_expected(export: Path) -> tuple[dict[str, list[dict]], dict[str, list[tuple]]]:
    """Each input kind's records, and the answers the exported model gives them in this process."""
    import mlflow  # here: the check of a running image needs only requests

    images = data.load().test_images[:N_IMAGES]
    records = rows_of_each_kind(images, PHOTO_SIZE)
    model = mlflow.pyfunc.load_model(str(export / "model"))
    expected = {kind: answers(model.predict(pd.DataFrame(rows)).to_dict("records")) for kind, rows in records.items()}
    return records, expected


def wait_for(predicate, what: str, timeout_s: float = START_TIMEOUT_S) -> float:
    """Seconds until `predicate()` is true; CheckFailed after `timeout_s`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            if predicate():
                return time.monotonic() - started
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise CheckFailed(f"{what} within {timeout_s} s")


def answers(predictions: list[dict]) -> list[tuple]:
    """What must agree everywhere: the class, and whether the picture looks like clothing at all."""
    return [(int(p["class_index"]), bool(p["in_distribution"])) for p in predictions]


def scoring_answers(url: str, records: list[dict]) -> list[tuple]:
    response = requests.post(f"{url}/invocations", json={"dataframe_records": records}, timeout=REQUEST_TIMEOUT_S)
    response.raise_for_status()
    return answers(response.json()["predictions"])


def ui_api_answers(url: str, records: list[dict]) -> list[tuple]:
    response = requests.post(f"{url}/predict", json={"images": [r["image"] for r in records]},
                             timeout=REQUEST_TIMEOUT_S)
    response.raise_for_status()
    return answers(response.json()["results"])


def ui_form_answers(url: str, records: list[dict]) -> list[tuple]:
    files = [("files", (f"{i}.img", base64.b64decode(r["image"]), "application/octet-stream"))
             for i, r in enumerate(records)]
    response = harness.ui_session(url).post(f"{url}/predict", files=files, timeout=REQUEST_TIMEOUT_S)
    response.raise_for_status()
    return answers(response.json()["results"])


def check_predictions(scoring_url: str, ui_url: str, records: dict, expected: dict) -> None:
    for kind, rows in records.items():
        check(scoring_answers(scoring_url, rows) == expected[kind], f"/invocations, {kind}: in-process answers")
        if kind != "pixels":  # the UI takes images, not pixel arrays
            check(ui_api_answers(ui_url, rows) == expected[kind], f"UI JSON API, {kind}: in-process answers")
            check(ui_form_answers(ui_url, rows) == expected[kind], f"UI form upload, {kind}: in-process answers")


class Container:
    def __init__(self, engine: list[str], env: dict, name: str):
        self.engine, self.env, self.name = engine, env, name

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([*self.engine, *args], env=self.env, capture_output=True, text=True, check=check)

    def healthy(self) -> bool:
        """The image's own HEALTHCHECK: podman runs it on demand; docker reports its last result."""
        if self.engine[0] == "podman":
            return self("healthcheck", "run", self.name, check=False).returncode == 0
        return self("inspect", "--format", "{{.State.Health.Status}}", self.name).stdout.strip() == "healthy"

    def uids(self) -> set[int]:
        script = ("import glob\nfor s in glob.glob('/proc/[0-9]*/status'):\n"
                  "    print(next(l.split()[1] for l in open(s) if l.startswith('Uid:')))")
        return {int(uid) for uid in self("exec", self.name, "python", "-c", script).stdout.split()}


def check_image(engine: list[str], env: dict, tag: str, records: dict, expected: dict) -> dict:
    scoring_port, ui_port = harness.free_port(), harness.free_port()
    container = Container(engine, env, f"fmnist-smoke-{os.getpid()}")
    health_flags = ["--health-interval", f"{HEALTH_POLL_S}s"] if engine[0] == "docker" else []
    started = time.monotonic()
    container("run", "--detach", "--name", container.name, "--read-only", "--tmpfs", "/tmp", *health_flags,
              "-p", f"{config.LOOPBACK}:{scoring_port}:{config.SCORING_PORT}",
              "-p", f"{config.LOOPBACK}:{ui_port}:{config.UI_PORT}", tag)
    scoring_url, ui_url = f"http://{config.LOOPBACK}:{scoring_port}", f"http://{config.LOOPBACK}:{ui_port}"
    try:
        wait_for(lambda: scoring_answers(scoring_url, records["pixels"][:1]) is not None, "a first prediction")
        cold_start = time.monotonic() - started
        print(f"ok   cold start (container start -> first 200 from /invocations): {cold_start:.1f} s", flush=True)
        wait_for(container.healthy, "HEALTHCHECK healthy")
        check(True, "HEALTHCHECK healthy")
        check_predictions(scoring_url, ui_url, records, expected)
        check(container.uids() == {APP_UID}, f"every process runs as uid {APP_UID}, not root")
        write = container("exec", container.name, "touch", "/app/written", check=False)
        check(write.returncode != 0 and "Read-only" in write.stderr, "the root filesystem refuses writes")
        stopping = time.monotonic()
        container("stop", "--time", str(STOP_GRACE_S), container.name)
        stop_s = time.monotonic() - stopping
        exit_code = container("inspect", "--format", "{{.State.ExitCode}}", container.name).stdout.strip()
        check(exit_code == "0" and stop_s < STOP_GRACE_S, f"SIGTERM: exit code {exit_code} after {stop_s:.1f} s")
    except (CheckFailed, requests.RequestException, subprocess.CalledProcessError):
        print(container("logs", container.name, check=False).stdout[-3000:], file=sys.stderr)
        raise
    finally:
        container("rm", "--force", container.name, check=False)
    return {"cold_start_s": cold_start, "stop_s": stop_s}


def compose_command(engine: list[str]) -> list[str]:
    return ["docker", "compose"] if engine[0] == "docker" else ["podman-compose"]


def check_compose(engine: list[str], env: dict, tag: str, records: dict, expected: dict) -> None:
    """The compose file's scoring and ui services, from this image, answer through their published ports."""
    scoring_port, ui_port = harness.free_port(), harness.free_port()
    project = f"fmnist-smoke-{os.getpid()}"
    compose_env = dict(env, FMNIST_IMAGE=tag, SCORING_PORT=str(scoring_port), UI_PORT=str(ui_port))
    compose = [*compose_command(engine), "--project-name", project, "--file", str(COMPOSE_FILE)]
    subprocess.run([*compose, "up", "--detach", "scoring", "ui"], env=compose_env, check=True,
                   capture_output=True, text=True)
    try:
        ui_url = f"http://{config.LOOPBACK}:{ui_port}"
        wait_for(lambda: requests.get(f"{ui_url}/health", timeout=5).status_code == 200, "compose: UI healthy")
        check(ui_api_answers(ui_url, records["png"]) == expected["png"], "compose: ui -> scoring, in-process answers")
        scoring_url = f"http://{config.LOOPBACK}:{scoring_port}"
        check(scoring_answers(scoring_url, records["pixels"]) == expected["pixels"], "compose: scoring service")
    except (CheckFailed, requests.RequestException):
        print(subprocess.run([*compose, "logs"], env=compose_env, capture_output=True, text=True).stdout[-3000:],
              file=sys.stderr)
        raise
    finally:
        subprocess.run([*compose, "down"], env=compose_env, capture_output=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tag", default=build.DEFAULT_TAG, help="image to test (default: %(default)s)")
    parser.add_argument("--export", type=Path, default=Path("export"),
                        help="the export the image was built from (default: %(default)s)")
    parser.add_argument("--engine", choices=("auto", "docker", "podman"), default="auto",
                        help="container engine (default: %(default)s)")
    parser.add_argument("--compose", type=lambda s: s == "true", default=True, metavar="BOOL",
                        help="also bring up the compose file's services (default: true)")
    args = parser.parse_args(argv)
    engine = build.engine_command(args.engine)
    env = build.engine_env(engine)
    records, expected = inputs_and_expected(args.export)
    try:
        figures = check_image(engine, env, args.tag, records, expected)
        if args.compose:
            check_compose(engine, env, args.tag, records, expected)
    except (CheckFailed, requests.RequestException, subprocess.CalledProcessError) as exc:
        detail = f"{exc}\n{exc.stderr}" if isinstance(exc, subprocess.CalledProcessError) else str(exc)
        print(f"FAIL {detail}", file=sys.stderr)
        return 1
    size = build.image_size(engine, env, args.tag)
    print(f"image {args.tag}: {size / 1e9:.2f} GB, cold start {figures['cold_start_s']:.1f} s, "
          f"SIGTERM -> exit 0 in {figures['stop_s']:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
