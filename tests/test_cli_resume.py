"""Long runs: plain lines when piped, Ctrl-C keeps what finished, --resume / --overwrite, divergence flagged.

Each run is a real `worldlm-secure simulate` process whose stdout is a pipe (not a terminal).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import write_world

REPO = Path(__file__).resolve().parents[1]


def _world(tmp_path: Path, local_steps: int = 2) -> Path:
    world = write_world(tmp_path, rounds=3)
    world.write_text(world.read_text().replace("local_steps: 2", f"local_steps: {local_steps}"))
    return world


def _cmd(world: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "worldlm_secure.cli", "simulate", str(world), "--out", str(out),
            "--methods", "worldlm,fedavg", "--threads", "1", "--device", "cpu", *extra]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)


def _ledgers(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "ledgers").rglob("*.sqlite"))}


def _verify_all(out: Path) -> int:
    from worldlm_secure.ledger import read_entries, verify

    n = 0
    for path in sorted((out / "ledgers").rglob("*.sqlite")):
        rep = verify(path)
        assert rep.ok, f"{path}: {rep.problem}"
        entries = read_entries(path)
        ids = [e.release_id for e in entries]
        assert len(ids) == len(set(ids)), f"{path}: an entry is repeated: {ids}"
        n += len(entries)
    return n


def _interrupt_during_second_method(world: Path, out: Path, sig: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(_cmd(world, out), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.time() + 500
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("fedavg round 1/"):  # worldlm finished and is saved; fedavg is mid-run
            proc.send_signal(sig)
            break
        assert time.time() < deadline, "".join(lines)
    rest = proc.stdout.read()
    proc.wait(timeout=120)
    proc.output = "".join(lines) + rest  # type: ignore[attr-defined]
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_interrupted_run_resumes_without_repeating_a_ledger_entry(tmp_path: Path, sig: int) -> None:
    world = _world(tmp_path, local_steps=12)
    out = tmp_path / "out"
    proc = _interrupt_during_second_method(world, out, sig)
    text = proc.output  # type: ignore[attr-defined]
    # piped: one plain line per round and method (loss, perplexity, ε, seconds), no progress bar
    assert "worldlm round 1/3: loss " in text and ", ppl " in text and " s\n" in text and "━" not in text
    partial = json.loads((out / "results.partial.json").read_text())
    assert list(partial["methods"]) == ["worldlm"]
    if sig == signal.SIGINT:
        assert proc.returncode == 130, text
        assert "interrupted: kept" in text and "results.partial.json (finished: worldlm)" in text and "--resume" in text
        assert "Traceback" not in text
    else:
        assert proc.returncode == -signal.SIGKILL
    kept = {k: v for k, v in _ledgers(out).items() if "/" not in k.removeprefix("ledgers/")}
    assert kept, "worldlm's ledgers"

    again = _run(_cmd(world, out))
    assert again.returncode == 2 and "an earlier run is there" in again.stderr and "--resume" in again.stderr

    resumed = _run(_cmd(world, out, "--resume"))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "--resume: kept worldlm" in resumed.stdout and "worldlm round" not in resumed.stdout
    after = _ledgers(out)
    assert {k: after[k] for k in kept} == kept  # the finished method's ledgers are untouched
    assert any(k.startswith("ledgers/fedavg/") for k in after)
    assert _verify_all(out) > 0
    res = json.loads((out / "results.json").read_text())
    assert list(res["methods"]) == ["worldlm", "fedavg"] and res["resumed_from_earlier_run"] == ["worldlm"]
    assert not (out / "results.partial.json").exists()
    for m in res["methods"].values():
        assert len(m["rounds"]) == 3 and m["diverged"] is None


@pytest.mark.slow
def test_overwrite_and_json_summary(tmp_path: Path) -> None:
    world = _world(tmp_path)
    out = tmp_path / "out"
    first = _run(_cmd(world, out, "--rounds", "1"))
    assert first.returncode == 0, first.stderr
    assert "torch thread(s)" in first.stdout  # the header states the threads
    again = _run(_cmd(world, out, "--rounds", "1", "--overwrite", "--json"))
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert set(summary["methods"]) == {"worldlm", "fedavg"} and summary["results"].endswith("results.json")
    assert all(m["diverged"] is None for m in summary["methods"].values())
    assert "--overwrite: removed" in again.stderr
    assert _verify_all(out) > 0


def test_resume_refuses_other_settings(tmp_path: Path) -> None:
    from worldlm_secure.cli import main

    world = _world(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.partial.json").write_text(json.dumps({"partial": True, "methods": {}, "run": {
        "world_sha256": "0" * 64, "rounds": 3, "seed": 0}}))
    assert main(["simulate", str(world), "--out", str(out), "--resume", "--threads", "1"]) == 2


def test_divergence_is_flagged_and_plots_use_log_scale(tmp_path: Path) -> None:
    from worldlm_secure.federation.results import divergence, flag_divergence, fmt_ppl, write_plots

    ok = {"mean_val_ppl": 50.0, "rounds": [{"round": 1, "mean_val_ppl": 60.0}], "sites": {"a": {"val_ppl": 50.0}}}
    big = {"mean_val_ppl": 1.5e6, "rounds": [{"round": 1, "mean_val_ppl": 1.5e6}], "sites": {"a": {"val_ppl": 1.5e6}}}
    nan = {"mean_val_ppl": float("nan"), "rounds": [], "sites": {"a": {"val_ppl": float("nan")}}}
    assert divergence(ok, 1024) is None
    assert "exceeds 1024" in divergence(big, 1024) and "not finite" in divergence(nan, None)
    assert fmt_ppl(1e130) == "1e+130" and fmt_ppl(52.234) == "52.23"
    payload = flag_divergence({"world": "w", "diverged_above_ppl": 1024.0, "entropy_floor_ppl": None,
                               "methods": {"worldlm": ok, "fedavg": big}})
    assert payload["methods"]["fedavg"]["diverged"] and payload["methods"]["worldlm"]["diverged"] is None
    import matplotlib.pyplot as plt

    seen: list[str] = []
    real = plt.Axes.set_yscale
    plt.Axes.set_yscale = lambda self, v, **k: (seen.append(v), real(self, v, **k))[1]  # type: ignore[method-assign]
    try:
        write_plots(payload, tmp_path)
    finally:
        plt.Axes.set_yscale = real  # type: ignore[method-assign]
    assert seen.count("log") == 2  # the rounds plot and the per-site bars

    from worldlm_secure.cli.simulate import table
    from rich.console import Console

    c = Console(width=120)
    with c.capture() as cap:
        c.print(table(payload))
    assert "fedavg (diverged)" in cap.get() and "1.5e+06" in cap.get()
