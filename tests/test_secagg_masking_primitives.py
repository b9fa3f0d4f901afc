"""PRG, Shamir, quantization, neighbour graph and message codec of the SecAgg+ masking protocol."""

from __future__ import annotations

import os

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import example, given, settings
from hypothesis import strategies as st

from worldlm_secure.errors import ConfigError, SecAggError
from worldlm_secure.secagg import prg, shamir
from worldlm_secure.secagg.graph import auto_degree, components, neighbour_graph
from worldlm_secure.secagg.masking_messages import (
    EncryptedShare,
    KeyAdvert,
    MaskedInput,
    ShareKeys,
    UnmaskResponse,
    decode,
    pack_words,
    unpack_words,
)
from worldlm_secure.secagg.quantize import QuantizationSpec, dequantize, quantize

# ---- PRG ----


def test_prg_is_aes128_ctr_under_hkdf_derived_key_and_iv() -> None:
    seed = os.urandom(32)
    okm = HKDF(hashes.SHA256(), 32, None, b"worldlm-secagg+/prg/aes128-ctr/v1").derive(seed)
    raw = Cipher(algorithms.AES(okm[:16]), modes.CTR(okm[16:])).encryptor().update(bytes(4 * 70_001))
    assert np.array_equal(prg.expand(seed, 70_001), np.frombuffer(raw, "<u4"))
    assert np.array_equal(prg.expand(seed, 9_000, np.uint64), np.frombuffer(raw[: 8 * 9_000], "<u8"))


@settings(deadline=None, max_examples=25)
@given(n=st.integers(1, 3 * (1 << 15) + 7), k=st.integers(1, 4), dtype=st.sampled_from([np.uint32, np.uint64]))
def test_masks_cancel_and_wrap(n: int, k: int, dtype: type) -> None:
    x = np.frombuffer(os.urandom(n * np.dtype(dtype).itemsize), dtype=dtype).copy()
    seeds = [os.urandom(32) for _ in range(k)]
    y = x.copy()
    prg.apply_masks(y, [(s, 1) for s in seeds])
    expected = x.copy()
    for s in seeds:
        expected += prg.expand(s, n, dtype)  # numpy unsigned add wraps
    assert np.array_equal(y, expected)
    prg.apply_masks(y, [(s, -1) for s in reversed(seeds)])
    assert np.array_equal(y, x)


def test_prg_refuses_short_seed_and_wrong_dtype() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        prg.expand(b"\x00" * 16, 4)
    with pytest.raises(ValueError, match="uint32"):
        prg.apply_masks(np.zeros(4, np.int64), [(os.urandom(32), 1)])


# ---- Shamir ----


@settings(deadline=None, max_examples=40)
@given(n=st.integers(1, 12), data=st.data())
def test_any_threshold_shares_reconstruct(n: int, data: st.DataObject) -> None:
    t = data.draw(st.integers(1, n))
    secret = os.urandom(32)
    xs = data.draw(st.lists(st.integers(1, 65535), min_size=n, max_size=n, unique=True))
    shares = shamir.split(secret, xs, t)
    subset = data.draw(st.permutations(shares))[: data.draw(st.integers(t, n))]
    assert shamir.combine(subset, t) == secret
    if t > 1:
        with pytest.raises(SecAggError, match="needed"):
            shamir.combine(subset[: t - 1], t)


def test_fewer_than_threshold_shares_fit_every_secret() -> None:
    # Any t-1 shares plus ANY candidate secret lie on one polynomial of degree t-1: they pin nothing down.
    p = shamir.PRIME
    known = shamir.split(os.urandom(32), [1, 2, 5], 3)[:2]
    candidate = os.urandom(32)
    pts = [(0, int.from_bytes(candidate, "big"))] + [(s.x, s.y) for s in known]

    def at(x: int) -> int:  # Lagrange evaluation of the polynomial through pts
        total = 0
        for i, (xi, yi) in enumerate(pts):
            num = den = 1
            for j, (xj, _) in enumerate(pts):
                if i != j:
                    num, den = num * (x - xj) % p, den * (xi - xj) % p
            total = (total + yi * num * pow(den, -1, p)) % p
        return total

    assert shamir.combine(known + [shamir.Share(5, at(5))], 3) == candidate


