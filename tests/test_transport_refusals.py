"""Every refusal the transport promises, over real gRPC with mutual TLS on 127.0.0.1.

Each test makes the bad request, checks the refusal (status, reason, logged line), then checks that
a good member still gets served by the same server.
"""

from __future__ import annotations

import logging
import os
import time

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worldlm_secure.errors import TransportError
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.transport import federation_pb2 as pb
from worldlm_secure.transport import federation_pb2_grpc as pb_grpc
from worldlm_secure.transport.board import RoundBoard
from worldlm_secure.transport.chunks import Payload, TransferLimits, iter_parts
from worldlm_secure.transport.client import RetryPolicy, SiteClient
from worldlm_secure.transport.envelope import enroll_message, make_envelope
from worldlm_secure.transport.handler import Announcement
from worldlm_secure.transport.refusal import Refused
from worldlm_secure.transport.server import FederationServer, ServerConfig
from worldlm_secure.transport.testing import connect, make_pki, start_federation
from worldlm_secure.transport.tls import Roster

FED = "fed"
ROUND = 1
LIMITS = TransferLimits(max_chunk_bytes=64 << 10, max_total_bytes=1 << 20)
MODEL = {"w": np.arange(50_000, dtype=np.float32)}  # 200 KB: several 64 KiB chunks
# gRPC core logs TLS handshake failures itself (the Python server never sees the connection);
# at its default verbosity the reason reaches stderr, which these tests then check.
CORE_LOGS_HANDSHAKES = os.environ.get("GRPC_VERBOSITY", "").upper() in ("", "INFO", "DEBUG")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    pki = make_pki(root, FED, [FED, "site-a", "site-b", "site-c", "stranger"])
    pki.issue("site-c", expired=True, label="site-c-expired")
    evil = make_pki(root / "evil", "evil-ca", [])
    evil.issue("site-a", label="site-a-evil")  # the right name, from the wrong CA
    evil.issue(FED, label="fed-evil")
    server, board = start_federation(
        pki, FED, ["site-a", "site-b", "site-c"], ServerConfig(limits=LIMITS, chunk_bytes=32 << 10)
    )
    board.announce(Announcement(ROUND, ("site-a", "site-b", "site-c"), "none"), Payload.from_tensors(MODEL))
    good = connect(server, pki, "site-a")
    good.enroll()
    yield pki, evil, server, board, good
    good.close()
    server.stop(0)


def assert_good_member_served(world) -> None:
    pki, _evil, server, _board, good = world
    assert good.heartbeat("ok") == ROUND
    got = good.download_model(ROUND).as_tensors()
    assert np.array_equal(got["w"], MODEL["w"])


def raw_stub(server, credentials: grpc.ChannelCredentials, authority: str = FED) -> tuple[grpc.Channel, pb_grpc.FederationStub]:
    channel = grpc.secure_channel(server.target, credentials, options=[("grpc.ssl_target_name_override", authority)])
    return channel, pb_grpc.FederationStub(channel)


def member_stub(world, label: str = "site-a"):
    pki, _e, server, _b, _g = world
    return raw_stub(server, pki.credentials(label).channel_credentials())


def refusal_of(call) -> tuple[grpc.StatusCode, Refused]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    refused = Refused.from_rpc_error(info.value)
    assert refused is not None, f"no refusal attached: {info.value}"
    return info.value.code(), refused


def expect_refusal(world, caplog, call, reason: str, code: grpc.StatusCode) -> Refused:
    server = world[2]
    before = server.refusals[reason]
    with caplog.at_level(logging.WARNING, logger="worldlm_secure.transport"):
        got_code, refused = refusal_of(call)
    assert (got_code, refused.reason_name) == (code, reason), refused
    assert server.refusals[reason] == before + 1
    assert any(f": {reason}: " in r.getMessage() and r.name == "worldlm_secure.transport" for r in caplog.records)
    assert_good_member_served(world)
    return refused


def heartbeat(sender: str = "site-a", round_id: int = ROUND) -> pb.Heartbeat:
    return pb.Heartbeat(envelope=make_envelope(sender, round_id), status="x")


# ---- refused by the TLS handshake (gRPC core): the client sees UNAVAILABLE ----

