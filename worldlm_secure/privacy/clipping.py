"""L2 clipping of one member's contribution, and the sensitivity it buys.

User-level DP (DP-FedAvg) clips each member's update for one parameter group to
L2 norm `clipping_norm` (in parameter units), so adding or removing one member
moves the sum by at most that much. Secure attentive aggregation submits
`concat(w·δ, [w])` with a public weight bound w ≤ w_max; its sensitivity is
derived in `attentive_sensitivity` and in protocols/dp.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ClipResult:
    """The clipped vector (float64), its L2 norm BEFORE clipping, and whether it was scaled down."""

    vector: np.ndarray
    norm: float
    clipped: bool


def clip_l2(vec: np.ndarray, max_norm: float) -> ClipResult:
    """Scale `vec` down to L2 norm ≤ `max_norm` (never up). Non-finite input is refused."""
    if not (max_norm > 0 and math.isfinite(max_norm)):
        raise ValueError(f"clipping_norm must be a positive finite number (got {max_norm})")
    v = np.asarray(vec, dtype=np.float64).ravel()
    if not np.all(np.isfinite(v)):
        raise ValueError("cannot clip a vector with NaN or infinite entries")
    norm = float(np.linalg.norm(v))
    if norm <= max_norm:
        return ClipResult(v.copy(), norm, False)
    # The factor is slightly below max_norm/norm so rounding can never leave the result above the bound.
    factor = (max_norm / norm) * (1.0 - 2.0**-40)
    return ClipResult(v * factor, norm, True)


def attentive_sensitivity(clipping_norm: float, w_max: float) -> float:
    """L2 sensitivity of one member's `concat(w·δ, [w])` with ‖δ‖ ≤ clipping_norm and 0 < w ≤ w_max.

    ‖(w·δ, w)‖₂ = w·sqrt(‖δ‖² + 1) ≤ w_max·sqrt(C² + 1). Add/remove-one neighbours change the
    sums Σw·δ and Σw jointly by at most this much; the division afterwards is post-processing.
    """
    if not (clipping_norm > 0 and w_max > 0):
        raise ValueError("attentive_sensitivity needs clipping_norm > 0 and w_max > 0")
    return w_max * math.sqrt(clipping_norm * clipping_norm + 1.0)
