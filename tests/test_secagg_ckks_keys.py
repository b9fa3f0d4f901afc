"""CKKS key lifecycle: parameters, wrapping to named holders, public-only aggregator context, rotation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tenseal as ts
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from worldlm_secure.errors import ConfigError, SecAggError
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.secagg import MemberInput, make_secure_sum
from worldlm_secure.secagg.ckks_round import CkksSecureSum
from worldlm_secure.secagg.ckks_keys import (
    TransportCert,
    TransportKey,
    _wrap_key,
    generate_epoch_keys,
    key_id_of,
    load_public_context,
    unwrap_secret_context,
)
from worldlm_secure.secagg.ckks_params import CkksParams

VECTORS = Path(__file__).resolve().parent.parent / "protocols" / "vectors" / "ckks.json"


@pytest.fixture(scope="module")
def ceremony():
    gen = NodeIdentity.generate("hold-a")
    other = NodeIdentity.generate("hold-b")
    tks = {"hold-a": TransportKey(gen), "hold-b": TransportKey(other)}
    keys = generate_epoch_keys(
        gen, CkksParams(), 0, {h: t.cert for h, t in tks.items()},
        {"hold-a": gen.public_bytes, "hold-b": other.public_bytes},
    )
    return gen, other, tks, keys


def test_aggregator_context_cannot_decrypt(ceremony):
    gen, _, tks, keys = ceremony
    pub = load_public_context(keys, gen.public_bytes)
    assert not pub.has_secret_key() and not pub.has_galois_keys() and not pub.has_relin_keys()
    vec = ts.ckks_vector(pub, [0.25] * 2048)
    with pytest.raises(ValueError, match="secret"):
        vec.decrypt()
    # the holder can
    sec = unwrap_secret_context(keys, tks["hold-a"], gen.public_bytes)
    back = ts.ckks_vector_from(sec, vec.serialize()).decrypt()
    assert np.allclose(back, 0.25, atol=0.05)  # raw CKKS at scale 2^17; packing makes it exact
    assert not ts.context_from(keys.public_context).has_secret_key()
    # the published context is much smaller than the secret one the holders get
    assert len(keys.public_context) < len(keys.wrapped["hold-a"].ciphertext)


def test_each_holder_opens_only_its_own_wrapped_key(ceremony):
    gen, _, tks, keys = ceremony
    a = unwrap_secret_context(keys, tks["hold-a"], gen.public_bytes)
    b = unwrap_secret_context(keys, tks["hold-b"], gen.public_bytes)
    assert a.has_secret_key() and b.has_secret_key()
    swapped = dataclasses.replace(keys, wrapped={"hold-a": keys.wrapped["hold-b"]})
    with pytest.raises(SecAggError, match="hold-a.*failed authentication"):
        unwrap_secret_context(swapped, tks["hold-a"], gen.public_bytes)
    outsider = TransportKey(NodeIdentity.generate("mallory"))
    with pytest.raises(SecAggError, match="mallory.*no wrapped key"):
        unwrap_secret_context(keys, outsider, gen.public_bytes)


def test_tampered_wrapped_key_or_epoch_is_refused(ceremony):
    gen, other, tks, keys = ceremony
    w = keys.wrapped["hold-b"]
    flipped = dataclasses.replace(w, ciphertext=w.ciphertext[:-1] + bytes([w.ciphertext[-1] ^ 1]))
    bad = dataclasses.replace(keys, wrapped={**keys.wrapped, "hold-b": flipped})
    with pytest.raises(SecAggError, match="hold-b.*failed authentication"):
        unwrap_secret_context(bad, tks["hold-b"], gen.public_bytes)
    # a context swapped in by someone else does not carry the generator's signature
    with pytest.raises(SecAggError, match="not signed by generator"):
        load_public_context(keys, other.public_bytes)
    forged = dataclasses.replace(keys, public_context=keys.public_context + b"\0")
    with pytest.raises(SecAggError, match="not signed"):
        load_public_context(forged, gen.public_bytes)


def test_transport_key_must_be_signed_by_holder_identity():
    gen = NodeIdentity.generate("hold-a")
    eve = TransportKey(NodeIdentity.generate("eve"))
    fake = TransportCert("hold-a", eve.cert.public, eve.cert.signature)
    with pytest.raises(SecAggError, match="hold-a.*not signed by its identity"):
        generate_epoch_keys(gen, CkksParams(), 0, {"hold-a": fake}, {"hold-a": gen.public_bytes})


def test_keys_rotate_on_schedule_and_every_release_names_its_key():
    ids = {n: NodeIdentity.generate(n) for n in ("a", "b", "c")}
    ss = make_secure_sum("ckks", params=CkksParams(rotate_every_rounds=2), identities=ids)
    rng = np.random.default_rng(0)
    seen = []
    for r in range(5):
        res = ss.run_round(r, [MemberInput(n, rng.uniform(-1, 1, 50)) for n in ids], min_cohort=2)
        assert res.key_id and res.stats.extra["key_id"] == res.key_id
        assert res.stats.extra["epoch"] == r // 2
        seen.append(res.key_id)
    assert seen[0] == seen[1] != seen[2] == seen[3] != seen[4]
    assert len(set(seen)) == 3


def test_default_key_holder_is_first_member_and_policy_holders_are_used():
    ids = {n: NodeIdentity.generate(n) for n in ("zed", "amy", "bob")}
    ss = make_secure_sum("ckks", params=None, identities=ids)
    res = ss.run_round(0, [MemberInput(n, np.zeros(4)) for n in ids], min_cohort=1)
    assert res.stats.extra["key_holders"] == "amy"
    section = SimpleNamespace(poly_modulus_degree=4096, coeff_mod_bit_sizes=[60, 49], scale_bits=17,
                              key_holders=["zed", "bob"], rotate_every_rounds=0)
    ss2 = make_secure_sum("ckks", params=section, identities=ids, round_seed=7)  # unknown kwargs ignored
    res2 = ss2.run_round(0, [MemberInput(n, np.zeros(4)) for n in ids], min_cohort=1)
    assert res2.stats.extra["key_holders"] == "bob,zed"
    assert res2.stats.extra["confirmed_by"] == "bob,zed"
    assert isinstance(ss2, CkksSecureSum) and ss2.params.key_holders == ("zed", "bob")
    # the policy schema's default: every member holds the key
    section.key_holders = ["members"]
    ss3 = make_secure_sum("ckks", params=section, identities=ids)
    res3 = ss3.run_round(0, [MemberInput(n, np.zeros(4)) for n in ids], min_cohort=1)
    assert res3.stats.extra["key_holders"] == "amy,bob,zed"


def test_policy_section_from_schema_is_accepted():
    schema = pytest.importorskip("worldlm_secure.policy.schema")
    section = schema.CkksParams(poly_modulus_degree=4096, coeff_mod_bit_sizes=(60, 49), scale_bits=20,
                                key_holders=("a",), rotate_every_rounds=3)
    ss = make_secure_sum("ckks", params=section, identities={"a": NodeIdentity.generate("a")}, clip_range=0.5)
    assert ss.params == CkksParams(4096, (60, 49), 20, ("a",), 3, 0.5, 20)
    # a policy that names no ring gets the protocol's own (one home: secagg/ckks_params.py), not a costlier one
    ss_default = make_secure_sum("ckks", params=schema.CkksParams())
    ring = CkksParams()
    assert ss_default.params == CkksParams(ring.poly_modulus_degree, ring.coeff_mod_bit_sizes, ring.scale_bits, (),
                                           schema.CkksParams().rotate_every_rounds, ring.clip_range, ring.value_bits)
    assert (ss_default.params.poly_modulus_degree, ss_default.params.slot_bits, ss_default.params.max_members()) == (4096, 41, 64)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"poly_modulus_degree": 3000}, "poly_modulus_degree"),
        ({"coeff_mod_bit_sizes": (60, 60)}, "coeff_mod_bit_sizes"),  # 120 > 109 bits at N=4096
        ({"coeff_mod_bit_sizes": (60,)}, "coeff_mod_bit_sizes"),
        ({"scale_bits": 8}, "scale_bits"),
        ({"scale_bits": 55}, "scale_bits"),
        ({"clip_range": 0.0}, "clip_range"),
        ({"rotate_every_rounds": -1}, "rotate_every_rounds"),
    ],
)
def test_bad_parameters_name_the_field(change, field):
    with pytest.raises(ConfigError, match=f"ckks.{field}"):
        dataclasses.replace(CkksParams(), **change).validate()


def test_cohort_beyond_noise_budget_is_refused():
    p = CkksParams()
    assert p.max_members() >= 64
    with pytest.raises(ConfigError, match="scale_bits"):
        p.check_cohort(p.max_members() + 1)


def test_noise_model_matches_measurement():
    """The precision budget rests on sigma = sqrt(n) N/6 / 2^scale; check it against TenSEAL."""
    p = CkksParams()
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, p.poly_modulus_degree, coeff_mod_bit_sizes=list(p.coeff_mod_bit_sizes))
    ctx.global_scale = 2.0**p.scale_bits
    pub = ctx.copy()
    pub.make_context_public()
    n = 8
    total = ts.ckks_vector(pub, [0.0] * p.slot_count)
    for _ in range(n - 1):
        total += ts.ckks_vector(pub, [0.0] * p.slot_count)
    total.link_context(ctx)
    err = np.asarray(total.decrypt())
    assert 0.6 * p.noise_std(n) < err.std() < 1.5 * p.noise_std(n)
    assert np.abs(err).max() < 0.5 / 4  # far from breaking exact integer recovery


def test_wrap_vector_reproduces():
    w = json.loads(VECTORS.read_text())["wrap"]
    eph = X25519PrivateKey.from_private_bytes(bytes.fromhex(w["ephemeral_private_hex"]))
    hold = X25519PrivateKey.from_private_bytes(bytes.fromhex(w["holder_private_hex"]))
    raw = lambda k: k.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)  # noqa: E731
    assert key_id_of(bytes.fromhex(w["public_context_hex"])) == w["key_id"]
    key, aad = _wrap_key(w["holder"], w["key_id"], raw(eph), raw(hold), hold.exchange(eph.public_key()))
    assert key.hex() == w["aes_key_hex"] and aad.hex() == w["aad_hex"]
    ct = AESGCM(key).encrypt(bytes.fromhex(w["nonce_hex"]), bytes.fromhex(w["plaintext_hex"]), aad)
    assert ct.hex() == w["ciphertext_hex"]
