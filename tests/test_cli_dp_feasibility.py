"""Say when DP cannot learn, before training: `policy check --world`, the `simulate` header and
`--dry-run`, and `node start` report the expected signal-to-noise of every DP release, with a warning
naming the fixes (privacy.feasibility)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from worldlm_secure.cli import main

from conftest import REPO, write_world

DP_WORLD = REPO / "examples" / "world-dp.yaml"
CANNOT_LEARN = "DP cannot learn"
FIXES = ("use record-level DP", "more members", "fewer released parameters")


def _dp_world(folder: Path) -> Path:
    """2 federations x 2 sites, every node user-level DP at ε 8 (central Gaussian), 1 round."""
    (folder / "policies").mkdir(exist_ok=True)
    text = (REPO / "examples" / "policies" / "dp-eps8.yaml").read_text()
    (folder / "policies" / "dp-eps8.yaml").write_text(text.replace("../../policies/research-open.yaml", "research-open.yaml"))
    return write_world(folder, policy="dp-eps8.yaml", rounds=1)


def _assert_warns(text: str, release: str) -> None:
    flat = " ".join(text.split())
    assert f"{CANNOT_LEARN}: {release} (user level) has expected signal-to-noise" in flat, flat[-3000:]
    for fix in FIXES:
        assert fix in flat


def test_policy_check_world_prints_snr_and_the_fixes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "check", "--world", str(DP_WORLD)]) == 0  # a warning, not an error
    out = capsys.readouterr().out
    assert "expected signal-to-noise of each DP release" in out
    for fed in ("eu", "us", "apac"):
        _assert_warns(out, f"key at {fed}")
        _assert_warns(out, f"shared at {fed}")


def test_policy_check_world_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "check", "--json", "--world", str(DP_WORLD), str(REPO / "policies" / "eu.yaml")]) == 0
    doc = json.loads(capsys.readouterr().out)
    rows = doc["world"]["dp_feasibility"]
    assert doc["ok"] and doc["files"][0]["ok"] and len(rows) == 6
    assert all(r["snr"] < 1 and r["warnings"] and r["contributors"] == 3 for r in rows)


def test_policy_check_world_without_dp_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "check", "--world", str(REPO / "examples" / "world.yaml")]) == 0
    out = capsys.readouterr().out
    assert "no release is under differential privacy" in out and CANNOT_LEARN not in out


def test_policy_check_needs_files_or_a_world(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "check"]) == 2
    assert "--world" in capsys.readouterr().err


def test_simulate_dry_run_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    world = _dp_world(tmp_path)
    assert main(["simulate", str(world), "--dry-run", "--threads", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    _assert_warns(out, "key at f0")
    assert "dry run: nothing trained" in out


@pytest.mark.slow
def test_simulate_header_warns_before_the_first_round(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    world = _dp_world(tmp_path)
    code = main(["simulate", str(world), "--out", str(tmp_path / "out"), "--methods", "worldlm,fedavg",
                 "--rounds", "1", "--threads", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0, out
    _assert_warns(out, "shared at f1")
    _assert_warns(out, "shared at world")  # fedavg: one flat federation of the 4 sites
    first_round = out.index("round 1/1")  # not a terminal: one plain line per round
    assert out.index(CANNOT_LEARN) < first_round
    assert out.index("expected signal-to-noise") < first_round
    # The plan predicts exactly what the engine then records in results.json (one `plan_feasibility`).
    recorded = json.loads((tmp_path / "out" / "results.json").read_text())["methods"]["worldlm"]["dp_feasibility"]
    assert main(["simulate", str(world), "--dry-run", "--json", "--threads", "1", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["dp_feasibility"] == recorded


def test_node_start_reports_each_release_it_takes_part_in(caplog: pytest.LogCaptureFixture) -> None:
    """`start_node` calls `report_feasibility` right after its checks, before any round."""
    from worldlm_secure.node.context import load_context
    from worldlm_secure.node.runner import node_feasibility, report_feasibility

    ctx = load_context(DP_WORLD)
    events: list[tuple[str, dict]] = []
    with caplog.at_level(logging.WARNING, logger="worldlm_secure.dp"):
        report_feasibility(ctx, "eu-a", lambda event, **fields: events.append((event, fields)))
    assert [e for e, _ in events] == ["dp_feasibility", "dp_feasibility"]
    assert sorted(f["release"] for _, f in events) == ["key at eu", "shared at eu"]
    assert all(f["snr"] < 1 and f["contributors"] == 3 for _, f in events)
    _assert_warns(caplog.text, "key at eu")
    assert [f.release for f in node_feasibility(ctx, "eu")] == ["key at eu", "shared at eu"]  # the aggregator too
    assert node_feasibility(ctx, "world") == []  # the root's release is post-processing: no noise of its own
