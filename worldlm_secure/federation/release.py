"""The release path of `simulate`: every member of an aggregation round in this process (or its members
as Ray actors), every step of the one pipeline (`worldlm_secure.release`) run here, left to right:

  plan -> authorize (policy) -> clip + encode (user-level DP) -> budget check -> protect + sum (secure
  aggregation) -> noise (central Gaussian) -> charge the budget -> ledger entries + receipts -> release.

Every aggregation the engine does goes through `ReleasePath`; nothing sums member vectors on its own.
A release the budget cannot afford is refused before any member sends (`BudgetExceeded`).
Members that run elsewhere (Ray site actors) clip, encode and protect their own vectors: `average_remote`
keeps every other step here and takes the protocol's sum from them (`RemoteSum`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch

from worldlm_secure.aggregation.member import encode_update
from worldlm_secure.aggregation.weighted import DeltaCodec
from worldlm_secure.errors import PolicyError
from worldlm_secure.federation.world import World
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.ledger.receipts import exchange
from worldlm_secure.policy import LayerPatterns, RoundPlan
from worldlm_secure.privacy import Charge
from worldlm_secure.privacy.adaptive_clip import MemberClip
from worldlm_secure.release.dp import (
    ReleaseDP,
    adaptive_clip_extra,
    check_quantizer_range,
    decode,
    release_dp_extra,
    with_adaptive_clip,
)
from worldlm_secure.release.pipeline import Pipeline, ReleaseStats, round_user_dp
from worldlm_secure.secagg import IntegerNoise, MemberInput, SecureSum, SumResult, make_secure_sum
from worldlm_secure.secagg.protocol import IntegerNoiseSum

# The pipeline's names are also importable from here, where the engine, simulate and the tests found them.
__all__ = [
    "MemberUpdate", "ReleaseDP", "ReleasePath", "ReleaseStats", "RemoteSum", "adaptive_clip_extra", "decode",
    "release_dp_extra", "round_user_dp", "with_adaptive_clip",
]
_check_quantizer_range = check_quantizer_range  # its name before it moved to `release.dp`


@dataclass(frozen=True)
class MemberUpdate:
    """One member's contribution to a weighted average: deltas per tensor and one weight per tensor in (0, 1]."""

    deltas: Mapping[str, torch.Tensor]
    weights: np.ndarray


