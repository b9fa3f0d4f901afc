"""The release path: the one way anything leaves a node in the engine.

For every member of an aggregation round, left to right:
  authorize (policy) -> clip (user-level DP) -> encode -> protect + sum (secure aggregation)
  -> noise (central Gaussian) -> charge the budget -> ledger entry -> release.
Every aggregation the engine does goes through `ReleasePath`; nothing sums member vectors on its own.
A release the budget cannot afford is refused before any member sends (`BudgetExceeded`).
Members that run elsewhere (Ray site actors) clip, encode and protect their own vectors: `average_remote`
keeps every other step here and takes the protocol's sum from them (`RemoteSum`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np
import torch

from worldlm_secure.aggregation.member import encode_update
from worldlm_secure.aggregation.weighted import DeltaCodec
from worldlm_secure.errors import BudgetExceeded, ConfigError, PolicyError
from worldlm_secure.federation.world import World
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.ledger.entry import DP_SGD, POST_PROCESSING
from worldlm_secure.ledger.receipts import exchange
from worldlm_secure.secagg import IntegerNoise, MemberInput, SecureSum, SumResult, make_secure_sum

if TYPE_CHECKING:
    from worldlm_secure.policy.authorize import ReleaseGroup
    from worldlm_secure.secagg.protocol import IntegerNoiseSum


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
    refusals: int = 0  # releases refused for budget (each left a signed `refused` entry per member)
    by_protocol: dict[str, int] = field(default_factory=dict)
    epsilon: dict[str, float] = field(default_factory=dict)  # stream -> cumulative ε
    # float32 bytes of what members released (values x 4), the denominator of mask/ciphertext expansion
    plain_bytes_up: float = 0.0


@dataclass(frozen=True)
class ReleaseDP:
    """User-level DP for one round: the shared settings and each member's budget tracker."""

    dp: Any  # privacy.UserLevelDP (with adaptive clipping: its clipping_norm is the round's clip C_t)
    trackers: dict[str, Any]  # member -> privacy.BudgetTracker
    plan: Any  # privacy.NoisePlan
    clip_round: Any = None  # privacy.adaptive_clip.ClipRound when adaptive clipping is on (protocols/dp.md §2.7)

    @property
    def member_clip(self) -> Any:
        """What each member clips with: the norm, or the adaptive round's `MemberClip` (norm + count words)."""
        return self.clip_round.member if self.clip_round is not None else self.dp.clipping_norm


