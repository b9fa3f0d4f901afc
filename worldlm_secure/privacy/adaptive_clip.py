"""Adaptive clipping for user-level DP (Andrew, Thakkar, McMahan & Ramaswamy, NeurIPS 2021, "Differentially
Private Learning with Adaptive Clipping"): the clip follows a target quantile of the members' update norms.

One round of one release stream (protocols/dp.md §2.7), with γ the target quantile, η the learning rate, z the
round's noise multiplier (what the accountant charges), σ_b the count's noise std:

    z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2)                    the vector's own noise multiplier (> z)
    member k:  b_k = 1[‖Δ_k‖ ≤ C_t]; sends concat(w ⊙ clip(Δ_k, C_t)) ++ (b_k − ½)·t·1_L,   t = C_t·z_Δ / (σ_b·√L)
    sum + N(0, (z·S)²) per word, S = √(C_t² + L·t²/4) = C_t·z_Δ/z (the joint sensitivity;
        central noise on a quantizing protocol: z·S_q, S_q = S + √d·e, protocols/dp.md §2.8)
    b̃ = (mean of the L count words) / (t·m) + ½    m = contributors (public)
    C_{t+1} = min(C_max, max(C_floor, C_t · exp(−η·(b̃ − γ))))   C_max = the policy's clipping_norm,
        C_floor = 10·√d·e (`privacy.quantization.clip_floor`; 0 without a quantizer or with distributed noise)

The count rides in the L weight words of the release (zero under plain user-level DP), so it is secure-summed
and noised with the update by the same mechanism, central or distributed, and the release *is* one Gaussian
mechanism of multiplier z on a vector of sensitivity S (S_q once quantized, which the central noise is sized
for): its privacy is at least what the accountant charges.
Seen separately, the vector carries noise std z_Δ·C_t (multiplier z_Δ) and the centered count noise std σ_b.

`AdaptiveClip` is the one implementation: the in-process engine, the Ray driver and (if ever) deployed
aggregators call `round_for` / `next_clip`; members call nothing here but `MemberClip` (through
`aggregation.member.encode_update`). Everything is pure; the state is the current clip per stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from worldlm_secure.errors import PolicyError

#: Unless σ_b is given, at most this share of a round's privacy (in z⁻²) goes to the count.
MAX_COUNT_SHARE = 0.1


@dataclass(frozen=True)
class AdaptiveClipConfig:
    """``aggregation.adaptive_clip`` of the world file (off when absent)."""

    target_quantile: float = 0.5  # γ
    learning_rate: float = 0.2  # η (geometric update)
    initial_clip: float | None = None  # C_0; None: the policy's clipping_norm (never above it)
    count_stddev: float | None = None  # σ_b; None: max(cohort/20, z / (2·√MAX_COUNT_SHARE))

    def __post_init__(self) -> None:
        if not 0.0 < self.target_quantile < 1.0:
            raise PolicyError(f"adaptive_clip.target_quantile: must be in (0, 1) (got {self.target_quantile})")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise PolicyError(f"adaptive_clip.learning_rate: must be > 0 (got {self.learning_rate})")
        if self.initial_clip is not None and not (self.initial_clip > 0 and math.isfinite(self.initial_clip)):
            raise PolicyError(f"adaptive_clip.initial_clip: must be > 0 (got {self.initial_clip})")
        if self.count_stddev is not None and not (self.count_stddev > 0 and math.isfinite(self.count_stddev)):
            raise PolicyError(f"adaptive_clip.count_stddev: must be > 0 (got {self.count_stddev})")


def vector_noise_multiplier(z: float, count_stddev: float) -> float:
    """z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2): the vector's noise multiplier so that vector + count together are the
    Gaussian mechanism of multiplier z (Andrew et al. 2021, Theorem 1). Needs 2σ_b > z."""
    rest = z ** -2 - (2.0 * count_stddev) ** -2
    if not rest > 0:
        raise PolicyError(
            f"adaptive_clip.count_stddev: σ_b={count_stddev:g} must exceed z/2={z / 2:g} (the count would take the "
            "round's whole privacy); raise it or leave it unset"
        )
    return rest ** -0.5


def combined_noise_multiplier(z_vector: float, count_stddev: float) -> float:
    """The inverse of `vector_noise_multiplier`: (z_Δ⁻² + (2σ_b)⁻²)^(−1/2), the z one round spends."""
    return (z_vector ** -2 + (2.0 * count_stddev) ** -2) ** -0.5


@dataclass(frozen=True)
class MemberClip:
    """What a member needs for one adaptive-clip round: the clip C_t and the count word scale t."""

    norm: float
    count_scale: float

    def count_words(self, update_norm: float, words: int) -> np.ndarray:
        """(b − ½)·t in each of ``words`` words, b = 1[‖Δ‖ ≤ C_t] (‖Δ‖ before clipping)."""
        b = 1.0 if update_norm <= self.norm else 0.0
        return np.full(words, (b - 0.5) * self.count_scale)


@dataclass(frozen=True)
class ClipRound:
    """One round of adaptive clipping on a stream: the clip, how the noise splits, the count encoding."""

    clip: float  # C_t, <= the policy's clipping_norm
    noise_multiplier: float  # z: charged
    vector_noise_multiplier: float  # z_Δ
    count_stddev: float  # σ_b
    words: int  # L: the weight words that carry the count
    max_clip: float  # C_max: the policy's clipping_norm (the clip never exceeds it)
    min_clip: float = 0.0  # the public floor (quantization.clip_floor: 10·√d·e under central noise), <= max_clip

    @property
    def count_scale(self) -> float:
        """t = C_t·z_Δ/(σ_b·√L): each word of the count carries (b − ½)·t."""
        return self.clip * self.vector_noise_multiplier / (self.count_stddev * math.sqrt(self.words))

    @property
    def sensitivity(self) -> float:
        """S = √(C_t² + L·t²/4) = C_t·z_Δ/z: one member's joint vector (update and count) in L2."""
        return math.sqrt(self.clip ** 2 + self.words * self.count_scale ** 2 / 4.0)

    @property
    def max_word(self) -> float:
        """The largest absolute value a member sends (for the quantizer's range)."""
        return max(self.clip, self.count_scale / 2.0)

    @property
    def member(self) -> MemberClip:
        return MemberClip(self.clip, self.count_scale)

    def noised_fraction(self, total: np.ndarray, contributors: int) -> float:
        """b̃: the noised fraction of contributors whose update was within the clip, from the released sum
        (its last L words). Post-processing of the release; may leave [0, 1] through the noise."""
        if contributors < 1:
            raise ValueError("noised_fraction needs at least one contributor")
        words = np.asarray(total, dtype=np.float64)[-self.words:]
        centered = float(np.mean(words)) / self.count_scale  # Σ(b − ½) + N(0, σ_b²)
        return centered / contributors + 0.5


