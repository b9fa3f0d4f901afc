"""Fuzzing every CKKS decoder that reads bytes from the wire, together with the code that consumes what it
decodes: `ckks_messages.decode` and each typed accessor (transport certs, holder certs, key epochs,
contributions, summed contributions, decryptions), the member's and holder's installation of a key epoch
(TenSEAL public context, sealed secret key), the aggregator's check of a contribution (TenSEAL
ciphertexts), the holder's re-addition and decryption, and the check of a holder's confirmation.

Random mutations of valid messages: bit flips, truncation and extension, header fields replaced by
hostile values (``1e400``, NaN, negative and 2^70 integers, wrong types, deep nesting, lone surrogates),
blob sizes tampered with, and, to reach TenSEAL past the signatures, blobs mutated and then re-signed by
the legitimate signer (a malicious member or key holder). The only exceptions allowed are the project's
own (`WorldLMError`). The fast variant runs ~300 cases per decoder; the slow one 10,000.
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import pytest

from worldlm_secure.errors import WorldLMError
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.secagg import ckks_messages as wire
from worldlm_secure.secagg.ckks import (
    CkksAggregator,
    CkksKeyHolder,
    CkksMember,
    Commitment,
    DecryptedAggregate,
    EpochTrust,
    RoundSpec,
    SummedCiphertext,
    check_commitments,
    check_epoch,
    chunks_digest,
    commitments_digest,
    verify_aggregate,
)
from worldlm_secure.secagg.ckks_keys import _epoch_message, generate_epoch_keys, key_id_of, unwrap_secret_context
from worldlm_secure.secagg.ckks_params import CkksParams

# A small ring keeps TenSEAL fast: N=2048, one 30-bit data prime (12-bit slots: values straddle slots).
PARAMS = CkksParams(poly_modulus_degree=2048, coeff_mod_bit_sizes=(30, 24), scale_bits=16, key_holders=("m0",))
NAMES = ("m0", "m1", "m2")
RID = 1
N_VALUES = 20
FAST, SLOW = 300, 10_000

HOSTILE_TOKENS = [
    "1e400", "-1e400", "NaN", "Infinity", "-1", "-9223372036854775809", str(2**70), "0.5", "true", "null", '""',
    '"x"', "[]", "{}", '"\\ud800"', "[" * 5000 + "]" * 5000, "9" * 5000, '"' + "a" * 5000 + '"', "[[1, 2]]",
    '{"a": 1}', "18446744073709551616", "0", "1",
]


@dataclass
class World:
    ids: dict[str, NodeIdentity]
    pubs: dict[str, bytes]
    trust: EpochTrust
    holder: CkksKeyHolder
    keys: object
    spec: RoundSpec
    agg: CkksAggregator
    messages: dict[str, bytes]
    contributions: dict[str, object]


_WORLD: list[World] = []


def _committed(ids: dict[str, NodeIdentity], cs: list) -> tuple[tuple[Commitment, ...], tuple]:
    """Commit, then reveal: each member's signed commitment to its contribution, and the contributions signed
    with the list's digest."""
    listed = []
    for c in cs:
        k = Commitment(c.round_id, c.member, c.key_id, c.n_values, len(c.chunks), chunks_digest(c.chunks))
        listed.append(replace(k, signature=ids[c.member].sign(k.message())))
    digest = commitments_digest(listed)
    return tuple(listed), tuple(c.revealed(digest, ids[c.member]) for c in cs)


def world() -> World:
    if _WORLD:
        return _WORLD[0]
    ids = {n: NodeIdentity.generate(n) for n in NAMES}
    pubs = {n: i.public_bytes for n, i in ids.items()}
    holder = CkksKeyHolder(ids["m0"])
    keys = generate_epoch_keys(ids["m0"], PARAMS, RID, {"m0": holder.transport.cert}, pubs)
    trust = EpochTrust(("m0",), pubs, 2)
    holder.install(keys, trust)
    spec = RoundSpec.plan(PARAMS, RID, keys.key_id, N_VALUES, NAMES, 2)
    rng = np.random.default_rng(0)
    cs = {}
    for n in NAMES:
        m = CkksMember(ids[n])
        m.install(keys, trust)
        cs[n] = m.protect(spec, rng.uniform(-1, 1, N_VALUES))
    agg = CkksAggregator(keys, pubs["m0"], PARAMS)
    listed, revealed = _committed(ids, [cs[n] for n in NAMES])
    summed = SummedCiphertext(RID, keys.key_id, NAMES, revealed, listed)
    sums, conf = holder.decrypt(summed, spec)
    msgs = {
        "cert": wire.cert_bytes(holder.transport.cert),
        "certs": wire.certs_bytes([holder.transport.cert, holder.transport.cert]).replace(b'"m0", "m0"', b'"m0", "m1"'),
        "epoch": wire.epoch_bytes(keys),
        "contribution": wire.contribution_bytes(cs["m1"]),
        "summed": wire.summed_bytes(summed, N_VALUES),
        "commitment": wire.commitment_bytes(listed[1]),
        "commitments": wire.commitments_bytes(listed),
        "decrypted": wire.decrypted_bytes(sums, conf),
    }
    _WORLD.append(World(ids, pubs, trust, holder, keys, spec, agg, msgs, cs))
    return _WORLD[0]