def with_adaptive_clip(adaptive: Any, stream: Any, dp: Any, plan: Any, cohort: int, words: int,
                       min_clip: float = 0.0) -> tuple[Any, Any, Any]:
    """``(dp, plan, clip_round)`` of one adaptive-clip round (protocols/dp.md §2.7): the clip C_t (never above
    the policy's clipping_norm, never below ``min_clip``, the public quantizer floor of §2.8), the plan at the
    joint sensitivity C_t·z_Δ/z, so that the noise std is z_Δ·C_t on the update and σ_b on the count and the
    accountant's z is the round's whole cost. Unchanged when off."""
    if adaptive is None:
        return dp, plan, None
    rnd = adaptive.round_for(stream, max_clip=dp.clipping_norm, noise_multiplier=dp.noise_multiplier,
                             cohort=cohort, words=words, min_clip=min_clip)
    return replace(dp, clipping_norm=rnd.clip), replace(plan, sensitivity=rnd.sensitivity), rnd


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
        # SHA-256 of the base weights the releasing nodes loaded (model.base_hash): sealed into every entry
        self.base_hash: str | None = None
        self._trackers: dict[str, Any] = {}
        # Record-level DP: site -> privacy.record_stream.RecordStream of the sites that train with DP-SGD
        # (filled by the engine); a release charges the steps its site took since its last release.
        self.record_streams: dict[str, Any] = {}
        # Adaptive clipping (aggregation.adaptive_clip; protocols/dp.md §2.7): the clip of every
        # (destination, group) stream, updated from each release's noised count. None: off.
        self.adaptive = _adaptive_clip(world)

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

    def member_dp(self, member: str, level: str = "user") -> Any:
        """The DP section ``member``'s one privacy loss (at ``level``) is checked against, from its first release.

        A member's releases of every group to every destination are releases of the same data, so they compose
        into one loss. Each is checked against the strictest budget and δ of *every* effective policy the
        member's releases can fall under (its chain up to each ancestor), not only the one of the release at
        hand: a key release to the federation spends what the root's stricter budget also counts. Composition
        is monotone along a chain, so this is the DP section of the longest chain at that level, with the
        smallest budget and δ of any prefix at that level (None: no policy on the member's paths asks for it).
        """
        key = (member, f"dp:{level}")
        if key not in self._effective:
            ancestors = [n.name for n in self.world.chain(member)][1:]
            sections = [self.effective(member, a).differential_privacy for a in ancestors]
            if level == "user":
                sections = [d for d in sections if d.level == "user"]
            else:
                sections = [d for d in sections if d.record_level]
            best = None
            if sections:
                if level == "user":
                    best = min(sections, key=lambda d: (d.epsilon_budget, d.delta))
                    best = best.model_copy(update={
                        "delta": min(d.delta for d in sections),
                        "clipping_norm": min(d.clipping_norm for d in sections),
                    })
                else:
                    best = sections[-1]  # the full chain: record_dp_params takes the smallest record budget
            self._effective[key] = best
        return self._effective[key]

    def accounting_policy(self, member: str, final_destination: str, level: str = "user") -> Any:
        """The policy a charged release of ``member`` is checked against and recorded with in the ledger: the
        release's effective policy (authorization: layers, protocol, egress) with the DP section its one loss
        is held to (`member_dp`), so the stored document's budget and δ are the ones of the check."""
        return self.held_to(member, self.effective(member, final_destination), level)

    def held_to(self, member: str, eff: Any, level: str = "user") -> Any:
        """``eff`` with the DP section ``member``'s one loss at ``level`` is held to (see `accounting_policy`)."""
        dp = self.member_dp(member, level)
        if dp is None or dp == eff.differential_privacy:
            return eff
        return eff.model_copy(update={"differential_privacy": dp})

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
        plan = self.plan(sorted(updates), final)
        dp = None if derived else self._dp_for(sorted(updates), final, codec.length, plan, (destination, group), len(names))
        clip = dp.member_clip if dp is not None else None  # member side: clip the group's update
        vectors = {member: encode_update(codec, upd.deltas, upd.weights, clip) for member, upd in updates.items()}
        result = self._release(round_id, group, destination, sorted(vectors), _in_process(round_id, plan, vectors),
                               names, final, plan, dp, derived)
        self._adapt_clip((destination, group), dp, result)
        return decode(codec, result.total, len(vectors) if dp is not None else None)

    def average_remote(
        self,
        round_id: int,
        group: str,
        destination: str,
        members: Sequence[str],
        names: Sequence[str],
        shapes: Mapping[str, torch.Size],
        remote: "RemoteSum",
        *,
        final_destination: str | None = None,
    ) -> dict[str, torch.Tensor]:
        """`average_deltas` for members that clip, encode and protect their own updates elsewhere (Ray actors).

        Authorization, the round plan, the budget check, central noise, charges and ledger entries stay
        here; ``remote`` runs the members' side (with the clipping norm of this round's DP, if any) and
        returns the protocol's sum. Never derived: members are sites releasing their own training.
        """
        codec = DeltaCodec(tuple(names), tuple(tuple(shapes[n]) for n in names))
        final = final_destination or destination
        cohort = sorted(members)
        plan = self.plan(cohort, final)
        dp = self._dp_for(cohort, final, codec.length, plan, (destination, group), len(names))
        clip = dp.member_clip if dp is not None else None  # a float, or the adaptive round's MemberClip

        def run(secure: SecureSum, noise: IntegerNoise | None) -> SumResult:
            out = remote(round_id, secure, plan, noise, clip, codec.length)
            if isinstance(out, SumResult):
                return out
            # the members sent their encoded vectors as such: protocol none, or CKKS (encrypted here)
            return _in_process(round_id, plan, out)(secure, noise)

        result = self._release(round_id, group, destination, cohort, run, names, final, plan, dp, False)
        self._adapt_clip((destination, group), dp, result)
        return decode(codec, result.total, len(cohort) if dp is not None else None)

    def _adapt_clip(self, stream: Any, dp: ReleaseDP | None, result: SumResult) -> None:
        """Adaptive clipping: the next clip of ``stream`` from this release's noised count (post-processing)."""
        if dp is not None and dp.clip_round is not None and self.adaptive is not None:
            self.adaptive.update(stream, dp.clip_round, result.total, len(result.contributors))

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
        plan = self.plan(sorted(vectors), destination)
        run = _in_process(round_id, plan, vectors)
        return self._release(round_id, group, destination, sorted(vectors), run, names, destination, plan, None, derived).total

    # --- the pipeline ------------------------------------------------------------------------------
    def _release(
        self,
        round_id: int,
        group: str,
        destination: str,
        members: Sequence[str],
        run: "_SumStep",
        names: Sequence[str],
        final: str,
        plan: Any,
        dp: ReleaseDP | None,
        derived: bool,
    ) -> SumResult:
        """``run(secure, noise)``: the members' protect step and the protocol's sum (in process, or remote)."""
        from worldlm_secure.policy import Release, authorize

        members = sorted(members)
        effective = [self.effective(m, final) for m in members]
        # What is actually applied, per member: noise on the sum protects every member of a noised round;
        # a derived release is DP by post-processing exactly when its member's own inputs were noised.
        levels = {m: self.applied_level(m, e, dp is not None, derived) for m, e in zip(members, effective)}
        mechanism = dp.dp.mechanism.name if dp is not None else (plan.dp_mechanism if derived else None)
        for member in members:
            authorize(
                Release(
                    source=member,
                    destination=destination,
                    round=round_id,
                    group=cast("ReleaseGroup", group),  # the pipeline's groups are the phases: key, shared, residual
                    tensor_names=tuple(names),
                    protocol=plan.protocol,
                    dp_level=levels[member],
                    dp_mechanism={"user": mechanism, "record": DP_SGD}.get(levels[member]),
                    cohort_size=len(members),
                    record_dp=self.trained_with_dp_sgd(member, effective[members.index(member)], derived),
                ),
                self.chain(member, final),
            )
        secure = self._protocol(destination, plan.protocol, plan, members)
        noise = None
        if dp is not None and dp.dp.mechanism.distributed:  # members noise their own quantized vectors
            dp, noise = _with_member_noise(dp, secure, len(members))
        if dp is not None:  # refuse before anyone sends if even the worst case would exceed a budget
            _check_quantizer_range(plan, dp)
            try:
                for member in members:
                    dp.dp.check_before_round(dp.trackers[member], dp.plan, plan.min_cohort)
            except BudgetExceeded as exc:
                self.record_refusal(round_id, group, members, destination, names, plan, final, str(exc))
                raise
        start = time.perf_counter()
        result = run(secure, noise)
        total = result.total
        charges: dict[str, Any] = {}
        if dp is not None:
            if noise is None:  # central Gaussian at the aggregator, after unmasking / decryption, of std
                dp = _checked_slack(dp, result)  # z·S_q: S_q = S + √d·e, the decoded sum's sensitivity (§2.8)
                total = dp.dp.mechanism.add_noise(total, dp.plan)
            # z_eff of what was released: distributed shares of dropped members are missing from the sum.
            # Every contributor's charge is checked before any is recorded: a refusal charges nobody.
            z_eff = dp.dp.effective_noise_multiplier(dp.plan, len(result.contributors))
            for m in result.contributors:
                c = dp.trackers[m].preview(z_eff, dp.dp.sample_rate)
                if c.epsilon_cumulative > dp.trackers[m].budget:
                    msg = (f"release refused after the sum on stream {c.stream!r}: cumulative ε would be "
                           f"{c.epsilon_cumulative:.4g} > budget ε={c.epsilon_budget:.4g} at δ={c.delta:g} with "
                           f"{len(result.contributors)} contributors; the sum is discarded")
                    self.record_refusal(round_id, group, members, destination, names, plan, final, msg)
                    raise BudgetExceeded(msg)
            charges = {m: dp.dp.charge(dp.trackers[m], dp.plan, len(result.contributors)) for m in result.contributors}
        # Record level: DP-SGD steps are charged on the site's first release after them, 0 steps after that.
        record_charges = {
            m: self.record_streams[m].charge_release() for m in result.contributors if not derived and m in self.record_streams
        }
        self.stats.protect_seconds += time.perf_counter() - start
        for member in result.contributors:
            rc = record_charges.get(member)
            if rc is None or levels[member] != "record":  # a record-only release has just its DP-SGD entry
                self.record_release(round_id, group, member, destination, names, plan, result,
                             effective[members.index(member)], levels[member], dp, charges.get(member))
            if rc is not None:
                self.record_dp_sgd(round_id, group, member, destination, names, plan, result,
                                    effective[members.index(member)], rc, second=levels[member] != "record")
            if self.ledger_dir is not None:
                # The receiver countersigns the member's ledger head and both keep the receipt, so a
                # rolled-back or truncated ledger is caught by `ledger audit` (protocols/ledger.md).
                exchange(self.ledger(destination), self.ledger(member), release_id=f"{round_id}:{group}:{destination}",
                         round=round_id)
        self._count(plan.protocol, result)
        return SumResult(total, result.contributors, result.dropped, result.stats)

    def record_refusal(self, round_id: int, group: str, members: Sequence[str], destination: str,
                       names: Sequence[str], plan: Any, final: str, reason: str) -> None:
        """A signed refusal entry (mechanism ``refused``, nothing released, no ε) in every member's ledger:
        the budget could not afford the release, so none of the members' inputs left (protocols/dp.md §5)."""
        self.stats.refusals += 1
        if self.ledger_dir is None:
            return
        from worldlm_secure.ledger import release_entry
        from worldlm_secure.ledger.entry import REFUSED

        for member in sorted(members):
            eff = self.accounting_policy(member, final)
            entry = release_entry(
                release_id=f"{round_id}:{group}:{destination}:refused", round=round_id,
                level=self.world.nodes[member].kind, source=member, destination=destination, group=group,
                tensor_names=names, protocol=getattr(plan, "protocol", "none"), cohort_size=len(members),
                dropouts=len(members), dp_level="none", mechanism=REFUSED, clipping_norm=0.0,
                policy_sha256=eff.sha256, charge=None, stream=f"{member}/user",
                delta=float(eff.differential_privacy.delta or 0.0), extra={"refused": reason[:1000]},
            )
            self.ledger(member).append(entry, policy_document=eff.canonical_json())

    def plan(self, members: Sequence[str], final: str) -> Any:
        """The round plan every member follows: protocol, its parameters, the DP mechanism (policy.plan_round)."""
        from worldlm_secure.policy import plan_round

        return plan_round({m: self.effective(m, final) for m in members})

    def _dp_for(self, members: list[str], final: str, dim: int, plan: Any, stream: Any = None,
                words: int = 1) -> ReleaseDP | None:
        """User-level DP settings for a round whose members' policies ask for it (None otherwise).
        ``stream`` (destination, group) and ``words`` (tensors): the adaptive clip's stream and count words."""
        dp = round_user_dp(self, members, final, plan)
        if dp is None:
            return None
        trackers = {m: self.member_tracker(m, dp) for m in members}
        noise_plan = dp.plan(expected_members=len(members), dim=dim, w_max=None)
        from worldlm_secure.privacy.quantization import clip_floor

        # the adaptive clip's public floor: 10·√d·e (central noise on a quantizing protocol; else e = 0: no floor)
        floor = clip_floor(dim, dp.rounding_error) if dp.rounding_error > 0 else 0.0
        dp, noise_plan, rnd = with_adaptive_clip(self.adaptive if stream is not None else None, stream, dp,
                                                 noise_plan, len(members), words, floor)
        return ReleaseDP(dp, trackers, noise_plan, rnd)

    def member_tracker(self, member: str, fallback: Any = None) -> Any:
        """``member``'s one user-level budget stream ``MEMBER/user``, rebuilt from its ledger: every group and
        destination charges it, against the budget and δ of `member_dp` (the strictest on its paths).
        ``fallback`` (a `UserLevelDP`): the round's settings, for a member none of whose own paths asks for
        user-level DP but whose round is noised for others (it is charged what the noise gives it)."""
        from worldlm_secure.privacy import BudgetTracker

        if member not in self._trackers:
            dp = self.member_dp(member)
            if dp is not None:
                budget, delta, accountant = float(dp.epsilon_budget), float(dp.delta), str(dp.accountant)
            elif fallback is not None:
                budget, delta, accountant = fallback.budget, fallback.delta, fallback.accountant
            else:
                raise PolicyError(f"{member!r}: no policy on its paths asks for user-level DP; nothing to charge")
            entries = self.ledger(member).entries() if self.ledger_dir is not None else ()
            self._trackers[member] = BudgetTracker.from_entries(
                entries, stream=f"{member}/user", budget=budget, delta=delta, accountant=accountant
            )
        return self._trackers[member]

    def ledger_entries(self, node: str) -> list[Any]:
        """``node``'s ledger entries so far (empty without a ledger), e.g. to rebuild a budget stream."""
        return self.ledger(node).entries() if self.ledger_dir is not None else []

    def applied_level(self, member: str, eff: Any, noised: bool, derived: bool) -> str:
        """The DP level a release of ``member`` actually has: user when noise is added to the sum; record
        when the member trained with DP-SGD; a derived release inherits its (DP-protected) inputs' level."""
        if noised:
            return "user"
        if derived:
            return str(eff.differential_privacy.level)
        return "record" if member in self.record_streams else "none"

    def trained_with_dp_sgd(self, member: str, eff: Any, derived: bool) -> bool:
        # A derived release's inputs come from the sites below it, whose paths include its policy: if that
        # is record-level, every one of them trained with DP-SGD (the engine refuses otherwise).
        return bool(eff.differential_privacy.record_level) if derived else member in self.record_streams

    def ledger(self, node: str) -> Any:
        """``node``'s signed ledger (opened on first use; needs a ``ledger_dir``)."""
        from worldlm_secure.ledger import Ledger

        if node not in self._ledgers:
            assert self.ledger_dir is not None
            self._ledgers[node] = Ledger(self.ledger_dir / f"{node}.sqlite", self.identities[node], base_hash=self.base_hash)
        return self._ledgers[node]

    def close(self) -> None:
        """Close every open ledger. SQLite then folds its write-ahead log into ``NODE.sqlite``, so that file
        alone is the whole ledger (an auditor copying only ``*.sqlite`` gets every entry); a later
        `ledger` call opens it again."""
        for ledger in self._ledgers.values():
            ledger.close()
        self._ledgers.clear()

    def record_release(
        self, round_id: int, group: str, member: str, destination: str, names: Sequence[str], plan: Any,
        result: SumResult, eff: Any, dp_level: str, dp: ReleaseDP | None, charge: Any,
    ) -> None:
        """Write ``member``'s ledger entry of one release (``charge``: its user-level charge, or None).
        A charged entry stores the policy its charge was checked against (`held_to`: budget and δ of its one loss)."""
        if charge is not None:
            self.stats.epsilon[charge.stream] = charge.epsilon_cumulative
            eff = self.held_to(member, eff)
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
            mechanism=(dp.dp.mechanism.name if dp is not None else (POST_PROCESSING if dp_level != "none" else "none")),
            clipping_norm=dp.dp.clipping_norm if dp is not None else 0.0,
            policy_sha256=eff.sha256,
            charge=charge,
            stream=f"{member}/{POST_PROCESSING if (dp is None and dp_level != 'none') else dp_level}",
            delta=float(eff.differential_privacy.delta or 0.0),
            key_id=str(result.stats.extra.get("key_id", "")),
            extra=release_dp_extra(dp, charge),
        )
        self.ledger(member).append(entry, policy_document=eff.canonical_json())

    def record_dp_sgd(
        self, round_id: int, group: str, member: str, destination: str, names: Sequence[str], plan: Any,
        result: SumResult, eff: Any, charge: Any, *, second: bool,
    ) -> None:
        """The `SITE/record` entry of a DP-SGD-trained site's release: mechanism dp_sgd, the steps charged
        (0 for a further release of the same model), q and C = max_grad_norm. With user-level noise too
        (``second``), it is the release's second entry, id ``R:GROUP:DEST:record`` (one entry per stream)."""
        self.stats.epsilon[charge.stream] = charge.epsilon_cumulative
        if self.ledger_dir is None:
            return
        from worldlm_secure.ledger import release_entry

        eff = self.held_to(member, eff, "record")
        params = self.record_streams[member].params
        entry = release_entry(
            release_id=f"{round_id}:{group}:{destination}" + (":record" if second else ""),
            round=round_id,
            level=self.world.nodes[member].kind,
            source=member,
            destination=destination,
            group=group,
            tensor_names=names,
            protocol=plan.protocol,
            cohort_size=len(result.contributors),
            dropouts=len(result.dropped),
            dp_level="record",
            mechanism=DP_SGD,
            clipping_norm=params.max_grad_norm,
            policy_sha256=eff.sha256,
            charge=charge,
            delta=charge.delta,
            key_id=str(result.stats.extra.get("key_id", "")),
            extra={"expected_batch": params.expected_batch},
        )
        self.ledger(member).append(entry, policy_document=eff.canonical_json())

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
        self.stats.plain_bytes_up += 4.0 * float(np.asarray(result.total).size) * len(result.contributors)
        self.stats.clipped_fraction_max = max(self.stats.clipped_fraction_max, result.stats.clipped_fraction)
        self.stats.by_protocol[protocol] = self.stats.by_protocol.get(protocol, 0) + 1


