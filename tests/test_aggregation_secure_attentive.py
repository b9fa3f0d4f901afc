"""Secure attentive aggregation, on the engine's own path, equals plaintext FedAtt within the
documented quantization error, under masking (SecAgg+) and under CKKS, with dropouts.

The path: each member computes its own bounded weights (`client_weights`) and encodes
concat(w*delta, w/sqrt(L)) (`DeltaCodec`); the protocol sums; the aggregator divides (`decode_average`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from worldlm_secure.aggregation import AttentionConfig, DeltaCodec, client_weights, fedatt_update
from worldlm_secure.secagg import DropoutPlan, MemberInput, make_secure_sum
from worldlm_secure.secagg.ckks_params import CkksParams
from worldlm_secure.secagg.masking import MaskingParams

PARAMS = {"masking": MaskingParams(clip_range=1.0, bits=32, neighbours="auto", threshold=0.51), "ckks": CkksParams(clip_range=1.0)}


def _secure_vs_plain(protocol: str, n: int, sizes: list[int], tau: float, seed: int, drop: bool):
    g = torch.Generator().manual_seed(seed)  # test inputs only
    names = [f"t{i}" for i in range(len(sizes))]
    server = {k: torch.randn(s, generator=g) for k, s in zip(names, sizes)}
    clients = {f"s{i}": {k: server[k] + (torch.rand(s, generator=g) - 0.5) for k, s in zip(names, sizes)} for i in range(n)}
    cfg = AttentionConfig(step=1.0, temperature=tau, max_score=6.0)  # w >= exp(-6/tau): well above the error
    codec = DeltaCodec.for_tensors(server, names)
    inputs = [
        MemberInput(m, codec.encode({k: c[k] - server[k] for k in names}, client_weights(server, c, names, cfg)))
        for m, c in clients.items()
    ]
    dropped = frozenset({"s1"}) if drop and n >= 4 else frozenset()  # t > d/2: 3 members tolerate no dropout
    proto = make_secure_sum(protocol, params=PARAMS[protocol], clip_range=1.0)
    res = proto.run_round(0, inputs, min_cohort=1, dropouts=DropoutPlan(after_keys=dropped))
    avg = codec.decode_average(res.total)
    kept = [c for m, c in clients.items() if m not in dropped]
    plain = fedatt_update(server, kept, names, cfg)
    # Error bound per tensor: |A/B - a/b| <= (|A-a| + |a/b| |B-b|) / (B - |B-b|), where every summed
    # coordinate is off by at most e and the weight sum (scaled back by sqrt(L)) by e*sqrt(L);
    # plus float32 rounding of the result.
    e = float(res.stats.extra["quantization_error_bound"])
    L = len(names)
    weight_sums = res.total[-L:] * np.sqrt(L)
    for i, k in enumerate(names):
        mean = float(avg[k].abs().max())
        bound = (e + mean * e * np.sqrt(L)) / (weight_sums[i] - e * np.sqrt(L)) + 1e-6 * (1 + float(plain[k].abs().max()))
        assert float((server[k] + avg[k] - plain[k]).abs().max()) <= bound, (k, bound)
    return res, dropped


@settings(deadline=None, max_examples=25)
@given(
    n=st.integers(2, 6),
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    tau=st.floats(0.5, 5.0),
    seed=st.integers(0, 2**31 - 1),
    drop=st.booleans(),
)
def test_masking_secure_attentive_equals_plaintext_fedatt(n, sizes, tau, seed, drop) -> None:
    res, dropped = _secure_vs_plain("masking", n, sizes, tau, seed, drop)
    assert res.stats.protocol == "masking" and res.stats.clipped_fraction == 0.0
    assert set(res.dropped) == set(dropped)


@settings(deadline=None, max_examples=8)
@given(
    n=st.integers(2, 5),
    sizes=st.lists(st.integers(1, 3000), min_size=1, max_size=3),
    tau=st.floats(0.5, 5.0),
    seed=st.integers(0, 2**31 - 1),
    drop=st.booleans(),
)
def test_ckks_secure_attentive_equals_plaintext_fedatt(n, sizes, tau, seed, drop) -> None:
    res, _ = _secure_vs_plain("ckks", n, sizes, tau, seed, drop)
    assert res.stats.protocol == "ckks" and res.stats.extra["key_id"] and res.stats.clipped_fraction == 0.0


def test_a_range_too_narrow_for_the_weights_is_reported_not_hidden() -> None:
    server = {"w": torch.zeros(3)}
    clients = [{"w": torch.full((3,), 0.1)}, {"w": torch.full((3,), 0.2)}]
    codec = DeltaCodec.for_tensors(server, ["w"])
    cfg = AttentionConfig(max_score=1.0)
    inputs = [MemberInput(f"m{i}", codec.encode({"w": c["w"]}, client_weights(server, c, ["w"], cfg))) for i, c in enumerate(clients)]
    res = make_secure_sum("masking", params=MaskingParams(clip_range=0.5)).run_round(0, inputs, min_cohort=2)
    assert res.stats.clipped_fraction > 0  # weights near 1 exceed the 0.5 range: the caller must see it
