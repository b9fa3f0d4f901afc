"""Budgets are enforced before anything leaves: a stream of releases stops at its budget."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worldlm_secure.errors import BudgetExceeded, PolicyError
from worldlm_secure.privacy import BudgetTracker, MechanismStep, epsilon_of


def test_a_sequence_of_releases_stops_at_the_budget() -> None:
    t = BudgetTracker(budget=3.0, delta=1e-5, stream="site-a/user")
    accepted = 0
    with pytest.raises(BudgetExceeded) as info:
        for _ in range(1000):
            t.charge(4.0, 1.0)
            accepted += 1
    assert accepted >= 2
    assert t.spent <= 3.0
    assert t.spent == pytest.approx(epsilon_of(t.history, 1e-5), rel=1e-9)
    msg = str(info.value)
    assert "\n" not in msg
    for part in (f"spent ε={t.spent:.4g}", "requested ε=", "budget ε=3 at δ=1e-05", "site-a/user"):
        assert part in msg
    # The refused release recorded nothing: the next preview is the same as before the refusal.
    assert len(t.history) == accepted
    with pytest.raises(BudgetExceeded):
        t.charge(4.0, 1.0)
    assert len(t.history) == accepted


@settings(deadline=None, max_examples=25)
@given(
    budget=st.floats(0.5, 20.0),
    releases=st.lists(st.tuples(st.floats(0.5, 10.0), st.sampled_from([1.0, 0.1])), min_size=1, max_size=12),
)
def test_no_accepted_release_ever_exceeds_the_budget(budget: float, releases: list[tuple[float, float]]) -> None:
    t = BudgetTracker(budget=budget, delta=1e-5, stream="s")
    for z, q in releases:
        before = t.spent
        try:
            c = t.charge(z, q)
        except BudgetExceeded:
            assert t.spent == before  # refused before recording
            assert t.preview(z, q).epsilon_cumulative > budget
            continue
        assert c.epsilon_cumulative <= budget
        assert c.epsilon_cumulative >= before  # composition never decreases ε
        assert t.spent == c.epsilon_cumulative


def test_tracker_rebuilt_from_ledger_entries_remembers_what_was_spent() -> None:
    class E:  # the fields BudgetTracker.from_entries reads from LedgerEntry
        def __init__(self, stream: str, z: float, level: str = "user") -> None:
            self.stream, self.dp_level, self.noise_multiplier, self.sample_rate, self.steps = stream, level, z, 1.0, 1

    entries = [E("a", 2.0), E("b", 1.0), E("a", 2.5), E("a", 9.0, "none")]
    t = BudgetTracker.from_entries(entries, stream="a", budget=10.0, delta=1e-5)
    assert t.history == (MechanismStep(2.0, 1.0, 1), MechanismStep(2.5, 1.0, 1))
    assert t.spent == pytest.approx(epsilon_of(t.history, 1e-5))


def test_bad_budgets_are_policy_errors() -> None:
    for b in (0.0, -1.0, float("inf")):
        with pytest.raises(PolicyError, match="epsilon_budget"):
            BudgetTracker(budget=b, delta=1e-5)