class AdaptiveClip:
    """The clip state of every stream (e.g. ``(destination, group)``) and its update rule."""

    def __init__(self, config: AdaptiveClipConfig) -> None:
        self.config = config
        self.clips: dict[object, float] = {}

    def count_stddev(self, z: float, cohort: int) -> float:
        """σ_b: the configured one, else Andrew et al.'s cohort/20, floored so the count takes at most
        `MAX_COUNT_SHARE` of the round's privacy (σ_b ≥ z / (2·√share)). Public: from z and the cohort."""
        if self.config.count_stddev is not None:
            return float(self.config.count_stddev)
        return max(cohort / 20.0, z / (2.0 * math.sqrt(MAX_COUNT_SHARE)))

    def current(self, stream: object, max_clip: float) -> float:
        start = self.config.initial_clip if self.config.initial_clip is not None else max_clip
        return min(self.clips.get(stream, start), max_clip)

    def round_for(self, stream: object, *, max_clip: float, noise_multiplier: float, cohort: int,
                  words: int, min_clip: float = 0.0) -> ClipRound:
        """The round's clip (never above ``max_clip``, the policy's clipping_norm, never below ``min_clip``,
        the public quantizer floor `quantization.clip_floor`, itself capped at ``max_clip``) and noise split."""
        if words < 1:
            raise PolicyError("adaptive clipping needs at least one weight word to carry the count")
        if not (min_clip >= 0 and math.isfinite(min_clip)):
            raise PolicyError(f"adaptive clipping: the clip floor must be >= 0 (got {min_clip})")
        floor = min(float(min_clip), max_clip)
        sb = self.count_stddev(noise_multiplier, cohort)
        return ClipRound(max(self.current(stream, max_clip), floor), noise_multiplier,
                         vector_noise_multiplier(noise_multiplier, sb), sb, words, max_clip, floor)

    def update(self, stream: object, rnd: ClipRound, total: np.ndarray, contributors: int) -> float:
        """After the release: C ← min(C_max, C·exp(−η(b̃ − γ))) from the released sum; returns the new clip."""
        new = next_clip(rnd.clip, rnd.noised_fraction(total, contributors), self.config, rnd.max_clip, rnd.min_clip)
        self.clips[stream] = new
        return new


def next_clip(clip: float, noised_fraction: float, config: AdaptiveClipConfig, max_clip: float,
              min_clip: float = 0.0) -> float:
    """The geometric update C·exp(−η(b̃ − γ)), capped at ``max_clip`` (the policy's clipping_norm) and floored
    at ``min_clip`` (public: `quantization.clip_floor`, QUANTIZATION_FLOOR_FACTOR·√d·e under central noise on a
    quantizing protocol, so the quantizer's slack √d·e never exceeds 10% of the clip; 0 otherwise). The floor
    never lifts the clip above ``max_clip``."""
    new = clip * math.exp(-config.learning_rate * (noised_fraction - config.target_quantile))
    return float(min(max_clip, max(min_clip, new)))
