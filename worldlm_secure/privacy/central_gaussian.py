"""Central Gaussian noise: the aggregator adds N(0, (z·Δ)²) per coordinate to the unmasked sum.

Δ is the sensitivity of the *decoded* sum: S_q = S + √d·e when the protocol quantizes (e: its per-value
rounding error, `NoisePlan.rounding_error`; protocols/dp.md §2.8), S itself for protocol none.

The aggregator is trusted to add the noise (it sees the noiseless sum for an instant);
dropped members do not matter, the noise is added once to whatever sum is released.
"""

from __future__ import annotations

import numpy as np

from worldlm_secure.privacy.mechanisms import NoiseMechanism, NoisePlan, register
from worldlm_secure.privacy.secure_random import SecureRandom


class CentralGaussian(NoiseMechanism):
    name = "central_gaussian"
    distributed = False

    def noise_std(self, plan: NoisePlan) -> float:
        """Standard deviation of the added noise, in parameter units: z · Δ, Δ = S_q = S + √d·e."""
        return plan.noise_multiplier * plan.quantized_sensitivity

    def add_noise(self, total: np.ndarray, plan: NoisePlan, rng: SecureRandom | None = None) -> np.ndarray:
        """`total` + Gaussian noise of std z·Δ (float64, a new array; secret noise from a CSPRNG)."""
        rng = rng or SecureRandom()
        t = np.asarray(total, dtype=np.float64)
        return t + self.noise_std(plan) * rng.standard_normal(t.shape)

    def effective_noise_multiplier(self, plan: NoisePlan, contributors: int) -> float:
        return plan.noise_multiplier


register(CentralGaussian.name, CentralGaussian)