# ---- mutations -----------------------------------------------------------------------------------------


def _split(data: bytes) -> tuple[dict, list[bytes]]:
    msg = wire.decode(data)
    return {"tag": msg.tag, "fields": msg.fields, "sizes": [len(b) for b in msg.blobs]}, list(msg.blobs)


def _join(head_text: str, blobs: list[bytes], rng: random.Random) -> bytes:
    head = head_text.encode("utf-8", "surrogatepass")
    n = len(head) if rng.random() < 0.9 else rng.choice([0, len(head) + 1, max(len(head) - 1, 0), 2**32 - 1, 2**20 + 1])
    return b"".join([struct.pack(">I", n), head, *blobs])


def _paths(obj: object, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:8]):
            out += _paths(v, (*prefix, i))
    return out


def _hostile_header(head: dict, rng: random.Random) -> str:
    """The header JSON with one value replaced by a hostile token (or a key dropped / added)."""
    paths = [p for p in _paths(head) if p]
    path = rng.choice(paths)
    parent = head
    for k in path[:-1]:
        parent = parent[k]
    op = rng.random()
    if op < 0.15 and isinstance(parent, dict):
        del parent[path[-1]]
        return json.dumps(head)
    if op < 0.2 and isinstance(parent, dict):
        parent["extra"] = 1
        return json.dumps(head)
    parent[path[-1]] = "@@HOSTILE@@"
    return json.dumps(head).replace('"@@HOSTILE@@"', rng.choice(HOSTILE_TOKENS))


def mutate(data: bytes, rng: random.Random) -> bytes:
    r = rng.random()
    if r < 0.45:
        head, blobs = _split(data)
        return _join(_hostile_header(head, rng), blobs, rng)
    if r < 0.55:
        head, blobs = _split(data)
        if head["sizes"]:
            i = rng.randrange(len(head["sizes"]))
            head["sizes"][i] = rng.choice([-1, -(2**70), 2**70, head["sizes"][i] + 1, head["sizes"][i] - 1, 0])
        return _join(json.dumps(head), blobs, rng)
    if r < 0.65:
        head, blobs = _split(data)
        if blobs:
            i = rng.randrange(len(blobs))
            blobs[i] = blobs[i][: rng.randrange(len(blobs[i]) + 1)]
            head["sizes"][i] = len(blobs[i])
        return _join(json.dumps(head), blobs, rng)
    b = bytearray(data)
    if r < 0.85:
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b)
    if r < 0.95:
        cut = rng.randrange(len(b) + 1)
        return bytes(b[:cut]) + (rng.randbytes(rng.randrange(64)) if rng.random() < 0.5 else b"")
    return rng.randbytes(rng.randrange(256))


def _flip_blob(blob: bytes, rng: random.Random) -> bytes:
    b = bytearray(blob)
    if rng.random() < 0.3:
        return bytes(b[: rng.randrange(len(b) + 1)])
    for _ in range(rng.randint(1, 6)):
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    return bytes(b)


def _resign_contribution(c, ident: NodeIdentity, rng: random.Random):
    i = rng.randrange(len(c.chunks))
    chunks = (*c.chunks[:i], _flip_blob(c.chunks[i], rng), *c.chunks[i + 1 :])
    c = replace(c, chunks=chunks, signature=b"")
    return replace(c, signature=ident.sign(c.message()))


