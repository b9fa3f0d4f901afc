"""Secret DP randomness: AES-CTR keystream samplers have the right distributions, fresh instances
never repeat, and no non-cryptographic generator appears in privacy/ or ledger/."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from worldlm_secure.privacy import SecureRandom

KEY = bytes(range(32))
PKG = Path(__file__).resolve().parents[1] / "worldlm_secure"


def test_stream_is_the_aes256_ctr_keystream() -> None:
    ks = Cipher(algorithms.AES(KEY), modes.CTR(b"\0" * 16)).encryptor().update(b"\0" * 64)
    assert SecureRandom(KEY).random_bytes(64) == ks
    r = SecureRandom(KEY)
    assert r.random_bytes(10) + r.random_bytes(54) == ks  # a continuing stream, no reuse


def test_fresh_instances_never_repeat() -> None:
    assert SecureRandom().random_bytes(32) != SecureRandom().random_bytes(32)
    with pytest.raises(ValueError):
        SecureRandom(b"short")


def test_uniform_is_open_interval_and_normal_is_standard() -> None:
    r = SecureRandom(KEY)
    u = r.uniform(200_000)
    assert u.min() > 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.005
    z = r.standard_normal((400, 500))
    assert z.shape == (400, 500)
    assert abs(z.mean()) < 0.01 and z.std() == pytest.approx(1.0, rel=0.01)
    assert np.mean(np.abs(z) > 1.96) == pytest.approx(0.05, abs=0.003)


@pytest.mark.parametrize("sigma", [0.7, 2.5, 40.0])
def test_discrete_gaussian_matches_its_pmf(sigma: float) -> None:
    x = SecureRandom(KEY).discrete_gaussian(sigma, 200_000)
    assert x.dtype == np.int64
    support = np.arange(-int(10 * sigma) - 10, int(10 * sigma) + 11)
    pmf = np.exp(-(support.astype(float) ** 2) / (2 * sigma**2))
    pmf /= pmf.sum()
    for k in (0, 1, int(sigma)):
        observed = np.mean(x == k)
        expected = pmf[support == k][0]
        assert observed == pytest.approx(expected, abs=4 * math.sqrt(expected / 200_000) + 1e-4)
    assert x.var() == pytest.approx(float((pmf * support.astype(float) ** 2).sum()), rel=0.02)


@pytest.mark.parametrize("lam", [0.5, 6.0, 10.0, 80.0, 1e7])
def test_poisson_and_skellam_moments(lam: float) -> None:
    r = SecureRandom(KEY)
    p = r.poisson(lam, 100_000)
    assert p.min() >= 0
    assert p.mean() == pytest.approx(lam, rel=0.02, abs=0.01)
    assert p.var() == pytest.approx(lam, rel=0.03)
    if lam < 10:
        k = int(lam)
        expected = math.exp(-lam) * lam**k / math.factorial(k)
        assert np.mean(p == k) == pytest.approx(expected, abs=0.005)
    s = r.skellam(lam, 100_000)
    assert abs(s.mean()) < 5 * math.sqrt(2 * lam / 100_000)
    assert s.var() == pytest.approx(2 * lam, rel=0.03)


FORBIDDEN = re.compile(
    r"^\s*(import random|from random import)|np\.random\.|numpy\.random|default_rng|RandomState|manual_seed",
    re.M,
)


@pytest.mark.parametrize("package", ["privacy", "ledger"])
def test_no_non_cryptographic_generator_in_dp_or_ledger_code(package: str) -> None:
    for f in (PKG / package).glob("*.py"):
        text = f.read_text()
        code = "\n".join(line.split("#")[0] for line in text.splitlines())
        assert not FORBIDDEN.search(code), f"{f.name} uses a non-cryptographic generator"
