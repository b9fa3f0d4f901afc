"""User-level DP of one release: the round's settings and what they add to a ledger entry (protocols/dp.md §2).

Pure functions over public quantities (the plan, the protocol's parameters, the cohort size): the noise
plan's distributed shares and quantization step, the adaptive clip of the round, the quantizer range check,
the central noise's sensitivity after the sum, the fixed-denominator decode, and the entry's DP `extra`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
import torch

from worldlm_secure.aggregation.weighted import DeltaCodec
from worldlm_secure.errors import PolicyError
from worldlm_secure.policy import RoundPlan
from worldlm_secure.privacy import BudgetTracker, Charge, NoisePlan, UserLevelDP
from worldlm_secure.privacy.adaptive_clip import AdaptiveClip, ClipRound, MemberClip, combined_noise_multiplier
from worldlm_secure.privacy.distributed import DistributedIntegerMechanism, integer_noise
from worldlm_secure.secagg import IntegerNoise
from worldlm_secure.secagg.masking import round_quantization


@dataclass(frozen=True)
class ReleaseDP:
    """User-level DP of one round: the shared settings, the budget trackers of the members charged in this
    process (every member in `simulate`; the node itself on a deployed member; none at a deployed aggregator),
    the noise plan, the adaptive clip round (protocols/dp.md §2.7) and the members' distributed integer noise
    (``noise``; None under central noise)."""

    dp: UserLevelDP  # with adaptive clipping its clipping_norm is the round's clip C_t
    trackers: Mapping[str, BudgetTracker]
    plan: NoisePlan
    clip_round: ClipRound | None = None
    noise: IntegerNoise | None = None

    @property
    def member_clip(self) -> float | MemberClip:
        """What each member clips with: the norm, or the adaptive round's `MemberClip` (norm + count words)."""
        return self.clip_round.member if self.clip_round is not None else self.dp.clipping_norm


def with_adaptive_clip(adaptive: AdaptiveClip | None, stream: tuple[str, str] | None, dp: UserLevelDP, plan: NoisePlan,
                       cohort: int, words: int, min_clip: float = 0.0) -> tuple[UserLevelDP, NoisePlan, ClipRound | None]:
    """``(dp, plan, clip_round)`` of one adaptive-clip round (protocols/dp.md §2.7): the clip C_t (never above
    the policy's clipping_norm, never below ``min_clip``, the public quantizer floor of §2.8), the plan at the
    joint sensitivity C_t·z_Δ/z, so that the noise std is z_Δ·C_t on the update and σ_b on the count and the
    accountant's z is the round's whole cost. Unchanged when off."""
    if adaptive is None or stream is None:
        return dp, plan, None
    rnd = adaptive.round_for(stream, max_clip=dp.clipping_norm, noise_multiplier=dp.noise_multiplier,
                             cohort=cohort, words=words, min_clip=min_clip)
    return replace(dp, clipping_norm=rnd.clip), replace(plan, sensitivity=rnd.sensitivity), rnd


def with_member_noise(dp: ReleaseDP, plan: RoundPlan, roster: int) -> ReleaseDP:
    """Distributed noise: the round's integer noise shares, and the noise plan at the scale the masked round
    of ``roster`` invited members will use (`secagg.masking.round_quantization`, the one the protocol uses).
    Only masking carries integer noise (`policy.plan_round` pairs distributed mechanisms with nothing else)."""
    mechanism = dp.dp.mechanism
    if plan.protocol != "masking" or not isinstance(mechanism, DistributedIntegerMechanism):
        raise PolicyError(f"{mechanism.name}: protocol {plan.protocol!r} cannot carry distributed noise; use masking")
    noise = integer_noise(mechanism, dp.plan, roster)
    scale = round_quantization(plan.params, roster, noise).scale
    return replace(dp, plan=replace(dp.plan, quant_step=1.0 / scale), noise=noise)


def check_quantizer_range(plan: RoundPlan, dp: ReleaseDP) -> None:
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


