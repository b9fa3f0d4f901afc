"""Whole SecAgg+ rounds: the unmasked result is the survivors' sum, or the round aborts when it must."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from worldlm_secure.errors import ConfigError, SecAggError
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.secagg import DropoutPlan, MemberInput, make_secure_sum
from worldlm_secure.secagg.graph import components, neighbour_graph
from worldlm_secure.secagg.masking import MaskingParams, RoundConfig
from worldlm_secure.secagg.masking_round import MaskingSum

STAGES = ("stay", "before_keys", "after_keys", "after_input")


def _expected_survivors(cfg: RoundConfig, stage: dict[str, str]) -> frozenset[str] | None:
    """The spec's abort rules (protocols/secagg-plus.md, "Aborts"), from public data: survivors, or None."""
    u1 = [m for m in cfg.roster if stage[m] != "before_keys"]
    if len(u1) < cfg.min_cohort:
        return None
    g = neighbour_graph(u1, cfg.neighbours, cfg.round_id)
    t = cfg.threshold_for(len(u1))  # t of the graph over those that advertised
    if any(len(nb) < t for nb in g.values()):
        return None
    u3 = frozenset(m for m in u1 if stage[m] in ("stay", "after_input"))
    if len(u3) < cfg.min_cohort or len(components(u3, g)) > 1:
        return None
    responders = frozenset(m for m in u3 if stage[m] == "stay")
    if len(responders) < cfg.consistency_threshold(len(u1)):  # too few sign the survivor list
        return None
    for u in u1:
        needs_recovery = u in u3 or bool(g[u] & u3)
        if needs_recovery and len(g[u] & responders) < t:
            return None
    return u3


@dataclass(frozen=True)
class Policyish:
    """Stands in for the policy's pydantic masking section: only attributes are read."""

    neighbours: int | str
    threshold: float
    bits: int
    clip_range: float


@settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 10),
    k=st.one_of(st.just("auto"), st.integers(1, 7)),
    threshold=st.sampled_from([0.51, 0.67, 1.0]),
    bits=st.sampled_from([16, 32, 48]),
    dim=st.integers(1, 40),
    min_cohort=st.integers(1, 4),
    data=st.data(),
)
def test_round_releases_survivor_sum_or_aborts(
    n: int, k: int | str, threshold: float, bits: int, dim: int, min_cohort: int, data: st.DataObject
) -> None:
    names = [f"site-{i}" for i in range(n)]
    stage = {m: data.draw(st.sampled_from(STAGES[:1] * 6 + STAGES[1:]), label=m) for m in names}
    seed = data.draw(st.integers(0, 2**32 - 1), label="vector seed")
    rng = np.random.default_rng(seed)  # test inputs only, never key material
    vectors = {m: rng.uniform(-1.5, 1.5, dim) for m in names}
    params = Policyish(k, threshold, bits, 1.0)
    proto = make_secure_sum("masking", params=params, identities=None, round_seed=seed)
    ids = {m: proto.identities.setdefault(m, NodeIdentity.generate(m)) for m in names}  # type: ignore[attr-defined]
    cfg = RoundConfig.build(
        params, 11, names, {m: i.public_bytes for m, i in ids.items()}, min_cohort,
        aggregator_key=proto.aggregator.public_bytes,  # type: ignore[attr-defined]
    )
    plan = DropoutPlan(*(frozenset(m for m in names if stage[m] == s) for s in STAGES[1:]))
    expected = _expected_survivors(cfg, stage)
    inputs = [MemberInput(m, vectors[m]) for m in names]
    event("aborted" if expected is None else f"released, {n - len(expected)} dropped")
    if expected is None:
        with pytest.raises(SecAggError) as err:
            proto.run_round(11, inputs, min_cohort=min_cohort, dropouts=plan)
        assert "\n" not in str(err.value) and "round 11" in str(err.value)
        return
    res = proto.run_round(11, inputs, min_cohort=min_cohort, dropouts=plan)
    assert set(res.contributors) == expected and set(res.dropped) == set(names) - expected
    plain = sum(np.clip(vectors[m], -1.0, 1.0) for m in expected)
    assert np.all(np.abs(res.total - plain) <= cfg.quant.sum_error_bound(len(expected)))
    clipped = np.mean([np.mean(np.abs(vectors[m]) > 1.0) for m in expected])
    assert clipped - 1e-12 <= res.stats.clipped_fraction <= clipped + 1.0 / cfg.quant.clip_units + 1e-12


