"""One member cannot starve the others or fill the federation's memory (real gRPC + mTLS on 127.0.0.1).

Before the fix, every open WatchRounds stream held one of the server's 64 worker threads, so one
member opening many streams made everyone else's heartbeat and enrollment time out; and every
message a member sent was kept forever. Now each member has its own caps on concurrent streams and
calls (the worker pool is sized so that every member's cap fits), on queued messages and bytes per
round, and the board keeps only the last few rounds. Assertions are on counts and bytes the board
holds, not on wall time (the timeouts below only bound a hang).
"""

from __future__ import annotations

import time

import grpc
import pytest

from worldlm_secure.transport import federation_pb2 as pb
from worldlm_secure.transport import federation_pb2_grpc as pb_grpc
from worldlm_secure.transport.board import BoardLimits, RoundBoard
from worldlm_secure.transport.chunks import Payload
from worldlm_secure.transport.envelope import make_envelope
from worldlm_secure.transport.handler import Announcement
from worldlm_secure.transport.refusal import Refused
from worldlm_secure.transport.server import FederationServer, ServerConfig
from worldlm_secure.transport.testing import connect, make_pki
from worldlm_secure.transport.tls import Roster

FED = "fed"
SITES = ("site-a", "site-b", "site-c")


@pytest.fixture
def pki(tmp_path):
    return make_pki(tmp_path, FED, [FED, *SITES])


def _serve(pki, board=None, config=None):
    board = board or RoundBoard(FED)
    server = FederationServer(pki.credentials(FED), Roster.of(SITES), board, config or ServerConfig(watch_poll_seconds=0.1))
    server.start()
    return server, board


def _held(board, rid):
    msgs = board.secagg_received(rid)
    return len(msgs), sum(m.payload.nbytes for m in msgs)


def test_one_members_watch_streams_do_not_starve_the_others(pki):
    server, board = _serve(pki, config=ServerConfig())  # the default worker pool
    hog = connect(server, pki, "site-a")
    hog.enroll()
    channel = grpc.secure_channel(server.target, pki.credentials("site-a").channel_credentials(),
                                  options=[("grpc.ssl_target_name_override", FED)])
    stub = pb_grpc.FederationStub(channel)
    streams = [stub.WatchRounds(pb.WatchRequest(envelope=make_envelope("site-a", 0), after_round=0)) for _ in range(80)]
    try:
        time.sleep(0.5)  # let the server pick the streams up
        other = connect(server, pki, "site-b", timeout=5.0)
        assert other.enroll().federation == FED  # served while site-a holds every stream it may
        assert other.heartbeat("ok") == 0
        other.close()
        # site-a got at most its cap of watch streams; the rest were refused with a reason
        done = [s for s in streams if s.done()]
        refused = [Refused.from_rpc_error(s) for s in done]
        assert len(streams) - len(done) <= server.config.max_streams_per_member
        assert refused and all(r is not None and r.reason_name == "OVER_QUOTA" for r in refused), refused[:1]
        assert "site-a" in refused[0].detail and "WatchRounds" in refused[0].detail
        assert server.refusals["OVER_QUOTA"] >= len(streams) - server.config.max_streams_per_member
    finally:
        for s in streams:
            s.cancel()
        channel.close()
    # cancelled streams give their slots back
    deadline = time.monotonic() + 10
    while server.open_calls("site-a") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.open_calls("site-a") == 0
    assert hog.heartbeat() == 0
    hog.close()
    server.stop(0)


def test_a_flood_of_messages_is_capped_per_member_and_round(pki):
    limits = BoardLimits(max_messages_per_member_round=8, max_bytes_per_member_round=1 << 20)
    server, board = _serve(pki, RoundBoard(FED, limits=limits))
    a, b = connect(server, pki, "site-a"), connect(server, pki, "site-b")
    try:
        for c in (a, b):
            c.enroll()
        board.announce(Announcement(1, SITES, "masking"))
        a.heartbeat()
        b.heartbeat()
        sent, refusal = 0, None
        for _ in range(40):
            try:
                a.send_secagg(pb.SECAGG_MASKING_ADVERTISE_KEYS, Payload.from_bytes(b"x" * 1000))
                sent += 1
            except Refused as exc:
                refusal = exc
                break
        assert sent == 8 and refusal is not None and refusal.reason_name == "OVER_QUOTA", (sent, refusal)
        assert "site-a" in refusal.detail and "8 messages" in refusal.detail
        # bytes: declared sizes are checked against the cap before any data is read
        with pytest.raises(Refused) as info:
            b.send_secagg(pb.SECAGG_MASKING_ADVERTISE_KEYS, Payload.from_bytes(b"y" * ((1 << 20) + 1)))
        assert info.value.reason_name == "OVER_QUOTA" and "bytes" in info.value.detail
        b.send_secagg(pb.SECAGG_MASKING_ADVERTISE_KEYS, Payload.from_bytes(b"y" * 1000))  # site-b is unaffected by site-a
        count, nbytes = _held(board, 1)
        assert count == 9 and nbytes == 9 * 1000
        assert board.held_bytes() <= len(SITES) * limits.max_bytes_per_member_round
    finally:
        a.close()
        b.close()
        server.stop(0)


def test_finished_rounds_are_pruned_so_memory_stays_bounded(pki):
    limits = BoardLimits(keep_rounds=2)
    server, board = _serve(pki, RoundBoard(FED, limits=limits))
    a = connect(server, pki, "site-a")
    try:
        a.enroll()
        for r in range(1, 11):
            board.announce(Announcement(r, SITES, "masking"), Payload.from_bytes(bytes(256 << 10)))
            a.heartbeat()
            a.send_secagg(pb.SECAGG_MASKING_ADVERTISE_KEYS, Payload.from_bytes(bytes(64 << 10)))
            a.upload_update(Payload.from_bytes(bytes(64 << 10)), secagg_kind=pb.SECAGG_MASKING_MASKED_INPUT)
        assert board.rounds_held() == [9, 10]
        assert board.model_for("site-a", 1) is None and board.secagg_received(1) == [] and board.updates(1) == {}
        assert board.held_bytes() == 2 * (256 + 64 + 64) << 10
        assert a.download_model(10).nbytes == 256 << 10  # the current round is whole
    finally:
        a.close()
        server.stop(0)
