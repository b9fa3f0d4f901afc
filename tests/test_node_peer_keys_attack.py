"""A malicious federation operator tries to choose the peer keys its members trust (real gRPC + mTLS).

The attack (before the fix): the operator announces a masked round whose `peer_keys` are identities
it made up for every cohort member but one, plays those members itself, and the released "secure
sum" is exactly the one honest member's input. Now the announcement carries each member's
certificate and the federation's own; the MEMBER verifies them against the CA it already trusts and
the roster it knows from the world file, and refuses the round (it takes no part) on any mismatch.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization

from worldlm_secure.identity import NodeIdentity
from worldlm_secure.secagg.masking import MaskingAggregator, MaskingMember, MaskingParams, RoundConfig
from worldlm_secure.secagg.masking_round import drive_round
from worldlm_secure.transport import federation_pb2 as pb
from worldlm_secure.transport.handler import Announcement
from worldlm_secure.transport.refusal import Refused
from worldlm_secure.transport.server import FederationServer, ServerConfig
from worldlm_secure.transport.testing import connect, make_pki
from worldlm_secure.transport.tls import Roster
from worldlm_secure.transport.board import RoundBoard

FED = "fed"
SITES = ("site-a", "site-b", "site-c")
PARAMS = MaskingParams(clip_range=4.0, neighbours="auto", threshold=0.67, bits=32)


class TamperingServer(FederationServer):
    """The operator runs modified server code: ``tamper(pb.RoundAnnouncement)`` edits every announcement."""

    tamper = staticmethod(lambda msg: None)

    def announcement(self, ann):  # the hook the real server builds announcements in
        msg = super().announcement(ann)
        type(self).tamper(msg)
        return msg


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    pki = make_pki(root, FED, [FED, *SITES, "stranger"])
    pki.issue("site-b", expired=True, label="site-b-expired")
    evil = make_pki(root / "evil", "evil-ca", [])
    evil.issue("site-b", label="site-b-evil")  # the right name, from a CA the members do not trust
    evil.issue(FED, label="fed-evil")
    board = RoundBoard(FED)
    server = TamperingServer(pki.credentials(FED), Roster.of([*SITES, "stranger"]), board, ServerConfig(watch_poll_seconds=0.1))
    server.start()
    clients = {m: connect(server, pki, m) for m in (*SITES, "stranger")}
    for c in clients.values():
        c.enroll()
    yield pki, evil, server, board, clients
    for c in clients.values():
        c.close()
    server.stop(0)


def _der(pki, label: str) -> bytes:
    return pki.credentials(label).certificate.public_bytes(serialization.Encoding.DER)


def _next_round(board) -> int:
    return board.current_round() + 1


def _watch_one(client, after: int):
    """The first announcement the member accepts after round ``after`` (refused ones are skipped)."""
    return next(client.watch_rounds(after_round=after))


def test_forged_identities_for_all_but_one_member_are_refused_by_that_member(world):
    """The operator's attack end to end: forged keys for site-b and site-c, the operator plays them."""
    pki, _evil, server, board, clients = world
    TamperingServer.tamper = staticmethod(lambda msg: None)
    rid = _next_round(board)
    forged = {m: NodeIdentity.generate(m) for m in ("site-b", "site-c")}  # the operator holds these keys
    keys = (("site-a", pki.identity("site-a").public_bytes), *((m, forged[m].public_bytes) for m in sorted(forged)))
    board.announce(Announcement(rid, SITES, "masking", b"{}", 0, peer_keys=keys))
    board.announce(Announcement(rid + 1, ("site-a",), "none"))  # an honest round after it
    site_a = clients["site-a"]
    ann = _watch_one(site_a, rid - 1)

    released = None
    if ann.round_id == rid:  # the member accepted the operator's keys: the operator plays the round out
        vector = np.linspace(-1.0, 1.0, 40)
        operator = pki.identity(FED)
        agg_key = getattr(ann, "aggregator_key", b"") or operator.public_bytes
        cfg = RoundConfig.build(PARAMS, rid, ann.cohort, dict(ann.peer_keys), 2, aggregator_key=agg_key)
        members = {"site-a": MaskingMember(pki.identity("site-a"), cfg), **{m: MaskingMember(forged[m], cfg) for m in forged}}
        vectors = {"site-a": vector, **{m: np.zeros_like(vector) for m in forged}}
        trace = drive_round(members, MaskingAggregator(cfg, operator), vectors)
        released = trace.outcome.total
        assert np.max(np.abs(released - vector)) < 1e-6  # the "secure sum" is site-a's input
    assert released is None, "site-a accepted forged peer keys: the released sum is exactly its own input"
    assert ann.round_id == rid + 1  # site-a took no part in the forged round
    refusal = site_a.refused_announcements[rid]
    assert isinstance(refusal, Refused) and "site-b" in str(refusal) and "certificate" in str(refusal)