def test_no_dropouts_many_members_with_policy_section() -> None:
    names = [f"m{i:02d}" for i in range(30)]
    rng = np.random.default_rng(1)
    vectors = {m: rng.normal(0, 0.3, 257) for m in names}
    proto = make_secure_sum("masking", params=Policyish("auto", 0.51, 32, 2.0), identities=None)
    plan = DropoutPlan(after_keys=frozenset(names[0:30:10]), after_input=frozenset(names[5:30:10]))
    res = proto.run_round(1, [MemberInput(m, v) for m, v in vectors.items()], min_cohort=20, dropouts=plan)
    survivors = [m for m in names if m not in plan.after_keys]
    assert res.contributors == tuple(survivors)
    assert np.allclose(res.total, sum(vectors[m] for m in survivors), atol=res.stats.extra["quantization_error_bound"])
    assert res.stats.extra["neighbours"] == 10 and res.stats.extra["threshold"] == 6
    assert res.stats.extra["recovered_mask_keys"] == 3
    assert res.stats.bytes_up_per_member > 4 * 258 and res.stats.server_seconds > 0  # 257 values + clip word
    assert res.stats.bytes_up_per_member * len(res.contributors) < res.stats.extra["bytes_up_total"]  # + dropped


def test_below_min_cohort_aborts_with_one_line_naming_the_rule() -> None:
    proto = MaskingSum(MaskingParams(clip_range=1.0))
    inputs = [MemberInput(f"m{i}", np.ones(3)) for i in range(5)]
    with pytest.raises(SecAggError, match=r"only 3 of 5 members sent masked input, below min_cohort=4"):
        proto.run_round(2, inputs, min_cohort=4, dropouts=DropoutPlan(after_keys=frozenset({"m0", "m1"})))


def test_too_many_dropouts_after_input_abort_naming_the_member() -> None:
    proto = MaskingSum(MaskingParams(clip_range=1.0, neighbours=2, threshold=1.0))
    inputs = [MemberInput(f"m{i}", np.ones(3)) for i in range(6)]
    with pytest.raises(SecAggError, match=r"shares of the self-mask seed of 'm\d' arrived"):
        proto.run_round(2, inputs, min_cohort=2, dropouts=DropoutPlan(after_input=frozenset({"m0"})))


def test_identities_are_used_and_missing_ones_are_a_config_error() -> None:
    ids = {m: NodeIdentity.generate(m) for m in ("a", "b", "c")}
    proto = make_secure_sum("masking", params=MaskingParams(clip_range=1.0), identities=ids, unknown_kwarg=1)
    res = proto.run_round(0, [MemberInput(m, np.full(4, 0.25)) for m in ids], min_cohort=3)
    assert np.allclose(res.total, 0.75, atol=1e-6)
    with pytest.raises(ConfigError, match="no Ed25519 identity for member 'd'"):
        proto.run_round(1, [MemberInput(m, np.zeros(4)) for m in ("a", "b", "d")], min_cohort=2)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (Policyish(0, 0.67, 32, 1.0), "neighbours"),
        (Policyish("auto", 1.5, 32, 1.0), "threshold"),
        (Policyish("auto", 0.5, 32, 1.0), "threshold"),
        (Policyish("auto", 0.67, 70, 1.0), "bits"),
    ],
)
def test_bad_parameters_name_the_policy_field(params: Policyish, field: str) -> None:
    with pytest.raises(ConfigError, match=f"masking.{field}"):
        MaskingSum(params).run_round(0, [MemberInput(m, np.zeros(2)) for m in "abc"], min_cohort=2)


def test_mismatched_vector_lengths_are_refused() -> None:
    with pytest.raises(SecAggError, match="one length"):
        MaskingSum(MaskingParams(clip_range=1.0)).run_round(
            0, [MemberInput("a", np.zeros(2)), MemberInput("b", np.zeros(3))], min_cohort=1
        )
