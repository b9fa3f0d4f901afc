"""Distributed integer noise: each member adds its share to its quantized vector before masking.

Works in the integer domain of the masking quantizer (x ↦ stochastic_round(x / quant_step), signed,
no offset). The aggregator only ever unmasks the noisy sum. Accounting (protocols/dp.md):

- Integer sensitivity. Stochastic rounding moves each coordinate by < 1, so one member's
  integer vector has ‖x̃‖₂ ≤ Δ/quant_step + √d =: Δ₂ and ‖x̃‖₁ ≤ min(Δ₂², √d·Δ₂) =: Δ₁.
- Shares. Each of n expected members adds noise of variance (z·Δ₂)²/n, so the full cohort
  gives the target z. When only m < n contribute, the noise is smaller: z_eff ≈ z·√(m/n)
  (exact formulas below), and the ledger records z_eff, never the planned z.
- Distributed discrete Gaussian (Kairouz, Liu & Steinke 2021, Thm. 1): the sum of m
  discrete Gaussians of variance σ² satisfies ½ε²-concentrated DP with
  ε² = Δ₂²/(mσ²) + τ·d, τ = 10·Σ_{k=1}^{m-1} exp(−2π²σ²·k/(k+1)); that is the CDP of a
  Gaussian with z_eff = 1/ε.
- Skellam (Agarwal, Kairouz & Liu 2021, Thm. 3.5): Skellam(M) noise, M = m·μ, is
  (α, α·Δ₂²/(4M) + ((2α−1)Δ₂² + 6Δ₁)/(16M²))-RDP; for all α ≥ 1 this is ≤ the Gaussian
  RDP with σ² = 2M/(1+κ), κ = 1/(2M) + 3Δ₁/(2M·Δ₂²), so z_eff = √(2M/(1+κ))/Δ₂.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import replace

import numpy as np

from worldlm_secure.errors import PolicyError
from worldlm_secure.privacy.mechanisms import NoiseMechanism, NoisePlan, register
from worldlm_secure.privacy.secure_random import SecureRandom
from worldlm_secure.secagg.protocol import IntegerNoise

# Per-member variance cap (integer units²): the Poisson sampler behind Skellam loses precision far above
# λ ≈ 1e12 (float64 log-factorials); the protocol lowers its scale instead. Costs nothing in utility: the
# quantization step stays ~1e-6 of the noise std.
MAX_MEMBER_VARIANCE = 1e12
# The noisy sum must not wrap in Z_2^b: reserve this many standard deviations of the total noise.
NOISE_SIGMAS = 8.0


def integer_sensitivity(plan: NoisePlan) -> tuple[float, float]:
    """(Δ₂, Δ₁) of one member's quantized integer vector, in integer units."""
    if plan.quant_step is None or not plan.quant_step > 0:
        raise PolicyError(
            "distributed noise: the quantization step (quant_step) must be given and > 0; pass the masking quantizer's step"
        )
    d2 = plan.sensitivity / plan.quant_step + math.sqrt(plan.dim)
    d1 = min(d2 * d2, math.sqrt(plan.dim) * d2)
    return d2, d1


class DistributedIntegerMechanism(NoiseMechanism):
    distributed = True

    def member_variance(self, plan: NoisePlan) -> float:
        """Variance (integer units²) of one member's noise per coordinate: (z·Δ₂)²/n."""
        d2, _ = integer_sensitivity(plan)
        return (plan.noise_multiplier * d2) ** 2 / plan.expected_members

    @abstractmethod
    def sample_member_noise(
        self, shape: int | tuple[int, ...], plan: NoisePlan, rng: SecureRandom | None = None
    ) -> np.ndarray:
        """This member's int64 noise share, to add to its quantized vector before masking."""

    def noise_std(self, plan: NoisePlan, contributors: int) -> float:
        """Std of the total noise in the released sum, in parameter units (for utility estimates)."""
        return math.sqrt(contributors * self.member_variance(plan)) * float(plan.quant_step or 0.0)

    def _check_contributors(self, contributors: int) -> None:
        if contributors < 1:
            raise PolicyError("distributed noise: at least one member must contribute to a release")


