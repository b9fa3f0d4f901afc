"""`world up`: the local world as separate OS processes over gRPC + mTLS trains to the end and matches
the in-process `simulate` of the same world and seed (no-DP variant: DP noise comes from a CSPRNG)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nodeworld import assert_like_simulate, small_world
from worldlm_secure.node.world_up import world_up


@pytest.mark.slow
def test_world_up_matches_simulate_and_ledgers_agree(tmp_path: Path) -> None:
    """Every node a fresh `worldlm-secure node start` interpreter (launch exec), as operators run them; the other
    world-up tests fork their nodes from a warm interpreter (the default, node.launcher)."""
    world = small_world(tmp_path / "w", rounds=2)
    events: list[dict] = []
    payload = world_up(world, tmp_path / "state", on_event=events.append, timeout=600, launch="exec")
    assert payload.get("failed_nodes") is None, payload["exit_codes"]
    deployed = payload["methods"]["worldlm"]
    assert sorted(deployed["sites"]) == ["eu-a", "eu-b", "eu-c", "lab-a", "us-a", "us-b", "us-c"]
    assert [r["round"] for r in deployed["rounds"]] == [2]
    # every aggregation ran over the network with masking where the policies require it
    agg = [e for e in events if e["event"] == "aggregated"]
    assert {(e["node"], e["phase"]) for e in agg} >= {("eu", "key"), ("eu", "shared"), ("world", "shared"), ("world", "residual")}
    assert all(e["contributors"] >= 1 and not e["dropped"] for e in agg)

    # the same model (within masking's quantization) and the same releases, recorded in the same places
    assert_like_simulate(world, deployed["sites"], tmp_path / "state", tmp_path / "sim-ledgers", 1e-4,
                         "masking's quantization error is ~1e-7; a larger gap is a logic difference")
    assert json.loads((tmp_path / "state" / "nodes" / "eu-a" / "results.json").read_text())["val_ppl"] > 0


def test_world_up_stops_when_a_node_cannot_start(tmp_path: Path) -> None:
    """A world whose CKKS policies name a key holder that is not a member of every link (eu-a: the US
    federation's sites would have to send their sums to a site of another federation): world up refuses
    with a one-line reason before starting anything, instead of waiting for the timeout."""
    import os

    import yaml

    from nodeworld import REPO
    from worldlm_secure.errors import WorldLMError

    def derived(name: str, base: Path) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "apiVersion": "worldlm-secure/v1", "kind": "JurisdictionPolicy", "name": name,
            "extends": os.path.relpath(base, tmp_path), "description": f"{base.stem} with key holder eu-a",
            "secure_aggregation": {"ckks": {"key_holders": ["eu-a"]}},
        }))
        return path

    ckks = derived("ckks-eu-a", REPO / "examples" / "policies" / "ckks-open.yaml")
    lab = derived("open-eu-a", REPO / "policies" / "research-open.yaml")
    world = small_world(tmp_path / "w", rounds=1)
    raw = yaml.safe_load(world.read_text())
    for n in raw["nodes"]:
        if n["name"][:2] in ("eu", "us"):
            n["policy"] = str(ckks)
        elif n["name"] == "lab":
            n["policy"] = str(lab)
    world.write_text(yaml.safe_dump(raw, sort_keys=False))
    # The world's policy check now refuses it before any node process starts (it used to surface as the
    # root exiting with code 2 before listening): one line naming the file, the field and the link.
    with pytest.raises(WorldLMError, match=r"ckks-eu-a.yaml:\d+ secure_aggregation.ckks.key_holders: none of eu-a is a member of the CKKS round at 'world'") as err:
        world_up(world, tmp_path / "state", timeout=120)
    assert "\n" not in str(err.value)
