"""Secure attentive aggregation equals plaintext FedAtt attention within the documented quantization error."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worldlm_secure.errors import SecAggError
from worldlm_secure.secagg import DropoutPlan, make_secure_sum
from worldlm_secure.secagg.attentive import attention_weight, secure_attentive_average
from worldlm_secure.secagg.masking import MaskingParams


def _plaintext_attentive(server, members, scores, tau, lo, hi, layers):
    """FedAtt per layer: softmax over clipped scores / tau, then the weighted average of the members."""
    out = np.empty_like(server)
    start = 0
    for i, size in enumerate(layers):
        sl = slice(start, start + size)
        s = np.array([min(max(scores[m][i], lo), hi) for m in members]) / tau
        alpha = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
        out[sl] = sum(a * members[m][sl] for a, m in zip(alpha, members))
        start += size
    return out


@settings(deadline=None, max_examples=25)
@given(
    n=st.integers(2, 7),
    layers=st.lists(st.integers(1, 30), min_size=1, max_size=3),
    tau=st.floats(0.2, 5.0),
    bits=st.sampled_from([24, 32]),
    seed=st.integers(0, 2**32 - 1),
    drop=st.booleans(),
)
def test_secure_attentive_equals_plaintext(n: int, layers: list[int], tau: float, bits: int, seed: int, drop: bool) -> None:
    rng = np.random.default_rng(seed)  # test inputs only
    d = sum(layers)
    server = rng.normal(0, 1, d)
    members = {f"s{i}": server + rng.uniform(-0.5, 0.5, d) for i in range(n)}
    lo, hi = 0.0, 3.0
    # FedAtt's score: per-layer distance between server and member parameters (sometimes out of range).
    scores = {m: [float(np.linalg.norm(v[sum(layers[:i]) : sum(layers[: i + 1])] - server[sum(layers[:i]) : sum(layers[: i + 1])])) for i in range(len(layers))] for m, v in members.items()}
    dropped = frozenset({"s0"}) if drop and n >= 3 else frozenset()
    proto = make_secure_sum("masking", params=MaskingParams(clip_range=1.0, bits=bits, neighbours="auto", threshold=0.5))
    res = secure_attentive_average(
        proto, server, members, scores, tau, score_range=(lo, hi), round_id=3, min_cohort=1,
        layer_sizes=layers, dropouts=DropoutPlan(after_keys=dropped),
    )
    kept = {m: v for m, v in members.items() if m not in dropped}
    expected = _plaintext_attentive(server, kept, scores, tau, lo, hi, layers)
    assert res.sum_result.contributors == tuple(kept)
    assert res.clipped_fraction == 0.0  # clip_range 1 covers w <= 1 and |w * delta| <= 0.5
    assert res.error_bound > 0
    assert np.all(np.abs(res.average - expected) <= res.error_bound)


def test_error_bound_is_tight_enough_to_matter() -> None:
    # With 16 bits the quantization error is visible, and still within the bound.
    rng = np.random.default_rng(7)
    server = np.zeros(200)
    members = {f"s{i}": rng.uniform(-0.9, 0.9, 200) for i in range(5)}
    scores = {m: 1.0 + i for i, m in enumerate(members)}
    proto = make_secure_sum("masking", params=MaskingParams(clip_range=1.0, bits=16))
    res = secure_attentive_average(proto, server, members, scores, 1.0, score_range=(0.0, 5.0), round_id=1, min_cohort=5)
    expected = _plaintext_attentive(server, members, {m: [s] for m, s in scores.items()}, 1.0, 0.0, 5.0, [200])
    err = np.max(np.abs(res.average - expected))
    assert 0 < err <= res.error_bound < 0.05


def test_weights_are_bounded_and_parameters_checked() -> None:
    assert attention_weight(10.0, 1.0, (0.0, 2.0)) == 1.0
    assert attention_weight(-3.0, 2.0, (0.0, 2.0)) == pytest.approx(np.exp(-1.0))
    with pytest.raises(SecAggError, match="tau > 0"):
        attention_weight(1.0, 0.0, (0.0, 1.0))
    proto = make_secure_sum("masking", params=MaskingParams(clip_range=1.0))
    with pytest.raises(SecAggError, match="layer sizes"):
        secure_attentive_average(proto, np.zeros(4), {"a": np.zeros(4)}, {"a": 1.0}, 1.0, score_range=(0, 1), round_id=0, min_cohort=1, layer_sizes=[3])


def test_clipped_weights_are_reported() -> None:
    proto = make_secure_sum("masking", params=MaskingParams(clip_range=0.5))
    res = secure_attentive_average(
        proto, np.zeros(3), {"a": np.full(3, 0.1), "b": np.full(3, 0.2)}, {"a": 1.0, "b": 1.0}, 1.0,
        score_range=(0.0, 1.0), round_id=0, min_cohort=2,
    )
    assert res.clipped_fraction > 0  # both weights (= 1) exceed the 0.5 range: the caller must see it
