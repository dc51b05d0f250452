"""Team mode on real components over loopback: PostgreSQL, `mlflow server`, two sweep workers sharing a study."""

import configparser
import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
import requests
import sqlalchemy as sa
from conftest import BIN, REPO

from entrypoints import tracking_server as tracking_server_cli
from fmnist_pyfunc import config, promotion, registry
from fmnist_testkit import harness
from fmnist_testkit.harness import child_env, free_port, wait_until_up

pytestmark = pytest.mark.e2e
PG_BINS = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
BUDGET = 4  # trials in the shared study
AMPLE_BUDGET_MINUTES = 30  # the sweep's time budget, far above what BUDGET trials need: these tests are not about it
N_CHECKED = 200           # test images the promoted model must classify
BETTER_THAN_CHANCE = 0.5  # accuracy on them: chance is 0.1, a quick-preset model ~0.8


class Postgres:
    """A throwaway cluster owned by the `postgres` user (the server refuses to run as root)."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="fmnist-pg-"))  # not under pytest's 0700 tmp: postgres must enter
        self.port = free_port()
        self.as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_owner:
            shutil.chown(self.root, "postgres")
        self.bin = Path(PG_BINS[-1])
        self._run("initdb", "-D", str(self.root / "data"), "-U", "postgres", "--auth=trust")

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run([*self.as_owner, str(self.bin / tool), *args], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.root / "data"), "-l", str(self.root / "log"), "-w", "start",
                  "-o", f"-p {self.port} -h 127.0.0.1 -k {self.root}")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop")

    def url(self, db: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"


@pytest.fixture(scope="module")
def postgres():
    if not PG_BINS:
        pytest.fail("PostgreSQL is not installed: `apt-get install postgresql` (make system-deps does)")
    pg = Postgres()
    pg.start()
    for db in ("mlflow", "optuna"):
        pg._run("createdb", "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres", db)
    yield pg
    pg.stop()
    shutil.rmtree(pg.root, ignore_errors=True)


SERVER = {}  # the running tracking server's process id
ADMIN_PASSWORD = "team-mode-admin-0123"  # a test value: real ones come from the user's environment
# Two sweep workers log hundreds of requests: hashing the password for each cost minutes of CPU. A login is
# checked once per server worker instead (the option a team may choose too; off by default).
AUTH_CACHE_TTL_S = 3600


@pytest.fixture(scope="module")
def tracking_server(postgres, tracking_uri):
    """`make tracking-server` as the team runs it: MLflow's basic-auth app on PostgreSQL, artifacts proxied.
    Everything in this module logs in as admin (MLFLOW_TRACKING_USERNAME/PASSWORD, as team members do)."""
    port = free_port()
    root = Path(tempfile.mkdtemp(prefix="fmnist-artifacts-"))
    log = root / "server.log"
    env = {**child_env(tracking_uri), "MLFLOW_TRACKING_ADMIN_PASSWORD": ADMIN_PASSWORD,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret-key"}
    process = subprocess.Popen([str(BIN / "python"), "-m", "entrypoints.tracking_server",
                                "--backend-store-uri", postgres.url("mlflow"), "--state-dir", str(root / "auth"),
                                "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
                                "--port", str(port), "--auth-cache-ttl-s", str(AUTH_CACHE_TTL_S),
                                "--", "--workers", "2"],
                               env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_until_up(f"{url}/health", process, log)
    SERVER["pid"] = process.pid
    logins = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": ADMIN_PASSWORD}
    os.environ.update(logins)
    yield url
    for key in logins:
        os.environ.pop(key, None)
    process.terminate()
    process.wait(timeout=30)
    mlflow.set_tracking_uri(tracking_uri)


def test_the_tracking_server_refuses_anyone_without_a_login(tracking_server):
    """No credentials or a wrong password: 401 on the REST API; the admin's login: 200. It runs the web
    workers only: none of MLflow's GenAI job runners, which this project does not use."""
    commands = [harness.command_line(pid) for pid in harness.process_tree(SERVER["pid"])]
    assert any("mlflow server" in c or "mlflow.server" in c for c in commands), commands
    assert not any("jobs._job_runner" in c or "huey" in c for c in commands), commands
    search = f"{tracking_server}/api/2.0/mlflow/experiments/search?max_results=1"
    assert requests.get(search, timeout=10).status_code == 401
    assert requests.get(search, auth=("admin", "wrong-password"), timeout=10).status_code == 401
    assert requests.get(search, auth=("admin", ADMIN_PASSWORD), timeout=10).status_code == 200


