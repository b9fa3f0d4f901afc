"""examples/world-dp.yaml (issue 6) is the default world with only its policies changed to user-level DP.

benchmarks/dp_utility.py compares the two worlds, so any other difference (data, schedule, model,
tree) would confound "what DP costs". These tests keep them in sync and check the DP the policy asks for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import yaml
from conftest import REPO

from worldlm_secure.federation.world import load_world
from worldlm_secure.policy import compose, load_policy

EXAMPLES = REPO / "examples"
DP_POLICY = EXAMPLES / "policies" / "dp-eps8.yaml"


def _without_policies_and_name(doc: dict[str, Any]) -> dict[str, Any]:
    doc = dict(doc)
    doc.pop("name")
    doc["nodes"] = [{k: v for k, v in node.items() if k != "policy"} for node in doc["nodes"]]
    return doc


def test_dp_world_differs_from_the_default_world_only_in_policies_and_name() -> None:
    base = yaml.safe_load((EXAMPLES / "world.yaml").read_text())
    dp = yaml.safe_load((EXAMPLES / "world-dp.yaml").read_text())
    assert _without_policies_and_name(dp) == _without_policies_and_name(base)
    assert dp["name"] == "dp-world" and dp["name"] != base["name"]
    assert {n["policy"] for n in dp["nodes"]} == {"policies/dp-eps8.yaml"}
    assert all(n["policy"] != "policies/dp-eps8.yaml" for n in base["nodes"])  # the baseline stays non-private


def test_dp_world_loads_and_every_site_release_is_user_level_dp_at_eps8() -> None:
    world = load_world(EXAMPLES / "world-dp.yaml")
    assert world.name == "dp-world" and len(world.sites) == 9 and len(world.federations) == 3
    for node in world.nodes.values():
        assert node.policy_path.resolve() == DP_POLICY.resolve()
    for site in world.sites:
        eff = compose(world.policy_chain(site.name))
        dp = eff.differential_privacy
        assert (dp.level, dp.epsilon_budget, dp.delta, dp.clipping_norm) == ("user", 8.0, 1e-5, 1.0)
        assert tuple(dp.acceptable_mechanisms) == ("central_gaussian",)  # the mechanism simulate applies
        assert dp.noise_multiplier == "auto" and dp.accountant == "rdp"
        assert eff.residuals.require_dp is True


def test_default_world_is_non_private() -> None:
    """The baseline of the comparison: research-open everywhere, so no DP on any release."""
    world = load_world(EXAMPLES / "world.yaml")
    for site in world.sites:
        assert compose(world.policy_chain(site.name)).differential_privacy.level == "none"


def test_dp_policy_extends_research_open_and_only_adds_dp() -> None:
    base = load_policy(REPO / "policies" / "research-open.yaml")
    dp = load_policy(DP_POLICY)
    assert dp.layers == base.layers and dp.secure_aggregation == base.secure_aggregation
    assert dp.egress == base.egress and dp.audit == base.audit
    assert base.differential_privacy.level == "none" and dp.differential_privacy.level == "user"


# --- examples/world-record-dp.yaml: the same world under record-level DP (Opacus DP-SGD in each site) ---
RECORD_POLICY = EXAMPLES / "policies" / "record-dp.yaml"


def test_record_dp_world_differs_from_the_default_world_only_in_policies_and_name() -> None:
    base = yaml.safe_load((EXAMPLES / "world.yaml").read_text())
    rec = yaml.safe_load((EXAMPLES / "world-record-dp.yaml").read_text())
    assert _without_policies_and_name(rec) == _without_policies_and_name(base)
    assert rec["name"] == "record-dp-world"
    assert {n["policy"] for n in rec["nodes"]} == {"policies/record-dp.yaml"}


def test_record_dp_world_trains_every_site_with_dp_sgd_within_a_budget_its_rounds_fit() -> None:
    from worldlm_secure.federation.settings import settings_for
    from worldlm_secure.privacy import derive_noise_multiplier, epsilon

    world = load_world(EXAMPLES / "world-record-dp.yaml")
    settings = settings_for(world)
    assert settings.rounds == 20
    records = settings.synthetic.train_tokens // settings.seq_len  # type: ignore[union-attr]
    q = settings.train.batch_size / records
    steps = settings.rounds * settings.train.local_steps
    for site in world.sites:
        dp = compose(world.policy_chain(site.name)).differential_privacy
        assert (dp.level, dp.delta, dp.accountant) == ("record", 1e-5, "rdp") and dp.record_level
        assert dp.record is not None and dp.record.noise_multiplier == "auto" and dp.record.epsilon_budget == 8.0
    z = derive_noise_multiplier(8.0, 1e-5, q, steps)  # what the engine derives before training: it exists
    assert epsilon(z, q, steps, 1e-5) <= 8.0


def test_record_dp_policy_extends_research_open_and_only_adds_dp() -> None:
    base = load_policy(REPO / "policies" / "research-open.yaml")
    rec = load_policy(RECORD_POLICY)
    assert rec.layers == base.layers and rec.secure_aggregation == base.secure_aggregation
    assert rec.egress == base.egress and rec.audit == base.audit and rec.residuals == base.residuals
    assert rec.differential_privacy.level == "record"


# --- examples/world-100-sites.yaml: 100 small sites in one federation, the user-level DP world of issue 14 ---
SITES100_POLICY = EXAMPLES / "policies" / "sites100-dp-eps8.yaml"


def test_100_site_world_loads_with_at_least_100_sites_and_is_non_private() -> None:
    world = load_world(EXAMPLES / "world-100-sites.yaml")
    assert len(world.sites) >= 100 and len(world.federations) == 1
    assert {len(f.children) for f in world.federations} == {100}
    for site in world.sites:
        assert compose(world.policy_chain(site.name)).differential_privacy.level == "none"


def test_100_site_world_finds_its_model_config_from_any_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`model.config: world-100-sites.model` is relative to the world file, not to where the command runs."""
    from worldlm_secure.federation.settings import settings_for
    from worldlm_secure.model.factory import build_model

    monkeypatch.chdir(tmp_path)
    spec = settings_for(load_world(EXAMPLES / "world-100-sites.yaml")).model
    assert spec.config is not None and Path(spec.config) == EXAMPLES / "world-100-sites.model"
    assert sum(p.numel() for p in build_model(spec).parameters()) == 2072


