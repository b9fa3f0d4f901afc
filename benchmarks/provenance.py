"""What every benchmark's JSON says about its run: the command line, when, which commit, which Python, CPUs.

Imported by the scripts beside it (`python benchmarks/NAME.py` puts this folder on ``sys.path``).
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def git(*args: str) -> str | None:
    """``git ARGS`` in the repository, stripped; None where git or the repository is missing."""
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def run_info(benchmark: str, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The provenance fields of a benchmark run (``argv``: its arguments; default: this process's)."""
    args = list(argv) if argv is not None else sys.argv[1:]
    return {
        "benchmark": benchmark,
        "command": f"python benchmarks/{benchmark}.py " + " ".join(args),
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git("rev-parse", "HEAD"),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
