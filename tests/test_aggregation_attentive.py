"""Attentive aggregation: the FedAtt formula by hand, and the secure (sum-only) form equals it."""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from worldlm_secure.aggregation import AttentionConfig, DeltaCodec, client_weights, fedatt_update


def test_fedatt_matches_a_hand_computation() -> None:
    server = {"w": torch.tensor([0.0, 0.0])}
    clients = [{"w": torch.tensor([3.0, 4.0])}, {"w": torch.tensor([0.0, 1.0])}]
    # distances 5 and 1; softmax -> e^5/(e^5+e^1), e^1/(e^5+e^1); step 0.5
    a1 = math.exp(5) / (math.exp(5) + math.exp(1))
    a2 = 1 - a1
    expected = 0.5 * (a1 * torch.tensor([3.0, 4.0]) + a2 * torch.tensor([0.0, 1.0]))
    out = fedatt_update(server, clients, ["w"], AttentionConfig(step=0.5, temperature=1.0, max_score=10.0))
    assert torch.allclose(out["w"], expected, atol=1e-6)


def test_score_bound_caps_the_weight() -> None:
    cfg = AttentionConfig(temperature=2.0, max_score=3.0)
    w = client_weights({"w": torch.zeros(1)}, {"w": torch.tensor([100.0])}, ["w"], cfg)
    assert w[0] == 1.0  # capped at the public bound: the largest weight there is
    near = client_weights({"w": torch.zeros(1)}, {"w": torch.tensor([0.0])}, ["w"], cfg)
    assert near[0] == cfg.min_weight == math.exp(-1.5)


@settings(deadline=None, max_examples=40)
@given(
    n_clients=st.integers(1, 6),
    sizes=st.lists(st.integers(1, 7), min_size=1, max_size=4),
    temperature=st.floats(0.2, 5.0),
    step=st.floats(0.1, 1.5),
    seed=st.integers(0, 2**16),
)
def test_secure_form_equals_plaintext_fedatt(n_clients: int, sizes: list[int], temperature: float, step: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    names = [f"t{i}" for i in range(len(sizes))]
    server = {n: torch.randn(s, generator=g) for n, s in zip(names, sizes)}
    clients = [{n: server[n] + 0.5 * torch.randn(s, generator=g) for n, s in zip(names, sizes)} for _ in range(n_clients)]
    cfg = AttentionConfig(step=step, temperature=temperature, max_score=4.0)
    codec = DeltaCodec.for_tensors(server, names)
    # each client encodes only its own update; the aggregator sees only the sum
    total = sum(
        codec.encode({n: c[n] - server[n] for n in names}, client_weights(server, c, names, cfg)) for c in clients
    )
    avg = codec.decode_average(total)
    secure = {n: server[n] + step * avg[n] for n in names}
    plain = fedatt_update(server, clients, names, cfg)
    for n in names:
        assert torch.allclose(secure[n], plain[n], atol=1e-5)