def test_100_site_dp_world_differs_from_its_non_private_world_only_in_policies_and_name() -> None:
    base = yaml.safe_load((EXAMPLES / "world-100-sites.yaml").read_text())
    dp = yaml.safe_load((EXAMPLES / "world-100-sites-dp.yaml").read_text())
    assert _without_policies_and_name(dp) == _without_policies_and_name(base)
    assert dp["name"] != base["name"]
    assert {n["policy"] for n in dp["nodes"]} == {"policies/sites100-dp-eps8.yaml"}
    assert {n["policy"] for n in base["nodes"]} == {"../policies/research-open.yaml"}
    world = load_world(EXAMPLES / "world-100-sites-dp.yaml")
    assert len(world.sites) >= 100
    for site in world.sites:
        eff = compose(world.policy_chain(site.name))
        dp_sec = eff.differential_privacy
        assert (dp_sec.level, dp_sec.epsilon_budget, dp_sec.delta) == ("user", 8.0, 1e-5)
        assert tuple(dp_sec.acceptable_mechanisms) == ("central_gaussian",)


def test_100_site_policy_variants_change_only_dp_and_for_distributed_noise_the_protocol() -> None:
    base = load_policy(REPO / "policies" / "research-open.yaml")
    eps8 = load_policy(SITES100_POLICY)
    eps1 = load_policy(EXAMPLES / "policies" / "sites100-dp-eps1.yaml")
    skellam = load_policy(EXAMPLES / "policies" / "sites100-dp-eps8-skellam.yaml")
    for p in (eps8, eps1, skellam):
        assert p.layers == base.layers and p.differential_privacy.level == "user"
    assert eps8.secure_aggregation == base.secure_aggregation == eps1.secure_aggregation
    assert eps1.differential_privacy.epsilon_budget == 1.0
    assert eps1.differential_privacy.model_copy(update={"epsilon_budget": 8.0}) == eps8.differential_privacy
    assert tuple(skellam.secure_aggregation.protocol) == ("masking",)
    assert tuple(skellam.differential_privacy.mechanism) == ("distributed_skellam",)
    assert skellam.secure_aggregation.masking.clip_range >= skellam.differential_privacy.clipping_norm


def test_skellam_world_is_the_100_site_world_as_two_federations_with_min_cohort_near_the_cohort() -> None:
    """Distributed noise is sized for min_cohort contributors: the sites' rounds (50 members) run at min_cohort
    45, the root's round (2 federations) at 2, and every site's release is Skellam over masking at ε 8."""
    base = yaml.safe_load((EXAMPLES / "world-100-sites.yaml").read_text())
    sk = yaml.safe_load((EXAMPLES / "world-100-sites-skellam.yaml").read_text())
    for key in ("model", "data", "schedule", "aggregation", "seed"):
        assert sk[key] == base[key], key
    world = load_world(EXAMPLES / "world-100-sites-skellam.yaml")
    assert len(world.sites) == 100 and {len(f.children) for f in world.federations} == {50}
    assert len(world.federations) == 2
    for site in world.sites:
        eff = compose(world.policy_chain(site.name))
        assert eff.secure_aggregation.min_cohort == 45 and tuple(eff.secure_aggregation.acceptable) == ("masking",)
        dp_sec = eff.differential_privacy
        assert (dp_sec.level, dp_sec.epsilon_budget, tuple(dp_sec.acceptable_mechanisms)) == (
            "user", 8.0, ("distributed_skellam",))
    for fed in world.federations:
        assert compose(world.policy_chain(fed.name)).secure_aggregation.min_cohort == 2


def test_record_dp_policy_variants_differ_from_record_dp_only_in_the_budget() -> None:
    rec = load_policy(RECORD_POLICY)
    for eps in (1.0, 4.0):
        p = load_policy(EXAMPLES / "policies" / f"record-dp-eps{eps:g}.yaml")
        assert p.differential_privacy.epsilon_budget == eps
        assert p.differential_privacy.model_copy(update={"epsilon_budget": 8.0}) == rec.differential_privacy
        assert (p.layers, p.secure_aggregation, p.residuals) == (rec.layers, rec.secure_aggregation, rec.residuals)
