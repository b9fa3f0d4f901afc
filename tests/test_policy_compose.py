"""Composition along a release path: strictest rule wins, conflicts name both files."""

from __future__ import annotations

from pathlib import Path

import pytest

from worldlm_secure.errors import PolicyError
from worldlm_secure.policy import EffectivePolicy, compose, load_policy

POLICIES = Path(__file__).resolve().parents[1] / "policies"


def _p(name: str):
    return load_policy(POLICIES / f"{name}.yaml")


def _variant(tmp_path: Path, base: str, name: str, **replace: str):
    text = (POLICIES / f"{base}.yaml").read_text()
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return load_policy(path)


def test_eu_under_open_root_keeps_eu_rules() -> None:
    eff = compose([_p("eu"), _p("eu"), _p("research-open")], nodes=["eu-a", "eu", "world"])
    assert isinstance(eff, EffectivePolicy)
    assert eff.secure_aggregation.protocol == "masking"
    assert eff.secure_aggregation.min_cohort == 3
    dp = eff.differential_privacy
    assert (dp.level, dp.epsilon_budget, dp.delta) == ("user", 8.0, 1e-5)
    assert dp.mechanism == "central_gaussian"
    assert set(eff.egress.require) == {"differential_privacy", "secure_aggregation"}
    assert eff.egress.destinations == ("eu", "world")
    assert eff.egress.groups["world"] == ("shared", "residual")
    assert eff.residuals.allowed and eff.residuals.require_dp
    assert eff.residuals.rank == 8  # min(8, 32)
    assert eff.audit.retention_days == 2190
    assert eff.secure_aggregation.params == eff.secure_aggregation.masking
    assert "eu.yaml" in eff.sources["differential_privacy.epsilon_budget"]


def test_open_world_runs_plain() -> None:
    eff = compose([_p("research-open"), _p("research-open")])
    assert eff.secure_aggregation.protocol == "none"
    assert eff.differential_privacy.level == "none" and eff.differential_privacy.mechanism is None
    assert eff.egress.destinations == ("*",)
    assert eff.egress.allows("anything", "key")


def test_healthcare_gets_ckks_and_record_dp() -> None:
    eff = compose([_p("healthcare"), _p("healthcare"), _p("research-open")])
    assert eff.secure_aggregation.protocol == "ckks"
    assert eff.differential_privacy.record_level
    assert eff.differential_privacy.accountant == "prv"
    assert not eff.residuals.allowed


def test_strictest_numbers_win_whichever_side(tmp_path: Path) -> None:
    child = _variant(tmp_path, "eu", "child", **{"epsilon_budget: 8.0": "epsilon_budget: 2.0", "min_cohort: 3": "min_cohort: 2"})
    parent = _variant(tmp_path, "eu", "parent", **{"delta: 1.0e-5": "delta: 1.0e-7", "min_cohort: 3": "min_cohort: 5"})
    for chain in ([child, parent], [parent, child]):
        eff = compose(chain)
        assert eff.differential_privacy.epsilon_budget == 2.0
        assert eff.differential_privacy.delta == 1e-7
        assert eff.secure_aggregation.min_cohort == 5
    eff = compose([child, parent])
    assert eff.sources["differential_privacy.epsilon_budget"].startswith(str(tmp_path / "child.yaml"))
    assert eff.sources["secure_aggregation.min_cohort"].startswith(str(tmp_path / "parent.yaml"))


def test_protocol_conflict_names_both_files(tmp_path: Path) -> None:
    masking_only = _variant(tmp_path, "us", "us-masking", **{"protocol: [masking, ckks]": "protocol: masking"})
    with pytest.raises(PolicyError) as info:
        compose([masking_only, _p("healthcare")])
    msg = str(info.value)
    assert "us-masking.yaml" in msg and "healthcare.yaml" in msg and "secure_aggregation.protocol" in msg
    assert "\n" not in msg
    # us.yaml itself accepts CKKS as a second choice, so it composes with healthcare
    assert compose([_p("us"), _p("healthcare")]).secure_aggregation.protocol == "ckks"


