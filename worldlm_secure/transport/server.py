"""`FederationServer`: the gRPC service a federation runs; its members connect to it outbound.

Admission, in order, for every request (each failure is logged with its reason and counted in
`FederationServer.refusals`; the server keeps serving everyone else):
  1. mutual TLS (gRPC): the client certificate chains to our CA and is in its validity period;
  2. `tls.verify_peer`: the same checks again on the accepted certificate, then the roster;
  3. the request parses (we deserialize ourselves so that garbage is a logged refusal);
  4. the envelope: version, sender = certificate name, 16-byte nonce, fresh timestamp;
  5. the round: round-scoped requests carry the current round; others may not be ahead of it;
  6. the replay cache: (sender, round, nonce) never seen before;
  7. enrollment (round-scoped requests and watches), then chunk-by-chunk transfer checks.

Right after step 2 the call takes one of the member's slots: at most ``max_calls_per_member`` calls
of one member run at once, and at most ``max_streams_per_member`` of each streaming method, so one
member cannot hold the worker pool (sized by default so that every member's cap fits) and starve the
others; a call over the cap is refused ``OVER_QUOTA`` at once. Members may not address
secure-aggregation messages to other members (no v1 protocol defines one); a member's fetch gets only
messages the federation itself sends.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from cryptography.hazmat.primitives import serialization

from worldlm_secure.errors import TransportError
from worldlm_secure.identity import verify_signature
from worldlm_secure.transport import federation_pb2 as pb
from worldlm_secure.transport.chunks import DEFAULT_CHUNK_BYTES, Assembler, TransferLimits, iter_parts
from worldlm_secure.transport.envelope import (
    EnvelopeRules,
    ReplayCache,
    check_envelope,
    enroll_message,
    make_envelope,
)
from worldlm_secure.transport.federation_pb2 import RefusalReason as R
from worldlm_secure.transport.handler import Announcement, FederationHandler, Inbound, LedgerHead, Member
from worldlm_secure.transport.refusal import Refused
from worldlm_secure.transport.tls import NodeCredentials, PeerCertificate, Roster, peer_certificate_pem, verify_peer

log = logging.getLogger("worldlm_secure.transport")

SERVICE = "worldlm.v1.Federation"
_UPDATE_SECAGG_KINDS = frozenset({pb.SECAGG_MASKING_MASKED_INPUT, pb.SECAGG_CKKS_CIPHERTEXT})
_CLIENT_STREAMS = frozenset({"UploadUpdate", "SendSecAgg"})  # unary-reply methods that are streams too


@dataclass(frozen=True)
class ServerConfig:
    """Server settings. ``bind`` is host:port (port 0 = any free port); seconds are wall time."""

    bind: str = "127.0.0.1:0"
    # Worker threads; every running call holds one (a WatchRounds stream for as long as it is open).
    # None: roster size * max_calls_per_member + 8, so members at their caps never starve each other.
    max_workers: int | None = None
    max_calls_per_member: int = 6  # concurrent calls of one member, all methods (an honest one uses <= 3)
    max_streams_per_member: int = 2  # concurrent calls of one member per streaming method (WatchRounds, ...)
    envelope: EnvelopeRules = field(default_factory=EnvelopeRules)
    limits: TransferLimits = field(default_factory=TransferLimits)
    chunk_bytes: int = DEFAULT_CHUNK_BYTES  # size of chunks this server sends
    heartbeat_seconds: int = 10  # advertised to members
    watch_poll_seconds: float = 0.5  # how often an idle watch stream checks for shutdown


class _Malformed:
    """Stands in for a request that did not parse, so the servicer can refuse it with a reason."""

    def __init__(self, cls_name: str, exc: Exception) -> None:
        self.detail = f"{cls_name} does not parse ({type(exc).__name__})"


def _parser(cls: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except Exception as exc:  # DecodeError and friends: refused by the servicer, with a log line
            return _Malformed(cls.__name__, exc)

    return parse


def _parsed(request: Any) -> Any:
    if isinstance(request, _Malformed):
        raise Refused(R.REFUSAL_MALFORMED, request.detail)
    return request


class FederationServer:
    """Serve one federation to its roster over mutual TLS."""

    def __init__(
        self,
        credentials: NodeCredentials,
        roster: Roster,
        handler: FederationHandler,
        config: ServerConfig | None = None,
    ) -> None:
        self.credentials = credentials
        self.roster = roster
        self.handler = handler
        self.config = config or ServerConfig()
        self.refusals: collections.Counter[str] = collections.Counter()
        self._ca = credentials.ca_certificate
        self._own_der = credentials.certificate.public_bytes(serialization.Encoding.DER)
        self._replay = ReplayCache(self.config.envelope)
        self._enrolled: dict[str, bytes] = {}  # member -> fingerprint of the certificate it enrolled with
        self._certificates: dict[str, bytes] = {}  # member -> DER of that certificate (shown in announcements)
        self._calls: dict[str, collections.Counter[str]] = {}  # member -> method -> calls running now
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: grpc.Server | None = None
        self.port = 0

    @property
    def name(self) -> str:
        return self.credentials.name

    @property
    def target(self) -> str:
        """host:port a member on this machine dials."""
        host = self.config.bind.rsplit(":", 1)[0]
        return f"{'127.0.0.1' if host in ('0.0.0.0', '[::]', '') else host}:{self.port}"

    def start(self) -> int:
        """Bind and start serving; returns the bound port."""
        limits = self.config.limits
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="worldlm-rpc"),
            options=[
                ("grpc.max_receive_message_length", limits.grpc_message_bytes),
                ("grpc.max_send_message_length", self.config.chunk_bytes + (64 << 10)),
                ("grpc.so_reuseport", 0),  # no other process may share our port
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ],
        )
        server.add_generic_rpc_handlers((self._handlers(),))
        try:
            self.port = server.add_secure_port(self.config.bind, self.credentials.server_credentials())
        except RuntimeError:  # newer gRPC raises instead of returning 0
            self.port = 0
        if self.port == 0:
            raise TransportError(f"cannot listen on {self.config.bind}: address in use or not local; choose another bind address")
        server.start()
        self._server = server
        log.info("federation %s serving on %s", self.name, self.target)
        return self.port

    @property
    def workers(self) -> int:
        """Size of the worker pool (threads start only when calls need them)."""
        cfg = self.config
        return cfg.max_workers if cfg.max_workers is not None else len(self.roster.names) * cfg.max_calls_per_member + 8

    def open_calls(self, member: str) -> int:
        """Calls of ``member`` running now (each holds one of its slots)."""
        with self._lock:
            return sum(self._calls.get(member, {}).values())

    def stop(self, grace: float | None = 0) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None

    def __enter__(self) -> "FederationServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(0)

    # ---- wiring ----

    def _handlers(self) -> grpc.GenericRpcHandler:
        out = lambda cls: cls.SerializeToString  # noqa: E731
        g = self._guard
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Enroll": grpc.unary_unary_rpc_method_handler(
                    g("Enroll", self._enroll), _parser(pb.EnrollRequest), out(pb.EnrollReply)
                ),
                "SendHeartbeat": grpc.unary_unary_rpc_method_handler(
                    g("SendHeartbeat", self._heartbeat), _parser(pb.Heartbeat), out(pb.HeartbeatReply)
                ),
                "WatchRounds": grpc.unary_stream_rpc_method_handler(
                    self._guard_stream("WatchRounds", self._watch), _parser(pb.WatchRequest), out(pb.RoundAnnouncement)
                ),
                "DownloadModel": grpc.unary_stream_rpc_method_handler(
                    self._guard_stream("DownloadModel", self._download), _parser(pb.DownloadRequest), out(pb.TransferPart)
                ),
                "UploadUpdate": grpc.stream_unary_rpc_method_handler(
                    g("UploadUpdate", self._upload_update), _parser(pb.TransferPart), out(pb.Receipt)
                ),
                "SendSecAgg": grpc.stream_unary_rpc_method_handler(
                    g("SendSecAgg", self._send_secagg), _parser(pb.TransferPart), out(pb.Receipt)
                ),
                "FetchSecAgg": grpc.unary_stream_rpc_method_handler(
                    self._guard_stream("FetchSecAgg", self._fetch_secagg), _parser(pb.FetchSecAggRequest), out(pb.TransferPart)
                ),
                "FetchLedgerReceipt": grpc.unary_unary_rpc_method_handler(
                    g("FetchLedgerReceipt", self._fetch_ledger_receipt), _parser(pb.LedgerReceiptRequest),
                    out(pb.LedgerReceiptReply),
                ),
            },
        )

    def _guard(self, method: str, fn: Callable[[PeerCertificate, Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def call(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                peer = self._peer(context)  # refuse strangers before looking at their bytes
                with self._slot(peer.name, method, context, stream=method in _CLIENT_STREAMS):
                    return fn(peer, request, context)
            except Refused as refused:
                self._refuse(context, method, refused)
            except grpc.RpcError:
                self._ended_by_grpc(context, method)
                raise  # gRPC recognizes its own error and ends the call quietly with its status
            except Exception:
                log.exception("%s from %s failed", method, context.peer())
                context.abort(grpc.StatusCode.INTERNAL, "internal error")

        return call

    def _guard_stream(
        self, method: str, fn: Callable[[PeerCertificate, Any, grpc.ServicerContext], Iterator[Any]]
    ) -> Callable[..., Any]:
        @functools.wraps(fn)
        def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                peer = self._peer(context)
                with self._slot(peer.name, method, context, stream=True):
                    yield from fn(peer, request, context)
            except Refused as refused:
                self._refuse(context, method, refused)
            except Exception:
                log.exception("%s from %s failed", method, context.peer())
                context.abort(grpc.StatusCode.INTERNAL, "internal error")

        return call

    @contextlib.contextmanager
    def _slot(self, member: str, method: str, context: grpc.ServicerContext, *, stream: bool) -> Iterator[None]:
        """Hold one of ``member``'s call slots for this call; refuse ``OVER_QUOTA`` if it has none left."""
        cfg = self.config
        with self._lock:
            calls = self._calls.setdefault(member, collections.Counter())
            if stream and calls[method] >= cfg.max_streams_per_member:
                raise Refused(R.REFUSAL_OVER_QUOTA, f"{member!r} already has {calls[method]} {method} calls open; "
                              f"the cap is {cfg.max_streams_per_member} per member")
            if sum(calls.values()) >= cfg.max_calls_per_member:
                raise Refused(R.REFUSAL_OVER_QUOTA, f"{member!r} already has {sum(calls.values())} calls open ({method} refused); "
                              f"the cap is {cfg.max_calls_per_member} per member")
            calls[method] += 1
        released = threading.Event()

        def release() -> None:
            with self._lock:
                if released.is_set():
                    return
                released.set()
                calls[method] -= 1
                if calls[method] <= 0:
                    del calls[method]

        context.add_callback(release)  # also when the client cancels a stream we are blocked in
        try:
            yield
        finally:
            release()

    def _ended_by_grpc(self, context: grpc.ServicerContext, method: str) -> None:
        """Reading a client stream failed below us: gRPC already ended the call with its own status."""
        self.refusals["GRPC_LAYER"] += 1
        log.warning(
            "refused %s from %s: GRPC_LAYER: the request stream failed (a message above %d bytes, or the peer cancelled)",
            method,
            context.peer(),
            self.config.limits.grpc_message_bytes,
        )

    def _refuse(self, context: grpc.ServicerContext, method: str, refused: Refused) -> None:
        self.refusals[refused.reason_name] += 1
        log.warning("refused %s from %s: %s: %s", method, context.peer(), refused.reason_name, refused.detail)
        context.set_trailing_metadata(refused.to_metadata())
        context.abort(refused.status_code, f"{refused.reason_name}: {refused.detail}")

    # ---- admission ----

    def _peer(self, context: grpc.ServicerContext) -> PeerCertificate:
        return verify_peer(peer_certificate_pem(context), self._ca, self.roster)

    def _admit(self, peer: PeerCertificate, envelope: pb.Envelope, *, round_scoped: bool, enrolled: bool) -> None:
        """Steps 4-7 of the module docstring, for an admitted peer whose request parsed."""
        check_envelope(envelope, sender=peer.name, rules=self.config.envelope)
        current = self.handler.current_round()
        if round_scoped and envelope.round_id != current:
            raise Refused(R.REFUSAL_WRONG_ROUND, f"message for round {envelope.round_id}; the current round is {current}")
        if not round_scoped and envelope.round_id > current:
            raise Refused(R.REFUSAL_WRONG_ROUND, f"message claims round {envelope.round_id}, ahead of the current round {current}")
        self._replay.admit(envelope)
        if enrolled:
            with self._lock:
                fingerprint = self._enrolled.get(peer.name)
            if fingerprint != peer.fingerprint:
                raise Refused(R.REFUSAL_NOT_ENROLLED, f"{peer.name!r} has not enrolled with this certificate; call Enroll first")

    def _envelope(self, round_id: int) -> pb.Envelope:
        return make_envelope(self.name, round_id)

    # ---- methods ----

    def _enroll(self, peer: PeerCertificate, request: Any, context: grpc.ServicerContext) -> pb.EnrollReply:
        req: pb.EnrollRequest = _parsed(request)
        self._admit(peer, req.envelope, round_scoped=False, enrolled=False)
        if peer.signing_public_key is None:
            raise Refused(R.REFUSAL_BAD_SIGNATURE, f"certificate of {peer.name!r} carries no signing key; re-issue it with `keys issue`")
        if req.signing_public_key != peer.signing_public_key:
            raise Refused(R.REFUSAL_BAD_SIGNATURE, f"signing key presented by {peer.name!r} is not the one its certificate binds")
        message = enroll_message(req.envelope, self.name, peer.fingerprint)
        if not verify_signature(peer.signing_public_key, req.signature, message):
            raise Refused(R.REFUSAL_BAD_SIGNATURE, f"enrollment signature of {peer.name!r} does not verify")
        self.handler.on_enroll(Member(peer.name, peer.signing_public_key, peer.fingerprint))
        with self._lock:
            self._enrolled[peer.name] = peer.fingerprint
            self._certificates[peer.name] = peer.der
        log.info("enrolled %s from %s", peer.name, context.peer())
        current = self.handler.current_round()
        return pb.EnrollReply(
            envelope=self._envelope(current),
            federation=self.name,
            current_round=current,
            heartbeat_seconds=self.config.heartbeat_seconds,
        )

    def _heartbeat(self, peer: PeerCertificate, request: Any, context: grpc.ServicerContext) -> pb.HeartbeatReply:
        req: pb.Heartbeat = _parsed(request)
        self._admit(peer, req.envelope, round_scoped=False, enrolled=False)
        self.handler.on_heartbeat(peer.name, req.status[:200])
        current = self.handler.current_round()
        return pb.HeartbeatReply(envelope=self._envelope(current), current_round=current)

    def _watch(self, peer: PeerCertificate, request: Any, context: grpc.ServicerContext) -> Iterator[pb.RoundAnnouncement]:
        req: pb.WatchRequest = _parsed(request)
        self._admit(peer, req.envelope, round_scoped=False, enrolled=True)
        after = req.after_round
        while context.is_active() and not self._stopping.is_set():
            ann = self.handler.next_announcement(after, self.config.watch_poll_seconds)
            if ann is None:
                continue
            after = ann.round_id
            yield self.announcement(ann)

    def announcement(self, ann: Announcement) -> pb.RoundAnnouncement:
        """The wire form of ``ann``: each peer key with the certificate its member enrolled with, and our
        own certificate, so that every member can check them against its CA and roster itself."""
        with self._lock:
            certs = dict(self._certificates)
        return pb.RoundAnnouncement(
            envelope=self._envelope(ann.round_id),
            cohort=list(ann.cohort),
            protocol=ann.protocol,
            params=ann.params,
            deadline_unix_ms=ann.deadline_unix_ms,
            peer_keys=[pb.PeerKey(name=n, signing_public_key=k, certificate=certs.get(n, b"")) for n, k in ann.peer_keys],
            aggregator_certificate=self._own_der,
        )

    def _download(self, peer: PeerCertificate, request: Any, context: grpc.ServicerContext) -> Iterator[pb.TransferPart]:
        req: pb.DownloadRequest = _parsed(request)
        self._admit(peer, req.envelope, round_scoped=True, enrolled=True)
        payload = self.handler.model_for(peer.name, req.envelope.round_id)
        if payload is None:
            raise Refused(R.REFUSAL_UNAVAILABLE, f"no model for round {req.envelope.round_id} yet; retry after the announcement")
        header = pb.TransferHeader(envelope=self._envelope(req.envelope.round_id), kind=pb.PAYLOAD_KIND_MODEL)
        yield from iter_parts(header, payload, self.config.chunk_bytes)

    def _receive(
        self,
        peer: PeerCertificate,
        request_iterator: Iterator[Any],
        check_kind: Callable[[pb.TransferHeader, PeerCertificate], None],
    ) -> Inbound:
        """Admit the header, its kind and the member's quota (before any data), then assemble and verify the chunks."""
        first = next(request_iterator, None)
        if first is None:
            raise Refused(R.REFUSAL_TRUNCATED, "the transfer stream ended before its header")
        first = _parsed(first)
        if first.WhichOneof("part") != "header":
            raise Refused(R.REFUSAL_MALFORMED, "a transfer must start with its header")
        header = first.header
        self._admit(peer, header.envelope, round_scoped=True, enrolled=True)
        check_kind(header, peer)
        head = LedgerHead.from_pb(header.ledger_head) if header.HasField("ledger_head") else None
        assembler = Assembler(header, self.config.limits)  # checks the declared sizes against the limits
        self.handler.admit_transfer(peer.name, header.envelope.round_id, header.kind, header.secagg_kind, header.total_bytes)
        for part in request_iterator:
            part = _parsed(part)
            if part.WhichOneof("part") != "chunk":
                raise Refused(R.REFUSAL_MALFORMED, "only chunks may follow a transfer header")
            assembler.feed(part.chunk)
        payload = assembler.finish()
        return Inbound(peer.name, header.envelope.round_id, header.kind, header.secagg_kind, header.recipient, payload, head)

    def _receipt(self, inbound: Inbound) -> pb.Receipt:
        """What we received (the digest was verified on arrival, so this is free)."""
        return pb.Receipt(envelope=self._envelope(inbound.round_id), total_bytes=inbound.payload.nbytes, sha256=inbound.payload.sha256())

    def _upload_update(self, peer: PeerCertificate, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> pb.Receipt:
        inbound = self._receive(peer, request_iterator, _check_update_kind)
        self.handler.on_update(inbound)
        log.info("update from %s for round %d: %d bytes", inbound.sender, inbound.round_id, inbound.payload.nbytes)
        reply = self._receipt(inbound)
        if inbound.ledger_head is not None and peer.signing_public_key is not None:
            # The update is accepted: countersign the member's ledger head with the key its certificate binds.
            # A failure here does not take the accepted update back: the member gets no ledger receipt and asks
            # again later (FetchLedgerReceipt), which returns nothing if none was issued.
            try:
                reply.ledger_receipt = self.handler.countersign(inbound, peer.signing_public_key)
            except Exception as exc:  # noqa: BLE001 - logged; the update itself stands
                log.warning("no ledger receipt for %s's update of round %d: %s", inbound.sender, inbound.round_id, exc)
        return reply

    def _fetch_ledger_receipt(self, peer: PeerCertificate, request: Any, context: grpc.ServicerContext) -> pb.LedgerReceiptReply:
        req: pb.LedgerReceiptRequest = _parsed(request)
        self._admit(peer, req.envelope, round_scoped=False, enrolled=True)
        if not req.HasField("head") or peer.signing_public_key is None:
            raise Refused(R.REFUSAL_MALFORMED, "FetchLedgerReceipt needs the ledger head the update carried")
        receipt = self.handler.ledger_receipt(peer.name, peer.signing_public_key, LedgerHead.from_pb(req.head))
        return pb.LedgerReceiptReply(envelope=self._envelope(self.handler.current_round()), ledger_receipt=receipt)

    def _send_secagg(self, peer: PeerCertificate, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> pb.Receipt:
        inbound = self._receive(peer, request_iterator, self._check_secagg_kind)
        self.handler.on_secagg(inbound)
        return self._receipt(inbound)

    def _check_secagg_kind(self, header: pb.TransferHeader, peer: PeerCertificate) -> None:
        if header.kind != pb.PAYLOAD_KIND_SECAGG or header.secagg_kind not in pb.SecAggKind.values() or not header.secagg_kind:
            raise Refused(R.REFUSAL_MALFORMED, f"SendSecAgg needs kind SECAGG and a known secagg_kind (got {header.kind}, {header.secagg_kind})")
        if header.HasField("ledger_head"):
            raise Refused(R.REFUSAL_MALFORMED, "a ledger head travels with an update (UploadUpdate), not a secure-aggregation message")
        if header.recipient:
            # Every v1 protocol routes member messages through the aggregator (masking: ShareKeys up,
            # the aggregator's signed ShareDelivery down; CKKS: keys and sums posted by the aggregator),
            # so a recipient could only serve to pass a member's bytes off as the aggregator's.
            raise Refused(
                R.REFUSAL_REJECTED,
                f"{peer.name!r} addressed a {pb.SecAggKind.Name(header.secagg_kind)} message to {header.recipient[:80]!r}: "
                "no protocol defines a member-to-member message; send it to the aggregator (recipient \"\")",
            )

    def _fetch_secagg(self, peer: PeerCertificate, request: Any, context: grpc.ServicerContext) -> Iterator[pb.TransferPart]:
        req: pb.FetchSecAggRequest = _parsed(request)
        self._admit(peer, req.envelope, round_scoped=True, enrolled=True)
        for msg in self.handler.secagg_for(peer.name, req.envelope.round_id, req.secagg_kind):
            if msg.sender != self.name or msg.recipient != peer.name:
                # Only the federation's own messages go out, under its own name: never a member's bytes.
                log.warning("not sending %s's %s message to %s: only the federation's own messages are served",
                            msg.sender[:80], pb.SecAggKind.Name(msg.secagg_kind) if msg.secagg_kind in pb.SecAggKind.values() else msg.secagg_kind, peer.name)
                continue
            header = pb.TransferHeader(
                envelope=self._envelope(msg.round_id),
                kind=msg.kind or pb.PAYLOAD_KIND_SECAGG,
                secagg_kind=msg.secagg_kind,
                recipient=peer.name,
            )
            yield from iter_parts(header, msg.payload, self.config.chunk_bytes)


def _check_update_kind(header: pb.TransferHeader, _peer: PeerCertificate) -> None:
    if header.kind == pb.PAYLOAD_KIND_UPDATE_PLAIN:
        if header.secagg_kind or header.recipient:
            raise Refused(R.REFUSAL_MALFORMED, "a plain update has no secagg_kind or recipient")
    elif header.kind == pb.PAYLOAD_KIND_UPDATE_PROTECTED:
        if header.secagg_kind not in _UPDATE_SECAGG_KINDS or header.recipient:
            raise Refused(R.REFUSAL_MALFORMED, f"a protected update needs secagg_kind MASKED_INPUT or CKKS_CIPHERTEXT (got {header.secagg_kind})")
    else:
        raise Refused(R.REFUSAL_MALFORMED, f"UploadUpdate carries update kinds only (got kind {header.kind})")
