"""Say when DP cannot learn, before training (privacy.feasibility)."""

from __future__ import annotations

import math

import pytest

from worldlm_secure.privacy.feasibility import SNR_THRESHOLD, expected_snr, feasibility


def test_a_handful_of_sites_with_a_full_model_is_hopeless_and_the_warning_names_the_fixes() -> None:
    f = feasibility("shared at eu", contributors=3, clipping_norm=1.0, noise_multiplier=1.5, dim=1_200_000)
    assert f.snr == pytest.approx(3 / (1.5 * math.sqrt(1_200_000)))
    assert f.snr < 0.01 < SNR_THRESHOLD  # the noise is hundreds of times the signal
    (w,) = f.warnings
    assert "record-level DP" in w and "more members" in w and "adapters" in w


def test_enough_members_or_few_values_pass_silently() -> None:
    assert feasibility("lora", contributors=1000, clipping_norm=1.0, noise_multiplier=1.0, dim=10_000).warnings == ()
    f = feasibility("DP-SGD at a", contributors=256, clipping_norm=1.0, noise_multiplier=1.0, dim=4096, level="record")
    assert f.snr == pytest.approx(4.0) and f.warnings == ()
    assert "record-level DP (" not in feasibility("x", contributors=1, clipping_norm=1, noise_multiplier=1, dim=100,
                                                  level="record").warnings[0]


def test_bad_plans_are_refused() -> None:
    with pytest.raises(ValueError):
        expected_snr(0, 1.0, 10)