@pytest.mark.parametrize(
    "case, core_reason",
    [
        ("no-client-cert", "PEER_DID_NOT_RETURN_A_CERTIFICATE"),
        ("other-ca", "CERTIFICATE_VERIFY_FAILED"),
        ("expired", "certificate has expired"),
    ],
)
def test_handshake_refusals_leave_server_serving(world, capfd, case, core_reason):
    pki, evil, server, _board, _good = world
    creds = {
        "no-client-cert": lambda: grpc.ssl_channel_credentials(root_certificates=pki.credentials(FED).ca_pem),
        "other-ca": lambda: grpc.ssl_channel_credentials(
            root_certificates=pki.credentials(FED).ca_pem,  # it trusts our CA; its own cert is from evil
            private_key=evil.credentials("site-a-evil").key_pem,
            certificate_chain=evil.credentials("site-a-evil").cert_pem,
        ),
        "expired": lambda: pki.credentials("site-c-expired").channel_credentials(),
    }[case]()
    channel, stub = raw_stub(server, creds)
    with pytest.raises(grpc.RpcError) as info:
        stub.SendHeartbeat(heartbeat("site-c" if case == "expired" else "site-a"), timeout=5)
    channel.close()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    if CORE_LOGS_HANDSHAKES:  # the core logs from its own thread: give it a moment
        err = ""
        for _ in range(40):
            err += capfd.readouterr().err
            if core_reason in err:
                break
            time.sleep(0.05)
        assert core_reason in err
    assert_good_member_served(world)


def test_expired_certificate_surfaces_as_one_line_transport_error(world):
    pki, _evil, server, _board, _good = world
    client = connect(server, pki, "site-c-expired")
    with pytest.raises(TransportError) as info:
        client.heartbeat()
    client.close()
    assert "\n" not in str(info.value) and "certificate" in str(info.value)
    assert_good_member_served(world)


def test_member_refuses_a_server_that_is_not_its_federation(world):
    """Same CA, but the server's certificate names another node: the member's handshake fails."""
    pki, _evil, _server, _board, _good = world
    impostor, _ = start_federation(pki, "site-b", ["site-a"])
    try:
        client = SiteClient(impostor.target, pki.credentials("site-a"), FED, identity=pki.identity("site-a"), retry=RetryPolicy(attempts=1))
        with pytest.raises(TransportError):
            client.heartbeat()
        client.close()
    finally:
        impostor.stop(0)
    assert impostor.refusals == {}  # refused by the member during the handshake, before any request
    assert_good_member_served(world)


def test_server_from_another_ca_is_refused_by_the_member(world):
    pki, evil, _server, _board, _good = world
    rogue = FederationServer(evil.credentials("fed-evil"), Roster.of(["site-a"]), RoundBoard(FED))
    rogue.start()
    try:
        client = connect(rogue, pki, "site-a")
        with pytest.raises(TransportError):
            client.heartbeat()
        client.close()
    finally:
        rogue.stop(0)
    assert rogue.refusals == {}  # the member never got as far as sending a request
    assert_good_member_served(world)


# ---- refused by admission in the servicer: reason in trailing metadata and in the log ----

def test_name_not_on_roster(world, caplog):
    channel, stub = member_stub(world, "stranger")
    expect_refusal(world, caplog, lambda: stub.SendHeartbeat(heartbeat("stranger"), timeout=5), "NOT_IN_ROSTER", grpc.StatusCode.PERMISSION_DENIED)
    channel.close()


def test_envelope_sender_must_match_certificate(world, caplog):
    channel, stub = member_stub(world)
    expect_refusal(world, caplog, lambda: stub.SendHeartbeat(heartbeat("site-b"), timeout=5), "SENDER_MISMATCH", grpc.StatusCode.PERMISSION_DENIED)
    channel.close()


def test_replayed_message(world, caplog):
    channel, stub = member_stub(world)
    msg = heartbeat()
    stub.SendHeartbeat(msg, timeout=5)  # first time: accepted
    expect_refusal(world, caplog, lambda: stub.SendHeartbeat(msg, timeout=5), "REPLAY", grpc.StatusCode.ALREADY_EXISTS)
    channel.close()


