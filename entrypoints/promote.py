"""Register a run's model and promote it to Production (alias `champion`) if it beats the current one.

    python -m entrypoints.promote --run-id <id>           # a given run
    python -m entrypoints.promote --experiment fashion-mnist   # best run by validation accuracy
    mlflow run . -e promote --env-manager local -P run_id=<id> -P force=true
"""

from __future__ import annotations

import argparse
import sys

import mlflow

from fmnist_pyfunc import cli, data, promotion, registry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-id", default="", help="run to promote; empty: the best run (default: best run)")
    parser.add_argument("--parent-run-id", default="",
                        help="with no --run-id: pick the best child of this sweep run (default: none)")
    cli.add_experiment_argument(parser)
    parser.add_argument("--force", type=cli.parse_bool, default=False,
                        help="promote even if it does not beat Production (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        dataset = data.load()
    except data.DataError as exc:
        parser.error(str(exc))
    cli.use_tracking_store()
    try:
        run_id = args.run_id or promotion.best_run(args.experiment, args.parent_run_id or None)
        cli.use_experiment(args.experiment)
        with mlflow.start_run(run_name="promote"):
            mlflow.log_params({"candidate_run_id": run_id, "force_promotion": args.force})
            decision = promotion.promote(run_id, dataset, force=args.force)
            promotion.log_decision(decision)
    except registry.PromotionError as exc:
        parser.error(str(exc))
    print(decision.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
