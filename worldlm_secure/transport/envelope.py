"""Envelopes: who sent a message, for which round, with which nonce and when; and the replay cache.

A receiver accepts an envelope once: the (sender, round, nonce) triple is remembered for as long
as the timestamp would pass the freshness check, so memory stays bounded by the sending rate.
"""

from __future__ import annotations

import secrets
import struct
import threading
import time
from dataclasses import dataclass

from worldlm_secure.transport import federation_pb2 as pb
from worldlm_secure.transport.federation_pb2 import RefusalReason as R
from worldlm_secure.transport.refusal import Refused

PROTOCOL_VERSION = 1
NONCE_BYTES = 16  # 128 random bits: collisions are negligible for any realistic message count


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def make_envelope(sender: str, round_id: int) -> pb.Envelope:
    """A fresh envelope: nonce from the OS CSPRNG (`secrets`), timestamp now."""
    return pb.Envelope(
        protocol_version=PROTOCOL_VERSION,
        sender=sender,
        round_id=round_id,
        nonce=secrets.token_bytes(NONCE_BYTES),
        sent_unix_ms=now_ms(),
    )


def enroll_message(envelope: pb.Envelope, federation: str, cert_fingerprint: bytes) -> bytes:
    """The bytes a member signs with its Ed25519 key to enroll.

    Binds the signing key to this TLS certificate (its SHA-256 fingerprint), this federation and
    this envelope, so the signature cannot be replayed elsewhere. Layout (all fixed or length-prefixed):
    ``b"worldlm.v1 enroll\\0" | u16 len | federation | u16 len | sender | u64 round | nonce(16) |
    i64 sent_unix_ms | fingerprint(32)``, integers big-endian.
    """
    fed, snd = federation.encode(), envelope.sender.encode()
    if len(fed) >= 1 << 16 or len(snd) >= 1 << 16:
        raise Refused(R.REFUSAL_MALFORMED, f"federation and sender names are limited to 65535 bytes (got {len(fed)} and {len(snd)})")
    if len(envelope.nonce) != NONCE_BYTES:  # fixed width, or the signed layout would be ambiguous
        raise Refused(R.REFUSAL_MALFORMED, f"nonce must be {NONCE_BYTES} bytes (got {len(envelope.nonce)})")
    return b"".join(
        (
            b"worldlm.v1 enroll\0",
            struct.pack(">H", len(fed)),
            fed,
            struct.pack(">H", len(snd)),
            snd,
            struct.pack(">Q", envelope.round_id),
            envelope.nonce,
            struct.pack(">q", envelope.sent_unix_ms),
            cert_fingerprint,
        )
    )


@dataclass(frozen=True)
class EnvelopeRules:
    """How strict a receiver is. Seconds are wall-clock seconds."""

    freshness_seconds: float = 300.0  # accepted clock skew plus transit time
    max_nonces_per_sender: int = 100_000  # outstanding (unexpired) nonces before RATE_LIMITED


def check_envelope(envelope: pb.Envelope, *, sender: str, rules: EnvelopeRules, now: int | None = None) -> None:
    """Refuse an envelope with the wrong version, sender, nonce size or a stale timestamp."""
    if envelope.protocol_version != PROTOCOL_VERSION:
        raise Refused(R.REFUSAL_VERSION, f"protocol_version {envelope.protocol_version}; this node speaks {PROTOCOL_VERSION}")
    if envelope.sender != sender:
        raise Refused(R.REFUSAL_SENDER_MISMATCH, f"envelope sender {envelope.sender[:80]!r} but certificate names {sender!r}")
    if len(envelope.nonce) != NONCE_BYTES:
        raise Refused(R.REFUSAL_MALFORMED, f"nonce must be {NONCE_BYTES} bytes (got {len(envelope.nonce)})")
    now = now_ms() if now is None else now
    skew = abs(now - envelope.sent_unix_ms)
    if skew > rules.freshness_seconds * 1000:
        raise Refused(R.REFUSAL_STALE, f"timestamp is {skew / 1000:.0f} s from this node's clock; limit {rules.freshness_seconds:.0f} s")


class ReplayCache:
    """Remembers (sender, round, nonce) until the envelope would be refused as stale anyway."""

    def __init__(self, rules: EnvelopeRules) -> None:
        self._rules = rules
        self._seen: dict[str, dict[tuple[int, bytes], int]] = {}  # sender -> (round, nonce) -> expiry ms
        self._lock = threading.Lock()

    def admit(self, envelope: pb.Envelope, now: int | None = None) -> None:
        """Record the envelope, or refuse it as a replay (call after `check_envelope`)."""
        now = now_ms() if now is None else now
        key = (envelope.round_id, bytes(envelope.nonce))
        expiry = envelope.sent_unix_ms + int(self._rules.freshness_seconds * 1000) + 1
        with self._lock:
            seen = self._seen.setdefault(envelope.sender, {})
            if key in seen:
                raise Refused(R.REFUSAL_REPLAY, f"nonce {key[1].hex()[:16]}... of round {key[0]} from {envelope.sender!r} was already used")
            if len(seen) >= self._rules.max_nonces_per_sender:
                for k in [k for k, exp in seen.items() if exp < now]:
                    del seen[k]
                if len(seen) >= self._rules.max_nonces_per_sender:
                    raise Refused(R.REFUSAL_RATE_LIMITED, f"{len(seen)} unexpired nonces from {envelope.sender!r}; slow down")
            seen[key] = expiry

    def __len__(self) -> int:
        with self._lock:
            return sum(len(s) for s in self._seen.values())
