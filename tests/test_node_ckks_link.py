"""One CKKS secure sum across one link over real gRPC + mTLS (node.ckks_link): the key epoch among the
member key holders through the aggregator, ciphertexts added by the aggregator, the sum decrypted and
confirmed by the holders; a member whose ciphertext is corrupted is rejected by name."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import numpy as np

from worldlm_secure.errors import SecAggError
from worldlm_secure.node import ckks_link
from worldlm_secure.secagg import ckks_messages as wire
from worldlm_secure.node.board import NodeBoard
from worldlm_secure.node.ckks_link import CkksRound
from worldlm_secure.node.heartbeat import Heartbeat
from worldlm_secure.node.link import Liveness, aggregate_round, member_round
from worldlm_secure.secagg.ckks_params import CkksParams
from worldlm_secure.transport import federation_pb2 as pb
from worldlm_secure.transport.client import RetryPolicy, SiteClient
from worldlm_secure.transport.handler import Announcement
from worldlm_secure.transport.server import FederationServer, ServerConfig
from worldlm_secure.transport.testing import make_pki
from worldlm_secure.transport.tls import Roster


def _garbled(member, spec, vector) -> bytes:
    """A contribution whose first ciphertext is garbled and then re-signed by the member, so that only the
    aggregator's ciphertext check (not the signature) can catch it."""
    c = member.protect(spec, vector)
    bad = bytes(b ^ 0x5A for b in c.chunks[0][:64]) + c.chunks[0][64:]
    c = replace(c, chunks=(bad, *c.chunks[1:]), signature=b"")
    return wire.contribution_bytes(replace(c, signature=member.identity.sign(c.message())))


def _run(tmp_path: Path, n: int, setup: CkksRound, bad: str | None = None, size: int = 3000):
    names = [f"site-{i}" for i in range(n)]
    pki = make_pki(tmp_path, "fed", ["fed", *names])
    board = NodeBoard("fed")
    server = FederationServer(pki.credentials("fed"), Roster.of(names), board, ServerConfig())
    server.start()
    rng = np.random.default_rng(0)
    vectors = {m: rng.uniform(-0.5, 0.5, size) for m in names}
    clients = {m: SiteClient(server.target, pki.credentials(m), "fed", identity=pki.identity(m), members=names,
                             retry=RetryPolicy(attempts=2, initial_backoff=0.05)) for m in names}
    for c in clients.values():
        c.enroll()
    aggregator = pki.identity("fed")
    board.announce(Announcement(1, tuple(names), "ckks", b"{}", 0, aggregator_key=aggregator.public_bytes))
    # Each member works from the announcement it verified itself (peer keys from certificates), as a site does.
    seen = {m: next(iter(clients[m].watch_rounds(after_round=0))) for m in names}
    recorded: dict[str, tuple[str, ...]] = {}
    errors: dict[str, str] = {}

    def member(m: str) -> None:
        try:
            if m == bad:
                ckks_link.member_round(clients[m], pki.identity(m), seen[m], setup, vectors[m], wait_timeout=20,
                                       before_input=lambda cohort, key_id: None, encrypt=_garbled)
                return
            member_round(clients[m], pki.identity(m), seen[m], None, vectors[m], ckks=setup, wait_timeout=20,
                         before_input=lambda cohort, key_id, m=m: recorded.__setitem__(m, (cohort, key_id)), timeout=8)
        except Exception as exc:  # collected: the abort test expects members to fail cleanly
            errors[m] = f"{type(exc).__name__}: {exc}"

    beats = [Heartbeat(lambda c=clients[m]: c.heartbeat("x"), 0.5) for m in names]
    for b in beats:
        b.start()
    threads = [threading.Thread(target=member, args=(m,)) for m in names]
    for t in threads:
        t.start()
    try:
        ann = board.announcement(1)
        out = aggregate_round(board, ann, None, setup.min_cohort, identity=aggregator, first_timeout=30, step_timeout=10,
                              live=Liveness(board, silent_after=3.0), ckks=setup)
    except SecAggError as exc:
        out = exc
    for t in threads:
        t.join(timeout=30)
    for b in beats:
        b.stop()
    epochs = {m: wire.epoch_from(wire.decode(x.payload.to_bytes()))
              for m in names for x in board.secagg_for(m, 1, pb.SECAGG_CKKS_PUBLIC_CONTEXT)
              if wire.decode(x.payload.to_bytes()).tag == wire.EPOCH_KEYS}
    for c in clients.values():
        c.close()
    server.stop()
    return out, vectors, recorded, errors, epochs


def test_ckks_round_over_mtls_equals_plain_sum_and_only_holders_get_the_key(tmp_path: Path) -> None:
    setup = CkksRound(CkksParams(key_holders=("site-1", "site-3"), value_bits=32, clip_range=1.0), 3)
    out, vectors, recorded, errors, epochs = _run(tmp_path, 4, setup)
    assert not errors, errors
    assert sorted(out.contributors) == sorted(vectors) and not out.dropped and not out.rejected
    # exact integer sums; the only error is quantization (clip_range / 2^32 per value and member)
    assert np.max(np.abs(out.total - sum(vectors.values()))) < 4 * 2.0**-31
    # the ledger hook ran before each input left, with the cohort and the key id the aggregator summed under
    assert all(set(c) == set(vectors) and k == out.key_id and len(k) == 32 for c, k in recorded.values())
    # the generator was site-1 (first holder); each holder got only its own sealed key, the others none
    assert {m: sorted(e.wrapped) for m, e in epochs.items()} == {"site-0": [], "site-1": ["site-1"], "site-2": [], "site-3": ["site-3"]}
    assert {e.generator for e in epochs.values()} == {"site-1"}


def test_corrupted_ciphertext_is_rejected_by_name_and_the_round_completes(tmp_path: Path) -> None:
    setup = CkksRound(CkksParams(value_bits=32, clip_range=1.0), 3)  # default holder: site-0
    out, vectors, _, errors, _ = _run(tmp_path, 4, setup, bad="site-2")
    assert not errors, errors
    assert out.dropped == ("site-2",) and sorted(out.contributors) == ["site-0", "site-1", "site-3"]
    assert len(out.rejected) == 1 and "'site-2'" in out.rejected[0] and "ciphertext 0" in out.rejected[0], out.rejected
    expected = sum(v for m, v in vectors.items() if m != "site-2")
    assert np.max(np.abs(out.total - expected)) < 4 * 2.0**-31


def test_corrupted_ciphertext_below_min_cohort_aborts_naming_the_member(tmp_path: Path) -> None:
    setup = CkksRound(CkksParams(value_bits=32, clip_range=1.0), 3)
    out, _, _, errors, _ = _run(tmp_path, 3, setup, bad="site-1")
    assert isinstance(out, SecAggError) and "min_cohort=3" in str(out) and "'site-1'" in str(out)
    assert "site-0" in errors  # the holder waited for a sum that never came and gave up cleanly


def test_every_member_holds_the_key_with_members_token(tmp_path: Path) -> None:
    setup = CkksRound(CkksParams(key_holders=("members",), value_bits=32, clip_range=1.0), 2)
    out, vectors, _, errors, epochs = _run(tmp_path, 3, setup, size=10)
    assert not errors, errors
    assert np.max(np.abs(out.total - sum(vectors.values()))) < 4 * 2.0**-31
    assert all(sorted(e.wrapped) == [m] for m, e in epochs.items())
