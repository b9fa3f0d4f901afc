"""The GPT-2 124M benchmark script runs end to end on a tiny GPT-2 and writes the keys the issue asks for."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpt2_124m.py"


def test_benchmark_script_runs_tiny_and_writes_its_json(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("gpt2_124m_bench", SCRIPT)
    assert spec and spec.loader
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "r.json"
    res = bench.main(["--size", "tiny", "--steps", "1", "--batch", "2", "--seq-len", "16", "--repeats", "1",
                      "--warmup", "1", "--codec-repeats", "1", "--device", "cpu", "--threads", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    assert {"params", "device", "tokens_per_s_engine", "tokens_per_s_bare", "engine_vs_bare", "seq_len", "batch",
            "steps", "torch_version", "threads", "engine_vs_bare_cpu"} <= set(data)
    assert data == json.loads(json.dumps(res))
    assert data["device"] == "cpu" and data["autocast"] == "none (fp32)"
    assert data["seq_len"] == 16 and data["batch"] == 2 and data["steps"] == 1 and data["threads"] == 1
    assert data["tokens_per_block"] == 1 * 2 * 16
    assert data["tokens_per_s_engine"] > 0 and data["tokens_per_s_bare"] > 0
    # the codec covers every parameter once, plus one weight per tensor, as float64
    assert data["codec"]["vector_len"] == data["params"] + data["codec"]["tensors"]
    assert data["codec"]["vector_bytes"] == 8 * data["codec"]["vector_len"]
    assert data["mean_loss_engine"] is not None and data["mean_loss_engine"] > 0