def test_the_tracking_server_will_not_start_with_a_weak_or_inline_secret(postgres, tmp_path):
    """No admin password (or a short one), or a database password inside the URI: it refuses to start."""
    base = [str(BIN / "python"), "-m", "entrypoints.tracking_server", "--artifacts-destination", str(tmp_path),
            "--state-dir", str(tmp_path / "auth")]
    cases = [({"MLFLOW_TRACKING_ADMIN_PASSWORD": "short", "MLFLOW_FLASK_SERVER_SECRET_KEY": "k"},
              postgres.url("mlflow"), "at least 12"),
             ({"MLFLOW_TRACKING_ADMIN_PASSWORD": ADMIN_PASSWORD, "MLFLOW_FLASK_SERVER_SECRET_KEY": "k"},
              "postgresql://mlflow:secret@127.0.0.1/mlflow", "PGPASSWORD")]
    for extra, uri, words in cases:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_ADMIN")} | extra
        result = subprocess.run([*base, "--backend-store-uri", uri], env=env, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 2 and words in result.stderr, result.stderr[-500:]


def test_the_login_cache_is_off_unless_the_team_asks_for_it(tmp_path, monkeypatch, capsys):
    """MLflow's auth config as the entry point writes it: no cached logins by default (every request checks
    the password), the asked-for lifetime with --auth-cache-ttl-s, and a negative one refused."""
    def cache_ttl(ini: str) -> int:
        parser = configparser.ConfigParser()
        parser.read_string(ini)
        return parser.getint("mlflow", "auth_cache_ttl_seconds")

    assert cache_ttl(tracking_server_cli.auth_config("sqlite:///a.db", ADMIN_PASSWORD)) == 0
    assert cache_ttl(tracking_server_cli.auth_config("sqlite:///a.db", ADMIN_PASSWORD, 300)) == 300
    monkeypatch.setenv(tracking_server_cli.ADMIN_PASSWORD_ENV, ADMIN_PASSWORD)
    monkeypatch.setenv(tracking_server_cli.SECRET_KEY_ENV, "test-secret-key")
    with pytest.raises(SystemExit) as exit_:
        tracking_server_cli.main(["--backend-store-uri", "sqlite:///a.db", "--artifacts-destination", str(tmp_path),
                                  "--auth-cache-ttl-s", "-1"])
    assert exit_.value.code == 2 and "--auth-cache-ttl-s must be >= 0" in capsys.readouterr().err


def _worker(postgres, tracking_url: str, cwd: Path, study: str) -> subprocess.Popen:
    command = [str(BIN / "mlflow"), "run", str(REPO), "-e", "sweep", "--env-manager", "local", "--experiment-name",
               "team", "-P", "preset=quick", "-P", f"n_trials={BUDGET}", "-P", f"budget_minutes={AMPLE_BUDGET_MINUTES}",
               "-P", f"storage={postgres.url('optuna')}",
               "-P", f"study={study}"]
    # Fewer HTTP retries than MLflow's default (7, exponential backoff): the outage test waits on them.
    env = dict(child_env(tracking_url), MLFLOW_HTTP_REQUEST_MAX_RETRIES="2", MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1")
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _eventually(call, timeout_s: float = 60):
    """Retry while the tracking server's database connections recover from the restart."""
    deadline = time.time() + timeout_s
    while True:
        try:
            return call()
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(1)


def _children(study: str) -> list:
    runs = mlflow.search_runs(experiment_names=["team"], output_format="list",
                              filter_string=f"tags.`optuna.study` = '{study}'")
    return [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def test_two_workers_share_one_study_and_promote_once(postgres, tracking_server, tmp_path, dataset):
    """Every trial runs once, the count equals the budget, one promotion; the scoring server resolves Production
    through the tracking server and follows a later promotion through it."""
    # As docs/team.md says: create the experiment once before starting workers. `mlflow run` creates a missing
    # experiment itself, and two workers starting at the same moment race on that (RESOURCE_ALREADY_EXISTS).
    mlflow.MlflowClient(tracking_server).create_experiment("team")
    workers = [_worker(postgres, tracking_server, tmp_path, "team") for _ in range(2)]
    outputs = [w.communicate(timeout=900)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), "\n".join(o[-3000:] for o in outputs)

    study = optuna.load_study(study_name="team", storage=postgres.url("optuna"))
    counted = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(counted) == BUDGET
    mlflow.set_tracking_uri(tracking_server)
    children = _children("team")
    assert len(children) == BUDGET
    assert sorted(int(r.data.tags["optuna.trial"]) for r in children) == sorted(t.number for t in counted)
    assert sum("PROMOTED" in o or "NOT promoted" in o or "already in Production" in o for o in outputs) == 1
    assert sum("another worker finishes this study and promotes" in o for o in outputs) == 1

    with registry.stages_quietly():
        model = mlflow.pyfunc.load_model(config.PRODUCTION_MODEL_URI)
    frame = pd.DataFrame({"pixels": [img.tolist() for img in dataset.test_images[:N_CHECKED]]})
    classes = model.predict(frame)["class_index"].to_numpy()
    assert len(classes) == N_CHECKED and (classes == dataset.test_labels[:N_CHECKED]).mean() > BETTER_THAN_CHANCE
    scores = {r.info.run_id: r.data.metrics["best_val_accuracy"] for r in children if r.info.status == "FINISHED"}
    assert scores[model.metadata.run_id] == max(scores.values())  # the best (ties on 1,000 val images happen)

    # The scoring server resolves and follows Production through the tracking server too.
    port = free_port()
    log = tmp_path / "serve.log"
    command = harness.scoring_command(config.PRODUCTION_MODEL_URI, config.LOOPBACK, port) + ["--follow-interval-s", "1"]
    server = harness.start(command, child_env(tracking_server), f"http://127.0.0.1:{port}/ping", log)
    try:
        body = {"dataframe_records": [{"pixels": dataset.test_images[0].tolist()}]}
        served = requests.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=30).headers
        assert served["X-Model-Run-Id"] == model.metadata.run_id
        other = next(run_id for run_id in scores if run_id != model.metadata.run_id)
        promoted = promotion.promote(other, dataset, force=True)
        deadline = time.time() + 60
        while requests.post(f"http://127.0.0.1:{port}/invocations", json=body,
                            timeout=30).headers["X-Model-Version"] != promoted.version:
            assert time.time() < deadline, "the promotion was not followed through the tracking server"
            time.sleep(0.5)
    finally:
        harness.stop(server)


def test_postgres_down_mid_sweep_fails_clearly_and_resumes(postgres, tracking_server, tmp_path):
    """PostgreSQL stopped mid-sweep: the worker exits non-zero with the 'lost the study storage' message; finished
    runs stay; the same command completes the budget once it is back."""
    worker = _worker(postgres, tracking_server, tmp_path, "outage")
    lines = []
    for line in worker.stdout:
        lines.append(line)
        if "trial 0 COMPLETE" in line:
            break
    time.sleep(3)  # into trial 1
    postgres.stop()
    output = "".join(lines) + worker.communicate(timeout=300)[0]
    postgres.start()
    assert worker.returncode != 0
    assert "lost the study storage or the tracking server" in output and "resume" in output
    mlflow.set_tracking_uri(tracking_server)
    finished_before = {r.info.run_id for r in _eventually(lambda: _children("outage")) if r.info.status == "FINISHED"}
    assert len(finished_before) >= 1
    time.sleep(35)  # past Optuna's heartbeat grace: the interrupted trial is failed as stale
    resumed = _worker(postgres, tracking_server, tmp_path, "outage")
    output = resumed.communicate(timeout=900)[0]
    assert resumed.returncode == 0, output[-3000:]
    finished = {r.info.run_id for r in _children("outage") if r.info.status == "FINISHED"}
    assert finished_before <= finished
    study = optuna.load_study(study_name="outage", storage=postgres.url("optuna"))
    assert len([t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]) == BUDGET
    requests.get(f"{tracking_server}/health", timeout=5).raise_for_status()


def test_the_prediction_log_lives_in_the_teams_postgresql(postgres, dataset):
    """In team mode the log defaults to the tracking store's PostgreSQL database, in tables of its own beside
    MLflow's; two writers (two scoring workers, or servers) log into it, feedback and retention work there, and
    while PostgreSQL is down rows are dropped and counted, never waited for, until it is back."""
    from fmnist_pyfunc import metrics, prediction_log
    from fmnist_pyfunc.seen import Seen

    url = prediction_log.default_url(postgres.url("mlflow"))
    assert url.startswith("postgresql+psycopg://")

    def answered(start: int, n: int = 20) -> Seen:
        labels = dataset.test_labels[start:start + n]
        probabilities = np.eye(10)[labels] * 0.9 + 0.01
        return Seen(dataset.test_images[start:start + n], ["pixels"] * n, labels, probabilities, None)

    writers = [prediction_log.PredictionLog(url) for _ in range(2)]
    ids = [w.put({"name": "m", "version": str(i + 1), "run_id": "r"}, answered(20 * i)) for i, w in enumerate(writers)]
    assert all(w.flush() for w in writers)
    engine = prediction_log.connect(url)
    assert len(prediction_log.recent(engine, 100, "r")) == 40
    assert prediction_log.add_feedback(engine, f"{ids[0]}-3", int(dataset.test_labels[3]))["correct"] is True
    assert prediction_log.feedback_accuracy(engine) == [{"version": "1", "feedback": 1, "accuracy": 1.0}]
    # Retention keeps whole requests (a request's rows share their time): the newest request and the labelled row.
    assert prediction_log.prune(engine, max_rows=1, max_days=30) == 19
    assert {"fmnist_predictions", "fmnist_feedback"} <= set(sa.inspect(engine).get_table_names())

    postgres.stop()
    try:
        dropped = metrics.LOG_DROPPED._value.get()
        started = time.perf_counter()
        assert writers[0].put({"name": "m", "version": "1", "run_id": "r"}, answered(100))
        assert time.perf_counter() - started < 0.05
        writers[0].flush()
        assert metrics.LOG_DROPPED._value.get() == dropped + 20
    finally:
        postgres.start()
    back = writers[0].put({"name": "m", "version": "1", "run_id": "r"}, answered(200))
    assert writers[0].flush()
    assert len([r for r in prediction_log.recent(engine, 100, "r") if r.id.startswith(back)]) == 20
