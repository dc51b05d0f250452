"""Sweep wall time with 1 and with 2 worker processes sharing one Optuna study (same budget, same machine).

Each worker is `python -m entrypoints.sweep` as a user would start it on another machine; here they share
a temporary SQLite tracking store and Optuna storage (pass --storage/--tracking-uri for PostgreSQL and a
tracking server). Torch threads are split so that the workers together use the machine's cores.

    python benchmarks/sweep_scaling.py                     # quick preset, 6 trials
    python benchmarks/sweep_scaling.py --preset default --n-trials 4
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow


def run_workers(workers: int, args: argparse.Namespace, root: Path) -> float:
    storage = args.storage or f"sqlite:///{root}/optuna-{workers}.db"
    tracking = args.tracking_uri or f"sqlite:///{root}/mlflow-{workers}.db"
    threads = max(1, (os.cpu_count() or 1) // workers)
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking, OMP_NUM_THREADS=str(threads))
    command = [sys.executable, "-m", "entrypoints.sweep", "--preset", args.preset, "--n-trials", str(args.n_trials),
               "--budget-minutes", str(args.budget_minutes), "--storage", storage,
               "--study", f"scaling-{workers}-{int(time.time())}", "--promote", "false",
               "--experiment", "sweep-scaling"]
    # Create the store's schema once: MLflow's SQLite migrations race when two processes open a new file.
    mlflow.MlflowClient(tracking_uri=tracking).search_experiments()
    start = time.perf_counter()
    logs = [root / f"worker-{workers}-{i}.log" for i in range(workers)]
    processes = [subprocess.Popen(command, env=env, cwd=root, stdout=log.open("w"), stderr=subprocess.STDOUT)
                 for log in logs]
    for process, log in zip(processes, logs, strict=True):
        if process.wait() != 0:
            raise SystemExit(f"a worker failed (workers={workers}):\n{log.read_text()[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="quick", help="sweep preset (default: %(default)s)")
    parser.add_argument("--n-trials", type=int, default=6, help="study budget (default: %(default)s)")
    parser.add_argument("--budget-minutes", type=float, default=60,
                        help="each run's time budget, far above what the trials need, so that both train the same "
                             "shape and finish the same trials (default: %(default)s)")
    parser.add_argument("--storage", default="", help="Optuna storage URL (default: a temporary SQLite file)")
    parser.add_argument("--tracking-uri", default="", help="MLflow tracking URI (default: a temporary SQLite file)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one = run_workers(1, args, Path(tmp))
        two = run_workers(2, args, Path(tmp))
    print(f"{args.preset} preset, {args.n_trials} trials, {os.cpu_count()} CPU cores")
    print(f"1 worker : {one:6.1f} s")
    print(f"2 workers: {two:6.1f} s   speed-up x{one / two:.2f}")


if __name__ == "__main__":
    main()
