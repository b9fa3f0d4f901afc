"""clip_l2: never above the bound, never scales up, direction kept; bad input refused."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worldlm_secure.privacy import attentive_sensitivity, clip_l2


@settings(deadline=None, max_examples=100)
@given(vec=st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=64), max_norm=st.floats(1e-6, 1e3))
def test_clipped_norm_never_exceeds_the_bound_and_direction_is_kept(vec: list[float], max_norm: float) -> None:
    v = np.array(vec)
    r = clip_l2(v, max_norm)
    assert np.linalg.norm(r.vector) <= max_norm
    assert r.norm == pytest.approx(float(np.linalg.norm(v)))
    assert r.clipped == (r.norm > max_norm)
    if not r.clipped:
        assert np.array_equal(r.vector, v)
    else:
        assert np.allclose(r.vector * (r.norm / np.linalg.norm(r.vector)), v, rtol=1e-9, atol=1e-9)


def test_input_is_not_modified_and_bad_input_is_refused() -> None:
    v = np.array([3.0, 4.0])
    r = clip_l2(v, 1.0)
    assert v.tolist() == [3.0, 4.0] and r.clipped
    with pytest.raises(ValueError, match="NaN"):
        clip_l2(np.array([1.0, np.nan]), 1.0)
    with pytest.raises(ValueError, match="clipping_norm"):
        clip_l2(v, 0.0)
    with pytest.raises(ValueError):
        attentive_sensitivity(1.0, 0.0)
    assert attentive_sensitivity(3.0, 2.0) == pytest.approx(2.0 * 10**0.5)
