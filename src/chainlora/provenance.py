"""Which code produced a result: recorded in every run's ``metrics.json`` (``code``).

Long experiments run from a frozen copy of the source (``scripts/freeze.sh``: ``git archive`` of one commit put
first on ``PYTHONPATH``), which has no ``.git``; the freeze writes the commit into ``chainlora/COMMIT`` instead.
"""

from __future__ import annotations

import subprocess
from functools import cache
from pathlib import Path

VERSION = "0.1.0"  # the package version (chainlora.__version__; pyproject.toml says the same)
PACKAGE_DIR = Path(__file__).resolve().parent
COMMIT_FILE = PACKAGE_DIR / "COMMIT"


@cache
def code_version() -> dict[str, str | None]:
    """``{"version", "commit", "source"}``: the package version, the commit it was frozen from or checked out at
    (``-dirty`` when the checkout has uncommitted changes), and the folder the code was imported from."""
    commit: str | None = None
    if COMMIT_FILE.is_file():
        commit = COMMIT_FILE.read_text().strip() or None
    else:
        try:
            head = subprocess.run(
                ["git", "-C", str(PACKAGE_DIR), "rev-parse", "--short=10", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.strip()
            dirty = subprocess.run(
                ["git", "-C", str(PACKAGE_DIR), "status", "--porcelain", "--untracked-files=no", "--", "."],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.strip()
            commit = head + ("-dirty" if dirty else "") if head else None
        except (OSError, subprocess.SubprocessError):
            commit = None
    return {"version": VERSION, "commit": commit, "source": str(PACKAGE_DIR.parent)}
