"""The release path of `federation.release.ReleasePath`, split between the member and the aggregator
of a deployed link: the same policy composition, round plan, authorization, clipping, encoding, noise,
budget charge and ledger entry, each step run where it belongs.

    member:     plan -> authorize -> clip (user-level DP) -> encode (DeltaCodec: w*delta, w)
                -> budget check -> [secure sum over the link] -> charge + ledger entry before the input leaves
    aggregator: plan -> [secure sum] -> central Gaussian noise (user-level DP) -> decode the average

Ledger entries carry the same release ids as `simulate` (``ROUND:GROUP:DESTINATION``, ROUND = the world
round), and `Ledger.append` is idempotent by id, so a restarted node never duplicates an entry.
The entry is written before the member's input leaves, with the cohort that got as far as key
agreement (an upper bound on the contributors) and the charge for that cohort: never after the fact.

Distributed noise (`distributed_discrete_gaussian`, `distributed_skellam` with masking): each member
adds its integer share inside `MaskingMember` and the aggregator adds nothing. Because the member's
entry is written before it knows how many members will contribute, it is charged at the z_eff of the
fewest contributors the round can release (`min_cohort`): never less than the truth (z_eff grows with
the contributors), equal to simulate's charge when every invited member contributes at min_cohort.
A re-release with fresh shares in a new link round (the aggregator restarted) is its own, charged
entry (``...:retryLINK``); see `NodeRelease.record`.

Record-level DP: a site whose composed policy is record-level trains with DP-SGD (`train.private`,
as the engine) and its first release after training charges those steps on its `SITE/record` stream.

CKKS: members encrypt and the member key holders decrypt (`node.ckks_link`); `check_supported` refuses a
CKKS link whose policy names key holders none of whom is a member of that link.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worldlm_secure.aggregation.weighted import DeltaCodec
from worldlm_secure.errors import ConfigError
from worldlm_secure.aggregation.member import encode_update
from worldlm_secure.errors import BudgetExceeded
from worldlm_secure.federation.engine import planned_site_releases
from worldlm_secure.federation.release import ReleaseDP, ReleasePath, decode, round_user_dp
from worldlm_secure.ledger.entry import DP_SGD
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.node.context import WorldContext
from worldlm_secure.secagg.protocol import ProtectionStats, SumResult


@dataclass(frozen=True)
class RoundDP:
    """User-level DP of one release: the settings (``privacy.UserLevelDP``), the round's noise plan, and
    for distributed mechanisms the members' integer noise (``secagg.IntegerNoise``; None when central)."""

    dp: Any
    plan: Any
    noise: Any = None


@dataclass
class Prepared:
    """A member's release, ready to go into the secure sum."""

    vector: np.ndarray
    plan: Any
    dp: RoundDP | None
    tracker: Any
    level: str
    effective: Any
    derived: bool = False

    @property
    def noise(self) -> Any:
        """The distributed DP share generator this member adds before masking (None: central or no DP)."""
        return self.dp.noise if self.dp is not None else None


def round_dp(path: ReleasePath, cohort: Sequence[str], final: str, dim: int, plan: Any, planned_releases: int) -> RoundDP | None:
    """`ReleasePath._dp_for` without the members' budget trackers (each member keeps its own): the same
    `round_user_dp` (z planned from the strictest one-loss budget of the cohort), the same noise plan."""
    dp = round_user_dp(path, sorted(cohort), final, plan)
    if dp is None:
        return None
    noise_plan = dp.plan(expected_members=len(cohort), dim=dim, w_max=None)
    if not dp.mechanism.distributed:
        return RoundDP(dp, noise_plan)
    # As `ReleasePath._with_member_noise`: the shares, and the plan at the scale the masked round will use.
    from worldlm_secure.privacy.distributed import integer_noise
    from worldlm_secure.secagg.masking import round_quantization

    if plan.protocol != "masking":
        raise ConfigError(f"{dp.mechanism.name}: protocol {plan.protocol!r} cannot carry distributed noise; use masking")
    noise = integer_noise(dp.mechanism, noise_plan, len(cohort))
    scale = round_quantization(plan.params, len(cohort), noise).scale
    return RoundDP(dp, replace(noise_plan, quant_step=1.0 / scale), noise)


