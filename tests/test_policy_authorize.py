"""Enforcement: authorize() refuses every release the effective policy does not allow."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from worldlm_secure.errors import PolicyViolation
from worldlm_secure.policy import (
    Authorization,
    Release,
    authorize,
    bind_chain,
    compose,
    load_policy,
    verify_authorization,
)

POLICIES = Path(__file__).resolve().parents[1] / "policies"
# The shipped policies name destinations by relation and jurisdiction: chains are bound to their nodes.
EU_CHAIN = bind_chain(
    [load_policy(POLICIES / "eu.yaml"), load_policy(POLICIES / "eu.yaml"), load_policy(POLICIES / "research-open.yaml")],
    ["eu-site-1", "eu", "world"],
)
HC_CHAIN = bind_chain(
    [load_policy(POLICIES / f"{n}.yaml") for n in ("healthcare", "healthcare", "research-open")],
    ["hospital-a", "health", "world"],
)

OK = Release(
    source="eu-site-1",
    destination="eu",
    round=3,
    group="shared",
    tensor_names=("model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"),
    protocol="masking",
    dp_level="user",
    dp_mechanism="central_gaussian",
    cohort_size=3,
)


def test_allowed_release_is_authorized() -> None:
    authorize(dataclasses.replace(OK, protocol="ckks"), EU_CHAIN)  # EU accepts CKKS as its second choice
    # distributed noise is acceptable under EU, but only with masking
    authorize(dataclasses.replace(OK, dp_mechanism="distributed_discrete_gaussian"), EU_CHAIN)
    with pytest.raises(PolicyViolation, match="mechanism"):
        authorize(dataclasses.replace(OK, protocol="ckks", dp_mechanism="distributed_discrete_gaussian"), EU_CHAIN)
    auth = authorize(OK, EU_CHAIN)
    assert isinstance(auth, Authorization)
    assert auth.policy_sha256 == compose(EU_CHAIN).sha256
    assert auth.covers(OK) and len(auth.digest) == 64
    assert verify_authorization(auth, OK) is auth
    assert authorize(OK, compose(EU_CHAIN)).digest == auth.digest


@pytest.mark.parametrize(
    "change,rule",
    [
        (dict(tensor_names=("lm_head.weight",)), "layers.local"),
        (dict(tensor_names=("model.norm.weight",)), "layers.local"),
        (dict(tensor_names=("model.layers.0.mlp.gate_proj.weight",)), "layers.shared"),  # key tensor sent as shared
        (dict(tensor_names=("something.else",)), "layers"),
        (dict(destination="us"), "egress.destinations"),
        (dict(destination="world", group="key", tensor_names=("model.layers.0.mlp.up_proj.weight",)), "egress.destinations"),
        (dict(protocol="none"), "egress.require"),
        (dict(protocol="rot13"), "secure_aggregation.protocol"),
        (dict(cohort_size=2), "secure_aggregation.min_cohort"),
        (dict(dp_level="none", dp_mechanism=None), "differential_privacy.level"),
        (dict(dp_level="record"), "differential_privacy.level"),
        (dict(dp_mechanism="distributed_skellam"), "differential_privacy.mechanism"),
        (dict(group="residual", rank=64, tensor_names=()), "residuals.rank"),
    ],
)
def test_each_rule_refuses(change: dict, rule: str) -> None:
    with pytest.raises(PolicyViolation) as info:
        authorize(dataclasses.replace(OK, **change), EU_CHAIN)
    msg = str(info.value)
    assert rule in msg and "allowed" in msg and "requested" in msg and "\n" not in msg


def test_healthcare_refuses_residuals_and_missing_record_dp() -> None:
    base = dataclasses.replace(OK, destination="health", protocol="ckks", record_dp=True)
    authorize(base, HC_CHAIN)
    with pytest.raises(PolicyViolation, match="secure_aggregation.protocol"):
        authorize(dataclasses.replace(base, protocol="masking"), HC_CHAIN)
    with pytest.raises(PolicyViolation, match="differential_privacy.record"):
        authorize(dataclasses.replace(base, record_dp=False), HC_CHAIN)
    with pytest.raises(PolicyViolation, match="residual"):
        authorize(dataclasses.replace(base, group="residual", tensor_names=()), HC_CHAIN)


def test_open_world_allows_plain_release() -> None:
    chain = [load_policy(POLICIES / "research-open.yaml")] * 2
    plain = dataclasses.replace(OK, destination="anywhere", protocol="none", dp_level="none", dp_mechanism=None, cohort_size=1)
    authorize(plain, chain)
    with pytest.raises(PolicyViolation, match="layers.local"):
        authorize(dataclasses.replace(plain, tensor_names=("lm_head.weight",)), chain)


def test_unbound_relations_allow_nothing_and_nodes_resolve_them() -> None:
    unbound = [load_policy(POLICIES / n) for n in ("eu.yaml", "eu.yaml", "research-open.yaml")]
    with pytest.raises(PolicyViolation, match="not resolved"):
        authorize(OK, unbound)
    assert authorize(OK, unbound, nodes=["eu-site-1", "eu", "world"]).digest == authorize(OK, EU_CHAIN).digest


def test_verify_authorization_refuses_mismatch() -> None:
    auth = authorize(OK, EU_CHAIN)
    with pytest.raises(PolicyViolation, match="no matching authorization"):
        verify_authorization(auth, dataclasses.replace(OK, round=4))
    with pytest.raises(PolicyViolation):
        verify_authorization(None, OK)
