"""One aggregation round has many members, each with its own effective policy: agree on one plan.

All members of a round must use the same protocol with the same parameters (a sum cannot
mix masks and ciphertexts). `plan_round` picks, among the protocols every member's path
accepts, the one the members prefer overall, and the strictest parameters any member
demands. If no protocol is acceptable to all, it names two members' policy files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Optional, TypeVar

from pydantic import BaseModel, ConfigDict

from worldlm_secure.errors import PolicyError
from worldlm_secure.policy.compose import EffectivePolicy, usable_mechanisms
from worldlm_secure.policy.schema import CkksParams, MaskingParams, Mechanism, Protocol

_T = TypeVar("_T", bound=str)

_TIE_ORDER = ("masking", "ckks", "none", "central_gaussian", "distributed_discrete_gaussian", "distributed_skellam")


class RoundPlan(BaseModel):
    """What every member of one round uses. `params` is what `make_secure_sum(params=...)` takes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    protocol: Protocol
    min_cohort: int  # the largest any member demands
    max_dropout_fraction: float  # the smallest any member tolerates
    masking: MaskingParams
    ckks: CkksParams
    dp_mechanism: Optional[Mechanism]  # None if no member's path asks for DP

    @property
    def params(self) -> MaskingParams | CkksParams | None:
        by_protocol: dict[str, MaskingParams | CkksParams] = {"masking": self.masking, "ckks": self.ckks}
        return by_protocol.get(self.protocol)


def _rank(options: set[_T], prefs: Sequence[tuple[_T, ...]]) -> list[_T]:
    """Order `options` by total preference rank over members (Borda count); ties in a fixed order."""
    def score(option: _T) -> tuple[int, int]:
        return sum(p.index(option) for p in prefs), _TIE_ORDER.index(option)

    return sorted(options, key=score)


def _conflict(
    members: Mapping[str, EffectivePolicy], field: str, get: Callable[[EffectivePolicy], Iterable[str]]
) -> PolicyError:
    names = list(members)
    sets = {m: set(get(members[m])) for m in names}
    pair = next(
        ((a, b) for i, a in enumerate(names) for b in names[i + 1:] if not sets[a] & sets[b]),
        (names[0], names[-1]),
    )
    a, b = pair
    src = lambda m: members[m].sources.get(field, ", ".join(members[m].files))  # noqa: E731
    return PolicyError(
        f"{src(a)} and {src(b)}: members {a!r} and {b!r} of one aggregation round accept no common {field} "
        f"({a}: [{', '.join(get(members[a]))}], {b}: [{', '.join(get(members[b]))}]); give them a common one"
    )


def plan_round(members: Mapping[str, EffectivePolicy]) -> RoundPlan:
    """The plan every member of one round follows, given each member's effective policy (member -> policy)."""
    if not members:
        raise PolicyError("plan_round: a round needs at least one member")
    effs = list(members.values())
    common = set.intersection(*(set(e.secure_aggregation.acceptable) for e in effs))
    if not common:
        raise _conflict(members, "secure_aggregation.protocol", lambda e: e.secure_aggregation.acceptable)
    with_dp = [e for e in effs if e.differential_privacy.level != "none"]
    mechanisms: list[Mechanism] = []
    if with_dp:
        shared = set.intersection(*(set(e.differential_privacy.acceptable_mechanisms) for e in with_dp))
        if not shared:
            dp_members = {m: e for m, e in members.items() if e.differential_privacy.level != "none"}
            raise _conflict(dp_members, "differential_privacy.mechanism",
                            lambda e: e.differential_privacy.acceptable_mechanisms)
        mechanisms = _rank(shared, [e.differential_privacy.acceptable_mechanisms for e in with_dp])
        common = {p for p in common if usable_mechanisms(mechanisms, p)}
        if not common:
            raise _conflict(members, "secure_aggregation.protocol", lambda e: e.secure_aggregation.acceptable)
    protocol = _rank(common, [e.secure_aggregation.acceptable for e in effs])[0]
    mechanism = usable_mechanisms(mechanisms, protocol)[0] if mechanisms else None

    sas = [e.secure_aggregation for e in effs]
    neighbours = [s.masking.neighbours for s in sas if not isinstance(s.masking.neighbours, str)]
    masking = MaskingParams.model_construct(
        neighbours=max(neighbours) if neighbours else "auto",
        threshold=max(s.masking.threshold for s in sas),
        bits=max(s.masking.bits for s in sas),
        clip_range=max(s.masking.clip_range for s in sas),  # never clip what some member may send
    )
    if protocol == "ckks":
        holders = {s.ckks.key_holders for s in sas}
        if len(holders) > 1:
            raise _conflict(members, "secure_aggregation.ckks.key_holders", lambda e: e.secure_aggregation.ckks.key_holders)
    # the largest ring, then the largest scale (more members per sum), then the widest data primes: the same
    # choice whatever order the members come in
    widest = max(sas, key=lambda s: (s.ckks.poly_modulus_degree, s.ckks.scale_bits, sum(s.ckks.coeff_mod_bit_sizes)))
    ckks = CkksParams.model_construct(
        poly_modulus_degree=widest.ckks.poly_modulus_degree,
        coeff_mod_bit_sizes=widest.ckks.coeff_mod_bit_sizes,
        scale_bits=widest.ckks.scale_bits,
        key_holders=sas[0].ckks.key_holders,
        rotate_every_rounds=min(s.ckks.rotate_every_rounds for s in sas),
        clip_range=max(s.ckks.clip_range for s in sas),
        value_bits=max(s.ckks.value_bits for s in sas),
    )
    return RoundPlan(
        protocol=protocol,
        min_cohort=max(s.min_cohort for s in sas),
        max_dropout_fraction=min(s.max_dropout_fraction for s in sas),
        masking=masking,
        ckks=ckks,
        dp_mechanism=mechanism,
    )
