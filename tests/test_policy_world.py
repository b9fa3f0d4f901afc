"""World-level checks: every path of a world composes, or the world refuses to start naming both files."""

from __future__ import annotations

from pathlib import Path

import pytest

from worldlm_secure.errors import PolicyError
from worldlm_secure.federation.world import load_world
from worldlm_secure.policy.check import check_world

POLICIES = Path(__file__).resolve().parents[1] / "policies"


def _world(tmp_path: Path, feds: dict[str, tuple[str, list[str]]], root: str = "research-open") -> Path:
    """feds: federation -> (policy of the federation, [policy of each site])."""
    lines = ["name: test-world", "nodes:", f"  - {{name: world, policy: {POLICIES / (root + '.yaml')}}}"]
    for fed, (fed_policy, sites) in feds.items():
        lines.append(f"  - {{name: {fed}, parent: world, policy: {_policy(fed_policy)}}}")
        for i, site in enumerate(sites):
            lines.append(f"  - {{name: {fed}-{i}, parent: {fed}, policy: {_policy(site)}}}")
    path = tmp_path / "world.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _policy(name: str) -> str:
    return name if "/" in name else str(POLICIES / f"{name}.yaml")


def _variant(tmp_path: Path, base: str, name: str, old: str, new: str) -> str:
    text = (POLICIES / f"{base}.yaml").read_text()
    assert old in text
    path = tmp_path / f"{name}.yaml"
    path.write_text(text.replace(old, new))
    return str(path)


def test_realistic_world_composes(tmp_path: Path) -> None:
    path = _world(
        tmp_path,
        {"eu": ("eu", ["eu"] * 3), "us": ("us", ["us"] * 3), "health": ("healthcare", ["healthcare"] * 3)},
    )
    world = load_world(path, check_policies=False)
    eff = check_world(world)
    assert eff[("eu-0", "world")].secure_aggregation.protocol == "masking"
    assert eff[("health-1", "world")].secure_aggregation.protocol == "ckks"
    assert eff[("health-1", "health")].differential_privacy.record_level
    assert eff[("us", "world")].differential_privacy.epsilon_budget == 16.0
    from worldlm_secure.policy.round import plan_round

    root_round = plan_round({f: eff[(f, "world")] for f in ("eu", "us", "health")})
    assert root_round.protocol == "ckks"  # the only protocol all three federations accept
    eu_round = plan_round({s: eff[(s, "world")] for s in ("eu-0", "eu-1", "eu-2")})
    assert eu_round.protocol == "masking" and eu_round.params == eu_round.masking


def test_default_style_open_world(tmp_path: Path) -> None:
    path = _world(tmp_path, {f: ("research-open", ["research-open"] * 3) for f in ("eu", "us", "apac")})
    eff = check_world(load_world(path, check_policies=False))
    assert {e.secure_aggregation.protocol for e in eff.values()} == {"none"}


def _three(tmp_path: Path, first: tuple[str, list[str]], name: str = "eu") -> Path:
    """A world with federation `name` as given plus two well-formed ones, so the root round has 3 members."""
    return _world(tmp_path, {name: first, "us": ("us", ["us"] * 3), "apac": ("research-open", ["research-open"] * 3)})


def test_conflicting_site_and_federation_names_both_files(tmp_path: Path) -> None:
    us_masking = _variant(tmp_path, "us", "us-masking", "protocol: [masking, ckks]", "protocol: masking")
    path = _three(tmp_path, ("healthcare", [us_masking] * 3))
    with pytest.raises(PolicyError) as info:
        check_world(load_world(path, check_policies=False))
    msg = str(info.value)
    assert "us-masking.yaml" in msg and "healthcare.yaml" in msg and "\n" not in msg


def test_world_loader_refuses_to_start(tmp_path: Path) -> None:
    us_masking = _variant(tmp_path, "us", "us-masking", "protocol: [masking, ckks]", "protocol: masking")
    path = _three(tmp_path, ("healthcare", [us_masking] * 3), name="health")
    with pytest.raises(PolicyError) as info:
        load_world(path)  # the world loader composes every chain at load time
    assert "us-masking.yaml" in str(info.value) and "healthcare.yaml" in str(info.value)


