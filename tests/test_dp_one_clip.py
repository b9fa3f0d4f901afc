"""Issue 14, item 3: one clip. Production (`aggregation.member.encode_update`, used by the engine, Ray site
actors and site nodes) clips with the hardened `privacy.clipping.clip_l2`: non-finite updates are refused,
the clipped norm never lands above C, and under DP the weight words carry nothing (sensitivity C)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worldlm_secure.aggregation import member
from worldlm_secure.aggregation.member import encode_update
from worldlm_secure.aggregation.weighted import DeltaCodec


def _codec() -> DeltaCodec:
    return DeltaCodec(("a", "b"), ((3, 4), (5,)))


def test_there_is_no_second_clip() -> None:
    assert not hasattr(member, "clip_update")
    assert member.clip_l2.__module__ == "worldlm_secure.privacy.clipping"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_update_is_refused_before_it_is_encoded(bad: float) -> None:
    deltas = {"a": torch.ones(3, 4), "b": torch.ones(5)}
    deltas["b"][2] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        encode_update(_codec(), deltas, np.ones(2), 1.0)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 7.0, 1e6])
def test_under_dp_a_members_vector_never_exceeds_the_clip_whatever_its_weights(scale: float) -> None:
    g = torch.Generator().manual_seed(3)
    deltas = {"a": torch.randn(3, 4, generator=g) * scale, "b": torch.randn(5, generator=g) * scale}
    for weights in (np.ones(2), np.array([0.3, 1.0]), np.array([5.0, 2.0])):  # > 1 is clamped to the public range
        v = encode_update(_codec(), deltas, weights, 0.5)
        assert np.linalg.norm(v) <= 0.5 and np.all(v[-2:] == 0.0)
    plain = encode_update(_codec(), deltas, np.ones(2), None)  # without DP: the weight words, unclipped
    assert plain[-1] == pytest.approx(1 / np.sqrt(2))
