"""Secure attentive aggregation under CKKS equals plaintext FedAtt within the documented error."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from worldlm_secure.secagg import DropoutPlan, make_secure_sum
from worldlm_secure.secagg.attentive import secure_attentive_average
from worldlm_secure.secagg.ckks_params import CkksParams


def _plaintext_fedatt(server, members, scores, tau, lo, hi, layers):
    """Per layer: softmax over clipped scores / tau, then the attention-weighted average of the members."""
    out = np.empty_like(server)
    start = 0
    for i, size in enumerate(layers):
        sl = slice(start, start + size)
        s = np.array([min(max(scores[m][i], lo), hi) for m in members]) / tau
        alpha = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
        out[sl] = sum(a * members[m][sl] for a, m in zip(alpha, members))
        start += size
    return out


@settings(deadline=None, max_examples=10)
@given(
    n=st.integers(2, 6),
    layers=st.lists(st.integers(1, 3000), min_size=1, max_size=3),
    tau=st.floats(1.0, 5.0),
    seed=st.integers(0, 2**32 - 1),
    drop=st.booleans(),
)
def test_ckks_attentive_equals_plaintext_fedatt(n, layers, tau, seed, drop):
    rng = np.random.default_rng(seed)  # test inputs only
    d = sum(layers)
    edges = np.cumsum([0, *layers])
    server = rng.normal(0, 1, d)
    members = {f"s{i}": server + rng.uniform(-0.5, 0.5, d) for i in range(n)}
    lo, hi = 0.0, 6.0  # w >= exp(-6): well above the quantization error
    scores = {m: [float(np.linalg.norm(v[a:b] - server[a:b])) for a, b in zip(edges[:-1], edges[1:])] for m, v in members.items()}
    dropped = frozenset({"s1"}) if drop and n >= 3 else frozenset()
    proto = make_secure_sum("ckks", params=CkksParams(clip_range=1.0))
    res = secure_attentive_average(
        proto, server, members, scores, tau, score_range=(lo, hi), round_id=0, min_cohort=1,
        layer_sizes=layers, dropouts=DropoutPlan(after_keys=dropped),
    )
    kept = {m: v for m, v in members.items() if m not in dropped}
    expected = _plaintext_fedatt(server, kept, scores, tau, lo, hi, layers)
    stats = res.sum_result.stats
    assert res.sum_result.contributors == tuple(kept)
    assert stats.protocol == "ckks" and stats.extra["key_id"]
    assert stats.clipped_fraction == 0.0  # w <= 1 and |w * delta| <= 0.5 lie inside clip_range 1
    assert 0 < res.error_bound < 1e-3
    assert np.all(np.abs(res.average - expected) <= res.error_bound)
