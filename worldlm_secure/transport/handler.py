"""What the federation's round logic provides to the transport server, and what it receives.

The server does admission (mTLS, roster, envelope, replay, round, chunk integrity) and hands the
handler only messages that passed. A handler refuses a message by raising `Refused` (typically
with ``REFUSAL_REJECTED``); the member sees the reason. `RoundBoard` is the in-memory reference
implementation.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Protocol

from worldlm_secure.transport.chunks import Payload


@dataclass(frozen=True)
class Member:
    """An enrolled member: its name, CA-bound Ed25519 signing key, and TLS certificate fingerprint."""

    name: str
    signing_public_key: bytes
    cert_fingerprint: bytes


@dataclass(frozen=True)
class Announcement:
    """A round the federation opens. ``params`` are opaque engine bytes; times are Unix milliseconds."""

    round_id: int
    cohort: tuple[str, ...]
    protocol: str  # "masking" | "ckks" | "none"
    params: bytes = b""
    deadline_unix_ms: int = 0
    peer_keys: tuple[tuple[str, bytes], ...] = ()  # (member, raw Ed25519 key) for the cohort
    # Raw Ed25519 key that signs the aggregator's secure-aggregation messages. A member's copy comes from
    # the federation's certificate, verified by the member (`SiteClient.verify_announcement`), as do its
    # peer_keys; the aggregator node sets it from its own certificate.
    aggregator_key: bytes = b""


_RELEASE_ID = re.compile(r"^[\x21-\x7e]{1,200}$")  # printable ASCII, no spaces (e.g. "3:shared:eu")


@dataclass(frozen=True)
class LedgerHead:
    """A member's privacy-ledger head sent with its update (protocols/ledger.md §7): the release this update
    is, and the member's entry count and last entry hash (32 bytes) once that release's entry is written."""

    release_id: str
    entry_count: int
    entry_hash: bytes
    signature: bytes = b""  # the member's Ed25519 signature of the head (`ledger.receipts.head_message`), 64 bytes

    @classmethod
    def from_pb(cls, msg: Any) -> "LedgerHead":
        """Decode and check a `pb.LedgerHead` (raises `Refused` MALFORMED)."""
        from worldlm_secure.transport.federation_pb2 import RefusalReason as R
        from worldlm_secure.transport.refusal import Refused

        rid, count, h, sig = str(msg.release_id), int(msg.entry_count), bytes(msg.entry_hash), bytes(msg.signature)
        if not _RELEASE_ID.match(rid) or len(h) != 32 or count >= 1 << 62 or len(sig) not in (0, 64):
            raise Refused(R.REFUSAL_MALFORMED, "a ledger head needs a release id of 1-200 printable ASCII characters, "
                          "an entry count, a 32-byte entry hash and a 64-byte signature (or none)")
        return cls(rid, count, h, sig)

    def to_pb(self) -> Any:
        from worldlm_secure.transport import federation_pb2 as pb

        return pb.LedgerHead(release_id=self.release_id, entry_count=self.entry_count, entry_hash=self.entry_hash,
                             signature=self.signature)


class Countersigner(Protocol):
    """The aggregator's ledger side of updates that carry a `LedgerHead` (the node implements it; the
    transport never touches a ledger). Both return the receipt's canonical JSON, or b"" for none.
    ``signing_public_key`` is the member's Ed25519 key from its CA-verified certificate."""

    def countersign(self, member: str, signing_public_key: bytes, round_id: int, head: LedgerHead) -> bytes: ...

    def issued(self, member: str, signing_public_key: bytes, head: LedgerHead) -> bytes: ...


@dataclass(frozen=True)
class Inbound:
    """A transfer that passed admission: an update, or a secure-aggregation message.

    ``kind`` and ``secagg_kind`` are `PayloadKind` / `SecAggKind` values; ``recipient`` is "" for
    the aggregator, else the member a relayed secure-aggregation message is for.
    """

    sender: str
    round_id: int
    kind: int
    secagg_kind: int
    recipient: str
    payload: Payload
    ledger_head: LedgerHead | None = None  # an update's ledger head, when the member sent one


class FederationHandler(ABC):
    """The round logic behind a `FederationServer`. Methods are called from server threads."""

    @abstractmethod
    def current_round(self) -> int:
        """The round that round-scoped messages must carry (0 before the first round)."""

    @abstractmethod
    def on_enroll(self, member: Member) -> None:
        """A member proved its identity; remember its signing key."""

    def on_heartbeat(self, member: str, status: str) -> None:
        """A member is alive (used for dropout detection). Default: ignore."""

    @abstractmethod
    def next_announcement(self, after_round: int, timeout: float) -> Announcement | None:
        """The first announced round with id > ``after_round``; wait up to ``timeout`` seconds, else None."""

    @abstractmethod
    def model_for(self, member: str, round_id: int) -> Payload | None:
        """The parameters ``member`` starts ``round_id`` from, or None if not available yet."""

    @abstractmethod
    def on_update(self, message: Inbound) -> None:
        """An update arrived (verified, complete). Raise `Refused` to reject it."""

    def admit_transfer(self, sender: str, round_id: int, kind: int, secagg_kind: int, total_bytes: int) -> None:
        """A transfer's header passed admission; raise `Refused` (e.g. ``REFUSAL_OVER_QUOTA``) to refuse it
        before any of its data is read. Default: accept."""

    def countersign(self, message: Inbound, signing_public_key: bytes) -> bytes:
        """``message`` (an update already accepted by `on_update`) carries the member's ledger head: return the
        aggregator's signed ledger receipt of it (canonical JSON), or b"" when this aggregator keeps no ledger.
        ``signing_public_key``: the member's key from its certificate. Default: no ledger."""
        return b""

    def ledger_receipt(self, member: str, signing_public_key: bytes, head: LedgerHead) -> bytes:
        """The receipt issued earlier for exactly ``head`` of ``member`` (a member that crashed before storing
        it asks again), or b"" when there is none. Default: no ledger."""
        return b""

    @abstractmethod
    def on_secagg(self, message: Inbound) -> None:
        """A secure-aggregation message from a member to the aggregator arrived (``recipient`` is always
        "": the server refuses member-to-member messages, which no v1 protocol defines)."""

    @abstractmethod
    def secagg_for(self, member: str, round_id: int, secagg_kind: int) -> list[Inbound]:
        """The aggregator's secure-aggregation messages waiting for ``member`` (kind 0 = all kinds). The
        server sends only those whose ``sender`` is the federation itself."""