def test_replayed_upload_header(world, caplog):
    pki, _e, _s, board, good = world
    channel, stub = member_stub(world, "site-b")
    client_b = connect(world[2], pki, "site-b")
    client_b.enroll()
    header = pb.TransferHeader(envelope=make_envelope("site-b", ROUND), kind=pb.PAYLOAD_KIND_UPDATE_PLAIN)
    parts = list(iter_parts(header, Payload.from_bytes(b"update-bytes")))
    stub.UploadUpdate(iter(parts), timeout=5)
    assert "site-b" in board.updates(ROUND)
    expect_refusal(world, caplog, lambda: stub.UploadUpdate(iter(parts), timeout=5), "REPLAY", grpc.StatusCode.ALREADY_EXISTS)
    client_b.close()
    channel.close()


def test_stale_timestamp(world, caplog):
    channel, stub = member_stub(world)
    msg = heartbeat()
    msg.envelope.sent_unix_ms -= 3_600_000
    expect_refusal(world, caplog, lambda: stub.SendHeartbeat(msg, timeout=5), "STALE", grpc.StatusCode.FAILED_PRECONDITION)
    channel.close()


@pytest.mark.parametrize("round_id", [ROUND - 1, ROUND + 1, 2**63])
def test_message_for_another_round(world, caplog, round_id):
    channel, stub = member_stub(world)
    req = pb.DownloadRequest(envelope=make_envelope("site-a", round_id))
    expect_refusal(world, caplog, lambda: list(stub.DownloadModel(req, timeout=5)), "WRONG_ROUND", grpc.StatusCode.FAILED_PRECONDITION)
    channel.close()


def test_session_message_ahead_of_the_federation(world, caplog):
    channel, stub = member_stub(world)
    expect_refusal(world, caplog, lambda: stub.SendHeartbeat(heartbeat(round_id=ROUND + 7), timeout=5), "WRONG_ROUND", grpc.StatusCode.FAILED_PRECONDITION)
    channel.close()


def test_round_scoped_request_before_enrollment(world, caplog):
    channel, stub = member_stub(world, "site-c")  # site-c's valid certificate never enrolled
    req = pb.DownloadRequest(envelope=make_envelope("site-c", ROUND))
    expect_refusal(world, caplog, lambda: list(stub.DownloadModel(req, timeout=5)), "NOT_ENROLLED", grpc.StatusCode.PERMISSION_DENIED)
    channel.close()


def test_enrollment_with_a_key_the_certificate_does_not_bind(world, caplog):
    pki = world[0]
    channel, stub = member_stub(world, "site-b")
    env = make_envelope("site-b", ROUND)
    other = NodeIdentity.generate("site-b")
    req = pb.EnrollRequest(
        envelope=env,
        signing_public_key=other.public_bytes,
        signature=other.sign(enroll_message(env, FED, pki.credentials("site-b").fingerprint)),
    )
    expect_refusal(world, caplog, lambda: stub.Enroll(req, timeout=5), "BAD_SIGNATURE", grpc.StatusCode.PERMISSION_DENIED)
    # The right key, but a signature over another federation's name.
    env = make_envelope("site-b", ROUND)
    mine = pki.identity("site-b")
    req = pb.EnrollRequest(
        envelope=env,
        signing_public_key=mine.public_bytes,
        signature=mine.sign(enroll_message(env, "other-fed", pki.credentials("site-b").fingerprint)),
    )
    expect_refusal(world, caplog, lambda: stub.Enroll(req, timeout=5), "BAD_SIGNATURE", grpc.StatusCode.PERMISSION_DENIED)
    channel.close()


def _upload_parts(payload: bytes, *, chunk: int = 16 << 10) -> list[pb.TransferPart]:
    header = pb.TransferHeader(envelope=make_envelope("site-a", ROUND), kind=pb.PAYLOAD_KIND_UPDATE_PLAIN)
    return list(iter_parts(header, Payload.from_bytes(payload), chunk))


def test_truncated_chunk_stream(world, caplog):
    channel, stub = member_stub(world)
    parts = _upload_parts(os.urandom(100_000))
    assert len(parts) > 3
    expect_refusal(world, caplog, lambda: stub.UploadUpdate(iter(parts[:-2]), timeout=5), "TRUNCATED", grpc.StatusCode.DATA_LOSS)
    expect_refusal(world, caplog, lambda: stub.UploadUpdate(iter([]), timeout=5), "TRUNCATED", grpc.StatusCode.DATA_LOSS)
    channel.close()


