"""The root killed with kill -9 mid-round and restarted: it resumes from its checkpoint, the federations
re-release what they had aggregated, and the world ends exactly where an uninterrupted run ends (the
in-process `simulate` of the same world and seed), with the same ledger entries, none duplicated."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodeworld import Events, assert_like_simulate, run_with_one_restart, small_world
from worldlm_secure.node.world_up import collect_results


@pytest.mark.slow
def test_root_restart_resumes_and_matches_simulate(tmp_path: Path) -> None:
    world_path = small_world(tmp_path / "w", rounds=2, timeouts={"train": 240, "step": 60, "heartbeat": 1, "dropout": 120})
    state = tmp_path / "state"
    events = Events()
    world, _, codes = run_with_one_restart(world_path, state, events, "world",
                                           {"node": "world", "event": "aggregated", "round": 1, "phase": "shared"})
    assert all(c == 0 for c in codes.values()), codes
    assert len(events.all(node="world", event="announced", round=1, phase="shared")) == 2  # round 1 re-run

    deployed = collect_results(world, state, 0.0)["methods"]["worldlm"]["sites"]
    assert_like_simulate(world_path, deployed, state, tmp_path / "sim", 1e-4,
                         "the restarted root must resume exactly; no ledger entry lost or duplicated")
