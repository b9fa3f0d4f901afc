"""Say when DP cannot learn, before training: the expected signal-to-noise of every planned DP release.

For one user-level release the members' clipped updates (L2 <= C each) are summed and Gaussian noise of
std z·Δ per coordinate is added (Δ = C, the sensitivity). Over d released values the noise has L2 norm
about z·C·√d, while the signal is at most n·C (n members whose updates all point the same way, each
at the clip). So

    SNR = n·C / (z·C·√d) = n / (z·√d)            (an upper bound: real updates are not aligned)

For record-level DP-SGD one step sums B clipped per-sample gradients (B the expected batch) and adds
z·C·√d of noise: SNR = B / (z·√d). Below `SNR_THRESHOLD` (1.0: the noise norm exceeds the largest signal
the release could carry) the release cannot learn whatever the code does; the warning names the fixes:
record-level DP (the batch, not the number of sites, carries the signal), more sites (n >= z·√d), or
fewer released values (adapters: d <= (n/z)²). Pure functions; protocols/dp.md §9.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

SNR_THRESHOLD = 1.0


@dataclass(frozen=True)
class Feasibility:
    """The expected signal-to-noise of one planned DP release and the warnings it raises."""

    release: str  # e.g. "key at eu" or "eu-a DP-SGD"
    level: str  # user | record
    contributors: int  # n members (user level) or expected batch B (record level)
    clipping_norm: float
    noise_multiplier: float
    dim: int
    snr: float
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, object]:
        return {
            "release": self.release, "level": self.level, "contributors": self.contributors,
            "clipping_norm": self.clipping_norm, "noise_multiplier": self.noise_multiplier, "dim": self.dim,
            "snr": self.snr, "warnings": list(self.warnings),
        }


def expected_snr(contributors: int, noise_multiplier: float, dim: int) -> float:
    """n / (z·√d): the largest signal norm n·C over the noise norm z·C·√d (C cancels)."""
    if contributors < 1 or dim < 1 or not noise_multiplier > 0:
        raise ValueError("expected_snr needs contributors >= 1, dim >= 1 and noise_multiplier > 0")
    return contributors / (noise_multiplier * math.sqrt(dim))


def feasibility(
    release: str, *, contributors: int, clipping_norm: float, noise_multiplier: float, dim: int,
    level: str = "user", threshold: float = SNR_THRESHOLD,
) -> Feasibility:
    """The expected SNR of one DP release from its plan, with warnings (naming the fixes) below ``threshold``."""
    snr = expected_snr(contributors, noise_multiplier, dim)
    warnings: list[str] = []
    if snr < threshold:
        need_n = math.ceil(threshold * noise_multiplier * math.sqrt(dim))
        max_d = int((contributors / (threshold * noise_multiplier)) ** 2)
        who = "members" if level == "user" else "records per expected batch"
        fixes = []
        if level == "user":
            fixes.append("use record-level DP (DP-SGD inside each site: the batch, not the site count, carries the signal)")
        fixes.append(f"more {who} (>= {need_n} for SNR {threshold:g})")
        fixes.append(f"fewer released parameters, e.g. LoRA adapters (<= {max_d} values at this noise)" if max_d >= 1
                     else "fewer released parameters (adapters) together with one of the above: at this noise "
                          "not even one value reaches the threshold")
        warnings.append(
            f"DP cannot learn: {release} ({level} level) has expected signal-to-noise {snr:.3g} < {threshold:g}: "
            f"noise norm z·C·√d = {noise_multiplier:.3g}·{clipping_norm:g}·√{dim} against at most "
            f"{contributors}·{clipping_norm:g} of signal. Fixes: " + "; ".join(fixes)
        )
    return Feasibility(release, level, contributors, float(clipping_norm), float(noise_multiplier), int(dim),
                       float(snr), tuple(warnings))
