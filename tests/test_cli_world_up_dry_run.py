"""`world up --dry-run` prints the plan `simulate --dry-run` prints and starts nothing."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from worldlm_secure.cli import main

from conftest import REPO

LOCAL_WORLD = REPO / "examples" / "local-world" / "world.yaml"


def _body(text: str) -> list[str]:
    """The plan without the command's own first (header) and last (dry run: ...) lines."""
    lines = text.rstrip("\n").splitlines()
    assert lines[-1].startswith("dry run:")
    return lines[1:-1]


def test_world_up_dry_run_prints_the_simulate_plan_and_starts_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_process(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"--dry-run started a process: {args}")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    state = tmp_path / "state"
    assert main(["world", "up", str(LOCAL_WORLD), "--state", str(state), "--dry-run"]) == 0
    up = capsys.readouterr().out
    assert not state.exists()  # no key issued, nothing written
    assert "dry run: no key issued, nothing written, no process started" in up
    assert main(["simulate", str(LOCAL_WORLD), "--dry-run", "--device", "cpu", "--threads", "1",
                 "--methods", "worldlm", "--out", str(tmp_path / "sim")]) == 0
    sim = capsys.readouterr().out
    assert _body(up) == _body(sim)
    body = "\n".join(_body(up))
    for part in ("releases per round", "planned privacy loss per member", "bytes up per round",
                 "expected signal-to-noise of each DP release", "eu-a site (eu.yaml)"):
        assert part in body


def test_world_up_dry_run_json_is_the_simulate_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["world", "up", str(LOCAL_WORLD), "--dry-run", "--json"]) == 0
    up = json.loads(capsys.readouterr().out)
    assert main(["simulate", str(LOCAL_WORLD), "--dry-run", "--json", "--device", "cpu", "--threads", "1",
                 "--out", str(tmp_path / "sim")]) == 0
    sim = json.loads(capsys.readouterr().out)
    for key in ("methods", "threads"):  # simulate's own additions
        sim.pop(key)
    assert up == sim


def test_world_up_json_needs_dry_run(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["world", "up", str(LOCAL_WORLD), "--json"]) == 2
    assert "--json: only with --dry-run" in capsys.readouterr().err
