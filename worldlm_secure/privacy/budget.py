"""Per-stream privacy budgets: refuse a release before anything leaves if it would overspend.

A *stream* is a sequence of releases that compose (e.g. everything one node releases about
the same data at one DP level). The tracker holds the stream's history of mechanism steps
and charges a new release only when the cumulative ε at δ stays within the effective budget.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from worldlm_secure.errors import BudgetExceeded, PolicyError
from worldlm_secure.privacy.accountant import MechanismStep, epsilon_from_rdp, epsilon_of, rdp_curve


@dataclass(frozen=True)
class Charge:
    """One accepted (or previewed) release: ε of the release alone and cumulative ε, both at δ."""

    stream: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    accountant: str
    epsilon: float
    epsilon_cumulative: float
    epsilon_budget: float


class BudgetTracker:
    """Cumulative ε of one release stream against its budget (ε_budget at δ)."""

    def __init__(
        self,
        *,
        budget: float,
        delta: float,
        accountant: str = "rdp",
        stream: str = "default",
        history: Sequence[MechanismStep] = (),
    ) -> None:
        if not (budget > 0 and math.isfinite(budget)):
            raise PolicyError(f"differential_privacy.epsilon_budget: must be > 0 and finite (got {budget})")
        self.budget = float(budget)
        self.delta = float(delta)
        self.accountant = accountant
        self.stream = stream
        self._history: list[MechanismStep] = list(history)
        # RDP composes by adding curves: keep the running curve so a charge costs one step, not a replay.
        self._curve = rdp_curve(self._history) if accountant == "rdp" else None
        self._spent = self._epsilon(self._history, self._curve)

    def _epsilon(self, history: Sequence[MechanismStep], curve: list[float] | None) -> float:
        if curve is not None:
            return epsilon_from_rdp(curve, self.delta)
        return epsilon_of(history, self.delta, self.accountant)

    @classmethod
    def from_entries(
        cls, entries: Iterable[object], *, stream: str, budget: float, delta: float, accountant: str = "rdp"
    ) -> "BudgetTracker":
        """Rebuild a tracker from ledger entries (anything with stream, dp_level, noise_multiplier,
        sample_rate, steps), e.g. after a restart, so nothing already spent is forgotten."""
        hist = [
            MechanismStep(e.noise_multiplier, e.sample_rate, e.steps)  # type: ignore[attr-defined]
            for e in entries
            if e.stream == stream and e.dp_level != "none"  # type: ignore[attr-defined]
        ]
        return cls(budget=budget, delta=delta, accountant=accountant, stream=stream, history=hist)

    @property
    def spent(self) -> float:
        """Cumulative ε at δ spent so far on this stream."""
        return self._spent

    @property
    def history(self) -> tuple[MechanismStep, ...]:
        return tuple(self._history)

    def preview(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> Charge:
        """What a release would cost, without recording it."""
        c, _ = self._preview(noise_multiplier, sample_rate, steps)
        return c

    def _preview(self, noise_multiplier: float, sample_rate: float, steps: int) -> tuple[Charge, list[float] | None]:
        step = MechanismStep(float(noise_multiplier), float(sample_rate), int(steps))
        alone = epsilon_of([step], self.delta, self.accountant)
        curve = rdp_curve([step], self._curve) if self._curve is not None else None
        cumulative = self._epsilon([*self._history, step], curve)
        return Charge(
            self.stream, step.noise_multiplier, step.sample_rate, step.steps, self.delta,
            self.accountant, alone, cumulative, self.budget,
        ), curve

    def charge(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> Charge:
        """Record a release, or raise BudgetExceeded (recording nothing) if it would exceed the budget."""
        c, curve = self._preview(noise_multiplier, sample_rate, steps)
        if c.epsilon_cumulative > self.budget:
            raise BudgetExceeded(
                f"release refused on stream {self.stream!r}: spent ε={self._spent:.4g}, requested ε={c.epsilon:.4g} "
                f"(cumulative would be {c.epsilon_cumulative:.4g}), budget ε={self.budget:.4g} at δ={self.delta:g}; "
                "stop releasing on this stream, raise noise_multiplier, or raise the policy's epsilon_budget"
            )
        self._history.append(MechanismStep(c.noise_multiplier, c.sample_rate, c.steps))
        self._curve = curve
        self._spent = c.epsilon_cumulative
        return c
