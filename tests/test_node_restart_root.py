"""The root killed with kill -9 mid-round and restarted: it resumes from its checkpoint, the federations
re-release what they had aggregated, and the world ends exactly where an uninterrupted run ends (the
in-process `simulate` of the same world and seed), with the same ledger entries, none duplicated."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from nodeworld import Events, ledger_ids, small_world
from worldlm_secure.federation.methods import METHODS
from worldlm_secure.federation.simulate import simulate
from worldlm_secure.node.world_up import collect_results, prepare, start_world, wait_all


@pytest.mark.slow
def test_root_restart_resumes_and_matches_simulate(tmp_path: Path) -> None:
    world_path = small_world(tmp_path / "w", rounds=2, timeouts={"train": 240, "step": 60, "heartbeat": 1, "dropout": 120})
    state = tmp_path / "state"
    events = Events()
    world, procs = prepare(world_path, state)
    try:
        start_world(world, procs, state, events)
        events.wait(300, node="world", event="aggregated", round=1, phase="shared")
        os.kill(procs["world"].popen.pid, signal.SIGKILL)  # type: ignore[union-attr]
        procs["world"].popen.wait()  # type: ignore[union-attr]
        start_world(world, procs, state, events, only={"world"})
        codes = wait_all(procs, timeout=600)
    finally:
        for p in procs.values():
            if p.popen is not None and p.popen.poll() is None:
                p.popen.kill()
    assert all(c == 0 for c in codes.values()), codes
    assert len(events.all(node="world", event="announced", round=1, phase="shared")) == 2  # round 1 re-run

    deployed = collect_results(world, state, 0.0)["methods"]["worldlm"]["sites"]
    sim = simulate(world_path, methods=[METHODS["worldlm"]], device="cpu", ledger_root=tmp_path / "sim")
    for site, ppl in sim.methods["worldlm"].sites.items():
        assert abs(deployed[site]["val_ppl"] - ppl) / ppl < 1e-4, (site, deployed[site]["val_ppl"], ppl)
    ids = ledger_ids(state)
    from worldlm_secure.ledger import verify

    for path in (tmp_path / "sim").glob("*.sqlite"):
        rep = verify(path)
        assert ids.get(rep.node, []) == [e.release_id for e in rep.entries], rep.node
