"""`SiteClient`: a member's outbound connection to its federation (no inbound port needed).

Every call gets a fresh envelope (CSPRNG nonce, current round). Calls that fail before reaching
the federation (gRPC UNAVAILABLE: network down, server restarting, TLS handshake refused) are
retried with capped exponential backoff and full jitter; a refusal from the federation is never
retried and surfaces as `Refused` with its reason. Server messages are checked too: the sender
is the expected federation, rounds match, transfers verify.

The member trusts no key on the federation's word. Every announcement is checked here, by the member
(`verify_announcement`): each peer key must come with a certificate that chains to the CA the member
trusts, is valid now, names that peer and binds exactly that key; the federation's own certificate
must name the federation the member meant to reach (its key becomes ``Announcement.aggregator_key``);
and, given the roster the member knows independently (``members``: its federation's children in the
world file), the cohort may name no one else. An announcement that fails is refused: the member
takes no part in that round (`watch_rounds` skips it and records why in ``refused_announcements``).
Secure-aggregation messages are accepted only from the federation itself.
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol, TypeVar

import grpc

from worldlm_secure.errors import TransportError
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.transport import federation_pb2 as pb
from worldlm_secure.transport import federation_pb2_grpc as pb_grpc
from worldlm_secure.transport.chunks import DEFAULT_CHUNK_BYTES, Assembler, Payload, TransferLimits, iter_parts
from worldlm_secure.transport.envelope import enroll_message, make_envelope
from worldlm_secure.transport.federation_pb2 import RefusalReason as R
from worldlm_secure.transport.handler import Announcement, Inbound, LedgerHead
from worldlm_secure.transport.refusal import Refused
from worldlm_secure.transport.tls import NodeCredentials, verify_certificate

log = logging.getLogger("worldlm_secure.transport")
T = TypeVar("T")
MAX_LEDGER_RECEIPT = 64 << 10  # a ledger receipt is about 1 KB of canonical JSON


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of calls that did not reach the federation. Seconds are wall time."""

    attempts: int = 5
    initial_backoff: float = 0.2
    max_backoff: float = 10.0
    multiplier: float = 2.0

    def delay(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max, initial * multiplier**attempt)]."""
        cap = min(self.max_backoff, self.initial_backoff * self.multiplier**attempt)
        return cap * secrets.randbelow(1_000_001) / 1_000_000


@dataclass(frozen=True)
class Enrollment:
    """The federation's answer to `SiteClient.enroll`."""

    federation: str
    current_round: int
    heartbeat_seconds: int


@dataclass(frozen=True)
class Receipt:
    """What the federation acknowledged receiving (checked against what was sent)."""

    round_id: int
    total_bytes: int
    sha256: bytes
    ledger_receipt: bytes = b""  # the aggregator's signed ledger receipt of the head we sent (ledger.md §7)


class MemberLink(Protocol):
    """What a member's side of a secure-aggregation round uses of its connection: a `SiteClient`, or a
    wrapper around one (node.receipts.ReceiptingClient)."""

    @property
    def federation(self) -> str: ...

    def upload_update(self, payload: Payload, *, secagg_kind: int = 0, round_id: int | None = None) -> Receipt: ...

    def send_secagg(self, secagg_kind: int, payload: Payload, *, round_id: int | None = None) -> Receipt: ...

    def fetch_secagg(self, secagg_kind: int = 0, *, round_id: int | None = None) -> list[Inbound]: ...


