"""`world up` of a local world whose federations require CKKS (examples/policies/ckks-open.yaml): every
site-to-federation and federation-to-root sum runs encrypted over gRPC + mTLS, and per-site perplexity
matches the in-process `simulate` of the same world (which runs `CkksSecureSum`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from nodeworld import assert_like_simulate, small_world
from worldlm_secure.node.world_up import world_up


def ckks_world(folder: Path, rounds: int) -> Path:
    """examples/local-world/world-nodp.yaml with the EU and US nodes under ckks-open instead of masking-open."""
    world = small_world(folder, rounds=rounds)
    raw = yaml.safe_load(world.read_text())
    for n in raw["nodes"]:
        n["policy"] = n["policy"].replace("masking-open.yaml", "ckks-open.yaml")
    world.write_text(yaml.safe_dump(raw, sort_keys=False))
    return world


@pytest.mark.slow
def test_ckks_world_up_matches_simulate(tmp_path: Path) -> None:
    world = ckks_world(tmp_path / "w", rounds=1)
    events: list[dict] = []
    payload = world_up(world, tmp_path / "state", on_event=events.append, timeout=600, launch="fork")
    assert payload.get("failed_nodes") is None, payload["exit_codes"]
    deployed = payload["methods"]["worldlm"]
    released = [e for e in events if e["event"] == "released"]
    # every release of the EU and US sites, and every federation's release to the root, was encrypted
    assert {e["node"] for e in released if e.get("protocol") == "ckks"} >= {"eu-a", "eu-b", "eu-c", "us-a", "us-b", "us-c", "eu", "us", "lab"}
    agg = [e for e in events if e["event"] == "aggregated"]
    assert {(e["node"], e["phase"]) for e in agg} >= {("eu", "key"), ("us", "shared"), ("world", "shared"), ("world", "residual")}
    assert all(not e["dropped"] and not e.get("rejected") for e in agg)

    # the holders' integer sums are exact and both sides quantize identically (measured: 0.0 relative)
    assert_like_simulate(world, deployed["sites"], tmp_path / "state", tmp_path / "sim-ledgers", 1e-6,
                         "a gap beyond float rounding is a logic difference")
    from worldlm_secure.ledger import verify

    for path in (tmp_path / "state" / "nodes").glob("*/ledger/*.sqlite"):
        rep = verify(path)
        if rep.node[:2] in ("eu", "us"):  # every release of the CKKS-only nodes is recorded as CKKS
            assert rep.entries and {e.protocol for e in rep.entries} == {"ckks"}, rep.node
            assert all(len(e.key_id) == 32 for e in rep.entries), rep.node  # the epoch each input was encrypted under
