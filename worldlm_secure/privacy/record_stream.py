"""One site's record-level (DP-SGD) budget stream `SITE/record`: preview before training, charge at release.

DP-SGD spends ε per optimizer step, not per release, so the stream is charged with the steps a site
took since its last charge, on the first release after them (`charge_release`); later releases of
the same trained model charge `steps=0` (ε 0: they are post-processing of the same DP-SGD output),
so every release entry still shows the cumulative ε its model cost. Before a round trains,
`check_round` refuses (BudgetExceeded) if the round's steps, plus any not yet charged, would exceed
the budget — nothing of that round is then trained or released.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from worldlm_secure.errors import BudgetExceeded
from worldlm_secure.privacy.budget import BudgetTracker, Charge


@dataclass(frozen=True)
class RecordDPParams:
    """One site's DP-SGD parameters for the whole run (fixed before it trains)."""

    noise_multiplier: float  # z: noise std / max_grad_norm
    max_grad_norm: float  # C: per-sample L2 clip (gradient units)
    sample_rate: float  # q: expected batch / training records (Poisson sampling)
    expected_batch: int  # q·N, the denominator of the noisy mean gradient
    delta: float
    budget: float  # ε budget of the stream at delta
    accountant: str  # rdp | prv


class RecordStream:
    """The `SITE/record` stream: a BudgetTracker rebuilt from the site's ledger plus uncharged steps."""

    def __init__(self, site: str, params: RecordDPParams, entries: Iterable[object] = ()) -> None:
        self.site = site
        self.params = params
        self.stream = f"{site}/record"
        self.tracker = BudgetTracker.from_entries(
            entries, stream=self.stream, budget=params.budget, delta=params.delta, accountant=params.accountant
        )
        self._uncharged = 0  # optimizer steps taken but not yet charged to a release

    @property
    def uncharged_steps(self) -> int:
        return self._uncharged

    def check_round(self, steps: int) -> Charge:
        """Refuse (BudgetExceeded, records nothing) if ``steps`` more DP-SGD steps would exceed the budget."""
        p = self.params
        c = self.tracker.preview(p.noise_multiplier, p.sample_rate, self._uncharged + steps)
        if c.epsilon_cumulative > self.tracker.budget:
            raise BudgetExceeded(
                f"training refused on stream {self.stream!r}: spent ε={self.tracker.spent:.4g}, the next "
                f"{self._uncharged + steps} DP-SGD steps would bring it to ε={c.epsilon_cumulative:.4g}, budget "
                f"ε={self.tracker.budget:.4g} at δ={self.tracker.delta:g}; stop training on this site, raise "
                "differential_privacy.record.noise_multiplier or the record epsilon_budget"
            )
        return c

    def add_steps(self, steps: int) -> None:
        """Steps a DP-SGD round actually took (charged on the next release)."""
        self._uncharged += int(steps)

    def charge_release(self) -> Charge:
        """Charge the steps taken since the last charge (0 for a further release of the same model)."""
        p = self.params
        c = self.tracker.charge(p.noise_multiplier, p.sample_rate, self._uncharged)
        self._uncharged = 0
        return c
