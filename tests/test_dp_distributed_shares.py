"""Distributed noise shares are sized for the fewest contributors a round can release with: min_cohort.

A round releases nothing with fewer than min_cohort contributors (every backend refuses it), so shares that
together reach the planned z at min_cohort keep z_eff >= z in every released round (the privacy floor), and
with all members present add only sqrt(n / min_cohort) of extra noise. The masking policy's
max_dropout_fraction is a robustness setting (how many may drop before the protocol cannot unmask), not a
floor on contributors: sizing shares for ceil(n (1 - f)) when min_cohort is larger adds noise no released
round needs. examples/world-100-sites-skellam.yaml states the intended sizing (45 of 50); before this test
the research-open base's f = 0.49 sized them for 26 (z_eff 5.63 instead of about 4.3 at epsilon 8).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from worldlm_secure.federation.release import ReleasePath
from worldlm_secure.federation.world import load_world
from worldlm_secure.release import round_user_dp

WORLD = Path(__file__).resolve().parents[1] / "examples" / "world-100-sites-skellam.yaml"


def test_skellam_shares_are_sized_for_min_cohort_and_every_releasable_round_keeps_the_planned_z(tmp_path: Path) -> None:
    world = load_world(WORLD)
    path = ReleasePath(world, {}, planned_releases=40)
    fed = "fed-a"
    members = sorted(n for n, node in world.nodes.items() if node.parent == fed)
    assert len(members) == 50
    final = world.root.name
    plan = path.plan(members, final)
    assert plan.dp_mechanism == "distributed_skellam" and plan.min_cohort == 45
    assert plan.max_dropout_fraction == pytest.approx(0.49)  # the masking tolerance, inherited from research-open
    dp = round_user_dp(path, members, final, plan)
    assert dp is not None
    noise = dp.plan(expected_members=len(members), dim=776, quant_step=2.0**-20)
    assert noise.expected_members == 45  # not ceil(50 * 0.51) = 26
    z = dp.noise_multiplier
    # the privacy floor: the fewest contributors a round can release with still reach the planned z
    assert dp.effective_noise_multiplier(noise, 45) >= z * (1 - 1e-9)
    # and the full cohort carries only sqrt(50/45) of z, as the world file says
    assert dp.effective_noise_multiplier(noise, 50) == pytest.approx(z * math.sqrt(50 / 45), rel=1e-3)