class RemoteSum(Protocol):
    """The members' side of one release run elsewhere: ``(round_id, secure, plan, noise, clip, dim)`` -> the
    protocol's sum (`SumResult`, e.g. a masked round routed to the members), or the members' encoded
    vectors by name when the plan sends them as such (protocol none; CKKS, which encrypts in this process).

    ``clip``: the DP clipping norm each member applies to its whole update (None: no user-level DP), or
    with adaptive clipping a `privacy.adaptive_clip.MemberClip` (the round's clip and count words), which the
    members hand to `aggregation.member.encode_update` as they would the norm;
    ``dim``: the encoded vector's length; ``noise``: the distributed DP shares members add (or None).
    """

    def __call__(self, round_id: int, secure: SecureSum, plan: Any, noise: IntegerNoise | None,
                 clip: float | None, dim: int, /) -> SumResult | Mapping[str, np.ndarray]: ...


_SumStep = Callable[[SecureSum, "IntegerNoise | None"], SumResult]


def _in_process(round_id: int, plan: Any, vectors: Mapping[str, np.ndarray]) -> _SumStep:
    """The protect + sum step when the members' vectors are in this process (the in-process engine)."""

    def run(secure: SecureSum, noise: IntegerNoise | None) -> SumResult:
        inputs = [MemberInput(m, vectors[m]) for m in sorted(vectors)]
        if noise is not None:
            # noise is only drawn for a protocol that carries_integer_noise (_with_member_noise)
            return cast("IntegerNoiseSum", secure).run_round(round_id, inputs, min_cohort=plan.min_cohort, noise=noise)
        return secure.run_round(round_id, inputs, min_cohort=plan.min_cohort)

    return run


