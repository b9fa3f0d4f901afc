"""ε at δ for the subsampled Gaussian mechanism: a pure wrapper over Opacus accountants.

`rdp` is Opacus' RDPAccountant (Mironov et al. 2019, with the Balle et al. 2020 RDP→DP
conversion); `prv` is the PRVAccountant (Gopi et al. 2021) with ε error 1e-3 and its upper
bound reported. Everything here is a pure function of its arguments, so `ledger verify`
recomputes exactly what the node recorded.

For user-level DP in a federation round: sample_rate = cohort / population (1.0 when all
members participate), steps = number of releases on the stream. For record-level DP-SGD:
sample_rate = batch / records, steps = optimizer steps.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import get_noise_multiplier

from worldlm_secure.errors import PolicyError

ACCOUNTANTS = ("rdp", "prv")
PRV_EPS_ERROR = 1e-3  # absolute ε error of the PRV estimate; the upper bound is what we report
# Integer orders only. The RDP bounds of the distributed integer mechanisms (Skellam: Agarwal, Kairouz & Liu
# 2021, Thm 3.5; the discrete Gaussian's via CDP) are proven at integer α, and the ledger replays every stream
# at these same orders whatever its mechanism, so fractional orders (Opacus' default 1.1, 1.2, ...) would
# under-state a Skellam release's ε by 0.07-0.24%. For the Gaussian the integer subset costs < 0.3% of ε.
RDP_ORDERS: tuple[int, ...] = tuple(range(2, 65)) + (72, 80, 96, 128, 160, 192, 256)


@dataclass(frozen=True)
class MechanismStep:
    """`steps` compositions of the Poisson-subsampled Gaussian mechanism (noise_multiplier z, rate q)."""

    noise_multiplier: float
    sample_rate: float
    steps: int = 1


def _check(accountant: str, delta: float, history: Sequence[MechanismStep]) -> None:
    if accountant not in ACCOUNTANTS:
        raise PolicyError(f"differential_privacy.accountant: unknown accountant {accountant!r} (use rdp or prv)")
    if not 0 < delta < 1:
        raise PolicyError(f"differential_privacy.delta: must be in (0, 1) (got {delta})")
    for s in history:
        if not (s.noise_multiplier > 0 and math.isfinite(s.noise_multiplier)):
            raise PolicyError(f"noise_multiplier must be > 0 and finite for DP accounting (got {s.noise_multiplier})")
        if not 0 < s.sample_rate <= 1:
            raise PolicyError(f"sample_rate must be in (0, 1] (got {s.sample_rate})")
        if s.steps < 0:
            raise PolicyError(f"steps must be >= 0 (got {s.steps})")


def epsilon_of(history: Sequence[MechanismStep], delta: float, accountant: str = "rdp") -> float:
    """ε at δ of the composition of all steps in `history` (0.0 for an empty history)."""
    _check(accountant, delta, history)
    hist: list[tuple[float, float, int]] = []
    for s in history:  # merge consecutive identical mechanisms: same ε, much faster PRV/RDP
        if s.steps <= 0:
            continue
        if hist and hist[-1][:2] == (s.noise_multiplier, s.sample_rate):
            hist[-1] = (s.noise_multiplier, s.sample_rate, hist[-1][2] + s.steps)
        else:
            hist.append((s.noise_multiplier, s.sample_rate, s.steps))
    if not hist:
        return 0.0
    if accountant == "rdp":
        acc = RDPAccountant()
        acc.history = hist
        return float(acc.get_epsilon(delta=delta, alphas=list(RDP_ORDERS)))
    acc_p = PRVAccountant()
    acc_p.history = hist
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # log(1 - q) at q = 1 inside Opacus is harmless
        return float(acc_p.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR))


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp") -> float:
    """ε at δ after `steps` steps of one subsampled Gaussian mechanism."""
    return epsilon_of([MechanismStep(noise_multiplier, sample_rate, steps)], delta, accountant)


def rdp_curve(history: Sequence[MechanismStep], start: Sequence[float] | None = None) -> list[float]:
    """The RDP ε(α) at `RDP_ORDERS` of the composition, optionally added to a `start` curve
    (incremental accounting: one `compute_rdp` per new step instead of replaying the stream)."""
    _check("rdp", 0.5, history)
    total = list(start) if start is not None else [0.0] * len(RDP_ORDERS)
    for s in history:
        if s.steps:
            r = rdp_analysis.compute_rdp(
                q=s.sample_rate, noise_multiplier=s.noise_multiplier, steps=s.steps, orders=list(RDP_ORDERS)
            )
            total = [a + float(b) for a, b in zip(total, r)]
    return total


def epsilon_from_rdp(curve: Sequence[float], delta: float) -> float:
    """ε at δ of an RDP curve at `RDP_ORDERS` (Opacus' conversion, as RDPAccountant uses)."""
    _check("rdp", delta, [])
    if not any(curve):
        return 0.0
    eps, _ = rdp_analysis.get_privacy_spent(orders=list(RDP_ORDERS), rdp=np.asarray(curve), delta=delta)
    return float(eps)


def derive_noise_multiplier(
    budget: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp"
) -> float:
    """The smallest z (to 1% in ε) such that `steps` steps at `sample_rate` spend ≤ `budget` at δ.

    Raises PolicyError when no z ≤ 1e6 meets the budget (refuse to start training).
    """
    _check(accountant, delta, [MechanismStep(1.0, sample_rate, steps)])
    if not (budget > 0 and math.isfinite(budget)):
        raise PolicyError(f"differential_privacy.epsilon_budget: must be > 0 and finite (got {budget})")
    if steps < 1:
        raise PolicyError(f"planned releases must be >= 1 to derive a noise multiplier (got {steps})")
    logging.getLogger("opacus").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            # The search runs PRV at a coarser ε error (10× faster); the result is re-checked below.
            kwargs = {"eps_error": 1e-2} if accountant == "prv" else {}
            z = get_noise_multiplier(
                target_epsilon=budget,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
                epsilon_tolerance=budget * 0.01,
                **kwargs,
            )
    except ValueError:
        raise PolicyError(
            f"differential_privacy.epsilon_budget: ε={budget} at δ={delta} cannot be met over {steps} releases "
            f"at sample rate {sample_rate} (noise multiplier would exceed 1e6); raise the budget or plan fewer rounds"
        ) from None
    # Opacus' binary search returns a z whose ε is ≤ the target; re-check with the exact ε we record.
    for _ in range(50):
        if epsilon(z, sample_rate, steps, delta, accountant) <= budget:
            return float(z)
        z *= 1.01
    raise PolicyError(f"derived noise multiplier {z} does not meet ε={budget} at δ={delta}; report this bug")