def checked_slack(dp: ReleaseDP, total: np.ndarray, error_bound: float | None, contributors: int) -> ReleaseDP:
    """After the sum, before the noise: never size the noise below what the protocol itself reports. Its
    ``error_bound`` (``quantization_error_bound``: per coordinate, for all contributors) over the contributors
    is the per-value error e of one member, and the released vector has ``total.size`` values (public).
    Normally a no-op: the plan's e (`round_user_dp`) is at least the reported one."""
    dim = max(int(dp.plan.dim), int(np.asarray(total).size))
    error = max(dp.plan.rounding_error, float(error_bound) / contributors if error_bound and contributors else 0.0)
    if error <= 0.0 or (error == dp.plan.rounding_error and dim == dp.plan.dim):
        return dp
    return replace(dp, plan=replace(dp.plan, rounding_error=error, dim=dim))


def decode(codec: DeltaCodec, total: np.ndarray, public_count: int | None,
           bound: float | None = None) -> dict[str, torch.Tensor]:
    """The average delta per tensor from a released sum. Under user-level DP (``public_count``: the round's
    invited cohort, public before it starts) the noised sum of weighted, clipped deltas is divided by that
    count, never by the (noisy, data-dependent) weight sum: the fixed-denominator DP-FedAvg estimator.

    ``bound`` (under DP: the round's clip C): the average is projected onto the L2 ball of radius C over all
    its tensors. Every member's weighted, clipped delta has norm <= C and absent members add zero, so the true
    average lies in that ball; projecting onto a convex set that holds the true value never moves the estimate
    away from it (post-processing, no privacy cost). It keeps a noise norm of z·C·√d/n >> C (few members, many
    values) from throwing the model away in one step (protocols/dp.md §2.9)."""
    if public_count is None:
        return codec.decode_average(total)
    mean = codec.decode_mean(total, public_count)
    if bound is None:
        return mean
    norm = float(np.sqrt(sum(float((t.double() ** 2).sum()) for t in mean.values())))
    if norm <= bound:
        return mean
    scale = bound / norm
    return {name: (t.double() * scale).to(t.dtype) for name, t in mean.items()}


def adaptive_clip_extra(rnd: ClipRound, noise_multiplier: float | None = None) -> dict[str, float]:
    """The ledger entry's record of an adaptive-clip round (`clipping_norm` is the clip used, C_t): how the
    entry's noise_multiplier splits between the update (z_Δ) and the count (σ_b), the cap and the floor.

    ``noise_multiplier``: the entry's (z_eff of what was released; None: the planned z). Distributed noise with
    dropouts releases z_eff ≠ z, and the whole vector's noise scales by z_eff/z, so both parts do: the split
    is recorded at z_eff, and combined_noise_multiplier(vector_z, count_stddev) == the entry's noise_multiplier."""
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


def release_dp_extra(dp: ReleaseDP | None, charge: Charge | None) -> dict[str, float | int] | None:
    """A user-level entry's `extra`: the adaptive clip's split (at the entry's z_eff), and under central noise on
    a quantizing protocol what the noise was sized for (protocols/dp.md §2.8): ``quantization_slack`` √d·e,
    ``noise_sensitivity`` S_q = S + √d·e (the noise std on the sum is noise_multiplier × noise_sensitivity) and
    ``released_dim`` d (values in the released vector, weight words included).
    None when there is nothing to add (no DP, protocol none without adaptive clipping: as before)."""
    if dp is None:
        return None
    out: dict[str, float | int] = {}
    if dp.clip_round is not None:
        out.update(adaptive_clip_extra(dp.clip_round, charge.noise_multiplier if charge is not None else None))
    if not dp.dp.mechanism.distributed and dp.plan.rounding_error > 0.0:
        out["quantization_slack"] = float(dp.plan.quantization_slack)
        out["noise_sensitivity"] = float(dp.plan.quantized_sensitivity)
        # d, so an auditor checks the slack at √d·e for the length actually released, not a lower bound
        out["released_dim"] = int(dp.plan.dim)
    return out or None