def _wants_dp(effective: Sequence[Any]) -> bool:
    return any(e.differential_privacy.level != "none" for e in effective)


def decode(codec: DeltaCodec, total: np.ndarray, public_count: int | None) -> dict[str, torch.Tensor]:
    """The average delta per tensor from a released sum. Under user-level DP (``public_count``: the round's
    invited cohort, public before it starts) the noised sum of weighted, clipped deltas is divided by that
    count, never by the (noisy, data-dependent) weight sum: the fixed-denominator DP-FedAvg estimator."""
    if public_count is None:
        return codec.decode_average(total)
    return codec.decode_mean(total, public_count)


def adaptive_clip_extra(rnd: Any, noise_multiplier: float | None = None) -> dict[str, float]:
    """The ledger entry's record of an adaptive-clip round (`clipping_norm` is the clip used, C_t): how the
    entry's noise_multiplier splits between the update (z_Δ) and the count (σ_b), the cap and the floor.

    ``noise_multiplier``: the entry's (z_eff of what was released; None: the planned z). Distributed noise with
    dropouts releases z_eff ≠ z, and the whole vector's noise scales by z_eff/z, so both parts do: the split
    is recorded at z_eff, and combined_noise_multiplier(vector_z, count_stddev) == the entry's noise_multiplier."""
    from worldlm_secure.privacy.adaptive_clip import combined_noise_multiplier

    z = float(rnd.noise_multiplier)
    ratio = 1.0 if noise_multiplier is None else float(noise_multiplier) / z
    out = {"adaptive_clip_max": float(rnd.max_clip), "adaptive_clip_vector_z": float(rnd.vector_noise_multiplier) * ratio,
           "adaptive_clip_count_stddev": float(rnd.count_stddev) * ratio}
    if float(getattr(rnd, "min_clip", 0.0)) > 0.0:
        out["adaptive_clip_min"] = float(rnd.min_clip)
    combined = combined_noise_multiplier(out["adaptive_clip_vector_z"], out["adaptive_clip_count_stddev"])
    if not abs(combined - z * ratio) <= 1e-9 * z * ratio:
        raise AssertionError(f"adaptive clip split recombines to z={combined!r}, not the entry's {z * ratio!r}")
    return out


