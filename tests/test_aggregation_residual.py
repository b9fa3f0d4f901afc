"""Residual layer embeddings: the similarity gate shares between similar federations and not otherwise."""

from __future__ import annotations

import numpy as np
import torch

from worldlm_secure.aggregation import blend_from_sum, embed, mix_in


def test_similar_federations_share_and_dissimilar_ones_do_not() -> None:
    base = np.array([1.0, 2.0, 0.0, -1.0])
    own = {"a": base, "b": base * 1.1 + 0.05, "c": -base}  # a ~ b, c opposite
    total = sum(own.values())
    gains = {f: blend_from_sum(v, total, 3, gain=0.5).gain for f, v in own.items()}
    # a's siblings' mean is (b + c) / 2: mostly cancels, so a shares little; c's siblings oppose it: nothing
    assert gains["c"] == 0.0
    two = {"a": base, "b": base * 1.1}
    g = blend_from_sum(two["a"], two["a"] + two["b"], 2, gain=0.5)
    assert g.similarity > 0.99 and abs(g.gain - 0.5 * g.similarity) < 1e-12


def test_mixing_pulls_the_residual_toward_the_siblings_mean_by_the_gain() -> None:
    reference = np.zeros(3)
    key = np.array([1.0, 0.0, 0.0])
    blend = blend_from_sum(key, key + np.array([0.8, 0.6, 0.0]), 2, gain=0.5)
    mixed = mix_in(key, reference, blend)
    assert np.allclose(mixed, key + blend.gain * (np.array([0.8, 0.6, 0.0]) - key))
    assert 0 < blend.gain <= 0.5


def test_lone_federation_gets_nothing() -> None:
    b = blend_from_sum(np.ones(2), np.ones(2), 1, gain=0.5)
    assert b.gain == 0.0 and not b.siblings_mean.any()


def test_low_rank_embedding_is_exact_on_low_rank_residuals() -> None:
    g = torch.Generator().manual_seed(0)
    r = torch.randn(16, 2, generator=g) @ torch.randn(2, 12, generator=g)  # rank 2
    out = embed({"w": r, "b": torch.ones(5)}, rank=2)
    assert torch.allclose(out["w"], r, atol=1e-4) and torch.equal(out["b"], torch.ones(5))
    assert torch.linalg.matrix_rank(embed({"w": torch.randn(16, 12, generator=g)}, rank=3)["w"]) == 3