def test_protocol_conflict_in_nested_tree_names_the_culprits(tmp_path: Path) -> None:
    site = _variant(tmp_path, "research-open", "site", **{"protocol: [none, masking, ckks]": "protocol: [none, masking]"})
    fed = _variant(tmp_path, "research-open", "fed", **{"protocol: [none, masking, ckks]": "protocol: [none, masking, ckks]"})
    root = _p("healthcare")
    with pytest.raises(PolicyError) as info:
        compose([site, fed, root])
    msg = str(info.value)
    assert "site.yaml" in msg and "healthcare.yaml" in msg


def test_plain_only_child_under_secure_parent(tmp_path: Path) -> None:
    plain = _variant(tmp_path, "research-open", "plain", **{"protocol: [none, masking, ckks]": "protocol: none"})
    with pytest.raises(PolicyError) as info:
        compose([plain, _p("eu")])
    msg = str(info.value)
    assert "plain.yaml" in msg and "eu.yaml" in msg and "egress.require" in msg


def test_preference_is_the_nearest_policys(tmp_path: Path) -> None:
    ckks_first = _variant(tmp_path, "eu", "ckks-first", **{"protocol: [masking, ckks]": "protocol: [ckks, masking]"})
    assert compose([ckks_first, _p("eu")]).secure_aggregation.protocol == "ckks"
    assert compose([_p("eu"), ckks_first]).secure_aggregation.protocol == "masking"


def test_distributed_noise_needs_masking(tmp_path: Path) -> None:
    dist = _variant(
        tmp_path, "eu", "dist",
        **{"mechanism: [central_gaussian, distributed_discrete_gaussian]": "mechanism: distributed_discrete_gaussian"},
    )
    assert compose([dist, _p("eu")]).differential_privacy.mechanism == "distributed_discrete_gaussian"
    ckks_only = _variant(tmp_path, "eu", "ckks", **{"protocol: [masking, ckks]": "protocol: ckks"})
    with pytest.raises(PolicyError, match="need protocol masking"):
        compose([dist, ckks_only])


def test_local_anywhere_is_local(tmp_path: Path) -> None:
    parent = _variant(tmp_path, "eu", "parent", **{'local: ["lm_head.*"': 'local: ["*.mlp.down_proj.*", "lm_head.*"'})
    eff = compose([_p("eu"), parent])
    assert eff.layers.group_of("model.layers.0.mlp.down_proj.weight") == "local"
    assert eff.layers.group_of("model.layers.0.mlp.up_proj.weight") == "key"


def test_delta_versus_composed_cohort(tmp_path: Path) -> None:
    loose = _variant(tmp_path, "research-open", "loose",
                     **{"level: none": "level: user\n  epsilon_budget: 10.0\n  delta: 0.3"})
    big = _variant(tmp_path, "research-open", "big", **{"min_cohort: 1": "min_cohort: 4"})
    with pytest.raises(PolicyError) as info:
        compose([loose, big])
    msg = str(info.value)
    assert "loose.yaml" in msg and "big.yaml" in msg and "1/min_cohort" in msg


def test_sha256_is_stable_and_sensitive(tmp_path: Path) -> None:
    a = compose([_p("eu"), _p("research-open")])
    b = compose([load_policy(POLICIES / "eu.yaml"), load_policy(POLICIES / "research-open.yaml")])
    assert a.sha256 == b.sha256 and len(a.sha256) == 64
    tighter = _variant(tmp_path, "eu", "eu", **{"epsilon_budget: 8.0": "epsilon_budget: 7.0"})
    assert compose([tighter, _p("research-open")]).sha256 != a.sha256


def test_empty_chain() -> None:
    with pytest.raises(PolicyError):
        compose([])
