"""The release path: the one way anything leaves a node in the engine.

For every member of an aggregation round, left to right:
  authorize (policy) -> clip (user-level DP) -> encode -> protect + sum (secure aggregation)
  -> noise (central Gaussian) -> charge the budget -> ledger entry -> release.
Every aggregation the engine does goes through `ReleasePath`; nothing sums member vectors on its own.
A release the budget cannot afford is refused before any member sends (`BudgetExceeded`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worldlm_secure.aggregation.weighted import DeltaCodec
from worldlm_secure.errors import ConfigError, PolicyError
from worldlm_secure.federation.world import World
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.ledger.entry import POST_PROCESSING
from worldlm_secure.secagg import MemberInput, SecureSum, SumResult, make_secure_sum



@dataclass(frozen=True)
class MemberUpdate:
    """One member's contribution to a weighted average: deltas per tensor and one weight per tensor in (0, 1]."""

    deltas: Mapping[str, torch.Tensor]
    weights: np.ndarray


@dataclass
class ReleaseStats:
    """Running totals over a run: bytes members sent up, seconds spent protecting, DP spent."""

    bytes_up: float = 0.0
    bytes_down: float = 0.0
    protect_seconds: float = 0.0
    releases: int = 0
    clipped_fraction_max: float = 0.0
    by_protocol: dict[str, int] = field(default_factory=dict)
    epsilon: dict[str, float] = field(default_factory=dict)  # stream -> cumulative ε


@dataclass(frozen=True)
class _DP:
    """User-level DP for one round: the shared settings and each member's budget tracker."""

    dp: Any  # privacy.UserLevelDP
    trackers: dict[str, Any]  # member -> privacy.BudgetTracker
    plan: Any  # privacy.NoisePlan