class SiteClient:
    """Connect to the federation ``federation`` at ``target`` (host:port) as the node in ``credentials``."""

    def __init__(
        self,
        target: str,
        credentials: NodeCredentials,
        federation: str,
        *,
        identity: NodeIdentity | None = None,
        retry: RetryPolicy | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        limits: TransferLimits | None = None,
        timeout: float = 30.0,
        members: Iterable[str] | None = None,
    ) -> None:
        """``members``: the federation's members as this node knows them independently (the world file's
        children of ``federation``); an announced cohort naming anyone else is refused. None: no roster
        check (the certificate checks still apply)."""
        self.target = target
        self.credentials = credentials
        self.federation = federation
        self.identity = identity
        self.retry = retry or RetryPolicy()
        self.chunk_bytes = chunk_bytes
        self.limits = limits or TransferLimits()
        self.timeout = timeout  # seconds, for unary calls; streams run until done
        self.round_id = 0  # the latest round this member has seen
        self.members = frozenset(members) if members is not None else None
        if self.members is not None and credentials.name not in self.members:
            raise TransportError(f"{credentials.name!r} is not among the members it was given for federation {federation!r}; check the world file")
        # round id -> why its announcement was refused (the latest 100)
        self.refused_announcements: OrderedDict[int, Refused] = OrderedDict()
        self._seen: OrderedDict[bytes, None] = OrderedDict()  # recent server nonces (replay check)
        self._lock = threading.Lock()
        self._channel = grpc.secure_channel(
            target,
            credentials.channel_credentials(),
            options=[
                # The federation must present a certificate naming it (SAN), whatever address we dial.
                ("grpc.ssl_target_name_override", federation),
                ("grpc.default_authority", federation),
                ("grpc.max_receive_message_length", self.limits.grpc_message_bytes),
                ("grpc.max_send_message_length", chunk_bytes + (64 << 10)),
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.enable_retries", 0),  # we retry ourselves, with fresh nonces
                # Reconnect no slower than our own backoff, or retries would hit a still-failed channel.
                ("grpc.initial_reconnect_backoff_ms", max(50, int(self.retry.initial_backoff * 1000))),
                ("grpc.min_reconnect_backoff_ms", max(50, int(self.retry.initial_backoff * 1000))),
                ("grpc.max_reconnect_backoff_ms", max(100, int(self.retry.max_backoff * 1000))),
            ],
        )
        self._stub = pb_grpc.FederationStub(self._channel)

    @property
    def name(self) -> str:
        return self.credentials.name

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "SiteClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- calls ----

    def enroll(self) -> Enrollment:
        """Prove possession of the Ed25519 signing key the CA bound into our certificate."""
        if self.identity is None:
            raise TransportError(f"{self.name}: enroll needs the node's signing key; pass identity=NodeIdentity.load(...)")
        identity = self.identity
        fingerprint = self.credentials.fingerprint

        def call() -> pb.EnrollReply:
            env = make_envelope(self.name, self.round_id)
            sig = identity.sign(enroll_message(env, self.federation, fingerprint))
            req = pb.EnrollRequest(envelope=env, signing_public_key=identity.public_bytes, signature=sig)
            return self._stub.Enroll(req, timeout=self.timeout)

        reply = self._retrying("Enroll", call)
        self.check_server_envelope(reply.envelope, None)
        self._advance(reply.current_round)
        return Enrollment(reply.federation, reply.current_round, reply.heartbeat_seconds)

    def heartbeat(self, status: str = "") -> int:
        """Tell the federation we are alive; returns its current round."""
        reply = self._retrying(
            "SendHeartbeat",
            lambda: self._stub.SendHeartbeat(
                pb.Heartbeat(envelope=make_envelope(self.name, self.round_id), status=status), timeout=self.timeout
            ),
        )
        self.check_server_envelope(reply.envelope, None)
        self._advance(reply.current_round)
        return reply.current_round

    def watch_rounds(
        self, after_round: int | None = None, on_refused: Callable[[int, Refused], None] | None = None
    ) -> Iterator[Announcement]:
        """Verified announcements of rounds after ``after_round`` (default: the latest seen), as they open.

        Blocks between announcements; the stream is reopened (with backoff) if the connection drops
        or the federation restarts. Stop by leaving the loop (or closing the client). An announcement
        that fails `verify_announcement` is not yielded: it is logged, kept in
        ``refused_announcements`` and passed to ``on_refused(round_id, refusal)``; this member takes no
        part in that round.
        """
        after = self.round_id if after_round is None else after_round
        failures = 0
        while True:
            req = pb.WatchRequest(envelope=make_envelope(self.name, min(after, self.round_id)), after_round=after)
            try:
                for ann in self._stub.WatchRounds(req):
                    failures = 0
                    self.check_server_envelope(ann.envelope, None)
                    if ann.envelope.round_id <= after:
                        raise Refused(R.REFUSAL_WRONG_ROUND, f"announcement of round {ann.envelope.round_id} after round {after}")
                    after = ann.envelope.round_id
                    self._advance(after)
                    try:
                        verified = self.verify_announcement(ann)
                    except Refused as refused:
                        log.warning("%s: %s", self.name, refused)
                        self.refused_announcements[after] = refused
                        while len(self.refused_announcements) > 100:
                            self.refused_announcements.popitem(last=False)
                        if on_refused is not None:
                            on_refused(after, refused)
                        continue
                    yield verified
                # The federation ended the stream (it is shutting down or restarting): reopen it.
                log.info("WatchRounds stream from %s ended; reopening", self.target)
                time.sleep(self.retry.delay(0))
            except grpc.RpcError as err:
                try:
                    failures = self._after_failure("WatchRounds", err, failures)
                except Refused as refused:
                    if refused.reason == R.REFUSAL_OVER_QUOTA and failures + 1 < self.retry.attempts:
                        # our previous stream may still be open at the federation (it notices a drop late)
                        time.sleep(self.retry.delay(failures))
                        failures += 1
                    elif not self._reenroll_after(refused, "WatchRounds"):
                        raise

    def verify_announcement(self, ann: pb.RoundAnnouncement, now: dt.datetime | None = None) -> Announcement:
        """Check an announcement as this member (module docstring) and return it with only verified keys.

        Raises `Refused` naming the peer (or the federation) and why: ``UNTRUSTED_CERTIFICATE`` (no
        certificate, another CA, wrong name, unparsable), ``CERTIFICATE_EXPIRED``, ``BAD_SIGNATURE`` (the
        key is not the one the certificate binds), ``NOT_IN_ROSTER`` (a cohort member this member does
        not know), ``MALFORMED`` (a name twice, a key for someone outside the cohort)."""
        rid = ann.envelope.round_id
        ca = self.credentials.ca_certificate

        def refuse(reason: int, who: str, why: str) -> Refused:
            return Refused(reason, f"announcement of round {rid} refused: {who}: {why}; {self.name} takes no part in this round")

        fed_who = f"federation {self.federation!r}"
        if not ann.aggregator_certificate:
            raise refuse(R.REFUSAL_UNTRUSTED_CERTIFICATE, fed_who, "the announcement carries no certificate of the federation")
        try:
            fed = verify_certificate(bytes(ann.aggregator_certificate), ca, name=self.federation, now=now)
        except Refused as exc:
            raise refuse(exc.reason, fed_who, exc.detail) from None
        if fed.signing_public_key is None:
            raise refuse(R.REFUSAL_BAD_SIGNATURE, fed_who, "its certificate binds no signing key")
        cohort = tuple(ann.cohort)
        for i, m in enumerate(cohort):
            if m in cohort[:i]:
                raise refuse(R.REFUSAL_MALFORMED, f"member {m[:80]!r}", "listed twice in the cohort")
            if self.members is not None and m not in self.members:
                raise refuse(R.REFUSAL_NOT_IN_ROSTER, f"member {m[:80]!r}",
                             f"not a member of federation {self.federation!r} in the roster this member knows (the world file)")
        keys: list[tuple[str, bytes]] = []
        for pk in ann.peer_keys:
            who = f"peer {pk.name[:80]!r}"
            if any(pk.name == n for n, _ in keys):
                raise refuse(R.REFUSAL_MALFORMED, who, "listed twice in peer_keys")
            if pk.name not in cohort:
                raise refuse(R.REFUSAL_MALFORMED, who, "has a key but is not in the round's cohort")
            if not pk.certificate:
                raise refuse(R.REFUSAL_UNTRUSTED_CERTIFICATE, who, "no certificate for its key")
            try:
                cert = verify_certificate(bytes(pk.certificate), ca, name=pk.name, now=now)
            except Refused as exc:
                raise refuse(exc.reason, who, exc.detail) from None
            if cert.signing_public_key is None or bytes(pk.signing_public_key) != cert.signing_public_key:
                raise refuse(R.REFUSAL_BAD_SIGNATURE, who, "its signing key is not the key its certificate binds")
            keys.append((pk.name, cert.signing_public_key))
        return Announcement(
            round_id=rid,
            cohort=cohort,
            protocol=ann.protocol,
            params=bytes(ann.params),
            deadline_unix_ms=ann.deadline_unix_ms,
            peer_keys=tuple(keys),
            aggregator_key=fed.signing_public_key,
        )

    def download_model(self, round_id: int | None = None) -> Payload:
        """The model for ``round_id`` (default: the latest round seen), verified end to end."""
        rid = self.round_id if round_id is None else round_id

        def call() -> Payload:
            stream = self._stub.DownloadModel(pb.DownloadRequest(envelope=make_envelope(self.name, rid)))
            transfers = list(self._receive(stream, rid, expect_sender=self.federation))
            if len(transfers) != 1 or transfers[0][0].kind != pb.PAYLOAD_KIND_MODEL:
                raise Refused(R.REFUSAL_MALFORMED, f"model download for round {rid} returned {len(transfers)} transfers")
            return transfers[0][1]

        return self._retrying("DownloadModel", call)

    def upload_update(self, payload: Payload, *, secagg_kind: int = 0, round_id: int | None = None,
                      ledger_head: LedgerHead | None = None) -> Receipt:
        """Upload this member's update: plain (``secagg_kind`` 0) or protected (MASKED_INPUT / CKKS_CIPHERTEXT).
        ``ledger_head``: this member's ledger head, for the federation to countersign (the receipt comes back in
        ``Receipt.ledger_receipt``; the caller checks it, `ledger.receipts.hold`)."""
        kind = pb.PAYLOAD_KIND_UPDATE_PROTECTED if secagg_kind else pb.PAYLOAD_KIND_UPDATE_PLAIN
        return self._upload("UploadUpdate", self._stub.UploadUpdate, payload, kind, secagg_kind, "", round_id, ledger_head)

    def fetch_ledger_receipt(self, head: LedgerHead) -> bytes:
        """The ledger receipt the federation issued for ``head`` (sent with an earlier update), b"" if none."""
        reply = self._retrying(
            "FetchLedgerReceipt",
            lambda: self._stub.FetchLedgerReceipt(
                pb.LedgerReceiptRequest(envelope=make_envelope(self.name, self.round_id), head=head.to_pb()), timeout=self.timeout
            ),
        )
        self.check_server_envelope(reply.envelope, None)
        if len(reply.ledger_receipt) > MAX_LEDGER_RECEIPT:
            raise Refused(R.REFUSAL_OVERSIZED, f"ledger receipt of {len(reply.ledger_receipt)} bytes; at most {MAX_LEDGER_RECEIPT}")
        return bytes(reply.ledger_receipt)

    def send_secagg(self, secagg_kind: int, payload: Payload, *, recipient: str = "", round_id: int | None = None) -> Receipt:
        """Send a secure-aggregation message to the aggregator. ``recipient`` must stay "": v1 defines no
        member-to-member message, and the federation refuses one (``REJECTED``)."""
        return self._upload("SendSecAgg", self._stub.SendSecAgg, payload, pb.PAYLOAD_KIND_SECAGG, secagg_kind, recipient, round_id)

    def fetch_secagg(self, secagg_kind: int = 0, *, round_id: int | None = None) -> list[Inbound]:
        """The federation's secure-aggregation messages for us in the round (``secagg_kind`` 0 = all kinds).

        Every message must come from the federation itself (envelope sender, round, fresh nonce);
        anything else is refused (``SENDER_MISMATCH``): no member's message reaches us through here."""
        rid = self.round_id if round_id is None else round_id

        def call() -> list[Inbound]:
            req = pb.FetchSecAggRequest(envelope=make_envelope(self.name, rid), secagg_kind=secagg_kind)
            out = []
            for header, payload in self._receive(self._stub.FetchSecAgg(req), rid, expect_sender=self.federation):
                if header.recipient != self.name or (secagg_kind and header.secagg_kind != secagg_kind):
                    raise Refused(R.REFUSAL_MALFORMED, "federation returned a secure-aggregation message not addressed to us")
                out.append(Inbound(header.envelope.sender, rid, header.kind, header.secagg_kind, header.recipient, payload))
            return out

        return self._retrying("FetchSecAgg", call)

    def check_server_envelope(self, env: pb.Envelope, round_id: int | None) -> None:
        """Refuse (`Refused`) a message the federation did not send: another sender (SENDER_MISMATCH), another
        round than ``round_id`` when given (WRONG_ROUND), or a nonce among the last 10,000 this client saw (REPLAY)."""
        if env.sender != self.federation:
            raise Refused(R.REFUSAL_SENDER_MISMATCH, f"reply from {env.sender!r}, expected federation {self.federation!r}")
        if round_id is not None and env.round_id != round_id:
            raise Refused(R.REFUSAL_WRONG_ROUND, f"reply for round {env.round_id}, expected round {round_id}")
        nonce = bytes(env.nonce)
        with self._lock:
            if nonce in self._seen:
                raise Refused(R.REFUSAL_REPLAY, "the federation repeated a nonce")
            self._seen[nonce] = None
            while len(self._seen) > 10_000:
                self._seen.popitem(last=False)

    # ---- internals ----

    def _upload(
        self,
        method: str,
        rpc: Callable[..., pb.Receipt],
        payload: Payload,
        kind: int,
        secagg_kind: int,
        recipient: str,
        round_id: int | None,
        ledger_head: LedgerHead | None = None,
    ) -> Receipt:
        rid = self.round_id if round_id is None else round_id
        sha = payload.sha256()  # once, not per retry

        def call() -> pb.Receipt:
            header = pb.TransferHeader(
                envelope=make_envelope(self.name, rid), kind=kind, secagg_kind=secagg_kind, recipient=recipient,
                ledger_head=ledger_head.to_pb() if ledger_head is not None else None,
            )
            return rpc(iter_parts(header, payload, self.chunk_bytes, sha256=sha))

        reply = self._retrying(method, call)
        self.check_server_envelope(reply.envelope, rid)
        if reply.sha256 != sha or reply.total_bytes != payload.nbytes:
            raise Refused(R.REFUSAL_INTEGRITY, f"{method}: the federation acknowledged different bytes than we sent")
        if len(reply.ledger_receipt) > MAX_LEDGER_RECEIPT:
            raise Refused(R.REFUSAL_OVERSIZED, f"{method}: ledger receipt of {len(reply.ledger_receipt)} bytes; at most {MAX_LEDGER_RECEIPT}")
        return Receipt(rid, reply.total_bytes, bytes(reply.sha256), bytes(reply.ledger_receipt))

    def _receive(self, stream: Iterator[pb.TransferPart], round_id: int, expect_sender: str | None) -> Iterator[tuple[pb.TransferHeader, Payload]]:
        """Assemble consecutive transfers from a server stream, verifying each."""
        assembler: Assembler | None = None
        for part in stream:
            which = part.WhichOneof("part")
            if which == "header":
                if assembler is not None:
                    raise Refused(R.REFUSAL_TRUNCATED, "a transfer header arrived before the previous transfer completed")
                env = part.header.envelope
                if expect_sender is not None:
                    self.check_server_envelope(env, round_id)
                elif env.round_id != round_id:
                    raise Refused(R.REFUSAL_WRONG_ROUND, f"transfer for round {env.round_id}, asked for {round_id}")
                assembler = Assembler(part.header, self.limits)
            elif which == "chunk" and assembler is not None:
                assembler.feed(part.chunk)
            else:
                raise Refused(R.REFUSAL_MALFORMED, "chunk without a transfer header")
            if assembler is not None and assembler.complete:
                yield assembler.header, assembler.finish()
                assembler = None
        if assembler is not None:
            assembler.finish()  # raises TRUNCATED

    def _advance(self, round_id: int) -> None:
        with self._lock:
            self.round_id = max(self.round_id, round_id)

    def _retrying(self, method: str, call: Callable[[], T]) -> T:
        failures, reenrolled = 0, False
        while True:
            try:
                return call()
            except grpc.RpcError as err:
                try:
                    failures = self._after_failure(method, err, failures)
                except Refused as refused:
                    if reenrolled or method == "Enroll" or not self._reenroll_after(refused, method):
                        raise
                    reenrolled = True

    def _reenroll_after(self, refused: Refused, method: str) -> bool:
        """Enroll again if the federation forgot us (it restarted); True if the call should be retried."""
        if refused.reason != R.REFUSAL_NOT_ENROLLED or self.identity is None:
            return False
        log.info("%s: federation %s no longer knows us (restarted?); enrolling again", method, self.federation)
        self.enroll()
        return True

    def _after_failure(self, method: str, err: grpc.RpcError, failures: int) -> int:
        """Raise `Refused` for a refusal; sleep and return the new count for a retryable failure."""
        refused = Refused.from_rpc_error(err)
        if refused is not None:
            log.warning("%s refused by %s: %s: %s", method, self.federation, refused.reason_name, refused.detail)
            raise refused from None
        code = err.code() if hasattr(err, "code") else None
        details = " ".join(str(err.details() if hasattr(err, "details") else err).split())
        if code != grpc.StatusCode.UNAVAILABLE or failures + 1 >= self.retry.attempts:
            log.warning("%s to %s at %s failed: %s: %s", method, self.federation, self.target, code, details)
            raise TransportError(
                f"{method} to federation {self.federation!r} at {self.target} failed ({code.name if code else 'error'}: "
                f"{details[:300]}); check the address, that both sides use the same CA, that our certificate is "
                "valid, and that we are on the federation's roster"
            ) from None
        delay = self.retry.delay(failures)
        log.info("%s to %s unavailable (%s); retry %d in %.2f s", method, self.target, details[:120], failures + 1, delay)
        time.sleep(delay)
        return failures + 1