def check_supported(ctx: WorldContext) -> None:
    """Refuse, before any key or port is used, what the networked release path cannot run."""
    from worldlm_secure.node.ckks_link import CkksRound

    path = ReleasePath(ctx.world, {})
    if path.adaptive is not None:  # protocols/dp.md §2.7: the clip and its count are engine and Ray only for now
        raise ConfigError(
            f"{ctx.world.path} aggregation.adaptive_clip: adaptive clipping is not supported by `node start` yet "
            "(deployed aggregators do not announce the clip or read the count); remove it to run nodes, or use simulate"
        )
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


class NodeRelease:
    """One node's releases (as a member) and aggregations (as an aggregator), with its own ledger."""

    def __init__(self, ctx: WorldContext, identity: NodeIdentity, ledger_dir: Path, state: Any = None) -> None:
        """``state``: the node's `NodeState` (remembers which link round each entry was written for)."""
        self.ctx = ctx
        self.state = state
        self.me = identity.name
        # Same planning as the engine: key + shared per round per site (for noise_multiplier: auto).
        self.planned_releases = planned_site_releases(ctx.settings.rounds, bool(ctx.key_names), bool(ctx.shared_names))
        self.path = ReleasePath(ctx.world, {identity.name: identity}, ledger_dir=ledger_dir, planned_releases=self.planned_releases)
        self._trackers: dict[str, Any] = {}

    def plan(self, cohort: Sequence[str], final: str) -> Any:
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

    # ---- member side ----
    def prepare(
        self, world_round: int, group: str, destination: str, final: str, cohort: Sequence[str],
        deltas: Mapping[str, torch.Tensor] | None, weights: np.ndarray | None, names: Sequence[str],
        shapes: Mapping[str, Any], *, derived: bool, raw_vector: np.ndarray | None = None,
    ) -> Prepared:
        """Authorize, clip and encode this node's release (``raw_vector``: a residual embedding, sent as is)."""
        from worldlm_secure.policy import Release, authorize

        cohort = sorted(cohort)
        plan = self.plan(cohort, final)
        eff = self.path.effective(self.me, final)
        if raw_vector is not None:
            dp = None
            vector = np.asarray(raw_vector, dtype=np.float64)
        else:
            codec = DeltaCodec(tuple(names), tuple(tuple(shapes[n]) for n in names))
            dp = None if derived else round_dp(self.path, cohort, final, codec.length, plan, self.planned_releases)
            clip = dp.dp.clipping_norm if dp is not None else None  # member side: clip the group's update
            vector = encode_update(codec, deltas, weights, clip)  # type: ignore[arg-type]
        level = self.path.applied_level(self.me, eff, dp is not None, derived)
        mechanism = dp.dp.mechanism.name if dp else (plan.dp_mechanism if derived else None)
        authorize(
            Release(
                source=self.me, destination=destination, round=world_round, group=group,  # type: ignore[arg-type]
                tensor_names=tuple(names), protocol=plan.protocol, dp_level=level,
                dp_mechanism={"user": mechanism, "record": DP_SGD}.get(level),
                cohort_size=len(cohort), record_dp=self.path.trained_with_dp_sgd(self.me, eff, derived),
            ),
            self.path.chain(self.me, final),
        )
        tracker = None
        if dp is not None:  # refuse before anything is sent if even the worst case would exceed the budget
            tracker = self._tracker(dp.dp)
            try:
                dp.dp.check_before_round(tracker, dp.plan, plan.min_cohort)
            except BudgetExceeded as exc:  # a signed refusal entry, as the engine writes (nothing leaves)
                self.path.record_refusal(world_round, group, [self.me], destination, names, plan, final, str(exc))
                raise
        return Prepared(vector, plan, dp, tracker, level, eff, derived)

    def record(self, world_round: int, group: str, destination: str, names: Sequence[str], prep: Prepared,
               cohort: Sequence[str], invited: Sequence[str], link_round: int, key_id: str = "") -> None:
        """Charge and write the ledger entry of this release (before the input leaves).

        Once per world-round release (``ROUND:GROUP:DEST``), except that a release with fresh distributed
        noise in a *new* link round (the aggregator restarted and re-ran the round) is a new release of the
        same update with new noise: it gets its own entry ``ROUND:GROUP:DEST:retryLINK`` and is charged.
        Which link round an entry belongs to is stored in the node's state before the entry is written.
        ``key_id``: the CKKS key epoch the input is encrypted under ("" for other protocols).
        """
        rid = f"{world_round}:{group}:{destination}"
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
            self.state.put(**{key: link_round})
        charge = None
        stream = None if prep.derived else self.path.record_streams.get(self.me)
        # Record level: the DP-SGD steps since the last release are charged on this one (0 on the next).
        record_charge = stream.charge_release() if stream is not None else None
        if prep.dp is not None:
            # Central: z does not depend on the contributors. Distributed: the fewest the round can release.
            contributors = prep.plan.min_cohort if prep.dp.noise is not None else len(cohort)
            charge = prep.dp.dp.charge(prep.tracker, prep.dp.plan, contributors)
        stats = ProtectionStats(prep.plan.protocol, extra={"key_id": key_id} if key_id else {})
        result = SumResult(np.zeros(0), tuple(sorted(cohort)), tuple(sorted(set(invited) - set(cohort))), stats)
        if retry is not None:
            self._append_retry(retry, world_round, group, destination, names, prep, result, charge)
            return
        dp = ReleaseDP(prep.dp.dp, {self.me: prep.tracker}, prep.dp.plan) if prep.dp is not None else None
        if record_charge is None or prep.level != "record":  # a record-only release has just its DP-SGD entry
            self.path.record_release(world_round, group, self.me, destination, names, prep.plan, result, prep.effective, prep.level, dp, charge)
        if record_charge is not None:
            self.path.record_dp_sgd(world_round, group, self.me, destination, names, prep.plan, result, prep.effective,
                                     record_charge, second=prep.level != "record")

    def _append_retry(self, release_id: str, world_round: int, group: str, destination: str, names: Sequence[str],
                      prep: Prepared, result: SumResult, charge: Any) -> None:
        """The entry `ReleasePath._record` writes, under the retry's own release id."""
        from worldlm_secure.ledger import release_entry

        assert prep.dp is not None
        held = self.path.held_to(self.me, prep.effective)  # the policy the charge was checked against
        entry = release_entry(
            release_id=release_id, round=world_round, level=self.ctx.world.nodes[self.me].kind, source=self.me,
            destination=destination, group=group, tensor_names=names, protocol=prep.plan.protocol,
            cohort_size=len(result.contributors), dropouts=len(result.dropped), dp_level=prep.level,
            mechanism=prep.dp.dp.mechanism.name, clipping_norm=prep.dp.dp.clipping_norm,
            policy_sha256=held.sha256, charge=charge, stream=f"{self.me}/{prep.level}",
            delta=float(held.differential_privacy.delta or 0.0), key_id="",
        )
        self.path.ledger(self.me).append(entry, policy_document=held.canonical_json())

    def _tracker(self, dp: Any) -> Any:
        """This node's one `NODE/user` stream (`ReleasePath.member_tracker`: the strictest budget on its paths)."""
        return self.path.member_tracker(self.me, dp)

    # ---- aggregator side ----
    def finish_average(self, total: np.ndarray, cohort: Sequence[str], final: str, names: Sequence[str],
                       shapes: Mapping[str, Any], *, derived: bool) -> dict[str, torch.Tensor]:
        """Noise (central Gaussian, when the members' policies ask for user-level DP) and decode the average."""
        codec = DeltaCodec(tuple(names), tuple(tuple(shapes[n]) for n in names))
        dp = None
        if not derived:
            plan = self.plan(cohort, final)
            dp = round_dp(self.path, sorted(cohort), final, codec.length, plan, self.planned_releases)
            if dp is not None and dp.noise is None:  # central; distributed shares are in the sum already
                total = dp.dp.mechanism.add_noise(total, dp.plan)
        # Under DP: divide by the public cohort size, never by the noisy weight sum (as the engine does).
        return decode(codec, total, len(cohort) if dp is not None else None)

    def member_noise(self, cohort: Sequence[str], final: str, names: Sequence[str], shapes: Mapping[str, Any]) -> Any:
        """The integer noise members add in this round (distributed DP), for the aggregator's round config."""
        codec = DeltaCodec(tuple(names), tuple(tuple(shapes[n]) for n in names))
        plan = self.plan(cohort, final)
        dp = round_dp(self.path, sorted(cohort), final, codec.length, plan, self.planned_releases)
        return dp.noise if dp is not None else None