def release_dp_extra(dp: ReleaseDP | None, charge: Any) -> dict[str, float] | None:
    """A user-level entry's `extra`: the adaptive clip's split (at the entry's z_eff), and under central noise on
    a quantizing protocol what the noise was sized for (protocols/dp.md §2.8): ``quantization_slack`` √d·e and
    ``noise_sensitivity`` S_q = S + √d·e (the noise std on the sum is noise_multiplier × noise_sensitivity).
    None when there is nothing to add (no DP, protocol none without adaptive clipping: as before)."""
    if dp is None:
        return None
    out: dict[str, float] = {}
    if dp.clip_round is not None:
        out.update(adaptive_clip_extra(dp.clip_round, charge.noise_multiplier if charge is not None else None))
    if not dp.dp.mechanism.distributed and dp.plan.rounding_error > 0.0:
        out["quantization_slack"] = float(dp.plan.quantization_slack)
        out["noise_sensitivity"] = float(dp.plan.quantized_sensitivity)
    return out or None


def _checked_slack(dp: ReleaseDP, result: SumResult) -> ReleaseDP:
    """After the sum, before the noise: never size the noise below what the protocol itself reports. Its
    ``quantization_error_bound`` (per coordinate, for all contributors) over the contributors is the per-value
    error e of one member, and the released vector has ``total.size`` values (public). Normally a no-op: the
    plan's e (`round_user_dp`) is at least the reported one."""
    bound = result.stats.extra.get("quantization_error_bound") if result.stats.extra else None
    dim = max(int(dp.plan.dim), int(np.asarray(result.total).size))
    error = max(dp.plan.rounding_error, float(bound) / len(result.contributors) if bound and result.contributors else 0.0)
    if error <= 0.0 or (error == dp.plan.rounding_error and dim == dp.plan.dim):
        return dp
    return replace(dp, plan=replace(dp.plan, rounding_error=error, dim=dim))


