"""Noise mechanisms for user-level DP: one small interface, one file per variant, a registry by name.

The registry is keyed by the policy's `differential_privacy.mechanism`:
`central_gaussian` (the aggregator adds Gaussian noise to the unmasked sum) and
`distributed_discrete_gaussian` / `distributed_skellam` (each member adds its share
of integer noise to its quantized vector before masking, so nobody ever sees a
noiseless sum). Every mechanism reports the *effective* noise multiplier of what
was actually released — the number the accountant and the ledger use.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from worldlm_secure.errors import PolicyError


@dataclass(frozen=True)
class NoisePlan:
    """What a mechanism needs for one release of one parameter group.

    sensitivity: L2 bound of one member's float vector, in parameter units (the clipping
        norm, or `attentive_sensitivity(...)` for secure attentive aggregation).
    noise_multiplier: z; the target noise standard deviation on the sum is z · sensitivity.
    expected_members: n, the members the noise is split over (distributed mechanisms only).
    dim: length of the released vector (distributed mechanisms only; rounding inflates sensitivity).
    quant_step: quantization step in parameter units per integer unit, i.e. 1 / QuantizationSpec.scale
        of secagg/quantize.py (distributed mechanisms only).
    rounding_error: e, the secure-summation protocol's largest per-value rounding error (central noise only;
        `privacy.quantization.rounding_error`, 0 for protocol none). The central aggregator noises the decoded
        sum, which one member moves by its *quantized* vector, so the noise is sized at
        `quantized_sensitivity` S_q = sensitivity + √dim·e (protocols/dp.md §2.8). Distributed mechanisms
        count rounding in their own Δ₂ and ignore it.
    """

    sensitivity: float
    noise_multiplier: float
    expected_members: int = 1
    dim: int = 1
    quant_step: float | None = None
    rounding_error: float = 0.0

    def __post_init__(self) -> None:
        if not (self.sensitivity > 0 and math.isfinite(self.sensitivity)):
            raise PolicyError(f"differential_privacy.clipping_norm: sensitivity must be > 0 (got {self.sensitivity})")
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise PolicyError(
                f"differential_privacy.noise_multiplier: must be > 0 for a DP release (got {self.noise_multiplier})"
            )
        if self.expected_members < 1 or self.dim < 1:
            raise PolicyError(
                f"noise plan: expected_members and dim must be >= 1 (got {self.expected_members}, {self.dim})"
            )
        if not (self.rounding_error >= 0 and math.isfinite(self.rounding_error)):
            raise PolicyError(f"noise plan: rounding_error must be >= 0 (got {self.rounding_error})")

    @property
    def quantization_slack(self) -> float:
        """√dim·e: how far one member's quantized vector can be from its float vector in L2 (central noise)."""
        return math.sqrt(self.dim) * self.rounding_error if self.rounding_error > 0 else 0.0

    @property
    def quantized_sensitivity(self) -> float:
        """S_q = sensitivity + √dim·e: what one member moves the decoded sum by (the central noise's Δ)."""
        return self.sensitivity + self.quantization_slack


class NoiseMechanism(ABC):
    """A user-level DP noise mechanism, as the engine sees it."""

    name: ClassVar[str]
    distributed: ClassVar[bool]

    @abstractmethod
    def effective_noise_multiplier(self, plan: NoisePlan, contributors: int) -> float:
        """z_eff of the released sum when `contributors` members actually contributed:
        the Gaussian noise multiplier whose RDP curve bounds this release's (feed it to the accountant)."""


_REGISTRY: dict[str, Callable[[], NoiseMechanism]] = {}


def register(name: str, factory: Callable[[], NoiseMechanism]) -> None:
    _REGISTRY[name] = factory


def _load_variants() -> None:
    # Imported here: the variant modules import this one for the interface.
    from worldlm_secure.privacy import central_gaussian, distributed  # noqa: F401


def available() -> tuple[str, ...]:
    _load_variants()
    return tuple(sorted(_REGISTRY))


def make_mechanism(name: str) -> NoiseMechanism:
    """The mechanism named by the policy's `differential_privacy.mechanism`."""
    _load_variants()
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise PolicyError(
            f"differential_privacy.mechanism: unknown mechanism {name!r} (available: {', '.join(available())})"
        ) from None
