"""Write the Production model, self-contained, plus its metadata to a folder (what the image serves).

    python -m entrypoints.export --output export       # make export
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fmnist_pyfunc import cli, export, registry

DEFAULT_OUTPUT = "export"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="folder to write (default: %(default)s)")
    args = parser.parse_args(argv)
    cli.use_tracking_store()
    try:
        info = export.export_production(Path(args.output))
    except registry.PromotionError as exc:
        parser.error(str(exc))
    print(f"exported {info['name']} v{info['version']} ({info['stage']}) to {args.output}/{export.EXPORT_MODEL_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