@pytest.mark.parametrize(
    "case, reason, words",
    [
        ("key-not-bound", "BAD_SIGNATURE", ("site-b", "not the key its certificate binds")),
        ("no-certificate", "UNTRUSTED_CERTIFICATE", ("site-b", "no certificate")),
        ("other-ca", "UNTRUSTED_CERTIFICATE", ("site-b", "not issued by the federation CA")),
        ("expired", "CERTIFICATE_EXPIRED", ("site-b", "valid")),
        ("name-swap", "UNTRUSTED_CERTIFICATE", ("site-b", "names 'site-c'")),
        ("garbage", "UNTRUSTED_CERTIFICATE", ("site-b", "does not parse")),
        ("stray-key", "MALFORMED", ("stranger", "not in the round's cohort")),
        ("duplicate", "MALFORMED", ("site-b", "twice")),
    ],
)
def test_member_checks_every_peer_certificate(world, case, reason, words):
    pki, evil, server, board, clients = world

    def tamper(msg: pb.RoundAnnouncement) -> None:
        pk = {k.name: k for k in msg.peer_keys}["site-b"]
        if case == "key-not-bound":
            pk.signing_public_key = NodeIdentity.generate("site-b").public_bytes
        elif case == "no-certificate":
            pk.certificate = b""
        elif case == "other-ca":
            pk.certificate = _der(evil, "site-b-evil")
            pk.signing_public_key = evil.identity("site-b-evil").public_bytes
        elif case == "expired":
            pk.certificate = _der(pki, "site-b-expired")
            pk.signing_public_key = pki.identity("site-b-expired").public_bytes
        elif case == "name-swap":  # site-c's genuine certificate and key, presented as site-b's
            pk.certificate = _der(pki, "site-c")
            pk.signing_public_key = pki.identity("site-c").public_bytes
        elif case == "garbage":
            pk.certificate = b"\x30\x03\x02\x01\x00"
        elif case == "stray-key":
            msg.peer_keys.add(name="stranger", signing_public_key=pki.identity("stranger").public_bytes, certificate=_der(pki, "stranger"))
        elif case == "duplicate":
            msg.peer_keys.add().CopyFrom(pk)

    rid = _next_round(board)
    TamperingServer.tamper = staticmethod(lambda msg: tamper(msg) if msg.envelope.round_id == rid else None)
    try:
        board.announce(Announcement(rid, SITES, "masking"))
        board.announce(Announcement(rid + 1, SITES, "masking"))
        site_a = clients["site-a"]
        ann = _watch_one(site_a, rid - 1)
        assert ann.round_id == rid + 1  # the tampered round was refused, the next one accepted
        refusal = site_a.refused_announcements[rid]
        assert refusal.reason_name == reason, refusal
        assert all(w in refusal.detail for w in words), refusal.detail
        # the honest announcement carries only verified keys, each the one its certificate binds
        assert dict(ann.peer_keys) == {m: pki.identity(m).public_bytes for m in SITES}
    finally:
        TamperingServer.tamper = staticmethod(lambda msg: None)


@pytest.mark.parametrize(
    "case, reason, words",
    [
        ("missing", "UNTRUSTED_CERTIFICATE", ("federation", "no certificate")),
        ("other-ca", "UNTRUSTED_CERTIFICATE", ("not issued by the federation CA",)),
        ("member-cert", "UNTRUSTED_CERTIFICATE", ("names 'site-c'", "'fed'")),
    ],
)
def test_member_checks_the_federations_certificate_and_learns_its_key(world, case, reason, words):
    pki, evil, server, board, clients = world

    def tamper(msg: pb.RoundAnnouncement) -> None:
        msg.aggregator_certificate = {"missing": b"", "other-ca": _der(evil, "fed-evil"), "member-cert": _der(pki, "site-c")}[case]

    rid = _next_round(board)
    TamperingServer.tamper = staticmethod(lambda msg: tamper(msg) if msg.envelope.round_id == rid else None)
    try:
        board.announce(Announcement(rid, SITES, "masking"))
        board.announce(Announcement(rid + 1, SITES, "masking"))
        site_a = clients["site-a"]
        ann = _watch_one(site_a, rid - 1)
        assert ann.round_id == rid + 1
        refusal = site_a.refused_announcements[rid]
        assert refusal.reason_name == reason and all(w in refusal.detail for w in words), refusal
        assert ann.aggregator_key == pki.identity(FED).public_bytes  # from the federation's verified certificate
    finally:
        TamperingServer.tamper = staticmethod(lambda msg: None)


def test_cohort_is_checked_against_the_roster_the_member_knows(world):
    """'stranger' holds a genuine certificate of the same CA and the operator admitted it, but the world
    file does not make it a member of this federation: a member that knows the roster refuses the round."""
    pki, _evil, server, board, clients = world
    TamperingServer.tamper = staticmethod(lambda msg: None)
    site_a = connect(server, pki, "site-a", members=SITES)
    try:
        site_a.enroll()
        rid = _next_round(board)
        board.announce(Announcement(rid, (*SITES, "stranger"), "masking"))
        board.announce(Announcement(rid + 1, SITES, "masking"))
        ann = _watch_one(site_a, rid - 1)
        assert ann.round_id == rid + 1
        refusal = site_a.refused_announcements[rid]
        assert refusal.reason_name == "NOT_IN_ROSTER" and "stranger" in refusal.detail, refusal
        assert set(dict(ann.peer_keys)) == set(SITES)
        # without the roster (clients["site-a"]), the certificate checks alone pass that round
        assert next(clients["site-c"].watch_rounds(after_round=rid - 1)).round_id == rid
    finally:
        site_a.close()


def test_verify_announcement_raises_a_clear_error(world):
    """The check itself, as a member calls it: one refusal naming the peer and why."""
    pki, _evil, server, board, clients = world
    rid = _next_round(board)
    board.announce(Announcement(rid, SITES, "masking"))
    msg = server.announcement(board.announcement(rid))
    site_a = clients["site-a"]
    ok = site_a.verify_announcement(msg)
    assert dict(ok.peer_keys) == {m: pki.identity(m).public_bytes for m in SITES}
    assert ok.aggregator_key == pki.identity(FED).public_bytes
    bad = pb.RoundAnnouncement()
    bad.CopyFrom(msg)
    bad.peer_keys[1].signing_public_key = bytes(32)
    with pytest.raises(Refused) as info:
        site_a.verify_announcement(bad)
    assert f"round {rid}" in str(info.value) and repr(bad.peer_keys[1].name) in str(info.value)
    assert replace(ok, peer_keys=()) != ok
