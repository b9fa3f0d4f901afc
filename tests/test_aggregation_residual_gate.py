"""Why the residual-embedding gate stays closed (issue #17 item 4), in numbers: with the root's reference moved
to the federations' mean every round, residuals sum to zero, and the leave-one-out siblings' mean of a
zero-sum set is exactly -e_f/(F-1) for any F, so the cosine is -1 and the gate 0. The gate opens only on
what the federations have in common, e.g. residuals measured from a fixed anchor (the common initial key
layers). benchmarks/real_text_study.py measures the same on the real-text world."""

from __future__ import annotations

import numpy as np
import pytest

from worldlm_secure.aggregation import blend_from_sum


@pytest.mark.parametrize("feds", [2, 3, 5])
def test_a_reference_at_the_mean_drives_every_cosine_to_minus_one(feds: int) -> None:
    rng = np.random.default_rng(feds)
    keys = rng.normal(size=(feds, 400))
    reference = keys.mean(axis=0)  # Ref <- Ref + S/F, as the root does after every exchange
    residuals = keys - reference
    total = residuals.sum(axis=0)
    for f in range(feds):
        b = blend_from_sum(residuals[f], total, feds, gain=0.5)
        assert b.similarity == pytest.approx(-1.0, abs=1e-9) and b.gain == 0.0
        assert np.allclose(b.siblings_mean, -residuals[f] / (feds - 1))


def test_one_round_of_common_drift_opens_it_only_when_it_outweighs_the_divergence() -> None:
    rng = np.random.default_rng(0)
    dev = rng.normal(size=(3, 400))
    dev -= dev.mean(axis=0)
    drift = rng.normal(size=400)
    drift *= np.linalg.norm(dev, axis=1).mean() / np.linalg.norm(drift)
    gains = {}
    for scale in (0.25, 2.0):
        e = dev + scale * drift
        gains[scale] = [blend_from_sum(e[f], e.sum(axis=0), 3, 0.5).gain for f in range(3)]
    assert gains[0.25] == [0.0, 0.0, 0.0]  # accumulated divergence dominates: closed
    assert all(g > 0.2 for g in gains[2.0])  # a common direction dominates: open


def test_from_a_fixed_anchor_related_federations_open_the_gate_and_unrelated_ones_do_not() -> None:
    rng = np.random.default_rng(1)
    anchor = rng.normal(size=600)
    common = rng.normal(size=600)  # what every federation learns (e.g. byte statistics of text)
    related = [anchor + common + 0.5 * rng.normal(size=600) for _ in range(3)]
    unrelated = [anchor + rng.normal(size=600) for _ in range(3)]
    for keys, expect_open in ((related, True), (unrelated, False)):
        residuals = np.stack([k - anchor for k in keys])
        total = residuals.sum(axis=0)
        sims = [blend_from_sum(residuals[f], total, 3, 0.5).similarity for f in range(3)]
        assert all((s > 0.5) if expect_open else (abs(s) < 0.2) for s in sims), sims
