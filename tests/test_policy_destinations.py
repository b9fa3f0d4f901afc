"""Destinations by relation and jurisdiction: the shipped policies govern any tree (issue 18).

policies/eu.yaml once named its destinations `eu` and `world`, so it could only govern a world whose
nodes had those names. It now says `jurisdiction: EU` (key layers stay within EU federations) and
`relation: ancestors` (shared layers and residuals go up to the root), read from the releasing node.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from worldlm_secure.errors import PolicyError
from worldlm_secure.federation.world import load_world
from worldlm_secure.policy import Destination, bind_chain, compose, load_policy
from worldlm_secure.policy.compose import _refusing_rule

POLICIES = Path(__file__).resolve().parents[1] / "policies"


def _world(tmp_path: Path, feds: dict[str, tuple[str, str]], root: str = "research-open") -> Path:
    """feds: federation -> (its policy, its 3 sites' policy); policies are shipped names or paths."""
    def pol(name: str) -> str:
        return name if "/" in name else str(POLICIES / f"{name}.yaml")

    lines = ["name: linguistic-world", "nodes:", f"  - {{name: europe, policy: {pol(root)}}}"]
    for fed, (fed_policy, site_policy) in feds.items():
        lines.append(f"  - {{name: {fed}, parent: europe, policy: {pol(fed_policy)}}}")
        lines += [f"  - {{name: {fed}-{i}, parent: {fed}, policy: {pol(site_policy)}}}" for i in range(3)]
    path = tmp_path / "world.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


LINGUISTIC = {"germanic": ("eu", "eu"), "romance": ("eu", "eu"), "slavic": ("eu", "eu")}


def test_shipped_eu_policy_governs_a_world_with_other_node_names(tmp_path: Path) -> None:
    world = load_world(_world(tmp_path, LINGUISTIC))  # checks every path (policy.check_world)
    chain = world.chain("romance-2")
    eff = compose(world.policy_chain("romance-2"), nodes=[n.name for n in chain])
    assert eff.egress.groups == {"romance": ("key", "shared", "residual"), "europe": ("shared", "residual")}
    assert eff.egress.allows("romance", "key") and eff.egress.allows("europe", "shared")
    assert not eff.egress.allows("europe", "key")  # key layers never leave the EU federations
    assert not eff.egress.allows("germanic", "shared")  # a sibling federation is not above the site
    fed = compose(world.policy_chain("slavic"), nodes=["slavic", "europe"])
    assert fed.egress.groups == {"europe": ("shared", "residual")}


@pytest.mark.parametrize("shipped", ["eu", "us", "healthcare"])
def test_every_shipped_jurisdiction_policy_governs_any_tree(tmp_path: Path, shipped: str) -> None:
    path = _world(tmp_path, {"north": (shipped, shipped), "south": (shipped, shipped), "east": (shipped, shipped)})
    world = load_world(path)
    eff = compose(world.policy_chain("east-1"), nodes=["east-1", "east", "europe"])
    assert eff.egress.allows("east", "key") and eff.egress.allows("europe", "shared")
    assert not eff.egress.allows("europe", "key")


def test_mixed_jurisdictions_keep_key_layers_in_their_own(tmp_path: Path) -> None:
    load_world(_world(tmp_path, {"germanic": ("eu", "eu"), "romance": ("eu", "eu"), "anglo": ("us", "us")}))
    # a US site under an EU federation: its key layers may only go to a US federation
    with pytest.raises(PolicyError) as info:
        load_world(_world(tmp_path, {"germanic": ("eu", "us"), "romance": ("eu", "eu"), "anglo": ("us", "us")}))
    msg = str(info.value)
    assert "us.yaml" in msg and "egress.destinations" in msg and "'germanic'" in msg and "key" in msg
    assert "jurisdiction US (no node above 'germanic-0' declares it: germanic declares 'EU'" in msg
    assert "ancestors (= germanic, europe): shared/residual" in msg


def test_the_error_lists_the_destinations_a_name_based_policy_has(tmp_path: Path) -> None:
    text = (POLICIES / "eu.yaml").read_text()
    by_name = text.replace("- jurisdiction: EU ", "- name: eu         ").replace(
        "- relation: ancestors ", "- name: world          ")
    assert by_name.count("- name:") == 2
    (tmp_path / "eu-by-name.yaml").write_text(by_name)
    feds = {f: (str(tmp_path / "eu-by-name.yaml"),) * 2 for f in ("germanic", "romance", "slavic")}
    with pytest.raises(PolicyError) as info:
        load_world(_world(tmp_path, feds))
    msg = str(info.value)
    assert "must send its shared layers to its parent" in msg
    assert "its destinations are [eu: key/shared/residual; world: shared/residual]" in msg, msg


def test_relations_resolve_from_the_releasing_node() -> None:
    eu, open_ = load_policy(POLICIES / "eu.yaml"), load_policy(POLICIES / "research-open.yaml")
    chain = bind_chain([eu, eu, open_], ["site", "fed", "root"])
    rules = compose(chain).egress.rules
    assert _refusing_rule(rules, "fed", "key") is None
    assert _refusing_rule(rules, "root", "residual") is None
    where, why = _refusing_rule(rules, "root", "key")
    assert where.endswith("eu.yaml:57") and "'root' may receive only [residual, shared]" in why
    # parent / root relations, and a jurisdiction compared without case
    for dest, ok, refused, fed in (({"relation": "parent"}, "fed", "root", open_),
                                   ({"relation": "root"}, "root", "fed", open_),
                                   ({"jurisdiction": "eu"}, "fed", "root", eu)):
        p = eu.model_copy(update={"egress": eu.egress.model_copy(update={
            "destinations": (Destination(**dest, groups=("key", "shared", "residual")),)})})
        eff = compose([p, fed, open_], nodes=["site", "fed", "root"])
        assert eff.egress.allows(ok, "key") and not eff.egress.allows(refused, "shared"), dest


def test_a_destination_is_exactly_one_of_name_relation_jurisdiction(tmp_path: Path) -> None:
    for dest in ("{jurisdiction: EU, relation: parent}", "{relation: siblings}", "{groups: [key]}"):
        path = tmp_path / "bad.yaml"
        (tmp_path / "eu.yaml").write_text((POLICIES / "eu.yaml").read_text())
        path.write_text("apiVersion: worldlm-secure/v1\nkind: JurisdictionPolicy\nname: bad\n"
                        f"extends: eu.yaml\negress:\n  destinations:\n    - {dest}\n")
        with pytest.raises(PolicyError) as info:
            load_policy(path)
        msg = str(info.value)
        assert "bad.yaml:" in msg and "egress.destinations" in msg and "\n" not in msg, msg
