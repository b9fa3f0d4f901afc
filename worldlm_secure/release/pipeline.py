"""The release pipeline: every step of a release, written once, run by every backend.

    plan                 `Pipeline.plan` (the round plan: protocol, its parameters, the DP mechanism)
                         `Pipeline.round_dp` (user-level DP: z, the noise plan, adaptive clip, distributed shares)
    member prepare       `Pipeline.authorize` (policy) -> `aggregation.member.encode_update` with
                         `ReleaseDP.member_clip` (clip + encode) -> `Pipeline.check_budget` (worst case, before
                         anything is sent; a refusal leaves a signed entry)
    [protect + sum]      the protocol, over whatever carries it (in process, Ray actors, a gRPC link)
    aggregator finish    `Pipeline.add_noise` (central Gaussian on the decoded sum) -> `Pipeline.charge`
                         -> `Pipeline.record_member` (ledger entries: user level, and DP-SGD's `:record`)
                         -> `Pipeline.adapt_clip` (the next adaptive clip, post-processing) -> `dp.decode`

Where the steps run is the backend's business, not a copy of them: `federation.release.ReleasePath` (simulate,
in process and Ray) runs them all in one process for every member; a deployed member (`node.release`) runs
plan, prepare, charge and its own entry before its input leaves (distributed noise charged at min_cohort's
z_eff, a re-release in a new link round its own charged entry ``...:retryLINK``), and its aggregator runs plan
and the noise. Every backend writes its entries with `record_member` / `record_release`, so the ledger records
the same fields in every backend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np

import worldlm_secure.policy as policy
from worldlm_secure.errors import BudgetExceeded, ConfigError, PolicyError
from worldlm_secure.federation.settings import adaptive_clip_of
from worldlm_secure.federation.world import World
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.ledger import Ledger, LedgerEntry, release_entry
from worldlm_secure.ledger.entry import DP_SGD, POST_PROCESSING, RECORD_SUFFIX, REFUSED, REFUSED_SUFFIX, ExtraValue
from worldlm_secure.policy import EffectivePolicy, LayerPatterns, Policy, RoundPlan, compose, plan_round
from worldlm_secure.policy.authorize import ReleaseGroup
from worldlm_secure.policy.compose import LEVEL_ORDER, EffectiveDifferentialPrivacy
from worldlm_secure.privacy import BudgetTracker, Charge, UserLevelDP
from worldlm_secure.privacy.adaptive_clip import AdaptiveClip
from worldlm_secure.privacy.central_gaussian import CentralGaussian
from worldlm_secure.privacy.quantization import clip_floor, rounding_error
from worldlm_secure.privacy.record_stream import RecordStream
from worldlm_secure.release.dp import (
    ReleaseDP,
    check_quantizer_range,
    checked_slack,
    release_dp_extra,
    with_adaptive_clip,
    with_member_noise,
)
from worldlm_secure.secagg import SumResult


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


class Pipeline:
    """The policies, budgets and ledgers of the releases of one world, and the steps every release takes.

    ``identities``: the signing keys of the nodes whose ledgers this process keeps (every node in `simulate`,
    the node itself when deployed). ``layer_override`` (simulate's baselines only): a baseline shares a
    different set of tensors than the policies' ``layers:`` say, so its authorization is evaluated with that
    plan substituted and recorded as such in results.json; ``node start`` never overrides.
    ``ledger_dir``: where each node's ledger lives (``NODE.sqlite``); None keeps no ledger.
    ``planned_releases``: DP releases each node plans over the run (for ``noise_multiplier: auto``).
    """

    def __init__(
        self,
        world: World,
        identities: Mapping[str, NodeIdentity],
        *,
        layer_override: LayerPatterns | None = None,
        ledger_dir: Path | None = None,
        planned_releases: int = 1,
    ) -> None:
        self.world = world
        self.identities = dict(identities)
        self.layer_override = layer_override
        self.ledger_dir = ledger_dir
        self.planned_releases = planned_releases
        self.stats = ReleaseStats()
        self._chains: dict[tuple[str, str], list[Policy]] = {}
        self._effective: dict[tuple[str, str], EffectivePolicy] = {}
        self._member_dp: dict[tuple[str, str], EffectiveDifferentialPrivacy | None] = {}
        self._ledgers: dict[str, Ledger] = {}
        # SHA-256 of the base weights the releasing nodes loaded (model.base_hash): sealed into every entry
        self.base_hash: str | None = None
        self._trackers: dict[str, BudgetTracker] = {}
        # Record-level DP: the `SITE/record` streams of the sites that train with DP-SGD (filled by the
        # engine or the site node); a release charges the steps its site took since its last release.
        self.record_streams: dict[str, RecordStream] = {}
        # Adaptive clipping (aggregation.adaptive_clip; protocols/dp.md §2.7): the clip of every
        # (destination, group) stream, updated from each release's noised count. None: off.
        cfg = adaptive_clip_of(world)
        self.adaptive: AdaptiveClip | None = AdaptiveClip(cfg) if cfg is not None else None

    # --- policies ------------------------------------------------------------------------------
    def chain(self, member: str, final_destination: str) -> list[Policy]:
        """Policies from ``member`` up to ``final_destination`` (inclusive), with any layer override."""
        key = (member, final_destination)
        if key not in self._chains:
            names = [n.name for n in self.world.chain(member)]
            if final_destination not in names:
                raise ConfigError(f"{self.world.path}: {final_destination!r} is not an ancestor of {member!r}")
            policies: list[Policy] = self.world.policy_chain(member)[: names.index(final_destination) + 1]
            if self.layer_override is not None:
                policies = [p.model_copy(update={"layers": self.layer_override}) for p in policies]
            self._chains[key] = policies
        return self._chains[key]

    def effective(self, member: str, final_destination: str) -> EffectivePolicy:
        """The composed policy for ``member``'s releases travelling up to ``final_destination``."""
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
        An `EffectiveDifferentialPrivacy` or None (typed Any until `federation.simulate.plan_simulation` reads
        its Optional budget and δ as such; `_user_dp` is the typed view).
        """
        key = (member, level)
        if key not in self._member_dp:
            ancestors = [n.name for n in self.world.chain(member)][1:]
            sections = [self.effective(member, a).differential_privacy for a in ancestors]
            if level == "user":
                sections = [d for d in sections if d.level == "user"]
            else:
                sections = [d for d in sections if d.record_level]
            best = None
            if sections:
                if level == "user":
                    best = min(sections, key=_strictness)
                    best = best.model_copy(update={
                        "delta": min(float(d.delta or 0.0) for d in sections),
                        "clipping_norm": min(d.clipping_norm for d in sections),
                    })
                else:
                    best = sections[-1]  # the full chain: record_dp_params takes the smallest record budget
            self._member_dp[key] = best
        return self._member_dp[key]

    def accounting_policy(self, member: str, final_destination: str, level: str = "user") -> EffectivePolicy:
        """The policy a charged release of ``member`` is checked against and recorded with in the ledger: the
        release's effective policy (authorization: layers, protocol, egress) with the DP section its one loss
        is held to (`member_dp`), so the stored document's budget and δ are the ones of the check."""
        return self.held_to(member, self.effective(member, final_destination), level)

    def held_to(self, member: str, eff: EffectivePolicy, level: str = "user") -> EffectivePolicy:
        """``eff`` with the DP section ``member``'s one loss at ``level`` is held to (see `accounting_policy`)."""
        dp = self.member_dp(member, level)
        if dp is None or dp == eff.differential_privacy:
            return eff
        return eff.model_copy(update={"differential_privacy": dp})

    def applied_level(self, member: str, group: str, eff: EffectivePolicy, noised: bool, derived: bool) -> str:
        """The DP level a release of ``member`` actually has: user when noise is added to the sum; record
        when the member trained with DP-SGD; a derived release inherits its inputs' level (`inputs_level`), and
        never claims more than its own path's policy level."""
        if noised:
            return "user"
        if derived:
            return min(str(eff.differential_privacy.level), self.inputs_level(member, group), key=LEVEL_ORDER.__getitem__)
        return "record" if member in self.record_streams else "none"

    def inputs_level(self, member: str, group: str) -> str:
        """The DP level of what a derived release of ``member`` (of ``group``) is computed from: the weakest over
        its children's releases of the input group, each at the level its own path's policy enforced towards
        the destination it had. A residual embedding is computed from ``member``'s key layers, whose releases
        stop at ``member``: a path that asks for DP only from ``member`` upwards does not make them DP, and
        the embedding is then no DP post-processing (found by an attacker review: it was recorded as user level)."""
        children = self.world.nodes[member].children
        if not children:
            return "none"
        source = "key" if group == "residual" else group
        final = member if source == "key" else self.world.root.name
        levels = [str(self.effective(c, final).differential_privacy.level) for c in children]
        return min(levels, key=LEVEL_ORDER.__getitem__)

    def trained_with_dp_sgd(self, member: str, eff: EffectivePolicy, derived: bool) -> bool:
        # A derived release's inputs come from the sites below it, whose paths include its policy: if that
        # is record-level, every one of them trained with DP-SGD (the engine refuses otherwise).
        return bool(eff.differential_privacy.record_level) if derived else member in self.record_streams

    # --- step 1: plan ----------------------------------------------------------------------------
    def plan(self, members: Sequence[str], final: str) -> RoundPlan:
        """The round plan every member follows: protocol, its parameters, the DP mechanism (policy.plan_round)."""
        return plan_round({m: self.effective(m, final) for m in members})

    def round_dp(self, members: Sequence[str], final: str, dim: int, plan: RoundPlan, *, charged: Sequence[str],
                 stream: tuple[str, str] | None = None, words: int = 1) -> ReleaseDP | None:
        """The user-level DP of one round of ``members`` releasing a ``dim``-value vector towards ``final``
        (None: no noise on the sum): `round_user_dp`, the noise plan for the cohort, the adaptive clip of
        ``stream`` (destination, group) over ``words`` count words, and under a distributed mechanism the
        members' integer shares at the scale the masked round uses. ``charged``: the members whose budget
        trackers this process keeps (the same round is planned identically wherever it is planned)."""
        members = sorted(members)
        dp = round_user_dp(self, members, final, plan)
        if dp is None:
            return None
        trackers = {m: self.member_tracker(m, dp) for m in charged}
        noise_plan = dp.plan(expected_members=len(members), dim=dim, w_max=None)
        # the adaptive clip's public floor: 10·√d·e (central noise on a quantizing protocol; else e = 0: no floor)
        floor = clip_floor(dim, dp.rounding_error) if dp.rounding_error > 0 else 0.0
        dp, noise_plan, rnd = with_adaptive_clip(self.adaptive, stream, dp, noise_plan, len(members), words, floor)
        out = ReleaseDP(dp, trackers, noise_plan, rnd)
        return with_member_noise(out, plan, len(members)) if dp.mechanism.distributed else out

    # --- step 2: member prepare --------------------------------------------------------------------
    def authorize(self, round_id: int, group: str, destination: str, members: Sequence[str], names: Sequence[str],
                  final: str, plan: RoundPlan, dp: ReleaseDP | None, *, cohort: int, derived: bool) -> dict[str, str]:
        """Authorize each of ``members``' release in a round of ``cohort`` members (`policy.authorize`, raises
        `PolicyViolation`); returns the DP level actually applied per member. Noise on the sum protects every
        member of a noised round; a derived release is DP by post-processing exactly when its inputs were."""
        mechanism = dp.dp.mechanism.name if dp is not None else (plan.dp_mechanism if derived else None)
        release_group = cast(ReleaseGroup, group)  # the pipeline's groups are the phases: key, shared, residual
        levels = {}
        for member in members:
            eff = self.effective(member, final)
            level = levels[member] = self.applied_level(member, group, eff, dp is not None, derived)
            policy.authorize(
                policy.Release(
                    source=member, destination=destination, round=round_id, group=release_group,
                    tensor_names=tuple(names), protocol=plan.protocol, dp_level=level,
                    dp_mechanism={"user": mechanism, "record": DP_SGD}.get(level), cohort_size=cohort,
                    record_dp=self.trained_with_dp_sgd(member, eff, derived),
                ),
                self.chain(member, final),
            )
        return levels

    def check_budget(self, round_id: int, group: str, destination: str, names: Sequence[str], final: str,
                     plan: RoundPlan, dp: ReleaseDP) -> None:
        """Before anyone sends: the quantizer cannot saturate a DP value, and even the worst case the round can
        release (min_cohort contributors) fits every charged member's budget; otherwise a signed refusal entry
        for each of them (nothing leaves) and `BudgetExceeded`."""
        check_quantizer_range(plan, dp)
        try:
            for tracker in dp.trackers.values():
                dp.dp.check_before_round(tracker, dp.plan, plan.min_cohort)
        except BudgetExceeded as exc:
            self.record_refusal(round_id, group, list(dp.trackers), destination, names, plan, final, str(exc))
            raise

    # --- step 3: aggregator finish -----------------------------------------------------------------
    def add_noise(self, dp: ReleaseDP, total: np.ndarray, contributors: int,
                  error_bound: float | None = None) -> tuple[ReleaseDP, np.ndarray]:
        """Central Gaussian at the aggregator, after unmasking / decryption, of std z·S_q: S_q = S + √d·e, the
        decoded sum's sensitivity (§2.8), never below the protocol's own reported ``error_bound``. Distributed
        shares are in the sum already: nothing is added."""
        if dp.noise is not None:
            return dp, total
        dp = checked_slack(dp, total, error_bound, contributors)
        mechanism = dp.dp.mechanism
        if not isinstance(mechanism, CentralGaussian):
            raise PolicyError(f"{mechanism.name}: a mechanism without member shares must be central_gaussian")
        return dp, mechanism.add_noise(total, dp.plan)

    def charge(self, round_id: int, group: str, destination: str, names: Sequence[str], final: str, plan: RoundPlan,
               dp: ReleaseDP, contributors: int, charged: Sequence[str], cohort: Sequence[str]) -> dict[str, Charge]:
        """Charge ``charged`` members for a release of ``contributors`` (z_eff: distributed shares of dropped
        members are missing from the sum). Every charge is checked before any is recorded: one that would
        exceed its budget refuses the release for the whole ``cohort`` (signed entries) and charges nobody."""
        z_eff = dp.dp.effective_noise_multiplier(dp.plan, contributors)
        for m in charged:
            c = dp.trackers[m].preview(z_eff, dp.dp.sample_rate)
            if c.epsilon_cumulative > dp.trackers[m].budget:
                msg = (f"release refused after the sum on stream {c.stream!r}: cumulative ε would be "
                       f"{c.epsilon_cumulative:.4g} > budget ε={c.epsilon_budget:.4g} at δ={c.delta:g} with "
                       f"{contributors} contributors; the sum is discarded")
                self.record_refusal(round_id, group, cohort, destination, names, plan, final, msg)
                raise BudgetExceeded(msg)
        return {m: dp.dp.charge(dp.trackers[m], dp.plan, contributors) for m in charged}

    def adapt_clip(self, stream: tuple[str, str], dp: ReleaseDP | None, total: np.ndarray, contributors: int) -> None:
        """Adaptive clipping: the next clip of ``stream`` from this release's noised sum ``total`` of
        ``contributors`` members (its count words; post-processing)."""
        if dp is not None and dp.clip_round is not None and self.adaptive is not None:
            self.adaptive.update(stream, dp.clip_round, total, contributors)

    # --- step 4: the entries -------------------------------------------------------------------------
    def record_member(self, round_id: int, group: str, member: str, destination: str, names: Sequence[str],
                      plan: RoundPlan, result: SumResult, eff: EffectivePolicy, level: str, dp: ReleaseDP | None,
                      charge: Charge | None, record_charge: Charge | None) -> None:
        """``member``'s entries of one release: the user-level (or unprotected, or post-processing) entry, and
        with a DP-SGD charge the `SITE/record` one (a record-only release has just its DP-SGD entry)."""
        if record_charge is None or level != "record":
            self.record_release(round_id, group, member, destination, names, plan, result, eff, level, dp, charge)
        if record_charge is not None:
            self.record_dp_sgd(round_id, group, member, destination, names, plan, result, eff, record_charge,
                               second=level != "record")

    def record_release(
        self, round_id: int, group: str, member: str, destination: str, names: Sequence[str], plan: RoundPlan,
        result: SumResult, eff: EffectivePolicy, dp_level: str, dp: ReleaseDP | None, charge: Charge | None,
        release_id: str | None = None,
    ) -> None:
        """Write ``member``'s ledger entry of one release (``charge``: its user-level charge, or None), under
        ``release_id`` (default ``ROUND:GROUP:DESTINATION``; a deployed re-release: ``...:retryLINK``).
        A charged entry stores the policy its charge was checked against (`held_to`: budget and δ of its one loss)."""
        if charge is not None:
            self.stats.epsilon[charge.stream] = charge.epsilon_cumulative
            eff = self.held_to(member, eff)
        if self.ledger_dir is None:
            return
        mechanism = dp.dp.mechanism.name if dp is not None else (POST_PROCESSING if dp_level != "none" else "none")
        self._append(member, eff, release_id or f"{round_id}:{group}:{destination}", round_id, group, destination, names,
                     plan, result, dp_level=dp_level, mechanism=mechanism,
                     clipping_norm=dp.dp.clipping_norm if dp is not None else 0.0, charge=charge,
                     stream=f"{member}/{POST_PROCESSING if (dp is None and dp_level != 'none') else dp_level}",
                     delta=float(eff.differential_privacy.delta or 0.0), extra=release_dp_extra(dp, charge))

    def record_dp_sgd(
        self, round_id: int, group: str, member: str, destination: str, names: Sequence[str], plan: RoundPlan,
        result: SumResult, eff: EffectivePolicy, charge: Charge, *, second: bool,
    ) -> None:
        """The `SITE/record` entry of a DP-SGD-trained site's release: mechanism dp_sgd, the steps charged
        (0 for a further release of the same model), q and C = max_grad_norm. With user-level noise too
        (``second``), it is the release's second entry, id ``R:GROUP:DEST:record`` (one entry per stream)."""
        self.stats.epsilon[charge.stream] = charge.epsilon_cumulative
        if self.ledger_dir is None:
            return
        eff = self.held_to(member, eff, "record")
        params = self.record_streams[member].params
        self._append(member, eff, f"{round_id}:{group}:{destination}" + (RECORD_SUFFIX if second else ""), round_id, group,
                     destination, names, plan, result, dp_level="record", mechanism=DP_SGD,
                     clipping_norm=params.max_grad_norm, charge=charge, stream=None, delta=charge.delta,
                     extra={"expected_batch": params.expected_batch})

    def _append(self, member: str, eff: EffectivePolicy, release_id: str, round_id: int, group: str, destination: str,
                names: Sequence[str], plan: RoundPlan, result: SumResult, *, dp_level: str, mechanism: str,
                clipping_norm: float, charge: Charge | None, stream: str | None, delta: float,
                extra: Mapping[str, ExtraValue] | None) -> None:
        """Append ``member``'s entry of one release: what, to whom and with whom from the plan and the sum, how
        it was protected from the caller; the policy it was checked against is stored beside it."""
        entry = release_entry(
            release_id=release_id, round=round_id, level=self.world.nodes[member].kind, source=member,
            destination=destination, group=group, tensor_names=names, protocol=plan.protocol,
            cohort_size=len(result.contributors), dropouts=len(result.dropped), dp_level=dp_level, mechanism=mechanism,
            clipping_norm=clipping_norm, policy_sha256=eff.sha256, charge=charge, stream=stream, delta=delta,
            key_id=str(result.stats.extra.get("key_id", "")), extra=extra,
        )
        self.ledger(member).append(entry, policy_document=eff.canonical_json())

    def record_refusal(self, round_id: int, group: str, members: Sequence[str], destination: str,
                       names: Sequence[str], plan: RoundPlan, final: str, reason: str) -> None:
        """A signed refusal entry (mechanism ``refused``, nothing released, no ε) in every member's ledger:
        the budget could not afford the release, so none of the members' inputs left (protocols/dp.md §5)."""
        self.stats.refusals += 1
        if self.ledger_dir is None:
            return
        for member in sorted(members):
            eff = self.accounting_policy(member, final)
            entry = release_entry(
                release_id=f"{round_id}:{group}:{destination}{REFUSED_SUFFIX}", round=round_id,
                level=self.world.nodes[member].kind, source=member, destination=destination, group=group,
                tensor_names=names, protocol=plan.protocol, cohort_size=len(members),
                dropouts=len(members), dp_level="none", mechanism=REFUSED, clipping_norm=0.0,
                policy_sha256=eff.sha256, charge=None, stream=f"{member}/user",
                delta=float(eff.differential_privacy.delta or 0.0), extra={"refused": reason[:1000]},
            )
            self.ledger(member).append(entry, policy_document=eff.canonical_json())

    # --- budgets and ledgers -----------------------------------------------------------------------
    def member_tracker(self, member: str, fallback: UserLevelDP | None = None) -> BudgetTracker:
        """``member``'s one user-level budget stream ``MEMBER/user``, rebuilt from its ledger: every group and
        destination charges it, against the budget and δ of `member_dp` (the strictest on its paths).
        ``fallback``: the round's settings, for a member none of whose own paths asks for user-level DP but
        whose round is noised for others (it is charged what the noise gives it)."""
        if member not in self._trackers:
            dp = self.member_dp(member)
            if dp is not None:
                budget, delta, accountant = float(dp.epsilon_budget), float(dp.delta), str(dp.accountant)
            elif fallback is not None:
                budget, delta, accountant = fallback.budget, fallback.delta, fallback.accountant
            else:
                raise PolicyError(f"{member!r}: no policy on its paths asks for user-level DP; nothing to charge")
            self._trackers[member] = BudgetTracker.from_entries(
                self.ledger_entries(member), stream=f"{member}/user", budget=budget, delta=delta, accountant=accountant
            )
        return self._trackers[member]

    def ledger_entries(self, node: str) -> list[LedgerEntry]:
        """``node``'s ledger entries so far (empty without a ledger), e.g. to rebuild a budget stream."""
        return self.ledger(node).entries() if self.ledger_dir is not None else []

    def ledger(self, node: str) -> Ledger:
        """``node``'s signed ledger (opened on first use; needs a ``ledger_dir``)."""
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


def _strictness(dp: EffectiveDifferentialPrivacy) -> tuple[float, float]:
    """Order DP sections by budget, then δ (smaller first); user level always has both."""
    return float(dp.epsilon_budget if dp.epsilon_budget is not None else float("inf")), float(dp.delta or 0.0)


def round_user_dp(path: Pipeline, members: Sequence[str], final: str, plan: RoundPlan) -> UserLevelDP | None:
    """The user-level DP of one round of ``members`` releasing towards ``final`` (None: no noise on the sum).

    Noise is added once to the sum, so the round has one z: planned (``noise_multiplier: auto``) from the
    strictest member's one-loss budget (`Pipeline.member_dp`: the smallest budget and δ on any of its
    paths, e.g. the root's for a key release that stays in the federation), over the releases the run plans.
    Record-level-only members are protected by DP-SGD inside their sites; noise on the sum is user level.
    """
    effs = {m: path.effective(m, final) for m in members}
    users = [m for m in members if effs[m].differential_privacy.level == "user"]
    if not users:
        return None
    strict = min((_user_dp(path, m) for m in users), key=_strictness)
    # Distributed shares are sized for the fewest contributors a round can release with: min_cohort, which
    # every backend enforces. Then z_eff >= z in every released round, and a full cohort adds only
    # sqrt(n / min_cohort) of noise. The masking policy's max_dropout_fraction is how many may drop before
    # unmasking fails, not a floor on contributors: sizing for it as well (as before 2026-12-03) added
    # noise no released round needs (tests/test_dp_distributed_shares.py).
    worst_dropout = 1.0 - min(1.0, max(1, int(plan.min_cohort)) / max(1, len(members)))
    dp = UserLevelDP.from_policy(
        strict,
        planned_releases=path.planned_releases,
        max_dropout_fraction=min(0.99, worst_dropout),
        mechanism=plan.dp_mechanism,
    )
    if dp.mechanism.distributed:  # rounding is in the integer sensitivity Δ₂ already (protocols/dp.md §3.2)
        return dp
    # Central noise is added to the decoded sum of the members' quantized vectors: every plan of this round
    # carries the protocol's per-value rounding error e, so the noise is sized at S + √d·e (§2.8).
    e = rounding_error(str(plan.protocol), plan.params, len(members))
    return replace(dp, rounding_error=e) if e > 0 else dp


def _user_dp(path: Pipeline, member: str) -> EffectiveDifferentialPrivacy:
    dp = path.member_dp(member)
    assert dp is not None, f"{member!r}: a user-level path has a user-level DP section"
    return dp


__all__ = ["Pipeline", "ReleaseDP", "ReleaseStats", "round_user_dp"]
