"""The release path: the one way anything leaves a node in the engine.

authorize (policy) -> protect + sum (secure aggregation) -> account the costs.
Every aggregation the engine does goes through `ReleasePath.aggregate`; nothing sums member
vectors on its own.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from worldlm_secure.errors import ConfigError
from worldlm_secure.federation.world import World
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.secagg import MemberInput, SecureSum, SumResult, make_secure_sum


@dataclass
class ReleaseStats:
    """Running totals over a run: bytes every member sent up, and seconds spent protecting."""

    bytes_up: float = 0.0
    bytes_down: float = 0.0
    protect_seconds: float = 0.0
    releases: int = 0
    clipped_fraction_max: float = 0.0
    by_protocol: dict[str, int] = field(default_factory=dict)


class ReleasePath:
    """Authorizes and securely sums the releases of one simulated world.

    ``layer_override`` (simulate's baselines only): a baseline shares a different set of tensors than
    the policies' ``layers:`` say, so its authorization is evaluated with that plan substituted and
    recorded as such in results.json. ``node start`` never overrides.
    """

    def __init__(
        self,
        world: World,
        identities: Mapping[str, NodeIdentity],
        *,
        layer_override: Any | None = None,
    ) -> None:
        self.world = world
        self.identities = dict(identities)
        self.layer_override = layer_override
        self.stats = ReleaseStats()
        self._chains: dict[tuple[str, str], list[Any]] = {}
        self._effective: dict[tuple[str, str], Any] = {}
        # One protocol instance per aggregating node: CKKS keys live for an epoch of rounds, not one call.
        self._protocols: dict[tuple[str, str], SecureSum] = {}

    def chain(self, member: str, final_destination: str) -> list[Any]:
        """Policies from ``member`` up to ``final_destination`` (inclusive), with any layer override."""
        key = (member, final_destination)
        if key not in self._chains:
            nodes = self.world.chain(member)
            names = [n.name for n in nodes]
            if final_destination not in names:
                raise ConfigError(f"{self.world.path}: {final_destination!r} is not an ancestor of {member!r}")
            policies = self.world.policy_chain(member)[: names.index(final_destination) + 1]
            if self.layer_override is not None:
                policies = [p.model_copy(update={"layers": self.layer_override}) for p in policies]
            self._chains[key] = policies
        return self._chains[key]

    def effective(self, member: str, final_destination: str) -> Any:
        """The composed policy for ``member``'s releases travelling up to ``final_destination``."""
        from worldlm_secure.policy import compose

        key = (member, final_destination)
        if key not in self._effective:
            self._effective[key] = compose(self.chain(member, final_destination))
        return self._effective[key]

    def _protocol(self, destination: str, protocol: str, plan: Any, members: Sequence[str]) -> SecureSum:
        key = (destination, protocol)
        if key not in self._protocols:
            params = plan.params
            extra = {"clip_range": params.clip_range} if hasattr(params, "clip_range") else {}
            self._protocols[key] = make_secure_sum(
                protocol, params=params, identities={m: self.identities[m] for m in members}, **extra
            )
        return self._protocols[key]

    def aggregate(
        self,
        round_id: int,
        group: str,
        destination: str,
        contributions: Mapping[str, np.ndarray],
        tensor_names: Sequence[str],
        *,
        final_destination: str | None = None,
    ) -> SumResult:
        """Authorize every member's release to ``destination`` and return the protected sum.

        ``final_destination`` is how far up the tree the released values travel (the root for shared
        layers); every policy on that path must authorize the release.
        """
        from worldlm_secure.policy import Release, authorize, plan_round

        final = final_destination or destination
        members = sorted(contributions)
        effective = [self.effective(m, final) for m in members]
        plan = plan_round(dict(zip(members, effective)))
        protocol = plan.protocol
        for member, eff in zip(members, effective):
            dp = eff.differential_privacy
            authorize(
                Release(
                    source=member,
                    destination=destination,
                    round=round_id,
                    group=group,
                    tensor_names=tuple(tensor_names),
                    protocol=protocol,
                    dp_level=dp.level,
                    dp_mechanism=dp.mechanism if dp.level != "none" else None,
                    cohort_size=len(members),
                ),
                self.chain(member, final),
            )
        start = time.perf_counter()
        secure = self._protocol(destination, protocol, plan, members)
        result = secure.run_round(
            round_id,
            [MemberInput(m, contributions[m]) for m in members],
            min_cohort=plan.min_cohort,
        )
        self.stats.protect_seconds += time.perf_counter() - start
        self.stats.bytes_up += result.stats.bytes_up_per_member * len(result.contributors)
        self.stats.bytes_down += result.stats.bytes_down_per_member * len(result.contributors)
        self.stats.releases += len(result.contributors)
        self.stats.clipped_fraction_max = max(self.stats.clipped_fraction_max, result.stats.clipped_fraction)
        self.stats.by_protocol[protocol] = self.stats.by_protocol.get(protocol, 0) + 1
        return result
