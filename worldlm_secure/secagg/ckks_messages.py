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
from worldlm_secure.secagg.ckks import Confirmation, Contribution, SummedCiphertext
from worldlm_secure.secagg.ckks_keys import EpochKeys, TransportCert, WrappedSecretKey

TRANSPORT_CERT = "transport_cert"  # key holder -> aggregator (PUBLIC_CONTEXT)
HOLDER_CERTS = "holder_certs"  # aggregator -> generator (PUBLIC_CONTEXT)
EPOCH_KEYS = "epoch_keys"  # generator -> aggregator, aggregator -> every member (PUBLIC_CONTEXT)
CONTRIBUTION = "contribution"  # member -> aggregator (UploadUpdate CIPHERTEXT)
SUMMED = "summed"  # aggregator -> key holders (AGGREGATE)
DECRYPTED = "decrypted"  # key holder -> aggregator (DECRYPTED)


@dataclass(frozen=True)
class Message:
    """A decoded message: its tag, scalar fields and blobs."""

    tag: str
    fields: dict
    blobs: tuple[bytes, ...]


def encode(tag: str, fields: dict, blobs: Sequence[bytes] = ()) -> bytes:
    head = json.dumps({"tag": tag, "fields": fields, "sizes": [len(b) for b in blobs]}, sort_keys=True).encode()
    return b"".join([struct.pack(">I", len(head)), head, *blobs])


def decode(data: bytes) -> Message:
    try:
        (n,) = struct.unpack(">I", data[:4])
        head = json.loads(data[4 : 4 + n].decode())
        blobs, off = [], 4 + n
        for size in head["sizes"]:
            if off + int(size) > len(data):
                raise ValueError("truncated blob")
            blobs.append(bytes(data[off : off + int(size)]))
            off += int(size)
        if off != len(data):
            raise ValueError("trailing bytes")
        return Message(str(head["tag"]), dict(head["fields"]), tuple(blobs))
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise SecAggError(f"malformed CKKS message ({exc})") from None


# ---- per message ------------------------------------------------------------------------------------


def cert_bytes(c: TransportCert) -> bytes:
    return encode(TRANSPORT_CERT, {"holder": c.holder}, [c.public, c.signature])


def cert_from(m: Message) -> TransportCert:
    return TransportCert(str(m.fields["holder"]), m.blobs[0], m.blobs[1])


def certs_bytes(certs: Sequence[TransportCert]) -> bytes:
    return encode(HOLDER_CERTS, {"holders": [c.holder for c in certs]}, [b for c in certs for b in (c.public, c.signature)])


def certs_from(m: Message) -> dict[str, TransportCert]:
    hs = [str(h) for h in m.fields["holders"]]
    return {h: TransportCert(h, m.blobs[2 * i], m.blobs[2 * i + 1]) for i, h in enumerate(hs)}


def epoch_bytes(k: EpochKeys, only: str | None = None) -> bytes:
    """The epoch's public context and signature, with every wrapped key (``only``: just that holder's)."""
    wrapped = [w for h, w in sorted(k.wrapped.items()) if only is None or h == only]
    fields = {"epoch": k.epoch, "key_id": k.key_id, "generator": k.generator, "wrapped": [[w.holder, w.key_id] for w in wrapped]}
    blobs = [k.public_context, k.signature] + [b for w in wrapped for b in (w.ephemeral_public, w.nonce, w.ciphertext)]
    return encode(EPOCH_KEYS, fields, blobs)


def epoch_from(m: Message) -> EpochKeys:
    f = m.fields
    wrapped = {}
    for i, (holder, key_id) in enumerate(f["wrapped"]):
        b = m.blobs[2 + 3 * i : 5 + 3 * i]
        wrapped[str(holder)] = WrappedSecretKey(str(holder), str(key_id), b[0], b[1], b[2])
    return EpochKeys(int(f["epoch"]), str(f["key_id"]), m.blobs[0], str(f["generator"]), m.blobs[1], wrapped)


def contribution_bytes(c: Contribution) -> bytes:
    f = {"round_id": c.round_id, "member": c.member, "key_id": c.key_id, "n_values": c.n_values, "clipped": c.clipped}
    return encode(CONTRIBUTION, f, [c.signature, *c.chunks])


def contribution_from(m: Message) -> Contribution:
    f = m.fields
    return Contribution(int(f["round_id"]), str(f["member"]), str(f["key_id"]), int(f["n_values"]), tuple(m.blobs[1:]),
                        int(f["clipped"]), m.blobs[0])


def summed_bytes(s: SummedCiphertext, n_values: int) -> bytes:
    f = {"round_id": s.round_id, "key_id": s.key_id, "contributors": list(s.contributors), "n_values": n_values}
    return encode(SUMMED, f, list(s.chunks))


def summed_from(m: Message) -> tuple[SummedCiphertext, int]:
    f = m.fields
    return SummedCiphertext(int(f["round_id"]), str(f["key_id"]), tuple(str(c) for c in f["contributors"]), m.blobs), int(f["n_values"])


def decrypted_bytes(sums: np.ndarray, c: Confirmation) -> bytes:
    f = {"holder": c.holder, "round_id": c.round_id, "key_id": c.key_id, "contributors": list(c.contributors)}
    return encode(DECRYPTED, f, [np.ascontiguousarray(sums, dtype="<i8").tobytes(), c.digest, c.signature])


def decrypted_from(m: Message) -> tuple[np.ndarray, Confirmation]:
    f = m.fields
    sums = np.frombuffer(m.blobs[0], dtype="<i8").astype(np.int64)
    conf = Confirmation(str(f["holder"]), int(f["round_id"]), str(f["key_id"]), tuple(str(c) for c in f["contributors"]),
                        m.blobs[1], m.blobs[2])
    return sums, conf