def _adaptive_clip(world: World) -> Any:
    from worldlm_secure.federation.settings import adaptive_clip_of
    from worldlm_secure.privacy.adaptive_clip import AdaptiveClip

    cfg = adaptive_clip_of(world)
    return AdaptiveClip(cfg) if cfg is not None else None


def _check_quantizer_range(plan: Any, dp: ReleaseDP) -> None:
    """Under user-level DP every value a member sends is within ±C (clipped update times a weight in [0, 1];
    the weight words are zero), so a quantizer range >= C never saturates and the clipped-value count the
    protocol reports (masking's last word, CKKS' `clipped`) is always 0: it carries nothing about the data.
    With adaptive clipping the count words are ±t/2 as well (`ClipRound.max_word`)."""
    rng = getattr(getattr(plan, "params", None), "clip_range", None)
    if dp.clip_round is not None and rng is not None and rng < dp.clip_round.max_word:
        raise PolicyError(
            f"secure_aggregation {plan.protocol}.clip_range {rng:g} is below the adaptive clip's count word "
            f"{dp.clip_round.max_word:g}: raise clip_range or aggregation.adaptive_clip.count_stddev"
        )
    if rng is not None and rng < dp.dp.clipping_norm:
        raise PolicyError(
            f"secure_aggregation {plan.protocol}.clip_range {rng:g} is below differential_privacy.clipping_norm "
            f"{dp.dp.clipping_norm:g}: clipped DP updates could saturate the quantizer and its clipped-value count "
            "would leave un-noised; raise clip_range to at least the clipping norm"
        )