def test_parent_not_an_allowed_destination(tmp_path: Path) -> None:
    path = _three(tmp_path, ("eu", ["us", "us", "us"]))  # us sites may only send to 'us' and 'world'
    with pytest.raises(PolicyError) as info:
        check_world(load_world(path, check_policies=False))
    msg = str(info.value)
    assert "us.yaml" in msg and "egress.destinations" in msg and "'eu'" in msg


def test_too_few_members_for_min_cohort(tmp_path: Path) -> None:
    path = _three(tmp_path, ("eu", ["eu", "eu"]))
    with pytest.raises(PolicyError) as info:
        check_world(load_world(path, check_policies=False))
    msg = str(info.value)
    assert "min_cohort" in msg and "eu.yaml" in msg and "'eu' has only 2" in msg
    # the root round counts federations: two are too few for EU's min_cohort of 3
    two = _world(tmp_path, {"eu": ("eu", ["eu"] * 3), "us": ("us", ["us"] * 3)})
    with pytest.raises(PolicyError, match="'world' has only 2"):
        check_world(load_world(two, check_policies=False))


def test_siblings_agree_on_a_protocol(tmp_path: Path) -> None:
    ckks_first = _variant(tmp_path, "eu", "eu-ckks-first", "protocol: [masking, ckks]", "protocol: [ckks, masking]")
    check_world(load_world(_three(tmp_path, ("eu", ["eu", "eu", ckks_first])), check_policies=False))  # masking wins
    masking = _variant(tmp_path, "eu", "eu-masking", "protocol: [masking, ckks]", "protocol: [masking]")
    ckks = _variant(tmp_path, "eu", "eu-ckks", "protocol: [masking, ckks]", "protocol: [ckks]")
    with pytest.raises(PolicyError) as info:
        check_world(load_world(_three(tmp_path, ("eu", [masking, masking, ckks])), check_policies=False))
    msg = str(info.value)
    assert "eu-masking.yaml" in msg and "eu-ckks.yaml" in msg and "one aggregation round" in msg


def test_unknown_ckks_key_holder(tmp_path: Path) -> None:
    hc = _variant(tmp_path, "healthcare", "hc-holder", "key_holders: []", "key_holders: [trusted-hospital]")
    path = _three(tmp_path, ("healthcare", [hc, hc, hc]), name="health")
    with pytest.raises(PolicyError, match="trusted-hospital"):
        check_world(load_world(path, check_policies=False))


def test_ckks_parameters_the_implementation_cannot_use(tmp_path: Path) -> None:
    # valid as a policy (scale below the inner moduli) but CKKS noise would swamp the packed integers
    noisy = _variant(tmp_path, "healthcare", "hc-noisy", "scale_bits: 40", "scale_bits: 10")
    path = _three(tmp_path, ("healthcare", [noisy] * 3), name="health")
    with pytest.raises(PolicyError) as info:
        check_world(load_world(path, check_policies=False))
    msg = str(info.value)
    assert "hc-noisy.yaml" in msg and "scale_bits" in msg and "\n" not in msg


def test_mixed_jurisdictions_under_an_open_root(tmp_path: Path) -> None:
    """The suggested default world: EU and US federations under their policies, an open third one."""
    from worldlm_secure.policy.round import plan_round

    path = _world(
        tmp_path, {"eu": ("eu", ["eu"] * 3), "us": ("us", ["us"] * 3), "apac": ("research-open", ["research-open"] * 3)}
    )
    eff = check_world(load_world(path, check_policies=False))
    # each path alone prefers different protocols ...
    assert eff[("apac", "world")].secure_aggregation.protocol == "none"
    assert eff[("eu", "world")].secure_aggregation.protocol == "masking"
    # ... but the root round needs one: masking, the protocol all three accept and prefer most
    plan = plan_round({f: eff[(f, "world")] for f in ("eu", "us", "apac")})
    assert plan.protocol == "masking" and plan.dp_mechanism == "central_gaussian"
    assert plan.min_cohort == 3 and plan.masking.threshold == 0.67
    assert plan_round({s: eff[(s, "world")] for s in ("apac-0", "apac-1", "apac-2")}).protocol == "none"