def resigned(kind: str, w: World, rng: random.Random) -> bytes:
    """A message whose TenSEAL blob is mutated and then signed again by its legitimate signer."""
    if kind == "epoch":
        k = w.keys
        public = _flip_blob(k.public_context, rng)
        kid = key_id_of(public)
        sig = w.ids["m0"].sign(_epoch_message(k.epoch, kid, public))
        wrapped = {h: replace(x, key_id=kid) for h, x in k.wrapped.items()}
        return wire.epoch_bytes(replace(k, public_context=public, key_id=kid, signature=sig, wrapped=wrapped))
    if kind == "contribution":
        return wire.contribution_bytes(_resign_contribution(w.contributions["m1"], w.ids["m1"], rng))
    if kind == "summed":
        cs = [w.contributions[n] for n in NAMES]
        j = rng.randrange(len(cs))
        cs[j] = _resign_contribution(cs[j], w.ids[NAMES[j]], rng)
        listed, revealed = _committed(w.ids, cs)  # committed to as mutated: the holder's TenSEAL loads it
        return wire.summed_bytes(SummedCiphertext(RID, w.keys.key_id, NAMES, revealed, listed), N_VALUES)
    raise AssertionError(kind)


# ---- consumers: the decoder, then what the protocol does with its result -----------------------------


def _epoch(w: World, data: bytes) -> None:
    keys = wire.epoch_from(wire.decode(data))
    CkksMember(w.ids["m1"]).install(keys, w.trust)  # generator named, signature, TenSEAL public context
    unwrap_secret_context(keys, w.holder.transport, check_epoch(keys, w.trust, "m0"))  # the holder's sealed key


def _certs(w: World, data: bytes) -> None:
    for h, c in wire.certs_from(wire.decode(data)).items():
        c.verify(w.pubs.get(h, b""))


def _contribution(w: World, data: bytes) -> None:
    c = wire.contribution_from(wire.decode(data))
    w.agg.open_round(w.spec)
    w.agg.accept(c, w.pubs.get(c.member))


def _summed(w: World, data: bytes) -> None:
    s, n = wire.summed_from(wire.decode(data))
    w.holder.decrypt(s, RoundSpec.plan(PARAMS, RID, w.keys.key_id, n, NAMES, 2))


def _decrypted(w: World, data: bytes) -> None:
    sums, conf = wire.decrypted_from(wire.decode(data))
    agg = DecryptedAggregate(conf.round_id, conf.key_id, conf.contributors, sums, conf.holder, (conf,))
    verify_aggregate(agg, w.pubs, [conf.holder])


def _commitments(w: World, data: bytes) -> None:
    check_commitments(wire.commitments_from(wire.decode(data)), w.trust, RID, w.keys.key_id, NAMES, 2, "fuzz")


def _commitment(w: World, data: bytes) -> None:
    check_commitments((wire.commitment_from(wire.decode(data)),), w.trust, RID, w.keys.key_id, NAMES, 1, "fuzz")


CONSUMERS: dict[str, tuple[str, Callable[[World, bytes], None]]] = {
    "commitment": ("commitment", _commitment),
    "commitments": ("commitments", _commitments),
    "decode": ("contribution", lambda w, d: wire.decode(d)),
    "cert": ("cert", lambda w, d: wire.cert_from(wire.decode(d)).verify(w.pubs["m0"])),
    "certs": ("certs", _certs),
    "epoch": ("epoch", _epoch),
    "contribution": ("contribution", _contribution),
    "summed": ("summed", _summed),
    "decrypted": ("decrypted", _decrypted),
}
RESIGNABLE = {"epoch", "contribution", "summed"}


def run(target: str, cases: int, seed: int) -> None:
    w = world()
    source, consume = CONSUMERS[target]
    rng = random.Random(f"{target}-{seed}")
    consume(w, w.messages[source])  # the unmutated message is accepted
    unexpected: list[str] = []
    for i in range(cases):
        if target in RESIGNABLE and rng.random() < 0.3:
            data = resigned(target, w, rng)
        else:
            data = mutate(w.messages[source], rng)
        try:
            consume(w, data)
        except WorldLMError:
            pass
        except BaseException as exc:  # noqa: BLE001 - the point of the test
            if isinstance(exc, KeyboardInterrupt):
                raise
            unexpected.append(f"case {i}: {type(exc).__name__}: {str(exc)[:200]}")
            if len(unexpected) >= 5:
                break
    assert not unexpected, "\n".join(unexpected)


@pytest.mark.parametrize("target", sorted(CONSUMERS))
def test_decoder_fuzz_fast(target: str) -> None:
    run(target, FAST, 0)


@pytest.mark.slow
@pytest.mark.parametrize("target", sorted(CONSUMERS))
def test_decoder_fuzz_slow(target: str) -> None:
    run(target, SLOW, 1)
