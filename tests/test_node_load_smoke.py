"""benchmarks/node_load.py runs end to end at a small size (its own check: the masked sum equals the plain sum)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_node_load_benchmark_small(tmp_path: Path) -> None:
    out = tmp_path / "node_load.json"
    subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "node_load.py"), "--sites", "5", "--dim", "2000", "--out", str(out)],
        check=True, timeout=300, cwd=REPO,
    )
    report = json.loads(out.read_text())
    assert report["contributors"] == 5 and report["sites"] == 5
    assert report["max_abs_error"] <= report["quantization_bound"]
    assert report["bytes_up_per_site"] > 4 * 2000  # the masked vector at least
