"""User-level DP for one release stream, configured from the effective policy: what the engine calls.

Flow for one release of one parameter group (see protocols/dp.md §2–5):

    dp = UserLevelDP.from_policy(eff.differential_privacy, planned_releases=R, sample_rate=q,
                                 max_dropout_fraction=eff.secure_aggregation.max_dropout_fraction)
    tracker = dp.tracker(stream, ledger_entries)                  # restart-safe
    plan = dp.plan(expected_members=n, dim=d, quant_step=γ, w_max=None)
    dp.check_before_round(tracker, plan, min_contributors)        # refuse before members send
    member k: v_k = clip_l2(Δ_k, dp.clipping_norm).vector         (attentive: concat(w·v_k, [w]))
              distributed: q_k += dp.mechanism.sample_member_noise(d, plan)  (integer domain)
    aggregator: central: total = dp.mechanism.add_noise(result.total, plan)
    charge = dp.charge(tracker, plan, contributors=len(result.contributors))   # BEFORE release
    ledger.append(release_entry(..., charge=charge), policy_document=eff.canonical_json())
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from worldlm_secure.errors import BudgetExceeded, PolicyError
from worldlm_secure.privacy.accountant import derive_noise_multiplier
from worldlm_secure.privacy.budget import BudgetTracker, Charge
from worldlm_secure.privacy.clipping import attentive_sensitivity
from worldlm_secure.privacy.mechanisms import NoiseMechanism, NoisePlan, make_mechanism


@dataclass(frozen=True)
class UserLevelDP:
    """The effective user-level DP settings of one stream (z already derived when policy says auto)."""

    mechanism: NoiseMechanism
    clipping_norm: float
    noise_multiplier: float  # the planned z for a full cohort
    delta: float
    budget: float
    accountant: str
    sample_rate: float
    planned_members_fraction: float  # 1 - max_dropout_fraction: distributed shares are sized for this
    # e: the round protocol's per-value rounding error (central noise only; privacy.quantization.rounding_error,
    # set by federation.release.round_user_dp). Every plan carries it, so central noise is sized at S + √d·e.
    rounding_error: float = 0.0

    @classmethod
    def from_policy(
        cls,
        dp: object,
        *,
        planned_releases: int,
        sample_rate: float = 1.0,
        max_dropout_fraction: float = 0.0,
        mechanism: str | None = None,
    ) -> "UserLevelDP":
        """From the policy's `differential_privacy` section (duck-typed: level, mechanism, epsilon_budget,
        delta, clipping_norm, noise_multiplier, accountant). `planned_releases` = releases planned on
        the stream (rounds × groups); used when noise_multiplier is "auto". `mechanism` overrides the
        policy's first preference (e.g. when the chosen protocol cannot carry distributed noise)."""
        if getattr(dp, "level", None) != "user":
            raise PolicyError(f"differential_privacy.level: user-level DP requested but the policy says {getattr(dp, 'level', None)!r}")
        names = getattr(dp, "mechanism")
        name = mechanism or (names if isinstance(names, str) else names[0])
        budget, delta = getattr(dp, "epsilon_budget"), getattr(dp, "delta")
        if budget is None or delta is None:
            raise PolicyError("differential_privacy: epsilon_budget and delta are required for user-level DP")
        accountant = str(getattr(dp, "accountant", "rdp"))
        z = getattr(dp, "noise_multiplier")
        if z == "auto":
            z = derive_noise_multiplier(float(budget), float(delta), sample_rate, planned_releases, accountant)
        if not 0.0 <= max_dropout_fraction < 1.0:
            raise PolicyError(f"secure_aggregation.max_dropout_fraction: must be in [0, 1) (got {max_dropout_fraction})")
        return cls(
            make_mechanism(name), float(getattr(dp, "clipping_norm")), float(z), float(delta), float(budget),
            accountant, float(sample_rate), 1.0 - max_dropout_fraction,
        )

    def tracker(self, stream: str, entries: Iterable[object] = ()) -> BudgetTracker:
        """The stream's budget tracker, rebuilt from the node's ledger entries (pass `ledger.entries()`)."""
        return BudgetTracker.from_entries(
            entries, stream=stream, budget=self.budget, delta=self.delta, accountant=self.accountant
        )

    def plan(
        self, *, expected_members: int, dim: int, quant_step: float | None = None, w_max: float | None = None
    ) -> NoisePlan:
        """The noise plan of one release. w_max: the public attention-weight bound for secure attentive
        aggregation (the vector is concat(w·Δ, [w])); None for plain sums. Distributed shares are sized
        for ceil(n · (1 − max_dropout_fraction)) members, so z_eff ≥ z whenever the round succeeds."""
        sens = self.clipping_norm if w_max is None else attentive_sensitivity(self.clipping_norm, w_max)
        n = expected_members
        if self.mechanism.distributed:
            n = max(1, math.ceil(expected_members * self.planned_members_fraction - 1e-9))
            return NoisePlan(sens, self.noise_multiplier, n, dim, quant_step)
        return NoisePlan(sens, self.noise_multiplier, n, dim, quant_step, self.rounding_error)

    def effective_noise_multiplier(self, plan: NoisePlan, contributors: int) -> float:
        return self.mechanism.effective_noise_multiplier(plan, contributors)

    def check_before_round(self, tracker: BudgetTracker, plan: NoisePlan, min_contributors: int) -> Charge:
        """Refuse the round (BudgetExceeded) before any member sends if even the worst case the round
        can release (min_contributors survive) would exceed the budget. Records nothing."""
        c = tracker.preview(self.effective_noise_multiplier(plan, min_contributors), self.sample_rate)
        if c.epsilon_cumulative > tracker.budget:
            raise BudgetExceeded(
                f"round refused before sending on stream {tracker.stream!r}: spent ε={tracker.spent:.4g}, "
                f"requested ε={c.epsilon:.4g} (cumulative would be {c.epsilon_cumulative:.4g}), budget "
                f"ε={tracker.budget:.4g} at δ={tracker.delta:g}; stop releasing on this stream or raise the budget"
            )
        return c

    def charge(self, tracker: BudgetTracker, plan: NoisePlan, contributors: int) -> Charge:
        """Charge the release actually made (z_eff for the real contributors); raises BudgetExceeded."""
        return tracker.charge(self.effective_noise_multiplier(plan, contributors), self.sample_rate)