def round_user_dp(path: "ReleasePath", members: Sequence[str], final: str, plan: Any) -> Any:
    """The user-level DP of one round of ``members`` releasing towards ``final`` (None: no noise on the sum).

    Noise is added once to the sum, so the round has one z: planned (``noise_multiplier: auto``) from the
    strictest member's one-loss budget (`ReleasePath.member_dp`: the smallest budget and δ on any of its
    paths, e.g. the root's for a key release that stays in the federation), over the releases the run plans.
    Record-level-only members are protected by DP-SGD inside their sites; noise on the sum is user level.
    The same function serves the engine, the Ray driver and deployed nodes (`node.release`).
    """
    from worldlm_secure.privacy import UserLevelDP

    effs = {m: path.effective(m, final) for m in members}
    users = [m for m in members if effs[m].differential_privacy.level == "user"]
    if not users:
        return None
    strict = min((path.member_dp(m) for m in users), key=lambda d: (d.epsilon_budget, d.delta))
    # Distributed noise is charged at the z of the fewest contributors the round can release with
    # (min_cohort), so plan for that worst case too, not only for the policy's max_dropout_fraction.
    worst_dropout = 1.0 - min(1.0, max(1, int(getattr(plan, "min_cohort", 1))) / max(1, len(members)))
    dp = UserLevelDP.from_policy(
        strict,
        planned_releases=path.planned_releases,
        max_dropout_fraction=min(0.99, max(worst_dropout, *(effs[m].secure_aggregation.max_dropout_fraction for m in users))),
        mechanism=plan.dp_mechanism,
    )
    if dp.mechanism.distributed:  # rounding is in the integer sensitivity Δ₂ already (protocols/dp.md §3.2)
        return dp
    # Central noise is added to the decoded sum of the members' quantized vectors: every plan of this round
    # carries the protocol's per-value rounding error e, so the noise is sized at S + √d·e (§2.8).
    from worldlm_secure.privacy.quantization import rounding_error

    e = rounding_error(str(getattr(plan, "protocol", "none")), getattr(plan, "params", None), len(members))
    return replace(dp, rounding_error=e) if e > 0 else dp


def _with_member_noise(dp: ReleaseDP, secure: SecureSum, roster: int) -> tuple[ReleaseDP, IntegerNoise]:
    """Distributed noise: the round's integer noise shares and the plan at the scale the protocol will use."""
    from worldlm_secure.privacy.distributed import integer_noise

    if not secure.carries_integer_noise:  # plan_round only pairs distributed mechanisms with masking
        raise PolicyError(f"{dp.dp.mechanism.name}: protocol {secure.name!r} cannot carry distributed noise")
    noise = integer_noise(dp.dp.mechanism, dp.plan, roster)
    scale = cast("IntegerNoiseSum", secure).quantization(roster, noise).scale  # checked carries_integer_noise above
    return replace(dp, plan=replace(dp.plan, quant_step=1.0 / scale)), noise
