"""SiteClient behaviour: retries with backoff, roster changes, and its checks on server messages."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from worldlm_secure.errors import TransportError
from worldlm_secure.transport.board import RoundBoard
from worldlm_secure.transport.chunks import Payload
from worldlm_secure.transport.client import RetryPolicy, SiteClient
from worldlm_secure.transport.envelope import make_envelope
from worldlm_secure.transport.handler import Announcement
from worldlm_secure.transport.refusal import Refused
from worldlm_secure.transport.server import FederationServer, ServerConfig
from worldlm_secure.transport.testing import connect, make_pki, start_federation
from worldlm_secure.transport.tls import Roster


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"), "fed", ["fed", "site-a", "site-b"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_retries_until_the_federation_comes_up(pki):
    port = free_port()
    server = FederationServer(pki.credentials("fed"), Roster.of(["site-a"]), RoundBoard("fed"), ServerConfig(bind=f"127.0.0.1:{port}"))
    starter = threading.Timer(0.4, server.start)
    starter.start()
    client = SiteClient(f"127.0.0.1:{port}", pki.credentials("site-a"), "fed", identity=pki.identity("site-a"),
                        retry=RetryPolicy(attempts=30, initial_backoff=0.05, max_backoff=0.2))
    try:
        t0 = time.monotonic()
        assert client.enroll().federation == "fed"
        assert time.monotonic() - t0 >= 0.3  # it really waited for the late server
    finally:
        starter.join()
        client.close()
        server.stop(0)


def test_gives_up_after_the_configured_attempts_with_one_line(pki):
    client = SiteClient(f"127.0.0.1:{free_port()}", pki.credentials("site-a"), "fed",
                        retry=RetryPolicy(attempts=3, initial_backoff=0.01, max_backoff=0.02))
    with pytest.raises(TransportError) as info:
        client.heartbeat()
    client.close()
    assert "UNAVAILABLE" in str(info.value) and "\n" not in str(info.value)


def test_backoff_is_capped_and_jittered():
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=1.0, multiplier=2.0)
    delays = [policy.delay(a) for a in range(10) for _ in range(20)]
    assert all(0 <= d <= 1.0 for d in delays) and len(set(delays)) > 100
    assert max(policy.delay(0) for _ in range(50)) <= 0.1


def test_roster_changes_take_effect_on_the_next_request(pki):
    server, board = start_federation(pki, "fed", ["site-a", "site-b"])
    try:
        b = connect(server, pki, "site-b")
        b.enroll()
        assert b.heartbeat() == 0
        server.roster = Roster.of(["site-a"])  # site-b is removed
        with pytest.raises(Refused) as info:
            b.heartbeat()
        assert info.value.reason_name == "NOT_IN_ROSTER"
        a = connect(server, pki, "site-a")
        assert a.heartbeat() == 0
        a.close()
        b.close()
    finally:
        server.stop(0)


def test_enroll_needs_the_signing_key(pki):
    server, _ = start_federation(pki, "fed", ["site-a"])
    try:
        client = SiteClient(server.target, pki.credentials("site-a"), "fed", retry=RetryPolicy(attempts=1))
        with pytest.raises(TransportError, match="signing key"):
            client.enroll()
        client.close()
    finally:
        server.stop(0)


def test_client_checks_server_envelopes(pki):
    client = SiteClient("127.0.0.1:1", pki.credentials("site-a"), "fed")
    env = make_envelope("fed", 3)
    client.check_server_envelope(env, 3)
    for bad, reason in [(env, "REPLAY"), (make_envelope("site-b", 3), "SENDER_MISMATCH"), (make_envelope("fed", 4), "WRONG_ROUND")]:
        with pytest.raises(Refused) as info:
            client.check_server_envelope(bad, 3)
        assert info.value.reason_name == reason
    client.close()


def test_watch_reconnects_after_the_federation_restarts(pki):
    """A member's watch survives a federation restart on the same port: it reconnects and re-enrolls."""
    port = free_port()
    cfg = ServerConfig(bind=f"127.0.0.1:{port}", watch_poll_seconds=0.1)
    board = RoundBoard("fed")
    server = FederationServer(pki.credentials("fed"), Roster.of(["site-a"]), board, cfg)
    server.start()
    client = SiteClient(f"127.0.0.1:{port}", pki.credentials("site-a"), "fed", identity=pki.identity("site-a"),
                        retry=RetryPolicy(attempts=40, initial_backoff=0.05, max_backoff=0.2))
    client.enroll()
    board.announce(Announcement(1, ("site-a",), "none"), Payload.from_bytes(b"m1"))
    watch = client.watch_rounds(after_round=0)
    assert next(watch).round_id == 1
    server.stop(0)
    # Restart with fresh state: a new board whose round ids continue (never reused), a new server.
    board2 = RoundBoard("fed", start_round=1)
    server2 = FederationServer(pki.credentials("fed"), Roster.of(["site-a"]), board2, cfg)
    server2.start()
    try:
        board2.announce(Announcement(2, ("site-a",), "none"), Payload.from_bytes(b"m2"))
        assert next(watch).round_id == 2  # the client enrolled again by itself
        assert client.download_model().to_bytes() == b"m2"
    finally:
        client.close()
        server2.stop(0)
