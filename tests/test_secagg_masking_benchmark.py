"""The masking benchmark script runs end to end at toy sizes and writes the keys the issue asks for."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "secagg_masking.py"


def test_benchmark_script_writes_its_json(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("secagg_masking_bench", SCRIPT)
    assert spec and spec.loader
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "r.json"
    bench.main(["--dim", "50000", "--neighbours", "4", "--repeats", "1", "--flwr-path", "",
                "--round-members", "8", "--round-dim", "300", "--out", str(out)])
    data = json.loads(out.read_text())
    assert {"mask_gbps", "vs_keystream_ratio", "vs_flwr_speedup", "round_100_members_s"} <= set(data)
    assert data["vs_flwr_speedup"] is None and "disabled" in data["client"]["flwr_skipped"]
    assert data["round"]["max_abs_error"] <= data["round"]["error_bound"]
