"""The team's tracking server: `mlflow server` on a shared database, with MLflow's basic-auth app.

    export MLFLOW_TRACKING_ADMIN_PASSWORD=...  MLFLOW_FLASK_SERVER_SECRET_KEY=...  PGPASSWORD=...
    python -m entrypoints.tracking_server --backend-store-uri postgresql://mlflow@db-host/mlflow \\
        --artifacts-destination /srv/mlartifacts --host 0.0.0.0          # make tracking-server
Every request needs a user (HTTP basic auth; clients set MLFLOW_TRACKING_USERNAME and
MLFLOW_TRACKING_PASSWORD); `admin` is created on first start with MLFLOW_TRACKING_ADMIN_PASSWORD and
creates the others (MLflow's UI, or `mlflow.server.get_app_client("basic-auth")`). New users may read
everything and change only what they create or are granted. Passwords come from the environment, never from
the command line (where `ps` shows them) or a URL; PostgreSQL's from PGPASSWORD or ~/.pgpass. Serve it
behind TLS (a reverse proxy): basic auth sends the password with every request.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import sqlalchemy.engine

from fmnist_pyfunc import config

ADMIN_PASSWORD_ENV = "MLFLOW_TRACKING_ADMIN_PASSWORD"
SECRET_KEY_ENV = "MLFLOW_FLASK_SERVER_SECRET_KEY"  # MLflow's: signs CSRF tokens; the same on every replica
MIN_PASSWORD_CHARS = 12
DEFAULT_PERMISSION = "READ"  # what a user may do with what they did not create and were not granted
# MLflow checks the password hash (deliberately slow) on every request unless it may cache a successful
# check; a cached login stays valid on other workers for this long after a password change. Off, as MLflow
# ships it: a team turns it on knowingly (--auth-cache-ttl-s).
DEFAULT_AUTH_CACHE_TTL_S = 0
# MLflow 3's server starts a job runner and its queue consumers (five more processes) for its GenAI features
# (LLM judges, trace roll-ups), which this project does not use: off unless the environment turns it on.
JOB_EXECUTION_ENV = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"


def auth_config(auth_db: str, admin_password: str, cache_ttl_s: int = DEFAULT_AUTH_CACHE_TTL_S) -> str:
    return (f"[mlflow]\ndefault_permission = {DEFAULT_PERMISSION}\ndatabase_uri = {auth_db}\n"
            f"admin_username = admin\nadmin_password = {admin_password}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            f"auth_cache_ttl_seconds = {cache_ttl_s}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend-store-uri", required=True, help="runs and registry: postgresql://user@host/db")
    parser.add_argument("--auth-db-uri", default="",
                        help="users and permissions; a shared database when several servers run "
                             "(default: sqlite in --state-dir)")
    parser.add_argument("--artifacts-destination", required=True, help="where artifacts are kept (folder or s3://)")
    parser.add_argument("--host", default=config.LOOPBACK, help="bind address (default: %(default)s)")
    parser.add_argument("--port", type=int, default=config.MLFLOW_UI_PORT, help="(default: %(default)s)")
    parser.add_argument("--state-dir", type=Path, default=Path(".tracking-server"),
                        help="where the generated auth config is written, mode 600 (default: %(default)s)")
    parser.add_argument("--auth-cache-ttl-s", type=int, default=DEFAULT_AUTH_CACHE_TTL_S,
                        help="keep a successful login this many seconds per worker instead of re-hashing the "
                             "password on every request; a changed password may still work that long on other "
                             "workers; 0: off (default: %(default)s)")
    parser.add_argument("mlflow_args", nargs=argparse.REMAINDER,
                        help="after --: passed to `mlflow server`, e.g. -- --allowed-hosts tracking.example.org")
    args = parser.parse_args(argv)
    password, secret = os.environ.get(ADMIN_PASSWORD_ENV, ""), os.environ.get(SECRET_KEY_ENV, "")
    if len(password) < MIN_PASSWORD_CHARS or not secret:
        parser.error(f"set {ADMIN_PASSWORD_ENV} (at least {MIN_PASSWORD_CHARS} characters) and {SECRET_KEY_ENV} "
                     "(any long random string, e.g. `openssl rand -hex 32`) in the environment")
    if args.auth_cache_ttl_s < 0:
        parser.error("--auth-cache-ttl-s must be >= 0")
    if any(sqlalchemy.engine.make_url(uri).password for uri in (args.backend_store_uri, args.auth_db_uri) if uri):
        parser.error("a database URI holds a password: drop it and set PGPASSWORD or use ~/.pgpass")
    args.state_dir.mkdir(parents=True, exist_ok=True)
    ini = args.state_dir / "basic_auth.ini"
    ini.touch(mode=0o600)
    auth_db = args.auth_db_uri or f"sqlite:///{(args.state_dir / 'basic_auth.db').resolve()}"
    ini.write_text(auth_config(auth_db, password, args.auth_cache_ttl_s))
    os.environ["MLFLOW_AUTH_CONFIG_PATH"] = str(ini.resolve())
    os.environ.setdefault(JOB_EXECUTION_ENV, "false")
    command = [str(Path(sys.executable).parent / "mlflow"), "server", "--app-name", "basic-auth",
               "--backend-store-uri", args.backend_store_uri, "--artifacts-destination", args.artifacts_destination,
               "--host", args.host, "--port", str(args.port), *[a for a in args.mlflow_args if a != "--"]]
    os.execv(command[0], command)  # mlflow takes this process over: signals reach it directly


if __name__ == "__main__":
    sys.exit(main())
