"""Byte encodings of the CKKS messages of `secagg.ckks` / `secagg.ckks_keys`: what crosses a node link
(`node.ckks_link`) or travels between a Ray site actor and the driver (`federation.ray_ckks`).

Every message is ``u32 header length | header JSON | blob | blob ...``: the header names the message
(``tag``), carries its scalar fields and the byte length of each blob (ciphertexts, contexts, keys,
signatures). Tags share the four CKKS `SecAggKind`s of protocols/federation.proto (which kind carries
which tag: protocols/federation.md, "CKKS over a link"). Decoding errors are `SecAggError`s; the
caller names the sender.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from worldlm_secure.errors import SecAggError
from worldlm_secure.secagg.ckks import Commitment, Confirmation, Contribution, SummedCiphertext
from worldlm_secure.secagg.ckks_keys import EpochKeys, TransportCert, WrappedSecretKey

TRANSPORT_CERT = "transport_cert"  # key holder -> aggregator (PUBLIC_CONTEXT)
HOLDER_CERTS = "holder_certs"  # aggregator -> generator (PUBLIC_CONTEXT)
EPOCH_KEYS = "epoch_keys"  # generator -> aggregator, aggregator -> every member (PUBLIC_CONTEXT)
COMMITMENT = "commitment"  # member -> aggregator, before any ciphertext leaves (PUBLIC_CONTEXT)
COMMITMENTS = "commitments"  # aggregator -> every committed member: the list it reveals under (PUBLIC_CONTEXT)
CONTRIBUTION = "contribution"  # member -> aggregator (UploadUpdate CIPHERTEXT)
SUMMED = "summed"  # aggregator -> key holders (AGGREGATE)
DECRYPTED = "decrypted"  # key holder -> aggregator (DECRYPTED)
ABSTAIN = "abstain"  # member -> aggregator, instead of a contribution it cannot encode (UploadUpdate CIPHERTEXT)


@dataclass(frozen=True)
class Message:
    """A decoded message: its tag, scalar fields and blobs."""

    tag: str
    fields: dict
    blobs: tuple[bytes, ...]


# Bounds of what any decoder accepts (every limit is far above what an honest peer sends).
MAX_HEADER_BYTES = 1 << 20  # the JSON header
MAX_BLOBS = 1 << 20
MAX_NAME_CHARS = 1024
MAX_U63 = (1 << 63) - 1  # integers are signed into messages as u64; we keep them < 2^63
KEY_ID_CHARS = 32  # hex of 16 bytes
SIGNATURE_BYTES = 64  # Ed25519
X25519_BYTES = 32
NONCE_BYTES = 12
DIGEST_BYTES = 32


def _bad(what: str) -> SecAggError:
    return SecAggError(f"malformed CKKS message: {what}")


def _no_float(text: str) -> float:
    raise ValueError(f"non-integer number {text[:20]!r}")  # no field of any CKKS message is a float


def encode(tag: str, fields: dict, blobs: Sequence[bytes] = ()) -> bytes:
    head = json.dumps({"tag": tag, "fields": fields, "sizes": [len(b) for b in blobs]}, sort_keys=True).encode()
    return b"".join([struct.pack(">I", len(head)), head, *blobs])


def decode(data: bytes) -> Message:
    """Parse ``u32 | header JSON | blobs``. Any malformation is a `SecAggError` (never another exception):
    header size, UTF-8, JSON (floats, NaN/Infinity, nesting depth and huge integers are refused), the
    header's shape and every blob size are checked before a blob is cut."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise _bad(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < 4:
        raise _bad(f"{len(data)} bytes, shorter than the 4-byte header length")
    (n,) = struct.unpack(">I", data[:4])
    if n > MAX_HEADER_BYTES or 4 + n > len(data):
        raise _bad(f"header of {n} bytes in a message of {len(data)} bytes")
    try:
        head = json.loads(data[4 : 4 + n].decode("utf-8"), parse_float=_no_float, parse_constant=_no_float)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise _bad(f"header is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(head, dict) or set(head) != {"tag", "fields", "sizes"}:
        raise _bad("header must be an object with exactly tag, fields and sizes")
    tag, fields, sizes = head["tag"], head["fields"], head["sizes"]
    if not isinstance(tag, str) or not isinstance(fields, dict) or not isinstance(sizes, list) or len(sizes) > MAX_BLOBS:
        raise _bad("tag must be a string, fields an object, sizes a list")
    blobs, off = [], 4 + n
    for size in sizes:
        if type(size) is not int or size < 0 or off + size > len(data):
            raise _bad(f"blob size {str(size)[:20]} does not fit the {len(data)}-byte message")
        blobs.append(data[off : off + size])
        off += size
    if off != len(data):
        raise _bad(f"{len(data) - off} trailing bytes")
    return Message(tag, fields, tuple(blobs))


# ---- typed field access: each raises SecAggError naming the field --------------------------------------


def _expect(m: Message, tag: str) -> dict:
    if not isinstance(m, Message) or m.tag != tag:
        raise _bad(f"expected a {tag!r} message, got {getattr(m, 'tag', type(m).__name__)!r}")
    return m.fields


def _int(f: dict, key: str, hi: int = MAX_U63) -> int:
    v = f.get(key)
    if type(v) is not int or not 0 <= v <= hi:
        raise _bad(f"field {key!r} must be an integer in [0, {hi}]")
    return v


def _name(v: object, key: str) -> str:
    if not isinstance(v, str) or not 0 < len(v) <= MAX_NAME_CHARS:
        raise _bad(f"field {key!r} must be a non-empty string of at most {MAX_NAME_CHARS} characters")
    try:
        v.encode("utf-8")  # lone surrogates cannot be signed
    except UnicodeEncodeError:
        raise _bad(f"field {key!r} is not encodable as UTF-8") from None
    return v


def _str(f: dict, key: str) -> str:
    return _name(f.get(key), key)


def _key_id(f: dict, key: str = "key_id") -> str:
    v = _str(f, key)
    if len(v) != KEY_ID_CHARS or any(ch not in "0123456789abcdef" for ch in v):
        raise _bad(f"field {key!r} must be {KEY_ID_CHARS} lowercase hex characters")
    return v


def _names(f: dict, key: str) -> tuple[str, ...]:
    v = f.get(key)
    if not isinstance(v, list) or len(v) > MAX_BLOBS:
        raise _bad(f"field {key!r} must be a list of names")
    out = tuple(_name(x, key) for x in v)
    if len(set(out)) != len(out):
        raise _bad(f"field {key!r} lists a name twice")
    return out


def _blob(m: Message, i: int, size: int | None = None, what: str = "blob") -> bytes:
    if i >= len(m.blobs):
        raise _bad(f"{what} {i} is missing ({len(m.blobs)} blobs)")
    b = m.blobs[i]
    if size is not None and len(b) != size:
        raise _bad(f"{what} must be {size} bytes (got {len(b)})")
    return b


def _blob_count(m: Message, n: int) -> None:
    if len(m.blobs) != n:
        raise _bad(f"{m.tag} message carries {len(m.blobs)} blobs, expected {n}")


# ---- per message ------------------------------------------------------------------------------------


def cert_bytes(c: TransportCert) -> bytes:
    return encode(TRANSPORT_CERT, {"holder": c.holder}, [c.public, c.signature])


def cert_from(m: Message) -> TransportCert:
    f = _expect(m, TRANSPORT_CERT)
    _blob_count(m, 2)
    return TransportCert(_str(f, "holder"), _blob(m, 0, X25519_BYTES, "transport key"), _blob(m, 1, SIGNATURE_BYTES, "signature"))


def certs_bytes(certs: Sequence[TransportCert]) -> bytes:
    return encode(HOLDER_CERTS, {"holders": [c.holder for c in certs]}, [b for c in certs for b in (c.public, c.signature)])


def certs_from(m: Message) -> dict[str, TransportCert]:
    hs = _names(_expect(m, HOLDER_CERTS), "holders")
    _blob_count(m, 2 * len(hs))
    return {h: TransportCert(h, _blob(m, 2 * i, X25519_BYTES, "transport key"), _blob(m, 2 * i + 1, SIGNATURE_BYTES, "signature"))
            for i, h in enumerate(hs)}


def epoch_bytes(k: EpochKeys, only: str | None = None) -> bytes:
    """The epoch's public context and signature, with every wrapped key (``only``: just that holder's)."""
    wrapped = [w for h, w in sorted(k.wrapped.items()) if only is None or h == only]
    fields = {"epoch": k.epoch, "key_id": k.key_id, "generator": k.generator, "wrapped": [[w.holder, w.key_id] for w in wrapped]}
    blobs = [k.public_context, k.signature] + [b for w in wrapped for b in (w.ephemeral_public, w.nonce, w.ciphertext)]
    return encode(EPOCH_KEYS, fields, blobs)


def epoch_from(m: Message) -> EpochKeys:
    f = _expect(m, EPOCH_KEYS)
    rows = f.get("wrapped")
    if not isinstance(rows, list) or not all(isinstance(r, list) and len(r) == 2 for r in rows):
        raise _bad("field 'wrapped' must be a list of [holder, key_id] pairs")
    key_id = _key_id(f)
    _blob_count(m, 2 + 3 * len(rows))
    wrapped = {}
    for i, (holder, wkey) in enumerate(rows):
        holder = _name(holder, "wrapped")
        if holder in wrapped or wkey != key_id:
            raise _bad(f"wrapped key {i} is a second copy for {holder!r} or for another key id")
        b = 2 + 3 * i
        wrapped[holder] = WrappedSecretKey(holder, key_id, _blob(m, b, X25519_BYTES, "ephemeral key"),
                                           _blob(m, b + 1, NONCE_BYTES, "nonce"), _blob(m, b + 2, None, "sealed key"))
        if len(wrapped[holder].ciphertext) < 16:
            raise _bad("sealed key shorter than its AEAD tag")
    if not m.blobs[0]:
        raise _bad("empty public context")
    return EpochKeys(_int(f, "epoch"), key_id, m.blobs[0], _str(f, "generator"), _blob(m, 1, SIGNATURE_BYTES, "signature"), wrapped)


def contribution_bytes(c: Contribution) -> bytes:
    return encode(CONTRIBUTION, _contribution_fields(c), [c.signature, *c.chunks])


def _contribution_fields(c: Contribution) -> dict:
    return {"round_id": c.round_id, "member": c.member, "key_id": c.key_id, "n_values": c.n_values, "clipped": c.clipped,
            "commitments": c.commitments.hex()}


def _digest(f: dict, key: str) -> bytes:
    """A hex SHA-256 field ("" allowed: a contribution not yet revealed under a commitment list)."""
    v = f.get(key)
    if not isinstance(v, str) or len(v) not in (0, 2 * DIGEST_BYTES) or any(ch not in "0123456789abcdef" for ch in v):
        raise _bad(f"field {key!r} must be empty or {2 * DIGEST_BYTES} lowercase hex characters")
    return bytes.fromhex(v)


def _contribution(f: dict, signature: bytes, chunks: tuple[bytes, ...]) -> Contribution:
    if not chunks:
        raise _bad("a contribution carries at least one ciphertext")
    if len(signature) != SIGNATURE_BYTES:
        raise _bad(f"signature must be {SIGNATURE_BYTES} bytes (got {len(signature)})")
    return Contribution(_int(f, "round_id"), _str(f, "member"), _key_id(f), _int(f, "n_values"), chunks,
                        _int(f, "clipped"), signature, _digest(f, "commitments"))


def contribution_from(m: Message) -> Contribution:
    f = _expect(m, CONTRIBUTION)
    if not m.blobs:
        raise _bad("contribution without a signature")
    return _contribution(f, m.blobs[0], tuple(m.blobs[1:]))


def summed_bytes(s: SummedCiphertext, n_values: int) -> bytes:
    """What the aggregator sends every key holder: the accepted, member-signed contributions (the holder
    re-adds them itself, so it decrypts nothing but a sum of at least min_cohort signed contributions) and the
    commitment list they were revealed under (the commitments' blobs come last)."""
    rows = [dict(_contribution_fields(c), chunks=len(c.chunks)) for c in s.contributions]
    f = {"round_id": s.round_id, "key_id": s.key_id, "contributors": list(s.contributors), "n_values": n_values,
         "contributions": rows, "commitments": [_commitment_fields(c) for c in s.commitments]}
    return encode(SUMMED, f, [b for c in s.contributions for b in (c.signature, *c.chunks)]
                  + [b for c in s.commitments for b in (c.digest, c.signature)])


def summed_from(m: Message) -> tuple[SummedCiphertext, int]:
    f = _expect(m, SUMMED)
    rows = f.get("contributions")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise _bad("field 'contributions' must be a list of objects")
    crows = f.get("commitments")
    if not isinstance(crows, list) or not all(isinstance(r, dict) for r in crows):
        raise _bad("field 'commitments' must be a list of objects")
    need = 0
    for r in rows:
        need += 1 + _int(r, "chunks", MAX_BLOBS)
    _blob_count(m, need + 2 * len(crows))
    out, off = [], 0
    for r in rows:
        k = r["chunks"]
        out.append(_contribution(r, m.blobs[off], tuple(m.blobs[off + 1 : off + 1 + k])))
        off += 1 + k
    listed = _commitment_list(crows, m.blobs[off:])
    return (SummedCiphertext(_int(f, "round_id"), _key_id(f), _names(f, "contributors"), tuple(out), listed),
            _int(f, "n_values"))


def decrypted_bytes(sums: np.ndarray, c: Confirmation) -> bytes:
    f = {"holder": c.holder, "round_id": c.round_id, "key_id": c.key_id, "contributors": list(c.contributors)}
    return encode(DECRYPTED, f, [np.ascontiguousarray(sums, dtype="<i8").tobytes(), c.digest, c.signature])


def decrypted_from(m: Message) -> tuple[np.ndarray, Confirmation]:
    f = _expect(m, DECRYPTED)
    _blob_count(m, 3)
    raw = m.blobs[0]
    if len(raw) % 8:
        raise _bad(f"integer sums of {len(raw)} bytes, not a whole number of int64")
    sums = np.frombuffer(raw, dtype="<i8").astype(np.int64)
    conf = Confirmation(_str(f, "holder"), _int(f, "round_id"), _key_id(f), _names(f, "contributors"),
                        _blob(m, 1, DIGEST_BYTES, "digest"), _blob(m, 2, SIGNATURE_BYTES, "signature"))
    return sums, conf


def abstain_bytes(round_id: int, member: str, reason: str) -> bytes:
    """A member that cannot encode its own vector (NaN, infinity) says so instead of contributing; it stays in
    the round (a key holder still decrypts). The aggregator rejects it by name with ``reason``."""
    return encode(ABSTAIN, {"round_id": round_id, "member": member, "reason": reason[:MAX_NAME_CHARS] or "?"})


def abstain_from(m: Message) -> tuple[int, str, str]:
    """(round_id, member, reason) of an abstention."""
    f = _expect(m, ABSTAIN)
    _blob_count(m, 0)
    return _int(f, "round_id"), _str(f, "member"), _str(f, "reason")


def _commitment_fields(c: Commitment) -> dict:
    out = {"round_id": c.round_id, "member": c.member, "key_id": c.key_id, "n_values": c.n_values, "n_chunks": c.n_chunks}
    return {**out, "context": c.context.hex()} if c.context else out


def _commitment(f: dict, digest: bytes, signature: bytes) -> Commitment:
    if len(digest) != DIGEST_BYTES or len(signature) != SIGNATURE_BYTES:
        raise _bad(f"a commitment carries a {DIGEST_BYTES}-byte digest and a {SIGNATURE_BYTES}-byte signature")
    context = f.get("context", "")
    if not isinstance(context, str) or (context and (len(context) != 2 * DIGEST_BYTES
                                                     or any(ch not in "0123456789abcdef" for ch in context))):
        raise _bad(f"field 'context' must be {2 * DIGEST_BYTES} lowercase hex characters")
    return Commitment(_int(f, "round_id"), _str(f, "member"), _key_id(f), _int(f, "n_values"),
                      _int(f, "n_chunks", MAX_BLOBS), digest, signature, bytes.fromhex(context))


def _commitment_list(rows: list, blobs: Sequence[bytes]) -> tuple[Commitment, ...]:
    if len(blobs) != 2 * len(rows):
        raise _bad(f"{len(rows)} commitments carried by {len(blobs)} blobs")
    out = tuple(_commitment(r, blobs[2 * i], blobs[2 * i + 1]) for i, r in enumerate(rows))
    if len({c.member for c in out}) != len(out):
        raise _bad("the commitment list names a member twice")
    return out


def commitment_bytes(c: Commitment) -> bytes:
    """A member's signed commitment (its answer to ckks_commit)."""
    return encode(COMMITMENT, _commitment_fields(c), [c.digest, c.signature])


def commitment_from(m: Message) -> Commitment:
    f = _expect(m, COMMITMENT)
    _blob_count(m, 2)
    return _commitment(f, m.blobs[0], m.blobs[1])


def commitments_bytes(cs: Sequence[Commitment]) -> bytes:
    """The commitment list the aggregator collected (its ckks_protect request to every committed member)."""
    return encode(COMMITMENTS, {"commitments": [_commitment_fields(c) for c in cs]},
                  [b for c in cs for b in (c.digest, c.signature)])


def commitments_from(m: Message) -> tuple[Commitment, ...]:
    f = _expect(m, COMMITMENTS)
    rows = f.get("commitments")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise _bad("field 'commitments' must be a list of objects")
    return _commitment_list(rows, m.blobs)
