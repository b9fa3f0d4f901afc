"""The one interface every secure-aggregation protocol implements.

A protocol turns the vectors that members release into their sum, so that the
aggregator learns the sum and nothing else the protocol is meant to hide.
`run_round` runs a whole round among in-process members; each member runs its
own side with its own keys (nothing shortcuts to the plaintext sum). Protocols
that also run over the network expose their member/aggregator state machines
in their own module; this interface is what the engine calls.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Protocol

import numpy as np

if TYPE_CHECKING:
    from worldlm_secure.secagg.quantize import QuantizationSpec


BeforeReveal = Callable[[tuple[str, ...]], None]
"""A member session's last hook before it reveals what completes a sum (SecAgg+ unmask shares, a CKKS key
holder's decryption): called with the sum's contributors, sorted; raises `SecAggError` to reveal nothing.
A deployed member remembers there which contributors its update was summed with, and refuses a second sum
of the same update over others (`node.release.NodeRelease.reveal_guard`; SECURITY.md, "Re-run rounds")."""


@dataclass(frozen=True)
class MemberInput:
    """What one member releases this round: a 1-D float64 vector, already clipped and weighted."""

    member: str
    vector: np.ndarray


@dataclass(frozen=True)
class DropoutPlan:
    """Which members vanish, and when, in a simulated round (used by tests and fault injection)."""

    before_keys: frozenset[str] = frozenset()  # never advertise keys
    after_keys: frozenset[str] = frozenset()  # after key sharing, before sending the protected input
    after_input: frozenset[str] = frozenset()  # after sending the protected input, before unmasking/decryption


@dataclass(frozen=True)
class IntegerNoise:
    """Distributed DP noise: each member adds its own integer share to its quantized vector before
    protecting it, so the aggregator only ever decodes a noisy sum (privacy/distributed.py builds it).

    The protocol sizes its integer domain so the noisy sum cannot wrap: per coordinate it reserves
    ``reserve_units + reserve_per_scale * scale`` integer units, and caps its scale (quantization steps
    per input unit) at ``max_scale`` so the shares stay in the samplers' exact range.
    ``sample(scale, size)`` draws one member's int64 share for a round quantized at ``scale``.
    """

    reserve_units: float
    reserve_per_scale: float
    max_scale: float
    sample: Callable[[float, int], np.ndarray]


@dataclass(frozen=True)
class ProtectionStats:
    """Costs of one protected round. Bytes are serialized message bytes; seconds are wall time."""

    protocol: str
    bytes_up_per_member: float = 0.0
    bytes_down_per_member: float = 0.0
    expansion: float = 1.0  # protected bytes of the input / float32 bytes of the input
    clipped_fraction: float = 0.0  # fraction of values saturated by quantization (never silent)
    member_seconds: float = 0.0  # summed over members
    server_seconds: float = 0.0
    extra: dict[str, float | str] = field(default_factory=dict)


@dataclass(frozen=True)
class SumResult:
    """The released aggregate: the float64 sum over `contributors` (dropped members are left out)."""

    total: np.ndarray
    contributors: tuple[str, ...]
    dropped: tuple[str, ...]
    stats: ProtectionStats


class SecureSum(ABC):
    """A secure-aggregation protocol, as the engine sees it."""

    name: ClassVar[str]
    # True if run_round takes ``noise=IntegerNoise`` (members add distributed DP noise in its integer domain).
    carries_integer_noise: ClassVar[bool] = False

    @abstractmethod
    def run_round(
        self,
        round_id: int,
        inputs: Sequence[MemberInput],
        *,
        min_cohort: int,
        dropouts: DropoutPlan = DropoutPlan(),
    ) -> SumResult:
        """Sum the members' vectors; raise `SecAggError` and release nothing when fewer than
        `min_cohort` members (or fewer than the protocol's own threshold) survive."""


class IntegerNoiseSum(Protocol):
    """What a `SecureSum` with ``carries_integer_noise`` offers beyond the base interface (masking.MaskingSum):
    ``run_round(..., noise=)`` and the fixed-point spec whose scale sizes the members' integer noise."""

    def run_round(
        self,
        round_id: int,
        inputs: Sequence[MemberInput],
        *,
        min_cohort: int,
        dropouts: DropoutPlan = ...,
        noise: IntegerNoise | None = None,
    ) -> SumResult: ...

    def quantization(self, n_members: int, noise: IntegerNoise | None = None) -> QuantizationSpec: ...
