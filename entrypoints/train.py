"""Train one model and log it to MLflow as a pyfunc model.

    python -m entrypoints.train --epochs 3 --width 16
    mlflow run . -e train --env-manager local -P epochs=3
    mlflow run . -e train --env-manager local -P feedback=true   # + users' corrections from the prediction log
"""

from __future__ import annotations

import argparse
import sys

import mlflow

from fmnist_pyfunc import cli, config, data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_training_arguments(parser)
    cli.add_experiment_argument(parser)
    args = parser.parse_args(argv)
    try:
        cfg = config.validate(cli.training_config(args))
        dataset = data.load()  # before any run exists: a data problem leaves nothing half-written
        corrections = None
        if cfg["feedback"]:  # read before any run exists too; its module brings torch, so only when asked for
            from fmnist_pyfunc import feedback

            corrections = feedback.snapshot()
    except (ValueError, LookupError, data.DataError) as exc:  # LookupError: feedback.NoFeedback
        parser.error(str(exc))
    from fmnist_pyfunc import tracking  # here: a refused parameter is reported before torch and matplotlib load

    cli.use_tracking_store()
    cli.use_experiment(args.experiment)
    run_id = tracking.run_training(cfg, dataset, corrections=corrections)
    test_accuracy = mlflow.get_run(run_id).data.metrics["test_accuracy"]
    print(f"run {run_id}: test_accuracy={test_accuracy:.4f} (tracking: {mlflow.get_tracking_uri()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
