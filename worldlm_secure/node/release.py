"""The release pipeline (`worldlm_secure.release.Pipeline`) split between the member and the aggregator of
a deployed link: the same steps as `simulate`, each run where it belongs, none of them written again here.

    member:     plan -> round_dp (at the announced adaptive clip) -> authorize -> clip + encode (`encode_update`)
                -> check_budget -> charge + ledger entry (`record_member`) before the input leaves -> [secure sum]
    aggregator: plan -> round_dp (the members' integer noise) -> [secure sum] -> add_noise (central) -> decode
                -> the next adaptive clip (`Pipeline.adapt_clip`), kept in node state and announced next round

Ledger entries carry the same release ids and fields as `simulate` (``ROUND:GROUP:DESTINATION``, ROUND = the
world round), and `Ledger.append` is idempotent by id, so a restarted node never duplicates an entry.
The entry is written before the member's input leaves, with the cohort that got as far as key
agreement (an upper bound on the contributors) and the charge for that cohort: never after the fact.

Distributed noise (`distributed_discrete_gaussian`, `distributed_skellam` with masking): each member
adds its integer share inside `MaskingMember` and the aggregator adds nothing. Because the member's
entry is written before it knows how many members will contribute, it is charged at the z_eff of the
fewest contributors the round can release (`min_cohort`): never less than the truth (z_eff grows with
the contributors), equal to simulate's charge when every invited member contributes at min_cohort.
A re-release with fresh shares in a new link round (the aggregator restarted) is its own, charged
entry (``...:retryLINK``), written by the same `record_release` step; see `NodeRelease.record`.

Record-level DP: a site whose composed policy is record-level trains with DP-SGD (`train.private`,
as the engine) and its first release after training charges those steps on its `SITE/record` stream.

CKKS: members encrypt and the member key holders decrypt (`node.ckks_link`); `check_supported` refuses a
CKKS link whose policy names key holders none of whom is a member of that link.

Adaptive clipping (protocols/dp.md §2.7): the aggregator holds the clip of each stream (destination, group),
updates it from each noised sum and announces C_t with the next round (`Phase.clip`); a member takes it as its
stream's clip, and `AdaptiveClip.round_for` keeps it within [the public floor, the policy's clipping_norm],
so an aggregator can move it only inside what the member's policy allows (z, hence ε, does not depend on it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast
from pathlib import Path

import numpy as np
import torch

from worldlm_secure.aggregation.member import encode_update
from worldlm_secure.aggregation.weighted import DeltaCodec
from worldlm_secure.errors import ConfigError, SecAggError
from worldlm_secure.federation.engine import planned_site_releases
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.node.ckks_link import CkksRound
from worldlm_secure.node.config import TimeoutSection
from worldlm_secure.node.link import member_round
from worldlm_secure.node.receipts import release_id
from worldlm_secure.node.rounds import ckks_round, masking_config
from worldlm_secure.node.context import WorldContext
from worldlm_secure.node.state import NodeState
from worldlm_secure.policy import EffectivePolicy, RoundPlan
from worldlm_secure.release import Pipeline, ReleaseDP, decode
from worldlm_secure.secagg import IntegerNoise
from worldlm_secure.secagg.protocol import BeforeReveal, ProtectionStats, SumResult
from worldlm_secure.transport.client import MemberLink
from worldlm_secure.transport.handler import Announcement


@dataclass(frozen=True)
class Prepared:
    """A member's release, ready to go into the secure sum: authorized, clipped, encoded, within budget."""

    vector: np.ndarray
    plan: RoundPlan
    dp: ReleaseDP | None  # user-level DP of the round, with this member's budget tracker (None: no noise)
    level: str  # the DP level applied (`Pipeline.applied_level`)
    effective: EffectivePolicy
    final: str  # the release's final destination (its effective policy's end)
    derived: bool = False

    @property
    def noise(self) -> IntegerNoise | None:
        """The distributed DP share generator this member adds before masking (None: central or no DP)."""
        return self.dp.noise if self.dp is not None else None


