"""Noise mechanisms: the noise has the promised scale, distributed shares add up to the target,
dropouts are accounted for honestly, and rounding/attention weights never break the sensitivity bound."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worldlm_secure.errors import PolicyError
from worldlm_secure.privacy import NoisePlan, SecureRandom, attentive_sensitivity, available, clip_l2, make_mechanism
from worldlm_secure.privacy.distributed import DistributedDiscreteGaussian, integer_sensitivity

KEY = bytes(range(32))  # fixed key: reproducible statistics in tests only


def test_registry_is_keyed_by_the_policy_mechanism_names() -> None:
    assert set(available()) == {"central_gaussian", "distributed_discrete_gaussian", "distributed_skellam"}
    for name in available():
        assert make_mechanism(name).name == name
    with pytest.raises(PolicyError, match="unknown mechanism 'laplace'"):
        make_mechanism("laplace")


def test_central_gaussian_adds_noise_of_std_z_times_sensitivity() -> None:
    mech = make_mechanism("central_gaussian")
    plan = NoisePlan(sensitivity=0.5, noise_multiplier=1.3)
    total = np.full(200_000, 3.0)
    noisy = mech.add_noise(total, plan, SecureRandom(KEY))
    diff = noisy - total
    assert diff.std() == pytest.approx(0.65, rel=0.01)
    assert abs(diff.mean()) < 0.01
    assert mech.effective_noise_multiplier(plan, contributors=1) == 1.3
    # Fresh CSPRNG per call by default: two calls never give the same noise.
    assert not np.array_equal(mech.add_noise(total, plan), mech.add_noise(total, plan))


@pytest.mark.parametrize("name", ["distributed_discrete_gaussian", "distributed_skellam"])
def test_distributed_shares_sum_to_the_target_noise(name: str) -> None:
    mech = make_mechanism(name)
    n, dim, step = 8, 4000, 1 / 256
    plan = NoisePlan(sensitivity=1.0, noise_multiplier=1.1, expected_members=n, dim=dim, quant_step=step)
    rng = SecureRandom(KEY)
    shares = [mech.sample_member_noise(dim, plan, rng) for _ in range(n)]
    assert all(s.dtype == np.int64 and s.shape == (dim,) for s in shares)
    total = np.sum(shares, axis=0)
    d2, _ = integer_sensitivity(plan)
    assert total.std() == pytest.approx(1.1 * d2, rel=0.03)  # σ_total = z·Δ₂ in integer units
    assert mech.noise_std(plan, n) == pytest.approx(1.1 * d2 * step)
    z_full = mech.effective_noise_multiplier(plan, n)
    assert z_full == pytest.approx(1.1, rel=1e-4) and z_full <= 1.1


@pytest.mark.parametrize("name", ["distributed_discrete_gaussian", "distributed_skellam"])
@given(n=st.integers(2, 50), data=st.data())
@settings(deadline=None, max_examples=30)
def test_dropped_members_lower_the_effective_multiplier_which_is_what_gets_accounted(
    name: str, n: int, data: st.DataObject
) -> None:
    mech = make_mechanism(name)
    m = data.draw(st.integers(1, n))
    plan = NoisePlan(sensitivity=2.0, noise_multiplier=0.9, expected_members=n, dim=1000, quant_step=1e-3)
    z_eff = mech.effective_noise_multiplier(plan, m)
    assert z_eff <= 0.9 * math.sqrt(m / n) * (1 + 1e-9)
    assert z_eff == pytest.approx(0.9 * math.sqrt(m / n), rel=1e-3)
    # Planning for the worst tolerated dropout keeps z_eff >= z.
    worst = NoisePlan(sensitivity=2.0, noise_multiplier=0.9, expected_members=m, dim=1000, quant_step=1e-3)
    assert mech.effective_noise_multiplier(worst, m) == pytest.approx(0.9, rel=1e-3)
    with pytest.raises(PolicyError):
        mech.effective_noise_multiplier(plan, 0)


def test_tiny_discrete_gaussian_shares_are_penalised_not_trusted() -> None:
    # Very small per-member σ: the sum is far from a discrete Gaussian; τ·d must lower z_eff.
    plan = NoisePlan(sensitivity=1e-3, noise_multiplier=1.0, expected_members=100, dim=1, quant_step=1.0)
    mech = DistributedDiscreteGaussian()
    assert mech.member_sigma(plan) < 0.2
    assert mech.tau(mech.member_sigma(plan), 100) > 0.1
    assert mech.effective_noise_multiplier(plan, 100) < 0.9


def test_distributed_noise_needs_the_quantization_step() -> None:
    with pytest.raises(PolicyError, match="quant_step"):
        make_mechanism("distributed_skellam").sample_member_noise(
            3, NoisePlan(sensitivity=1.0, noise_multiplier=1.0, expected_members=2, dim=3)
        )
    with pytest.raises(PolicyError, match="noise_multiplier"):
        NoisePlan(sensitivity=1.0, noise_multiplier=0.0)


@settings(deadline=None, max_examples=60)
@given(
    vec=st.lists(st.floats(-50, 50), min_size=1, max_size=40),
    clip=st.floats(0.01, 10.0),
    step=st.sampled_from([1.0, 0.1, 1 / 1024]),
    seed=st.binary(min_size=32, max_size=32),
)
def test_stochastic_rounding_never_exceeds_the_integer_sensitivity(
    vec: list[float], clip: float, step: float, seed: bytes
) -> None:
    x = clip_l2(np.array(vec), clip).vector
    u = SecureRandom(seed).uniform(x.size)
    q = np.floor(x / step + u)  # the masking quantizer's stochastic rounding, signed, no offset
    d2, d1 = integer_sensitivity(NoisePlan(sensitivity=clip, noise_multiplier=1.0, dim=x.size, quant_step=step))
    assert np.linalg.norm(q) <= d2 + 1e-9
    assert np.abs(q).sum() <= d1 + 1e-9


@settings(deadline=None, max_examples=60)
@given(
    delta=st.lists(st.floats(-10, 10), min_size=1, max_size=20),
    clip=st.floats(0.01, 5.0),
    w_frac=st.floats(0.0, 1.0),
    w_max=st.floats(0.1, 10.0),
)
def test_attention_weighted_contribution_stays_within_the_derived_sensitivity(
    delta: list[float], clip: float, w_frac: float, w_max: float
) -> None:
    d = clip_l2(np.array(delta), clip).vector
    w = max(w_frac * w_max, 1e-12)
    contribution = np.concatenate([w * d, [w]])
    assert np.linalg.norm(contribution) <= attentive_sensitivity(clip, w_max) * (1 + 1e-12)