class ReleasePath:
    """Authorizes, protects, noises, accounts and records the releases of one simulated world.

    ``layer_override`` (simulate's baselines only): a baseline shares a different set of tensors than
    the policies' ``layers:`` say, so its authorization is evaluated with that plan substituted and
    recorded as such in results.json. ``node start`` never overrides.
    ``ledger_dir``: where each node's ledger lives (``NODE.sqlite``); None keeps no ledger.
    ``planned_releases``: DP releases each node plans over the run (for ``noise_multiplier: auto``).
    """

    def __init__(
        self,
        world: World,
        identities: Mapping[str, NodeIdentity],
        *,
        layer_override: Any | None = None,
        ledger_dir: Path | None = None,
        planned_releases: int = 1,
    ) -> None:
        self.world = world
        self.identities = dict(identities)
        self.layer_override = layer_override
        self.ledger_dir = ledger_dir
        self.planned_releases = planned_releases
        self.stats = ReleaseStats()
        self._chains: dict[tuple[str, str], list[Any]] = {}
        self._effective: dict[tuple[str, str], Any] = {}
        # One protocol instance per aggregating node: CKKS keys live for an epoch of rounds, not one call.
        self._protocols: dict[tuple[str, str], SecureSum] = {}
        self._ledgers: dict[str, Any] = {}
        self._trackers: dict[str, Any] = {}

    # --- policies ------------------------------------------------------------------------------
    def chain(self, member: str, final_destination: str) -> list[Any]:
        """Policies from ``member`` up to ``final_destination`` (inclusive), with any layer override."""
        key = (member, final_destination)
        if key not in self._chains:
            names = [n.name for n in self.world.chain(member)]
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

    # --- the two entry points --------------------------------------------------------------------
    def average_deltas(
        self,
        round_id: int,
        group: str,
        destination: str,
        updates: Mapping[str, MemberUpdate],
        names: Sequence[str],
        shapes: Mapping[str, torch.Size],
        *,
        final_destination: str | None = None,
        derived: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Per tensor, the weighted average of the members' deltas, released under every protection.

        ``derived``: the members' deltas are computed only from already DP-protected aggregates (a
        federation releasing upward), so user-level DP holds by post-processing and adds no noise.
        """
        codec = DeltaCodec(tuple(names), tuple(tuple(shapes[n]) for n in names))
        final = final_destination or destination
        dp = None if derived else self._dp_for(round_id, group, sorted(updates), final, codec.length)
        vectors = {}
        for member, upd in updates.items():
            deltas = upd.deltas
            if dp is not None:  # member side: clip the whole group's update to the policy's norm
                deltas = _clip(deltas, names, dp.dp.clipping_norm)
            vectors[member] = codec.encode(deltas, upd.weights)
        total = self._release(round_id, group, destination, vectors, names, final, dp, derived).total
        return codec.decode_average(total)

    def secure_sum(
        self,
        round_id: int,
        group: str,
        destination: str,
        vectors: Mapping[str, np.ndarray],
        names: Sequence[str],
        *,
        derived: bool,
    ) -> np.ndarray:
        """The protected sum of raw vectors. Only for derived releases (post-processing of DP outputs),
        e.g. residual embeddings of key layers; a policy requiring DP on raw data refuses otherwise."""
        if not derived:
            for m in vectors:
                if self.effective(m, destination).differential_privacy.level != "none":
                    raise PolicyError(f"{group} release of {m!r}: raw vectors cannot be released under a DP policy")
        return self._release(round_id, group, destination, dict(vectors), names, destination, None, derived).total

    # --- the pipeline ------------------------------------------------------------------------------
    def _release(
        self,
        round_id: int,
        group: str,
        destination: str,
        vectors: Mapping[str, np.ndarray],
        names: Sequence[str],
        final: str,
        dp: _DP | None,
        derived: bool,
    ) -> SumResult:
        from worldlm_secure.policy import Release, authorize, plan_round

        members = sorted(vectors)
        effective = [self.effective(m, final) for m in members]
        plan = plan_round(dict(zip(members, effective)))
        # What is actually applied, per member: noise on the sum protects every member of a noised round;
        # a derived release is DP by post-processing exactly when its member's own inputs were noised.
        levels = {
            m: "user" if (dp is not None or (derived and _wants_dp([e]))) else "none" for m, e in zip(members, effective)
        }
        mechanism = dp.dp.mechanism.name if dp is not None else (_central(effective) if derived else None)
        for member in members:
            authorize(
                Release(
                    source=member,
                    destination=destination,
                    round=round_id,
                    group=group,
                    tensor_names=tuple(names),
                    protocol=plan.protocol,
                    dp_level=levels[member],
                    dp_mechanism=mechanism if levels[member] == "user" else None,
                    cohort_size=len(members),
                ),
                self.chain(member, final),
            )
        if dp is not None:  # refuse before anyone sends if even the worst case would exceed a budget
            for member in members:
                dp.dp.check_before_round(dp.trackers[member], dp.plan, plan.min_cohort)
        start = time.perf_counter()
        secure = self._protocol(destination, plan.protocol, plan, members)
        result = secure.run_round(round_id, [MemberInput(m, vectors[m]) for m in members], min_cohort=plan.min_cohort)
        total = result.total
        charges: dict[str, Any] = {}
        if dp is not None:  # central Gaussian at the aggregator, after unmasking / decryption
            total = dp.dp.mechanism.add_noise(total, dp.plan)
            charges = {m: dp.dp.charge(dp.trackers[m], dp.plan, len(result.contributors)) for m in result.contributors}
        self.stats.protect_seconds += time.perf_counter() - start
        for member in result.contributors:
            self._record(round_id, group, member, destination, names, plan, result, effective[members.index(member)],
                         levels[member], dp, charges.get(member))
        self._count(plan.protocol, result)
        return SumResult(total, result.contributors, result.dropped, result.stats)

    def _dp_for(self, round_id: int, group: str, members: list[str], final: str, dim: int) -> _DP | None:
        """User-level DP settings for a round whose members' policies ask for it (None otherwise)."""
        from worldlm_secure.privacy import UserLevelDP

        effs = [self.effective(m, final) for m in members]
        if not _wants_dp(effs):
            return None
        if any(e.differential_privacy.level == "record" for e in effs):
            raise PolicyError(f"{effs[0].files[0]}: record-level DP (Opacus DP-SGD) is not wired into simulate yet")
        # One noise level for the round, from the strictest member (smallest budget); conservative for the rest.
        eff = min(effs, key=lambda e: e.differential_privacy.epsilon_budget or float("inf"))
        dp = UserLevelDP.from_policy(
            eff.differential_privacy,
            planned_releases=self.planned_releases,
            max_dropout_fraction=eff.secure_aggregation.max_dropout_fraction,
            mechanism=_central(effs),
        )
        trackers = {m: self._tracker(m, dp) for m in members}
        return _DP(dp, trackers, dp.plan(expected_members=len(members), dim=dim, w_max=1.0))

    def _tracker(self, member: str, dp: Any) -> Any:
        if member not in self._trackers:
            entries = self._ledger(member).entries() if self.ledger_dir is not None else ()
            self._trackers[member] = dp.tracker(f"{member}/user", entries)
        return self._trackers[member]

    def _ledger(self, node: str) -> Any:
        from worldlm_secure.ledger import Ledger

        if node not in self._ledgers:
            assert self.ledger_dir is not None
            self._ledgers[node] = Ledger(self.ledger_dir / f"{node}.sqlite", self.identities[node])
        return self._ledgers[node]

    def _record(
        self, round_id: int, group: str, member: str, destination: str, names: Sequence[str], plan: Any,
        result: SumResult, eff: Any, dp_level: str, dp: _DP | None, charge: Any,
    ) -> None:
        if charge is not None:
            self.stats.epsilon[charge.stream] = charge.epsilon_cumulative
        if self.ledger_dir is None:
            return
        from worldlm_secure.ledger import release_entry

        level = self.world.nodes[member].kind
        entry = release_entry(
            release_id=f"{round_id}:{group}:{destination}",
            round=round_id,
            level=level,
            source=member,
            destination=destination,
            group=group,
            tensor_names=names,
            protocol=plan.protocol,
            cohort_size=len(result.contributors),
            dropouts=len(result.dropped),
            dp_level=dp_level,
            mechanism=(dp.dp.mechanism.name if dp is not None else (POST_PROCESSING if dp_level == "user" else "none")),
            clipping_norm=dp.dp.clipping_norm if dp is not None else 0.0,
            policy_sha256=eff.sha256,
            charge=charge,
            stream=f"{member}/{POST_PROCESSING if (dp is None and dp_level == 'user') else dp_level}",
            delta=float(eff.differential_privacy.delta or 0.0),
            key_id=str(result.stats.extra.get("key_id", "")),
        )
        self._ledger(member).append(entry, policy_document=eff.canonical_json())

    def _protocol(self, destination: str, protocol: str, plan: Any, members: Sequence[str]) -> SecureSum:
        key = (destination, protocol)
        if key not in self._protocols:
            params = plan.params
            extra = {"clip_range": params.clip_range} if hasattr(params, "clip_range") else {}
            self._protocols[key] = make_secure_sum(
                protocol, params=params, identities={m: self.identities[m] for m in members}, **extra
            )
        return self._protocols[key]

    def _count(self, protocol: str, result: SumResult) -> None:
        self.stats.bytes_up += result.stats.bytes_up_per_member * len(result.contributors)
        self.stats.bytes_down += result.stats.bytes_down_per_member * len(result.contributors)
        self.stats.releases += len(result.contributors)
        self.stats.clipped_fraction_max = max(self.stats.clipped_fraction_max, result.stats.clipped_fraction)
        self.stats.by_protocol[protocol] = self.stats.by_protocol.get(protocol, 0) + 1


def _wants_dp(effective: Sequence[Any]) -> bool:
    return any(e.differential_privacy.level != "none" for e in effective)


def _central(effective: Sequence[Any]) -> str:
    """Central Gaussian, the one mechanism simulate applies; refused when a policy does not accept it."""
    for e in effective:
        dp = e.differential_privacy
        if dp.level != "none" and "central_gaussian" not in dp.acceptable_mechanisms:
            raise PolicyError(
                f"{e.files[0]}: differential_privacy.mechanism accepts only {list(dp.acceptable_mechanisms)}; "
                "simulate applies central_gaussian (distributed noise inside masking is not wired yet)"
            )
    return "central_gaussian"


def _clip(deltas: Mapping[str, torch.Tensor], names: Sequence[str], max_norm: float) -> dict[str, torch.Tensor]:
    """Scale the group's update so its L2 norm over all tensors is at most ``max_norm``."""
    norm = float(torch.sqrt(sum((deltas[n].double() ** 2).sum() for n in names)))
    scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
    return {n: deltas[n] * scale for n in names}
