"""Issue 14, item 3: Skellam's RDP bound (Agarwal, Kairouz & Liu 2021, Thm 3.5) holds at integer orders
only, so the ledger's ε of a distributed-Skellam release must be at least the ε of the paper's bound
converted at integer orders (and not much more: the z_eff reduction is tight)."""

from __future__ import annotations

import numpy as np
import pytest
from opacus.accountants.analysis import rdp as rdp_analysis

from worldlm_secure.privacy import BudgetTracker, MechanismStep, NoisePlan, epsilon_of, make_mechanism
from worldlm_secure.privacy.accountant import RDP_ORDERS
from worldlm_secure.privacy.distributed import integer_sensitivity

DELTA = 1e-5


def paper_epsilon(plan: NoisePlan, contributors: int, releases: int) -> float:
    """Thm 3.5 at every integer order of RDP_ORDERS' range, composed over ``releases``, converted to (ε, δ)."""
    d2, d1 = integer_sensitivity(plan)
    mech = make_mechanism("distributed_skellam")
    big_m = contributors * mech.member_mu(plan)  # type: ignore[attr-defined]
    orders = np.arange(2, int(max(RDP_ORDERS)) + 1, dtype=float)
    rdp = orders * d2**2 / (4 * big_m) + ((2 * orders - 1) * d2**2 + 6 * d1) / (16 * big_m**2)
    eps, _ = rdp_analysis.get_privacy_spent(orders=list(orders), rdp=releases * rdp, delta=DELTA)
    return float(eps)


def test_every_rdp_order_is_an_integer() -> None:
    assert all(float(a).is_integer() and a >= 2 for a in RDP_ORDERS)


# small quantization scale (coarse integers) makes κ large, so the gap at fractional orders was visible
@pytest.mark.parametrize("z,step,dim,members,releases", [
    (1.0, 0.05, 64, 3, 8), (0.7, 0.02, 1000, 5, 40), (2.0, 0.1, 16, 10, 4), (1.2, 1e-3, 10_000, 4, 20),
])
def test_skellam_ledger_epsilon_is_the_papers_bound_at_integer_orders(z: float, step: float, dim: int, members: int,
                                                                       releases: int) -> None:
    plan = NoisePlan(1.0, z, members, dim, step)
    z_eff = make_mechanism("distributed_skellam").effective_noise_multiplier(plan, members)
    tracker = BudgetTracker(budget=1e6, delta=DELTA, stream="s")
    for _ in range(releases):
        charge = tracker.charge(z_eff, 1.0)
    paper = paper_epsilon(plan, members, releases)
    assert charge.epsilon_cumulative >= paper * (1 - 1e-9), "the ledger must never be below the paper's bound"
    assert charge.epsilon_cumulative <= paper * 1.002, "and the Gaussian reduction stays tight"
    assert epsilon_of([MechanismStep(z_eff, 1.0, releases)], DELTA) == pytest.approx(charge.epsilon_cumulative)