class ReleasePath(Pipeline):
    """Authorizes, protects, noises, accounts and records the releases of one simulated world: the
    `Pipeline`'s steps for every member at once, with the protocol's sum in between (see `Pipeline` for
    ``identities``, ``layer_override``, ``ledger_dir`` and ``planned_releases``)."""

    def __init__(self, world: World, identities: Mapping[str, NodeIdentity], *, layer_override: LayerPatterns | None = None,
                 ledger_dir: Path | None = None, planned_releases: int = 1) -> None:
        super().__init__(world, identities, layer_override=layer_override, ledger_dir=ledger_dir,
                         planned_releases=planned_releases)
        # One protocol instance per aggregating node: CKKS keys live for an epoch of rounds, not one call.
        self._protocols: dict[tuple[str, str], SecureSum] = {}

    # --- the entry points ------------------------------------------------------------------------
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

        def members_side(codec: DeltaCodec, plan: RoundPlan, clip: float | MemberClip | None) -> _SumStep:
            vectors = {member: encode_update(codec, upd.deltas, upd.weights, clip) for member, upd in updates.items()}
            return _in_process(round_id, plan, vectors)

        return self._average(round_id, group, destination, list(updates), names, shapes,
                             final_destination or destination, derived, members_side)

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

        def members_side(codec: DeltaCodec, plan: RoundPlan, clip: float | MemberClip | None) -> _SumStep:
            def run(secure: SecureSum, noise: IntegerNoise | None) -> SumResult:
                out = remote(round_id, secure, plan, noise, clip, codec.length)
                if isinstance(out, SumResult):
                    return out
                # the members sent their encoded vectors as such: protocol none, or CKKS (encrypted here)
                return _in_process(round_id, plan, out)(secure, noise)

            return run

        return self._average(round_id, group, destination, members, names, shapes, final_destination or destination,
                             False, members_side)

    def _average(self, round_id: int, group: str, destination: str, members: Sequence[str], names: Sequence[str],
                 shapes: Mapping[str, torch.Size], final: str, derived: bool,
                 members_side: Callable[[DeltaCodec, RoundPlan, float | MemberClip | None], _SumStep]) -> dict[str, torch.Tensor]:
        """plan -> the members' side (clip with the round's DP, encode; ``members_side``) -> `_release` -> the next
        adaptive clip -> the average (under DP: the noised sum over the public cohort size)."""
        codec = DeltaCodec(tuple(names), tuple(tuple(shapes[n]) for n in names))
        cohort = sorted(members)
        plan = self.plan(cohort, final)
        dp = None if derived else self.round_dp(cohort, final, codec.length, plan, charged=cohort,
                                                stream=(destination, group), words=len(names))
        run = members_side(codec, plan, dp.member_clip if dp is not None else None)
        result = self._release(round_id, group, destination, cohort, run, names, final, plan, dp, derived)
        self.adapt_clip((destination, group), dp, result.total, len(result.contributors))
        return decode(codec, result.total, len(cohort) if dp is not None else None,
                      dp.dp.clipping_norm if dp is not None else None)

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

    # --- the pipeline, every member in this process --------------------------------------------------
    def _release(
        self,
        round_id: int,
        group: str,
        destination: str,
        members: Sequence[str],
        run: "_SumStep",
        names: Sequence[str],
        final: str,
        plan: RoundPlan,
        dp: ReleaseDP | None,
        derived: bool,
    ) -> SumResult:
        """``run(secure, noise)``: the members' protect step and the protocol's sum (in process, or remote)."""
        members = sorted(members)
        levels = self.authorize(round_id, group, destination, members, names, final, plan, dp,
                                cohort=len(members), derived=derived)
        secure = self._protocol(destination, plan.protocol, plan, members)
        if dp is not None:  # refuse before anyone sends if even the worst case would exceed a budget
            self.check_budget(round_id, group, destination, names, final, plan, dp)
        start = time.perf_counter()
        result = run(secure, dp.noise if dp is not None else None)
        total = result.total
        charges: dict[str, Charge] = {}
        if dp is not None:
            bound = result.stats.extra.get("quantization_error_bound") if result.stats.extra else None
            dp, total = self.add_noise(dp, total, len(result.contributors), float(bound) if bound else None)
            charges = self.charge(round_id, group, destination, names, final, plan, dp, len(result.contributors),
                                  result.contributors, members)
        # Record level: DP-SGD steps are charged on the site's first release after them, 0 steps after that.
        record_charges = {
            m: self.record_streams[m].charge_release() for m in result.contributors if not derived and m in self.record_streams
        }
        self.stats.protect_seconds += time.perf_counter() - start
        for member in result.contributors:
            self.record_member(round_id, group, member, destination, names, plan, result,
                               self.effective(member, final), levels[member], dp, charges.get(member),
                               record_charges.get(member))
            if self.ledger_dir is not None:
                # The receiver countersigns the member's ledger head and both keep the receipt, so a
                # rolled-back or truncated ledger is caught by `ledger audit` (protocols/ledger.md).
                exchange(self.ledger(destination), self.ledger(member), release_id=f"{round_id}:{group}:{destination}",
                         round=round_id)
        self._count(plan.protocol, result)
        return SumResult(total, result.contributors, result.dropped, result.stats)

    def _protocol(self, destination: str, protocol: str, plan: RoundPlan, members: Sequence[str]) -> SecureSum:
        key = (destination, protocol)
        if key not in self._protocols:
            params = plan.params
            extra = {"clip_range": params.clip_range} if params is not None and hasattr(params, "clip_range") else {}
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

    # clip is a float, a MemberClip or None; Any until the Ray driver's `remote` (federation/ray_sites.py)
    # annotates it so (its ``float | None`` would not accept the protocol's wider parameter)
    def __call__(self, round_id: int, secure: SecureSum, plan: RoundPlan, noise: IntegerNoise | None,
                 clip: Any, dim: int, /) -> SumResult | Mapping[str, np.ndarray]: ...


_SumStep = Callable[[SecureSum, "IntegerNoise | None"], SumResult]


def _in_process(round_id: int, plan: RoundPlan, vectors: Mapping[str, np.ndarray]) -> _SumStep:
    """The protect + sum step when the members' vectors are in this process (the in-process engine)."""

    def run(secure: SecureSum, noise: IntegerNoise | None) -> SumResult:
        inputs = [MemberInput(m, vectors[m]) for m in sorted(vectors)]
        if noise is not None:
            # noise is only drawn for a round of a protocol that carries integer noise (`ReleaseDP.noise`)
            if not secure.carries_integer_noise:
                raise PolicyError(f"protocol {secure.name!r} cannot carry distributed noise")
            return cast(IntegerNoiseSum, secure).run_round(round_id, inputs, min_cohort=plan.min_cohort, noise=noise)
        return secure.run_round(round_id, inputs, min_cohort=plan.min_cohort)

    return run
