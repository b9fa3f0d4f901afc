"""One secure sum across one link over real gRPC + mTLS (node.link): the aggregator's and the members'
sides of SecAgg+ as `node start` runs them, with dropouts recovered and aborts under min_cohort."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from worldlm_secure.errors import SecAggError
from worldlm_secure.node.board import NodeBoard
from worldlm_secure.node.link import Liveness, aggregate_round, member_round
from worldlm_secure.secagg.masking import MaskingParams, RoundConfig
from worldlm_secure.transport import federation_pb2 as pb
from worldlm_secure.transport.chunks import Payload
from worldlm_secure.transport.client import RetryPolicy, SiteClient
from worldlm_secure.transport.handler import Announcement
from worldlm_secure.transport.server import FederationServer, ServerConfig
from worldlm_secure.transport.testing import make_pki
from worldlm_secure.transport.tls import Roster

PARAMS = MaskingParams(clip_range=4.0, neighbours="auto", threshold=0.67, bits=32)


def _run(tmp_path: Path, n: int, min_cohort: int, quitter: str | None, protocol: str = "masking"):
    names = [f"site-{i}" for i in range(n)]
    pki = make_pki(tmp_path, "fed", ["fed", *names])
    board = NodeBoard("fed")
    server = FederationServer(pki.credentials("fed"), Roster.of(names), board, ServerConfig())
    server.start()
    vectors = {m: np.linspace(-1, 1, 50) * (i + 1) for i, m in enumerate(names)}
    clients = {m: SiteClient(server.target, pki.credentials(m), "fed", identity=pki.identity(m), members=names,
                             retry=RetryPolicy(attempts=2, initial_backoff=0.05)) for m in names}
    for c in clients.values():
        c.enroll()
    aggregator = pki.identity("fed")
    ann = Announcement(1, tuple(names), protocol, b"{}", 0, aggregator_key=aggregator.public_bytes)
    board.announce(ann)
    ann = board.announcement(1) or ann
    # Each member takes the round's keys from the announcement it verified itself (certificates), as a site does.
    seen = {m: next(iter(clients[m].watch_rounds(after_round=0))) for m in names}
    build = lambda a: RoundConfig.build(PARAMS, 1, names, dict(a.peer_keys), min_cohort, aggregator_key=a.aggregator_key)  # noqa: E731
    cfg = build(ann) if protocol == "masking" else None
    member_cfg = {m: build(seen[m]) if protocol == "masking" else None for m in names}
    recorded: dict[str, tuple[str, ...]] = {}
    errors: dict[str, str] = {}

    def member(m: str) -> None:
        try:
            if m == quitter:  # advertises its keys, then vanishes (a crash after key agreement)
                from worldlm_secure.secagg.masking import MaskingMember

                adv = MaskingMember(pki.identity(m), member_cfg[m]).advertise()  # type: ignore[arg-type]
                clients[m].send_secagg(pb.SECAGG_MASKING_ADVERTISE_KEYS, Payload.from_bytes(adv.to_bytes()), round_id=1)
                return
            member_round(clients[m], pki.identity(m), seen[m], member_cfg[m], vectors[m],
                         before_input=lambda cohort, m=m: recorded.__setitem__(m, cohort), timeout=8)
        except Exception as exc:  # collected: the abort test expects members to fail cleanly
            errors[m] = f"{type(exc).__name__}: {exc}"

    from worldlm_secure.node.heartbeat import Heartbeat

    beats = [Heartbeat(lambda c=clients[m]: c.heartbeat("x"), 0.5) for m in names if m != quitter]
    for b in beats:
        b.start()
    threads = [threading.Thread(target=member, args=(m,)) for m in names]
    for t in threads:
        t.start()
    try:
        # the quitter's heartbeat is never current: it counts as silent right away
        live = Liveness(board, silent_after=3.0)
        out = aggregate_round(board, ann, cfg, min_cohort, identity=aggregator, first_timeout=30, step_timeout=3, live=live)
    except SecAggError as exc:
        out = exc
    for t in threads:
        t.join(timeout=30)
    for b in beats:
        b.stop()
    for c in clients.values():
        c.close()
    server.stop()
    return out, vectors, recorded, errors


def test_masked_round_over_mtls_equals_plain_sum(tmp_path: Path) -> None:
    out, vectors, recorded, errors = _run(tmp_path, 4, 3, None)
    assert not errors
    assert sorted(out.contributors) == sorted(vectors) and not out.dropped
    assert np.max(np.abs(out.total - sum(vectors.values()))) < 1e-6
    assert all(set(c) == set(vectors) for c in recorded.values())  # ledger hook ran before each input left


def test_plain_round_sums_uploads(tmp_path: Path) -> None:
    out, vectors, _, errors = _run(tmp_path, 3, 1, None, protocol="none")
    assert not errors and np.allclose(out.total, sum(vectors.values()))


def test_member_dropping_after_key_agreement_is_recovered(tmp_path: Path) -> None:
    out, vectors, _, errors = _run(tmp_path, 5, 3, "site-4")
    assert not errors, errors
    assert out.dropped == ("site-4",)
    expected = sum(v for m, v in vectors.items() if m != "site-4")
    assert np.max(np.abs(out.total - expected)) < 1e-6


def test_round_below_min_cohort_aborts_and_releases_nothing(tmp_path: Path) -> None:
    out, _, recorded, errors = _run(tmp_path, 3, 3, "site-2")
    assert isinstance(out, SecAggError) and "min_cohort=3" in str(out)
    assert not recorded  # no member's input ever left: nothing to record
    assert set(errors) == {"site-0", "site-1"}  # the others gave up cleanly (step timeout)