def test_oversized_declared_total(world, caplog):
    channel, stub = member_stub(world)
    parts = _upload_parts(b"x" * 10)
    parts[0].header.total_bytes = LIMITS.max_total_bytes + 1
    parts[0].header.total_chunks = LIMITS.max_total_bytes // LIMITS.max_chunk_bytes + 1
    expect_refusal(world, caplog, lambda: stub.UploadUpdate(iter(parts), timeout=5), "OVERSIZED", grpc.StatusCode.RESOURCE_EXHAUSTED)
    channel.close()


def test_oversized_chunk(world, caplog):
    channel, stub = member_stub(world)
    data = os.urandom(LIMITS.max_chunk_bytes + 1)  # one chunk above our cap, still under gRPC's message cap
    parts = _upload_parts(data, chunk=len(data))
    parts[0].header.total_chunks = 2  # claim a plausible layout so the header passes
    expect_refusal(world, caplog, lambda: stub.UploadUpdate(iter(parts), timeout=5), "OVERSIZED", grpc.StatusCode.RESOURCE_EXHAUSTED)
    channel.close()


def test_message_above_the_grpc_limit(world, caplog):
    """A chunk far above the cap is stopped by gRPC itself; we still log it and keep serving."""
    pki, _e, server, _b, _g = world
    channel = grpc.secure_channel(
        server.target,
        pki.credentials("site-a").channel_credentials(),
        options=[("grpc.ssl_target_name_override", FED), ("grpc.max_send_message_length", 16 << 20)],
    )
    data = os.urandom(LIMITS.grpc_message_bytes + 1)
    parts = _upload_parts(data, chunk=len(data))
    parts[0].header.total_chunks = -(-len(data) // LIMITS.max_chunk_bytes)  # a header that passes
    # gRPC drops the message; our reading of the stream then fails or ends early, depending on timing.
    ways = ("GRPC_LAYER", "TRUNCATED")
    before = sum(server.refusals[w] for w in ways)
    with caplog.at_level(logging.WARNING, logger="worldlm_secure.transport"), pytest.raises(grpc.RpcError) as info:
        pb_grpc.FederationStub(channel).UploadUpdate(iter(parts), timeout=5)
    channel.close()
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert sum(server.refusals[w] for w in ways) == before + 1
    assert any(f": {w}: " in r.getMessage() for r in caplog.records for w in ways)
    assert_good_member_served(world)


def test_more_chunks_than_declared(world, caplog):
    channel, stub = member_stub(world)
    parts = _upload_parts(os.urandom(40_000))
    extra = pb.TransferPart(chunk=pb.ChunkData(index=len(parts) - 1, data=b"more"))
    expect_refusal(world, caplog, lambda: stub.UploadUpdate(iter(parts + [extra]), timeout=5), "OVERSIZED", grpc.StatusCode.RESOURCE_EXHAUSTED)
    channel.close()


def test_tampered_chunk_fails_the_hash(world, caplog):
    channel, stub = member_stub(world)
    parts = _upload_parts(os.urandom(40_000))
    data = bytearray(parts[2].chunk.data)
    data[7] ^= 1
    parts[2].chunk.data = bytes(data)
    expect_refusal(world, caplog, lambda: stub.UploadUpdate(iter(parts), timeout=5), "INTEGRITY", grpc.StatusCode.DATA_LOSS)
    channel.close()


def test_reordered_chunks(world, caplog):
    channel, stub = member_stub(world)
    parts = _upload_parts(os.urandom(40_000))
    parts[1], parts[2] = parts[2], parts[1]
    expect_refusal(world, caplog, lambda: stub.UploadUpdate(iter(parts), timeout=5), "INTEGRITY", grpc.StatusCode.DATA_LOSS)
    channel.close()


def _raw_call(world, method: str, data: bytes, *, streaming: bool = False):
    channel, _stub = member_stub(world)
    ident = lambda b: b  # noqa: E731
    path = f"/worldlm.v1.Federation/{method}"
    if streaming:
        call = channel.stream_unary(path, request_serializer=ident, response_deserializer=ident)
        return channel, lambda: call(iter([data]), timeout=5)
    call = channel.unary_unary(path, request_serializer=ident, response_deserializer=ident)
    return channel, lambda: call(data, timeout=5)


@pytest.mark.parametrize("method, streaming", [("SendHeartbeat", False), ("Enroll", False), ("UploadUpdate", True)])
def test_malformed_protobuf(world, caplog, method, streaming):
    channel, call = _raw_call(world, method, b"\x0a\xff\xff\xff\xff\xff", streaming=streaming)  # truncated length-delimited field
    expect_refusal(world, caplog, call, "MALFORMED", grpc.StatusCode.INVALID_ARGUMENT)
    channel.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=256))