def test_tampered_share_is_caught_or_changes_secret() -> None:
    secret = os.urandom(32)
    shares = shamir.split(secret, [1, 2, 3], 2)
    bad = [shamir.Share(shares[0].x, (shares[0].y + 1) % shamir.PRIME), shares[1]]
    try:
        assert shamir.combine(bad, 2) != secret
    except SecAggError:
        pass  # out of the 256-bit range: detected outright
    with pytest.raises(SecAggError, match="two different"):
        shamir.combine([shares[0], bad[0], shares[1]], 2)


@pytest.mark.parametrize("raw", [b"", b"\x00" * 68, b"\x00\x01" + b"\xff" * 66])
def test_malformed_share_bytes_are_refused(raw: bytes) -> None:
    with pytest.raises(SecAggError):
        shamir.Share.from_bytes(raw)


# ---- quantization ----


@settings(deadline=None, max_examples=40)
@example(bits=62, n=1, clip=1.0, xs=[-1.0])  # wrapped to the other sign before scale kept a margin above 2^53
@given(
    bits=st.sampled_from([8, 12, 16, 24, 32, 40, 62]),
    n=st.integers(1, 50),
    clip=st.floats(0.01, 100.0),
    xs=st.lists(st.floats(-200, 200), min_size=1, max_size=60),
)
def test_sum_of_quantized_decodes_within_bound(bits: int, n: int, clip: float, xs: list[float]) -> None:
    if 2 ** (bits - 1) - 1 - n <= 0:
        return
    spec = QuantizationSpec(bits, clip, n)
    x = np.array(xs)
    members = [quantize(x * (i % 3 - 1), spec) for i in range(n)]
    total = np.zeros(x.size, dtype=spec.dtype)
    for q in members:
        total += q.values
    plain = sum(np.clip(x * (i % 3 - 1), -clip, clip) for i in range(n))
    assert np.all(np.abs(dequantize(total, spec) - plain) <= spec.sum_error_bound(n))
    assert members[-1].clipped == np.count_nonzero(np.abs(x * ((n - 1) % 3 - 1)) > clip)


def test_stochastic_rounding_is_unbiased() -> None:
    spec = QuantizationSpec(8, 1.0, 2)  # coarse: step 1/62.5
    x = np.full(200_000, 0.3337)
    assert abs(dequantize(quantize(x, spec).values, spec).mean() - 0.3337) < 3e-4
    assert np.max(np.abs(dequantize(quantize(x, spec).values, spec) - 0.3337)) < 1 / spec.scale


def test_clipped_fraction_is_reported() -> None:
    q = quantize(np.array([0.5, 2.0, -3.0, 1.0]), QuantizationSpec(16, 1.0, 4))
    assert q.clipped == 2 and q.clipped_fraction == 0.5


def test_bad_quantization_parameters_name_the_field() -> None:
    with pytest.raises(ConfigError, match="masking.bits"):
        QuantizationSpec(64, 1.0, 3)
    with pytest.raises(ConfigError, match="masking.bits"):
        QuantizationSpec(8, 1.0, 200)
    with pytest.raises(ConfigError, match="clip_range"):
        QuantizationSpec(32, 0.0, 3)
    with pytest.raises(ValueError, match="NaN"):
        quantize(np.array([np.nan]), QuantizationSpec(32, 1.0, 3))


# ---- graph ----


