"""Print pyproject.toml's [project] dependencies, one per line: what the image installs, and nothing else.

    python container/requirements.py pyproject.toml > requirements.txt
Run by the Dockerfile's build stage and by container/build.py (the offline wheelhouse), so the image's
packages have one source. Standard library only: it runs before anything is installed.
"""

import sys
import tomllib

if __name__ == "__main__":
    with open(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml", "rb") as f:
        print("\n".join(tomllib.load(f)["project"]["dependencies"]))