def test_arbitrary_bytes_are_refused_and_the_server_survives(world, data):
    channel, call = _raw_call(world, "SendHeartbeat", data)
    code, refused = refusal_of(call)
    channel.close()
    # Whatever parses still lacks a valid envelope (nonce, sender, fresh timestamp).
    assert refused.reason_name in {"MALFORMED", "VERSION", "SENDER_MISMATCH", "STALE", "WRONG_ROUND"}
    assert code != grpc.StatusCode.INTERNAL
    assert world[4].heartbeat() == ROUND


def test_upload_that_is_not_an_update_kind(world, caplog):
    channel, stub = member_stub(world)
    header = pb.TransferHeader(envelope=make_envelope("site-a", ROUND), kind=pb.PAYLOAD_KIND_MODEL)
    parts = list(iter_parts(header, Payload.from_bytes(b"abc")))
    expect_refusal(world, caplog, lambda: stub.UploadUpdate(iter(parts), timeout=5), "MALFORMED", grpc.StatusCode.INVALID_ARGUMENT)
    channel.close()


def test_client_refusal_is_one_line_and_not_retried(world):
    pki, _e, server, _b, _g = world
    client = connect(server, pki, "stranger", attempts=5)
    with pytest.raises(Refused) as info:
        client.heartbeat()
    client.close()
    assert info.value.reason_name == "NOT_IN_ROSTER" and "\n" not in str(info.value)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    op=st.sampled_from(["drop", "duplicate", "swap", "flip", "cut", "grow_total", "shrink_total"]),
    size=st.integers(1, 150_000),
    where=st.integers(0, 10**6),
)
def test_tampered_secagg_streams_are_refused_and_never_delivered(world, op, size, where):
    pki, _e, _server, board, good = world
    header = pb.TransferHeader(
        envelope=make_envelope("site-a", ROUND), kind=pb.PAYLOAD_KIND_SECAGG, secagg_kind=pb.SECAGG_MASKING_ADVERTISE_KEYS
    )
    parts = list(iter_parts(header, Payload.from_bytes(os.urandom(size)), 16 << 10))
    chunks = parts[1:]
    i = where % len(chunks)
    if op == "drop":
        del chunks[i]
    elif op == "duplicate":
        chunks.insert(i, chunks[i])
    elif op == "swap" and len(chunks) > 1:
        j = (i + 1) % len(chunks)
        chunks[i], chunks[j] = chunks[j], chunks[i]
    elif op == "flip" or op == "swap":
        data = bytearray(chunks[i].chunk.data)
        data[where % len(data)] ^= 0x80
        chunks[i] = pb.TransferPart(chunk=pb.ChunkData(index=chunks[i].chunk.index, data=bytes(data)))
    elif op == "cut":
        last = chunks[-1]
        chunks[-1] = pb.TransferPart(chunk=pb.ChunkData(index=last.chunk.index, data=last.chunk.data[: max(0, len(last.chunk.data) - 1 - where % 7)]))
    elif op == "grow_total":
        parts[0].header.total_bytes += 1 + where % 1000
    else:
        parts[0].header.total_bytes -= 1 + where % min(size, 1000)
    delivered = len(board.secagg_received(ROUND))
    channel, stub = member_stub(world)
    code, refused = refusal_of(lambda: stub.SendSecAgg(iter([parts[0], *chunks]), timeout=5))
    channel.close()
    assert refused.reason_name in {"TRUNCATED", "INTEGRITY", "OVERSIZED", "MALFORMED"}, refused
    assert len(board.secagg_received(ROUND)) == delivered  # nothing reached the round logic
    assert good.heartbeat() == ROUND
