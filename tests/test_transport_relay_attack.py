"""A member tries to pass its own message off as the aggregator's (real gRPC + mTLS on 127.0.0.1).

Before the fix, a member could send any secure-aggregation message with ``recipient`` set to another
member; the federation queued it and the recipient's `fetch_secagg` returned it among the
aggregator's messages. No protocol of worldlm.v1 defines a member-to-member relay (masking shares go
to the aggregator as ShareKeys and come back as its ShareDelivery; CKKS keys are posted by the
aggregator), so the federation refuses every member message with a recipient, and a member's fetch
accepts only messages whose sender is the federation itself.
"""

from __future__ import annotations

import pytest

from worldlm_secure.secagg.masking_messages import EncryptedShare, ShareDelivery
from worldlm_secure.transport import federation_pb2 as pb
from worldlm_secure.transport.board import RoundBoard
from worldlm_secure.transport.chunks import Payload, iter_parts
from worldlm_secure.transport.envelope import make_envelope
from worldlm_secure.transport.handler import Announcement, Inbound
from worldlm_secure.transport.refusal import Refused
from worldlm_secure.transport.server import FederationServer, ServerConfig
from worldlm_secure.transport.testing import connect, make_pki
from worldlm_secure.transport.tls import Roster

FED = "fed"
SITES = ("site-a", "site-b", "site-c")
KINDS = [k for k in pb.SecAggKind.values() if k]


class RelayingBoard(RoundBoard):
    """A federation whose round logic (wrongly) hands a member's message to another member."""

    smuggled: list[Inbound] = []

    def secagg_for(self, member, round_id, secagg_kind):
        return [*super().secagg_for(member, round_id, secagg_kind), *[m for m in self.smuggled if m.recipient == member]]


class ImpersonatingServer(FederationServer):
    """A federation that sends a message under a member's name (as the old relay did)."""

    def _fetch_secagg(self, peer, request, context):
        yield from iter_parts(
            pb.TransferHeader(envelope=make_envelope("site-b", request.envelope.round_id), kind=pb.PAYLOAD_KIND_SECAGG,
                              secagg_kind=pb.SECAGG_MASKING_ENCRYPTED_SHARES, recipient=peer.name),
            Payload.from_bytes(b"forged"), 1 << 16,
        )


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    pki = make_pki(tmp_path_factory.mktemp("pki"), FED, [FED, *SITES])
    board = RelayingBoard(FED)
    server = FederationServer(pki.credentials(FED), Roster.of(SITES), board, ServerConfig())
    server.start()
    clients = {m: connect(server, pki, m) for m in SITES}
    for c in clients.values():
        c.enroll()
    board.announce(Announcement(1, SITES, "masking"))
    for c in clients.values():
        c.heartbeat()
    yield pki, server, board, clients
    for c in clients.values():
        c.close()
    server.stop(0)


def _forged_delivery() -> bytes:
    # site-b's own "shares" for site-a, dressed as the aggregator's ShareDelivery
    share = EncryptedShare(1, "site-c", "site-a", bytes(12), b"\x00" * 48)
    return ShareDelivery(1, "site-a", (share,)).to_bytes()


@pytest.mark.parametrize("kind", KINDS, ids=[pb.SecAggKind.Name(k) for k in KINDS])
def test_member_cannot_address_a_message_to_another_member(fed, kind):
    _pki, server, board, clients = fed
    before = server.refusals["REJECTED"]
    with pytest.raises(Refused) as info:
        clients["site-b"].send_secagg(kind, Payload.from_bytes(_forged_delivery()), recipient="site-a")
    assert info.value.reason_name == "REJECTED" and "member-to-member" in info.value.detail, info.value
    assert server.refusals["REJECTED"] == before + 1
    assert clients["site-a"].fetch_secagg(0) == []  # nothing reached site-a
    assert board.secagg_received(1) == []  # and nothing is held for anyone


def test_fetch_returns_only_the_federations_own_messages(fed):
    pki, server, board, clients = fed
    board.post_secagg(Inbound(FED, 1, pb.PAYLOAD_KIND_SECAGG, pb.SECAGG_MASKING_KEY_BUNDLE, "site-a", Payload.from_bytes(b"bundle")))
    RelayingBoard.smuggled = [Inbound("site-b", 1, pb.PAYLOAD_KIND_SECAGG, pb.SECAGG_MASKING_ENCRYPTED_SHARES, "site-a",
                                      Payload.from_bytes(_forged_delivery()))]
    try:
        got = clients["site-a"].fetch_secagg(0)
    finally:
        RelayingBoard.smuggled = []
    # the server does not pass a member's message off as its own: only the aggregator's bundle arrives
    assert [(m.sender, m.secagg_kind, m.payload.to_bytes()) for m in got] == [(FED, pb.SECAGG_MASKING_KEY_BUNDLE, b"bundle")]


def test_member_refuses_a_fetched_message_sent_under_another_name(tmp_path):
    pki = make_pki(tmp_path, FED, [FED, *SITES])
    board = RoundBoard(FED)
    server = ImpersonatingServer(pki.credentials(FED), Roster.of(SITES), board, ServerConfig())
    server.start()
    client = connect(server, pki, "site-a")
    try:
        client.enroll()
        board.announce(Announcement(1, SITES, "masking"))
        client.heartbeat()
        with pytest.raises(Refused) as info:
            client.fetch_secagg(0)
        assert info.value.reason_name == "SENDER_MISMATCH" and "site-b" in info.value.detail
    finally:
        client.close()
        server.stop(0)