def check_supported(ctx: WorldContext) -> None:
    """Refuse, before any key or port is used, what the networked release path cannot run."""
    path = Pipeline(ctx.world, {})
    for fed in ctx.world.federations:
        links = [(ctx.members(fed.name), fed.name), (ctx.members(ctx.root), ctx.root)]
        for members, final in links:
            plan = path.plan(members, final)
            where = f"{ctx.world.path}: aggregation at {final!r}"
            ckks = CkksRound.from_plan(plan) if plan.protocol == "ckks" else None
            if ckks is not None and not ckks.holders(members):
                raise ConfigError(
                    f"{where}: CKKS key_holders {list(ckks.params.key_holders)} are not members of this link "
                    f"({', '.join(members)}); name members, 'members', or leave key_holders empty"
                )


def _change(before: Sequence[str], now: Sequence[str]) -> str:
    """Who a member list lost and gained, for refusals that name them."""
    left, new = sorted(set(before) - set(now)), sorted(set(now) - set(before))
    return f"left out now: {', '.join(left) or 'none'}; new: {', '.join(new) or 'none'}"


class NodeRelease:
    """One node's releases (as a member) and aggregations (as an aggregator), with its own ledger."""

    def __init__(self, ctx: WorldContext, identity: NodeIdentity, ledger_dir: Path, state: NodeState | None = None) -> None:
        """``state``: the node's `NodeState` (remembers which link round each entry was written for)."""
        self.ctx = ctx
        self.state = state
        self.me, self.identity = identity.name, identity
        # Same planning as the engine: key + shared per round per site (for noise_multiplier: auto).
        self.planned_releases = planned_site_releases(ctx.settings.rounds, bool(ctx.key_names), bool(ctx.shared_names))
        self.path = Pipeline(ctx.world, {identity.name: identity}, ledger_dir=ledger_dir, planned_releases=self.planned_releases)
        if self.path.adaptive is not None and state is not None:  # an aggregator's clips survive a restart
            for stream, clip in (state.get(ADAPTIVE_CLIPS) or {}).items():
                self.path.adaptive.clips[tuple(stream.split("|", 1))] = float(clip)

    def plan(self, cohort: Sequence[str], final: str) -> RoundPlan:
        return self.path.plan(sorted(cohort), final)

    @property
    def public_weights(self) -> bool:
        """Under any DP every weight is public (protocols/dp.md §2), as in `Engine.public_weights`."""
        root = self.ctx.root
        return any(self.path.effective(s.name, root).differential_privacy.level != "none" for s in self.ctx.world.sites)

    def example_scale(self, counts: Sequence[int]) -> float:
        """``n_max`` of example weighting (`Engine.example_scale`): the largest count without DP, else the public
        cap (``aggregation.dp_weight_cap``, 1 = uniform). Under DP the members' counts are never used."""
        if self.public_weights:
            return float(self.ctx.settings.dp_weight_cap or 1)
        return float(max(counts, default=1) or 1)

    def member_scale(self, announced: float) -> float:
        """The ``n_max`` a member weighs its shared update with: under DP the public cap it derives from its own
        world file (`example_scale`), whatever the aggregator announced; without DP the announced largest count."""
        return self.example_scale([]) if self.public_weights else announced

    def _round_dp(self, cohort: Sequence[str], final: str, codec: DeltaCodec, charged: Sequence[str],
                  stream: tuple[str, str]) -> ReleaseDP | None:
        """The round's user-level DP (`Pipeline.round_dp`), planned as every other member and the aggregator do;
        ``stream``: (destination, group), whose adaptive clip the round uses."""
        return self.path.round_dp(cohort, final, codec.length, self.plan(cohort, final), charged=charged,
                                  stream=stream, words=len(codec.names))

    # ---- adaptive clipping (protocols/dp.md §2.7) ----
    def announced_clip(self, destination: str, group: str) -> float:
        """The clip C_t this aggregator holds for stream (``destination``, ``group``), to announce with the round
        (`Phase.clip`); 0.0 when adaptive clipping is off or the stream has had no release yet (members then start
        from the same public C_0)."""
        adaptive = self.path.adaptive
        return float(adaptive.clips.get((destination, group), 0.0)) if adaptive is not None else 0.0

    def follow_clip(self, destination: str, group: str, clip: float) -> None:
        """A member takes the announced C_t as its stream's clip (0.0: none announced). `AdaptiveClip.round_for`
        still bounds it by the public floor and this member's clipping_norm, whatever was announced."""
        if self.path.adaptive is not None and clip > 0:
            self.path.adaptive.clips[(destination, group)] = float(clip)

    def _next_clip(self, stream: tuple[str, str], dp: ReleaseDP | None, total: np.ndarray, contributors: int) -> None:
        """The aggregator's next clip of ``stream`` from this noised sum (`Pipeline.adapt_clip`), stored at once."""
        self.path.adapt_clip(stream, dp, total, contributors)
        if self.path.adaptive is not None and self.state is not None:
            clips = cast(dict[tuple[str, str], float], self.path.adaptive.clips)  # keyed by (destination, group) here
            self.state.put(**{ADAPTIVE_CLIPS: {"|".join(k): c for k, c in clips.items()}})

    # ---- member side ----
    def prepare(
        self, world_round: int, group: str, destination: str, final: str, cohort: Sequence[str],
        deltas: Mapping[str, torch.Tensor] | None, weights: np.ndarray | None, names: Sequence[str],
        shapes: Mapping[str, tuple[int, ...]], *, derived: bool, raw_vector: np.ndarray | None = None,
        clip: float = 0.0,
    ) -> Prepared:
        """Authorize, clip and encode this node's release (``raw_vector``: a residual embedding, sent as is),
        and refuse it (a signed refusal entry, `BudgetExceeded`) before anything is sent if even the worst
        case the round can release would exceed this node's budget. ``clip``: the adaptive clip the aggregator
        announced (`Phase.clip`, 0.0: none)."""
        cohort = sorted(cohort)
        plan = self.plan(cohort, final)
        dp = None
        if raw_vector is not None:
            vector = np.asarray(raw_vector, dtype=np.float64)
        else:
            assert deltas is not None and weights is not None, "a delta release needs its deltas and weights"
            codec = _codec(names, shapes)
            self.follow_clip(destination, group, clip)
            dp = None if derived else self._round_dp(cohort, final, codec, [self.me], (destination, group))
            vector = encode_update(codec, deltas, weights, dp.member_clip if dp is not None else None)
        level = self.path.authorize(world_round, group, destination, [self.me], names, final, plan, dp,
                                    cohort=len(cohort), derived=derived)[self.me]
        if dp is not None:
            self.path.check_budget(world_round, group, destination, names, final, plan, dp)
        if dp is None or dp.noise is None:
            plan = self._rerun_plan(release_id(world_round, group, destination), cohort, plan)
        return Prepared(vector, plan, dp, level, self.path.effective(self.me, final), final, derived)

    def _rerun_plan(self, rid: str, cohort: Sequence[str], plan: RoundPlan) -> RoundPlan:
        """The plan of a release without fresh noise, which may already have gone into an earlier link round
        (the aggregator restarted, or says it did). Two released sums over the same unchanged vectors with
        different contributors give their difference, one member's update. So the same update goes again only
        to the cohort announced the first time, and only into a sum of all of it (min_cohort = the cohort: a
        member's session refuses to unmask or decrypt if anyone is left out). SECURITY.md, "Re-run rounds"."""
        if self.state is None:
            return plan
        first = self.state.get(f"cohort:{rid}")
        if first is None:
            return plan
        if sorted(first) != sorted(cohort):
            raise SecAggError(
                f"{self.me}: refusing to release {rid} again into a round of {', '.join(sorted(cohort))}: it went "
                f"into a round of {', '.join(sorted(first))} before ({_change(first, cohort)}), and the difference "
                "of two sums over the same update is one member's update"
            )
        return plan.model_copy(update={"min_cohort": len(cohort)})

    def contribute(self, link: MemberLink, ann: Announcement, world_round: int, group: str, destination: str,
                   names: Sequence[str], prep: Prepared, timeouts: TimeoutSection) -> None:
        """Send ``prep`` into the secure sum the aggregator announced (``ann``, verified by this node), through the
        protocol's member session: the ledger entry is written right before the input leaves (`record`), and
        `reveal_guard` runs before anything that completes a sum. Refuses (`SecAggError`, nothing sent) a round
        announced under another protocol than this node's policies plan: an aggregator announcing ``none`` to a
        member whose policy requires secure aggregation would otherwise get its update in the clear."""
        if prep.plan.protocol != ann.protocol:
            raise SecAggError(f"round {ann.round_id}: {self.me}'s aggregator announced {ann.protocol!r} but the "
                              f"policies' round plan is {prep.plan.protocol!r}; refused, nothing sent")
        member_round(
            link, self.identity, ann, masking_config(prep.plan, ann, prep.noise), prep.vector,
            before_input=lambda cohort, key_id="": self.record(world_round, group, destination, names, prep, cohort,
                                                               ann.cohort, ann.round_id, key_id=key_id),
            before_reveal=self.reveal_guard(world_round, group, destination, prep),
            timeout=timeouts.step, noise=prep.noise, ckks=ckks_round(prep.plan, ann), wait_timeout=timeouts.train,
        )

    def reveal_guard(self, world_round: int, group: str, destination: str, prep: Prepared) -> BeforeReveal:
        """This member's `BeforeReveal` for one release: before it reveals what completes a sum (unmask shares, a
        key holder's decryption) it stores the sum's contributors in its node state, and it never helps complete
        a second sum of the same update over other contributors (`SecAggError`, nothing revealed).

        Why: the aggregator can take a member's input in the first link round, declare her dropped, release the
        others' sum and re-run the round with her; the victim cannot tell, but the members that completed the
        first sum know its contributors, and without their shares or decryption the re-run yields nothing
        (`_rerun_plan` covers the other order: a re-run that leaves someone out). A release with fresh
        distributed noise is not guarded: each attempt is noised and charged on its own (`record`).
        SECURITY.md, "Re-run rounds"."""
        rid = release_id(world_round, group, destination)

        def guard(contributors: tuple[str, ...]) -> None:
            if prep.noise is not None or self.state is None:
                return
            key = f"summed:{rid}"
            before = self.state.get(key)
            if before is not None and sorted(before) != sorted(contributors):
                raise SecAggError(
                    f"{self.me}: refusing to complete a sum of {rid} over {', '.join(contributors)}: its update "
                    f"already went into a sum over {', '.join(before)} ({_change(before, contributors)}), and the "
                    "difference of the two is those members' updates; nothing revealed"
                )
            self.state.put(**{key: sorted(contributors)})  # stored before anything that completes the sum leaves

        return guard

    def record(self, world_round: int, group: str, destination: str, names: Sequence[str], prep: Prepared,
               cohort: Sequence[str], invited: Sequence[str], link_round: int, key_id: str = "") -> None:
        """Charge and write the ledger entry of this release (before the input leaves).

        Once per world-round release (``ROUND:GROUP:DEST``), except that a release with fresh distributed
        noise in a *new* link round (the aggregator restarted and re-ran the round) is a new release of the
        same update with new noise: it gets its own entry ``ROUND:GROUP:DEST:retryLINK`` and is charged.
        Which link round an entry belongs to is stored in the node's state before the entry is written.
        ``key_id``: the CKKS key epoch the input is encrypted under ("" for other protocols).
        """
        rid = release_id(world_round, group, destination)
        key = f"released:{rid}"
        existing = self.path.ledger(self.me).get(rid) if self.path.ledger_dir is not None else None
        retry = None
        if existing is not None:
            if prep.noise is None or self.state is None or self.state.get(key) == link_round:
                return  # the same release again (no fresh noise): its entry stands, nothing charged twice
            retry = f"{rid}:retry{link_round}"
            if self.path.ledger(self.me).get(retry) is not None:
                return
        if self.state is not None and retry is None:
            # the announced cohort too: a later link round re-running this release must announce the same one
            self.state.put(**{key: link_round, f"cohort:{rid}": sorted(invited)})
        stats = ProtectionStats(prep.plan.protocol, extra={"key_id": key_id} if key_id else {})
        result = SumResult(np.zeros(0), tuple(sorted(cohort)), tuple(sorted(set(invited) - set(cohort))), stats)
        charge = None
        if prep.dp is not None:
            # Central: z does not depend on the contributors. Distributed: the fewest the round can release.
            contributors = prep.plan.min_cohort if prep.dp.noise is not None else len(cohort)
            charge = self.path.charge(world_round, group, destination, names, prep.final, prep.plan, prep.dp,
                                      contributors, [self.me], [self.me])[self.me]
        if retry is not None:  # the same update again, with fresh shares: the release's entry under its own id
            self.path.record_release(world_round, group, self.me, destination, names, prep.plan, result,
                                     prep.effective, prep.level, prep.dp, charge, retry)
            return
        stream = None if prep.derived else self.path.record_streams.get(self.me)
        # Record level: the DP-SGD steps since the last release are charged on this one (0 on the next).
        record_charge = stream.charge_release() if stream is not None else None
        self.path.record_member(world_round, group, self.me, destination, names, prep.plan, result, prep.effective,
                                prep.level, prep.dp, charge, record_charge)

    # ---- aggregator side ----
    def finish_average(self, total: np.ndarray, cohort: Sequence[str], final: str, names: Sequence[str],
                       shapes: Mapping[str, tuple[int, ...]], *, derived: bool, stream: tuple[str, str],
                       contributors: int) -> dict[str, torch.Tensor]:
        """Noise (central Gaussian, when the members' policies ask for user-level DP), the next adaptive clip of
        ``stream`` (this aggregator, the group) and the decoded average of a sum of ``contributors`` members."""
        codec = _codec(names, shapes)
        dp = None if derived else self._round_dp(cohort, final, codec, [], stream)
        if dp is not None:  # central; distributed shares are in the sum already
            dp, total = self.path.add_noise(dp, total, len(cohort))
            self._next_clip(stream, dp, total, contributors)
        # Under DP: divide by the public cohort size, never by the noisy weight sum (as the engine does).
        return decode(codec, total, len(cohort) if dp is not None else None,
                      dp.dp.clipping_norm if dp is not None else None)

    def member_noise(self, cohort: Sequence[str], final: str, names: Sequence[str],
                     shapes: Mapping[str, tuple[int, ...]], stream: tuple[str, str]) -> IntegerNoise | None:
        """The integer noise members add in this round (distributed DP), for the aggregator's round config."""
        dp = self._round_dp(cohort, final, _codec(names, shapes), [], stream)
        return dp.noise if dp is not None else None


#: Node-state key of an aggregator's adaptive clips: {"DESTINATION|GROUP": C_t}.
ADAPTIVE_CLIPS = "adaptive_clips"


def _codec(names: Sequence[str], shapes: Mapping[str, tuple[int, ...]]) -> DeltaCodec:
    return DeltaCodec(tuple(names), tuple(tuple(shapes[n]) for n in names))
