"""Distributed DP noise inside SecAgg+ masking: members noise their own quantized vectors, the
aggregator only ever decodes a noisy sum, dropped members' missing noise is accounted, and the
engine records what was actually released."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worldlm_secure.errors import ConfigError, PolicyError
from worldlm_secure.federation.methods import METHODS
from worldlm_secure.federation.simulate import simulate
from worldlm_secure.ledger import read_entries, verify
from worldlm_secure.privacy.distributed import MAX_MEMBER_VARIANCE, integer_noise
from worldlm_secure.privacy.mechanisms import NoisePlan, make_mechanism
from worldlm_secure.secagg import DropoutPlan, MemberInput
from worldlm_secure.secagg.masking import MaskingParams
from worldlm_secure.secagg.masking_round import MaskingSum
from worldlm_secure.secagg.quantize import QuantizationSpec

from conftest import write_distributed_world

MECHANISMS = ("distributed_discrete_gaussian", "distributed_skellam")


def _round(mechanism: str, vectors: list[np.ndarray], *, z: float = 1.0, sens: float = 1.0, drop: int = 0,
           bits: int = 32, clip: float = 1.0):
    mech = make_mechanism(mechanism)
    plan = NoisePlan(sensitivity=sens, noise_multiplier=z, expected_members=len(vectors), dim=vectors[0].size)
    secure = MaskingSum(MaskingParams(clip_range=clip, bits=bits, threshold=0.6))  # t=3 of k=5 at n=6 (threshold must be > 1/2)
    noise = integer_noise(mech, plan, len(vectors))  # type: ignore[arg-type]
    spec = secure.quantization(len(vectors), noise)
    names = [f"m{i}" for i in range(len(vectors))]
    gone = DropoutPlan(after_keys=frozenset(names[:drop]))
    result = secure.run_round(
        1, [MemberInput(n, v) for n, v in zip(names, vectors)], min_cohort=1, dropouts=gone, noise=noise
    )
    return result, mech, replace(plan, quant_step=1.0 / spec.scale), spec


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_the_released_sum_carries_noise_of_the_planned_size(mechanism: str) -> None:
    d = 20_000
    vectors = [np.full(d, 0.1 * (i + 1)) for i in range(3)]
    result, mech, plan, _ = _round(mechanism, vectors, z=0.7, sens=0.5)
    err = result.total - sum(vectors)
    # total std z·Δ (0.35) up to the integer-sensitivity inflation (√d per scale, ~1e-4 here)
    assert err.std() == pytest.approx(0.7 * 0.5, rel=0.03)
    assert abs(err.mean()) < 5 * 0.35 / math.sqrt(d)
    assert mech.effective_noise_multiplier(plan, 3) == pytest.approx(0.7, rel=1e-3)
    assert result.stats.extra["scale"] == pytest.approx(1.0 / plan.quant_step)


def test_without_noise_the_same_round_is_exact_to_quantization() -> None:
    d = 1000
    vectors = [np.full(d, 0.25) for _ in range(3)]
    secure = MaskingSum(MaskingParams(clip_range=1.0))
    result = secure.run_round(1, [MemberInput(f"m{i}", v) for i, v in enumerate(vectors)], min_cohort=1)
    assert np.max(np.abs(result.total - 0.75)) <= result.stats.extra["quantization_error_bound"]


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_dropped_members_noise_is_missing_and_accounted(mechanism: str) -> None:
    d = 20_000
    vectors = [np.zeros(d) for _ in range(6)]
    result, mech, plan, _ = _round(mechanism, vectors, z=1.0, drop=2)
    assert len(result.contributors) == 4
    err = result.total  # zero inputs: only the four survivors' noise shares are left
    assert err.std() == pytest.approx(math.sqrt(4 / 6), rel=0.03)
    assert mech.effective_noise_multiplier(plan, 4) == pytest.approx(math.sqrt(4 / 6), rel=1e-3)
    assert mech.effective_noise_multiplier(plan, 4) < mech.effective_noise_multiplier(plan, 6)


@settings(max_examples=15, deadline=None)
@given(
    sign=st.sampled_from([-1.0, 1.0]),
    n=st.integers(min_value=2, max_value=5),
    z=st.floats(min_value=0.3, max_value=20.0),
    bits=st.sampled_from([24, 32, 48]),
)
def test_extreme_inputs_plus_noise_never_wrap(sign: float, n: int, z: float, bits: int) -> None:
    """Every member at +-clip_range: the decoded sum is n·clip plus noise, never a wrapped residue."""
    d = 512
    vectors = [np.full(d, sign * 1.0) for _ in range(n)]
    result, mech, plan, _ = _round("distributed_discrete_gaussian", vectors, z=z, sens=1.0, bits=bits)
    err = result.total - sign * n
    assert np.max(np.abs(err)) < 8 * z * 1.01 + n * plan.quant_step


def test_the_quantizer_reserves_room_and_caps_the_scale() -> None:
    plan = NoisePlan(sensitivity=1.0, noise_multiplier=1.0, expected_members=3, dim=10_000)
    noise = integer_noise(make_mechanism("distributed_skellam"), plan, 3)  # type: ignore[arg-type]
    spec = QuantizationSpec(32, 1.0, 3, noise.reserve_units, noise.reserve_per_scale, noise.max_scale)
    assert spec.scale < QuantizationSpec(32, 1.0, 3).scale
    member_var = (1.0 * (spec.scale + 100.0)) ** 2 / 3  # (z·Δ₂)²/n with Δ₂ = Δ·scale + √d
    assert member_var <= MAX_MEMBER_VARIANCE * 1.0001
    with pytest.raises(ConfigError, match="plus the distributed DP noise"):
        QuantizationSpec(8, 1.0, 3, reserve_units=200.0)


@pytest.mark.slow
def test_engine_releases_under_distributed_noise_and_records_z_eff(tmp_path: Path) -> None:
    out = tmp_path / "ledgers"
    result = simulate(write_distributed_world(tmp_path), methods=[METHODS["worldlm"]], device="cpu", ledger_root=out)
    site = read_entries(out / "f0-s0.sqlite")
    assert len(site) == 4 and {e.group for e in site} == {"key", "shared"}
    assert all(e.protocol == "masking" and e.mechanism == "distributed_discrete_gaussian" for e in site)
    assert all(e.epsilon > 0 and e.noise_multiplier > 0 for e in site)
    assert site[-1].epsilon_cumulative <= 50.0
    for f in sorted(out.glob("*.sqlite")):
        assert verify(f).ok, verify(f).summary()
    assert math.isfinite(result.methods["worldlm"].mean_val_ppl)


def test_distributed_noise_with_a_protocol_that_cannot_carry_it_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="need protocol masking"):
        simulate(write_distributed_world(tmp_path, protocol="ckks"), methods=[METHODS["worldlm"]], device="cpu")
