"""Build the image `fmnist:latest` from an exported model, with docker when an engine runs, else podman.

    python container/build.py --export export                  # make image (after make export)
    python container/build.py --export export --offline        # no registry reachable from the build
The build context is staged in a temporary folder: the paths .dockerignore allows, the export given here
as `export/`, and (offline) a wheelhouse the host's pip fills from pyproject.toml's dependencies, so the
Dockerfile's build stage installs without an index. Offline, a missing `python:3.11-slim` base is made
from Debian with debootstrap (Python 3.11 too). Standard library only: it runs beside any engine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TAG = "fmnist:latest"
BASE_IMAGE = "python:3.11-slim"        # the Dockerfile's FROM
DEBIAN_SUITE = "bookworm"              # Debian 12: its python3 is 3.11, as the base's
DEBIAN_MIRROR = "http://deb.debian.org/debian"
WHEELHOUSE = Path("container/wheelhouse")  # inside the context; the Dockerfile bind-mounts it
WHEEL_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fmnist-pyfunc" / "wheelhouse"
DONE_MARKER = ".complete"              # a wheel folder without it was interrupted: pip download fills it up
PODMAN_CONF = REPO / "container" / "podman.conf"
SOURCE_URL = "https://github.com/fmnist-pyfunc/fmnist-pyfunc"  # OCI label when git knows no remote


def engine_command(engine: str) -> list[str]:
    """The engine's command line; 'auto' picks docker when its daemon answers, else podman."""
    if engine == "auto":
        docker_up = shutil.which("docker") and subprocess.run(
            ["docker", "info"], capture_output=True).returncode == 0
        engine = "docker" if docker_up else "podman"
    if not shutil.which(engine):
        sys.exit("build: neither a running docker nor podman found; install one (apt-get install podman)")
    return [engine]


def engine_env(engine: list[str]) -> dict:
    """podman reads the project's settings (container/podman.conf) unless CONTAINERS_CONF names others."""
    env = dict(os.environ)
    if engine[0] == "podman" and "CONTAINERS_CONF" not in env:
        env["CONTAINERS_CONF"] = str(PODMAN_CONF)
    return env


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(command), flush=True)
    return subprocess.run(command, check=True, **kwargs)


def ensure_base(engine: list[str], env: dict) -> None:
    """The Debian-made base, when the engine has no `python:3.11-slim` (no registry to pull it from)."""
    if subprocess.run([*engine, "image", "inspect", BASE_IMAGE], capture_output=True, env=env).returncode == 0:
        return
    if not shutil.which("debootstrap"):
        sys.exit("build: no python:3.11-slim image and no debootstrap to make one (apt-get install debootstrap)")
    with tempfile.TemporaryDirectory(prefix="fmnist-base-") as root:
        run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,python-is-python3",
             DEBIAN_SUITE, root, DEBIAN_MIRROR], stdout=subprocess.DEVNULL)
        tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
        tag = f"localhost/{BASE_IMAGE}" if engine[0] == "podman" else BASE_IMAGE
        run([*engine, "import", "--change", 'CMD ["python3"]', "-", tag], stdin=tar.stdout, env=env)
        tar.wait()


def fill_wheel_cache() -> Path:
    """Every wheel that pyproject's dependencies resolve to on this host (its pip, its index), in a folder
    of their own per dependency list, so the image gets exactly that set and nothing left from older pins."""
    requirements = subprocess.run([sys.executable, str(REPO / "container" / "requirements.py"),
                                   str(REPO / "pyproject.toml")], check=True, capture_output=True, text=True).stdout
    folder = WHEEL_CACHE / hashlib.sha256(requirements.encode()).hexdigest()[:12]
    if not (folder / DONE_MARKER).exists():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "requirements.txt").write_text(requirements)
        run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "-d", str(folder),
             "-r", str(folder / "requirements.txt")])
        (folder / DONE_MARKER).touch()
    return folder


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:  # another filesystem
        shutil.copy2(source, destination)


def allowed_paths() -> list[str]:
    """What .dockerignore lets into the context (its `!path` lines): the one list of what the image holds."""
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line[1:].rstrip("/") for line in lines if line.startswith("!")]


def stage_context(context: Path, export: Path, wheels: Path | None) -> None:
    shutil.copy2(REPO / "Dockerfile", context / "Dockerfile")
    shutil.copy2(REPO / ".dockerignore", context / ".dockerignore")
    for path in allowed_paths():
        source = export if path == "export" else REPO / path
        if path == WHEELHOUSE.as_posix():
            (context / path).mkdir(parents=True)
            for wheel in sorted(wheels.glob("*.whl")) if wheels else []:
                _link_or_copy(str(wheel), str(context / path / wheel.name))
        elif source.is_dir():
            shutil.copytree(source, context / path, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.partial"))
        else:
            (context / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, context / path)


def labels(export: Path) -> list[str]:
    """OCI labels: where the image comes from and which model it serves."""
    info = json.loads((export / "model_info.json").read_text())

    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else ""

    source = git("remote", "get-url", "origin") or SOURCE_URL
    values = {"SOURCE_URL": source, "REVISION": git("rev-parse", "HEAD") or os.environ.get("GITHUB_SHA", ""),
              "MODEL_NAME": info["name"], "MODEL_VERSION": str(info["version"]), "MODEL_RUN_ID": info["run_id"] or ""}
    return [arg for key, value in values.items() for arg in ("--build-arg", f"{key}={value}")]


def image_size(engine: list[str], env: dict, tag: str) -> int:
    result = subprocess.run([*engine, "image", "inspect", "--format", "{{.Size}}", tag], check=True,
                            capture_output=True, text=True, env=env)
    return int(result.stdout.strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", type=Path, default=Path("export"),
                        help="the exported model folder, from `make export` (default: %(default)s)")
    parser.add_argument("--tag", default=DEFAULT_TAG, help="image name (default: %(default)s)")
    parser.add_argument("--engine", choices=("auto", "docker", "podman"), default="auto",
                        help="container engine (default: %(default)s: docker if its daemon runs, else podman)")
    parser.add_argument("--offline", action="store_true",
                        help="install from a wheelhouse the host's pip fills, base from Debian if missing")
    args = parser.parse_args(argv)
    if not (args.export / "model" / "MLmodel").is_file() or not (args.export / "model_info.json").is_file():
        parser.error(f"{args.export} holds no exported model: run `make export` first")
    engine = engine_command(args.engine)
    env = engine_env(engine)
    started = time.monotonic()
    wheels = fill_wheel_cache() if args.offline else None
    if args.offline:
        ensure_base(engine, env)
    with tempfile.TemporaryDirectory(prefix="fmnist-context-", dir=WHEEL_CACHE if wheels else None) as tmp:
        stage_context(Path(tmp), args.export.resolve(), wheels)
        format_flags = ["--format", "docker"] if engine[0] == "podman" else []  # OCI drops HEALTHCHECK
        run([*engine, "build", *format_flags, *labels(args.export), "-t", args.tag, tmp], env=env)
    size = image_size(engine, env, args.tag)
    print(f"built {args.tag} with {engine[0]} in {time.monotonic() - started:.0f} s: {size / 1e9:.2f} GB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
