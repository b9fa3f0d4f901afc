"""What the federation's round logic provides to the transport server, and what it receives.

The server does admission (mTLS, roster, envelope, replay, round, chunk integrity) and hands the
handler only messages that passed. A handler refuses a message by raising `Refused` (typically
with ``REFUSAL_REJECTED``); the member sees the reason. `RoundBoard` is the in-memory reference
implementation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

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

    @abstractmethod
    def on_secagg(self, message: Inbound) -> None:
        """A secure-aggregation message from a member to the aggregator arrived (``recipient`` is always
        "": the server refuses member-to-member messages, which no v1 protocol defines)."""

    @abstractmethod
    def secagg_for(self, member: str, round_id: int, secagg_kind: int) -> list[Inbound]:
        """The aggregator's secure-aggregation messages waiting for ``member`` (kind 0 = all kinds). The
        server sends only those whose ``sender`` is the federation itself."""
