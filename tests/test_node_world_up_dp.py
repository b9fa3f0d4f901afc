"""`world up` on the DP local world (eu.yaml, us.yaml: user-level DP, masking, min_cohort 3): over real
gRPC/mTLS every node's ledger holds exactly the entries `simulate` writes for the same world: the
same releases, protections, noise multipliers and ε (noise values differ: they come from a CSPRNG)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import LEDGER_FIELDS as FIELDS
from nodeworld import small_world
from worldlm_secure.federation.methods import METHODS
from worldlm_secure.federation.simulate import simulate
from worldlm_secure.ledger import verify
from worldlm_secure.node.world_up import world_up



def deployed_ledgers_equal_simulated(world: Path, tmp_path: Path) -> dict:
    """Run `world up` and `simulate` on ``world``; every node's deployed ledger verifies and equals the
    simulated one in FIELDS, entry for entry. Returns the deployed VerifyReports by node."""
    payload = world_up(world, tmp_path / "state", timeout=600, launch="fork")
    assert payload.get("failed_nodes") is None, payload["exit_codes"]
    return ledgers_equal_simulated(world, tmp_path / "state", tmp_path)


def ledgers_equal_simulated(world: Path, state: Path, tmp_path: Path, fields: tuple[str, ...] = FIELDS,
                            close: tuple[str, ...] = ()) -> dict:
    """`simulate` ``world``; every node's ledger deployed in ``state`` verifies and equals the simulated one in
    ``fields``, entry for entry (those in ``close`` within 1e-12 relative), and every site ended with a finite
    perplexity. The deployed VerifyReports by node."""
    sites = [r for p in (state / "nodes").glob("*/results.json") if "site" in (r := json.loads(p.read_text()))]
    assert sites and all(math.isfinite(r["val_ppl"]) for r in sites)
    simulate(world, methods=[METHODS["worldlm"]], device="cpu", ledger_root=tmp_path / "sim")
    # the root's ledger (both here and in simulate) holds only the receipts it countersigned
    sim = {r.node: r for r in (verify(p) for p in (tmp_path / "sim").glob("*.sqlite")) if r.entries}
    dep = {r.node: r for r in (verify(p) for p in (state / "nodes").glob("*/ledger/*.sqlite")) if r.entries}
    assert set(dep) == set(sim)
    for node, rep in dep.items():
        assert rep.ok, (node, rep.problem)
        assert [e.release_id for e in rep.entries] == [e.release_id for e in sim[node].entries], node
        for got, want in zip(rep.entries, sim[node].entries):
            diff = {f: (getattr(got, f), getattr(want, f)) for f in fields if getattr(got, f) != getattr(want, f)
                    and not (f in close and getattr(got, f) == pytest.approx(getattr(want, f), rel=1e-12))}
            assert not diff, (node, got.release_id, diff)  # field: (deployed, simulated)
    return dep


@pytest.mark.slow
@pytest.mark.xdist_group("deployed_dp_world")
def test_dp_world_up_ledgers_equal_simulate(deployed_dp_world: tuple[Path, Path], tmp_path: Path) -> None:
    world, state = deployed_dp_world
    dep = ledgers_equal_simulated(world, state, tmp_path)
    eu_site = dep["eu-a"].entries
    assert {e.mechanism for e in eu_site} == {"central_gaussian"} and eu_site[-1].epsilon_cumulative <= 8.0
    assert dep["eu-a"].spent["eu-a/user"] > 0


def test_distributed_noise_world_up_with_adaptive_clipping_ledgers_equal_simulate(tmp_path: Path) -> None:
    """Distributed discrete Gaussian noise added by each site inside SecAgg+ over the network, with adaptive
    clipping (protocols/dp.md §2.7): the aggregator decodes a noisy sum only, updates its clip from the sum's
    noised count and announces it with the next round; the ledgers match simulate's (every invited member
    contributes, so the conservative min_cohort charge equals simulate's z_eff charge) in every field but the
    clip after round 1, which follows each backend's own noise."""
    import yaml
    from conftest import write_distributed_world

    world = write_distributed_world(tmp_path)
    raw = yaml.safe_load(world.read_text())
    # C_0 = 0.25, below the policy's 1.0, so the clip can move either way
    raw.setdefault("aggregation", {})["adaptive_clip"] = {"target_quantile": 0.5, "initial_clip": 0.25}
    world.write_text(yaml.safe_dump(raw, sort_keys=False))
    payload = world_up(world, tmp_path / "state", timeout=600, launch="fork")
    assert payload.get("failed_nodes") is None, payload["exit_codes"]
    fields = tuple(f for f in FIELDS if f != "clipping_norm")
    # z_eff = z·(share sizing at C_t)/C_t: equal in exact arithmetic for any clip, but C_t here and in simulate
    # differ after round 1, so its last bits (and ε's) may differ
    close = ("noise_multiplier", "epsilon", "epsilon_cumulative")
    dep = ledgers_equal_simulated(world, tmp_path / "state", tmp_path, fields, close)
    assert {e.mechanism for e in dep["f0-s0"].entries} == {"distributed_discrete_gaussian"}
    for fed in ("f0", "f1"):
        for group in ("key", "shared"):
            clips = {r: {e.clipping_norm for s in (f"{fed}-s0", f"{fed}-s1") for e in dep[s].entries
                         if e.round == r and e.group == group} for r in (1, 2)}
            assert clips[1] == {0.25}, (fed, group, clips)  # C_0, as in simulate
            # round 2: both sites clipped at the one C_1 their aggregator announced, moved from C_0 by the noised
            # count (with 2 members its noise decides the direction), never above the policy's 1.0
            assert len(clips[2]) == 1 and next(iter(clips[2])) not in (0.25, 1.0), (fed, group, clips)
            assert 0.0 < next(iter(clips[2])) < 1.0, (fed, group, clips)
            assert all("adaptive_clip_max" in e.extra for s in (f"{fed}-s0", f"{fed}-s1") for e in dep[s].entries
                       if e.group == group), (fed, group)


@pytest.mark.slow
def test_record_level_dp_world_up_ledgers_equal_simulate(tmp_path: Path) -> None:
    """Sites under a record-level policy train with DP-SGD in their own processes; every node's ledger
    equals simulate's (DP-SGD entries on SITE/record with the steps, q, z and ε), and verifies."""
    rec = "../policies/record-dp.yaml"
    nodes = [{"name": "world", "policy": rec}]
    for fed in ("f0", "f1"):
        nodes.append({"name": fed, "parent": "world", "policy": rec})
        nodes += [{"name": f"{fed}-s{i}", "parent": fed, "policy": rec} for i in range(2)]
    world = small_world(tmp_path / "w", rounds=1, nodes=nodes)  # one round: composition over rounds is the DP world's
    dep = deployed_ledgers_equal_simulated(world, tmp_path)
    site = dep["f0-s0"].entries
    assert {e.mechanism for e in site} == {"dp_sgd"} and [e.steps for e in site] == [8, 0]