@settings(deadline=None, max_examples=40)
@given(n=st.integers(1, 60), k=st.integers(1, 30), round_id=st.integers(0, 2**32))
def test_graph_is_symmetric_regular_and_public(n: int, k: int, round_id: int) -> None:
    names = [f"m{i}" for i in range(n)]
    g = neighbour_graph(names, k, round_id)
    assert g == neighbour_graph(list(reversed(names)), k, round_id)
    degrees = {len(nb) for nb in g.values()}
    assert len(degrees) == 1
    d = degrees.pop()
    assert d == n - 1 or (d >= k and d % 2 == 0 and d <= k + 1)
    for m, nb in g.items():
        assert m not in nb and all(m in g[v] for v in nb)
    assert len(components(names, g)) == (1 if n else 0)


def test_auto_degree_is_logarithmic() -> None:
    assert auto_degree(1) == 0 and auto_degree(2) == 1 and auto_degree(5) == 4
    assert auto_degree(100) == 14 and auto_degree(10_000) == 28


# ---- messages ----


def _advert() -> KeyAdvert:
    return KeyAdvert(3, "alice", os.urandom(32), os.urandom(32), os.urandom(32), os.urandom(64))


def test_messages_round_trip() -> None:
    adv = _advert()
    enc = EncryptedShare(3, "alice", "bob", os.urandom(12), os.urandom(152))
    msgs = [
        adv,
        ShareKeys(3, "alice", (enc, enc)),
        MaskedInput(3, "bob", 24, 2, os.urandom(6)),
        UnmaskResponse(3, "bob", (("alice", b"x" * 68),), ()),
    ]
    for m in msgs:
        assert decode(m.to_bytes()) == m
        assert type(m).from_bytes(m.to_bytes()) == m


def test_nested_message_from_another_round_is_refused() -> None:
    enc = EncryptedShare(2, "alice", "bob", b"n" * 12, b"c")
    data = ShareKeys(3, "alice", (enc,)).to_bytes()
    with pytest.raises(SecAggError, match="round 2"):
        decode(data)


@settings(deadline=None, max_examples=200)
@given(junk=st.binary(max_size=200), cut=st.integers(0, 200))
def test_malformed_bytes_raise_secagg_error_or_parse_canonically(junk: bytes, cut: int) -> None:
    good = ShareKeys(3, "alice", (EncryptedShare(3, "alice", "bob", b"n" * 12, b"c" * 20),)).to_bytes()
    with pytest.raises(SecAggError):
        decode(good + junk[:1] + b"\x00")  # trailing bytes
    for data in (junk, good[:cut] + junk, good[:cut]):
        try:
            msg = decode(data)
        except SecAggError:
            continue
        assert msg.to_bytes() == data  # anything accepted is exactly one well-formed message


@pytest.mark.parametrize("bits", [8, 12, 16, 20, 24, 31, 32, 33, 40, 48, 56, 62])
def test_word_packing_keeps_low_bits(bits: int) -> None:
    dtype = np.uint32 if bits <= 32 else np.uint64
    w = np.frombuffer(os.urandom(8 * 1000), dtype=np.uint64).astype(dtype)
    payload = pack_words(w, bits)
    assert len(payload) == 1000 * ((bits + 7) // 8)
    assert np.array_equal(unpack_words(payload, bits, 1000), w & dtype(2**bits - 1) if bits < 64 else w)
    with pytest.raises(SecAggError, match="expected"):
        unpack_words(payload[:-1], bits, 1000, who="bob")


def test_chunked_quantization_equals_the_reference_formula() -> None:
    spec = QuantizationSpec(32, 1.5, 7)
    x = np.concatenate([np.linspace(-2, 2, 70_001), [1.5, -1.5, 0.0]])
    seed = os.urandom(32)
    reference = np.floor(np.clip(x, -1.5, 1.5) * spec.scale + prg.uniform01(seed, x.size)).astype(np.int64).astype(np.uint32)
    assert np.array_equal(quantize(x, spec, rounding_seed=seed).values, reference)