class DistributedDiscreteGaussian(DistributedIntegerMechanism):
    name = "distributed_discrete_gaussian"

    def member_sigma(self, plan: NoisePlan) -> float:
        """σ (integer units) of each member's discrete Gaussian share."""
        return math.sqrt(self.member_variance(plan))

    def sample_member_noise(
        self, shape: int | tuple[int, ...], plan: NoisePlan, rng: SecureRandom | None = None
    ) -> np.ndarray:
        return (rng or SecureRandom()).discrete_gaussian(self.member_sigma(plan), shape)

    @staticmethod
    def tau(sigma: float, contributors: int) -> float:
        """Kairouz et al.'s τ: how far a sum of discrete Gaussians is from one discrete Gaussian."""
        s2 = sigma * sigma
        return 10.0 * sum(math.exp(-2 * math.pi**2 * s2 * k / (k + 1)) for k in range(1, contributors))

    def effective_noise_multiplier(self, plan: NoisePlan, contributors: int) -> float:
        self._check_contributors(contributors)
        d2, _ = integer_sensitivity(plan)
        sigma = self.member_sigma(plan)
        eps2 = d2 * d2 / (contributors * sigma * sigma) + self.tau(sigma, contributors) * plan.dim
        return 1.0 / math.sqrt(eps2)


class DistributedSkellam(DistributedIntegerMechanism):
    name = "distributed_skellam"

    def member_mu(self, plan: NoisePlan) -> float:
        """μ of each member's Skellam(μ, μ) share (variance 2μ)."""
        return self.member_variance(plan) / 2.0

    def sample_member_noise(
        self, shape: int | tuple[int, ...], plan: NoisePlan, rng: SecureRandom | None = None
    ) -> np.ndarray:
        return (rng or SecureRandom()).skellam(self.member_mu(plan), shape)

    def effective_noise_multiplier(self, plan: NoisePlan, contributors: int) -> float:
        self._check_contributors(contributors)
        d2, d1 = integer_sensitivity(plan)
        big_m = contributors * self.member_mu(plan)
        kappa = 1.0 / (2 * big_m) + 3 * d1 / (2 * big_m * d2 * d2)
        return math.sqrt(2 * big_m / (1 + kappa)) / d2


register(DistributedDiscreteGaussian.name, DistributedDiscreteGaussian)
register(DistributedSkellam.name, DistributedSkellam)


def integer_noise(mechanism: DistributedIntegerMechanism, plan: NoisePlan, roster: int) -> IntegerNoise:
    """What a masking round needs to carry ``mechanism``'s shares for ``plan`` (its quant_step is ignored:
    the round fixes the scale). ``roster``: members invited; up to all of them may contribute.

    Per coordinate the total noise of ``roster`` shares has std sqrt(roster/n)·z·Δ₂ with Δ₂ = Δ·scale + √d;
    the round reserves NOISE_SIGMAS of it, and caps the scale so a share's variance stays <= MAX_MEMBER_VARIANCE.
    """
    z, sens, n, d = plan.noise_multiplier, plan.sensitivity, plan.expected_members, plan.dim
    spread = NOISE_SIGMAS * math.sqrt(max(roster, n) / n) * z
    max_d2 = math.sqrt(MAX_MEMBER_VARIANCE * n) / z
    max_scale = (max_d2 - math.sqrt(d)) / sens
    if not max_scale > 0:
        raise PolicyError(
            f"distributed noise: {d} values at noise_multiplier {z:g} do not fit the exact samplers; "
            "use central_gaussian or release fewer values per group"
        )

    def sample(scale: float, size: int) -> np.ndarray:
        return mechanism.sample_member_noise(size, replace(plan, quant_step=1.0 / scale))

    return IntegerNoise(spread * math.sqrt(d), spread * sens, max_scale, sample)
