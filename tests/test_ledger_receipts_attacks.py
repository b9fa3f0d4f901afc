"""Attacks on deployed ledger receipts (protocols/ledger.md §7.1, `node.receipts`), driven through the real
aggregator/member halves (`AggregatorReceipts`, `MemberReceipts`) and `ledger audit`, at unit level.

1. A member (or a whole colluding cohort) sends, with its update, a *stale* ledger head: the release id of the
   round, but the entry count and hash from before the release's entry. The aggregator cannot tell (it checks
   only the release id), countersigns it, the member holds it. The member then truncates the release's entry
   and re-signs its head. Every receipt still matches its ledger and no release is uncovered, so
   `audit --require-receipts` passes: the receipt for release R never covered R.

2. A parent issues (in its own ledger) a receipt for a head the child never sent. Nothing in the receipt is
   signed by the child, yet `audit` reports the honest child as rolled back or truncated.
"""

from __future__ import annotations

from pathlib import Path

import ledger_operator
from test_ledger_chain import effective_policy

from worldlm_secure.errors import LedgerError
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.ledger import Ledger, release_entry, verify
from worldlm_secure.ledger.audit import audit_ledgers
from worldlm_secure.ledger.receipts import countersign, sign_head
from worldlm_secure.node.receipts import AggregatorReceipts, MemberReceipts, release_id
from worldlm_secure.privacy import BudgetTracker
from worldlm_secure.transport.handler import LedgerHead

SITES = ("a", "b", "c")
SITE_POLICY = effective_policy(
    differential_privacy={"epsilon_budget": 8.0},
    egress={"destinations": ["fed"], "require": ["secure_aggregation"]},
)


class _State:
    def __init__(self) -> None:
        self.d: dict = {}

    def get(self, k, default=None):  # type: ignore[no-untyped-def]
        return self.d.get(k, default)

    def put(self, **kw) -> None:  # type: ignore[no-untyped-def]
        self.d.update(kw)


def _world(d: Path, *, stale_in_round: int | None, via: str = "aggregator",
           refused: list[tuple[int, str]] | None = None) -> dict[str, NodeIdentity]:
    """Sites a, b, c release to the root fed for 2 rounds; fed countersigns through `AggregatorReceipts` the head
    each member sends. In ``stale_in_round`` every member sends the head it had *before* that round's entry.
    ``via="ledger"``: fed countersigns with the bare `ledger.receipts.countersign` instead (a parent that makes
    no check of its own: an older or colluding one), so only `ledger audit` stands between the cohort and its
    rollback. A head the aggregator refuses is appended to ``refused`` as (round, site), and nothing is held."""
    ids = {n: NodeIdentity.generate(n) for n in (*SITES, "fed")}
    led = {n: Ledger(d / f"{n}.sqlite", ids[n]) for n in ids}
    phases: dict[int, tuple[int, str]] = {}
    agg = AggregatorReceipts(led["fed"], phases.get)
    trackers = {s: BudgetTracker(budget=8.0, delta=1e-5, stream=f"{s}/user") for s in SITES}
    try:
        for r in range(2):
            link_round = 10 + r
            phases[link_round] = (r, "shared")
            rid = release_id(r, "shared", "fed")
            for s in SITES:
                before = led[s].head()
                led[s].append(release_entry(
                    release_id=rid, round=r, level="site", source=s, destination="fed", group="shared",
                    tensor_names=("model.layers.0.self_attn.q_proj.weight",), protocol="masking", cohort_size=3,
                    dropouts=0, dp_level="user", mechanism="central_gaussian", clipping_norm=1.0,
                    policy_sha256=SITE_POLICY.sha256, charge=trackers[s].charge(4.0, 1.0),
                ), policy_document=SITE_POLICY.canonical_json())
                count, h = before if r == stale_in_round else led[s].head()
                sig = sign_head(led[s], rid, count, h)  # the member signs the head it sends (stale or not)
                head = LedgerHead(rid, count, bytes.fromhex(h), bytes.fromhex(sig))  # TransferHeader.ledger_head
                if via == "ledger":
                    body = countersign(led["fed"], child=s, child_public_key=ids[s].public_bytes.hex(), child_count=count,
                                       child_entry_hash=h, release_id=rid, round=r, child_signature=sig).to_json().encode()
                else:
                    try:
                        body = agg.countersign(s, ids[s].public_bytes, link_round, head)  # the real aggregator half
                    except LedgerError:
                        assert refused is not None, f"fed refused {s}'s head in round {r}"
                        refused.append((r, s))
                        continue
                held = MemberReceipts(led[s], _State(), "fed", lambda *a, **k: None).hold(head, body, ids["fed"].public_bytes)
                assert held is not None
    finally:
        for x in led.values():
            x.close()
    return ids


def _truncate_last_entry(path: Path, identity: NodeIdentity, *, drop_receipt: bool = False) -> None:
    """The node's operator deletes its last entry (and, with ``drop_receipt``, its last receipt row) and
    re-signs the head with its own key: the file verifies alone."""
    with ledger_operator.rewriting(path, identity) as con:
        con.execute("DELETE FROM entries WHERE seq = (SELECT max(seq) FROM entries)")
        if drop_receipt:
            con.execute("DELETE FROM receipts WHERE seq = (SELECT max(seq) FROM receipts)")
    rep = verify(path, require_policies=True)
    assert rep.ok, rep


def test_control_an_honest_head_catches_the_cohort_truncation(tmp_path: Path) -> None:
    ids = _world(tmp_path, stale_in_round=None)
    keys = {n: i.public_bytes.hex() for n, i in ids.items()}
    assert audit_ledgers([tmp_path], keys, require_receipts=True).ok
    for s in SITES:
        _truncate_last_entry(tmp_path / f"{s}.sqlite", ids[s], drop_receipt=True)
    rep = audit_ledgers([tmp_path], keys, require_receipts=True)
    assert not rep.ok and "receipt.child_head" in {f.rule for f in rep.findings}


def test_the_aggregator_refuses_a_stale_head(tmp_path: Path) -> None:
    """The parent's own check: a member's countersigned entry count strictly increases at its parent, so the
    stale head of round 1 (the count fed countersigned in round 0) is refused. The cohort then holds no receipt
    for round 1 and `audit --require-receipts` reports the release uncovered before anyone truncates it."""
    refused: list[tuple[int, str]] = []
    ids = _world(tmp_path, stale_in_round=1, refused=refused)
    assert sorted(refused) == [(1, s) for s in SITES]
    keys = {n: i.public_bytes.hex() for n, i in ids.items()}
    rep = audit_ledgers([tmp_path], keys, require_receipts=True)
    assert {(f.node, f.rule) for f in rep.findings} >= {(s, "receipt.uncovered") for s in SITES}


def test_a_stale_head_lets_a_cohort_truncate_its_release_unnoticed(tmp_path: Path) -> None:
    ids = _world(tmp_path, stale_in_round=1, via="ledger")  # a parent that does not check: audit must
    keys = {n: i.public_bytes.hex() for n, i in ids.items()}
    # Every member's ledger holds its round-1 entry ("1:shared:fed"), and fed issued a receipt named
    # "1:shared:fed" to each -- but the receipt countersigns the head from before that entry.
    for s in SITES:
        _truncate_last_entry(tmp_path / f"{s}.sqlite", ids[s])  # the whole cohort drops round 1
    rep = audit_ledgers([tmp_path], keys, require_receipts=True)
    # fed countersigned a receipt for release 1:shared:fed to each site; none of their ledgers has that release.
    assert not rep.ok, "a cohort truncated its countersigned release and `audit --require-receipts` passes"
    assert {(f.node, f.rule) for f in rep.findings} >= {(s, "receipt.child_release") for s in SITES}
    # and before the truncation too: the receipt for 1:shared:fed ends on the entry of 0:shared:fed
    ids = _world(tmp_path / "untouched", stale_in_round=1, via="ledger")
    rep = audit_ledgers([tmp_path / "untouched"], {n: i.public_bytes.hex() for n, i in ids.items()})
    assert {(f.node, f.rule) for f in rep.findings} == {(s, "receipt.child_release") for s in SITES}


def test_a_parent_cannot_frame_an_honest_child_with_a_head_it_never_sent(tmp_path: Path) -> None:
    ids = _world(tmp_path, stale_in_round=None)
    keys = {n: i.public_bytes.hex() for n, i in ids.items()}
    with Ledger(tmp_path / "fed.sqlite", ids["fed"]) as fed:  # the parent alone, no message from "a"
        countersign(fed, child="a", child_public_key=keys["a"], child_count=5, child_entry_hash="ab" * 32,
                    release_id="1:shared:fed", round=1)
    rep = audit_ledgers([tmp_path], keys, require_receipts=True)
    blamed = [f for f in rep.findings if f.node == "a" and f.rule == "receipt.child_head"]
    # "a" never sent (never signed) a head of 5 entries; the audit must not report a as rolled back on fed's word.
    assert not blamed, [f"{f.node}: {f.rule}: {f}" for f in blamed]
    # the parent is: it issued a receipt for a head "a" never signed
    assert ("fed", "receipt.child_signature") in {(f.node, f.rule) for f in rep.findings}
    assert not [f for f in rep.findings if f.node == "a"]


def test_the_aggregator_refuses_an_unsigned_or_forged_head_and_old_receipts_still_parse(tmp_path: Path) -> None:
    import dataclasses

    import pytest

    from worldlm_secure.ledger.receipts import RECEIPT_TYPE, Receipt

    ids = {n: NodeIdentity.generate(n) for n in ("a", "fed")}
    with Ledger(tmp_path / "fed.sqlite", ids["fed"]) as fed, Ledger(tmp_path / "a.sqlite", ids["a"]) as a:
        agg = AggregatorReceipts(fed, {1: (0, "shared")}.get)
        count, h = a.head()
        unsigned = LedgerHead("0:shared:fed", count, bytes.fromhex(h))
        forged = dataclasses.replace(unsigned, signature=ids["fed"].sign(b"x"))  # not a's signature of this head
        for head in (unsigned, forged):
            with pytest.raises(LedgerError, match="signature"):
                agg.countersign("a", ids["a"].public_bytes, 1, head)
        signed = dataclasses.replace(unsigned, signature=bytes.fromhex(sign_head(a, "0:shared:fed", count, h)))
        r = Receipt.from_json(agg.countersign("a", ids["a"].public_bytes, 1, signed))
        assert r.child_signed() and r.verify_signature(ids["fed"].public_bytes.hex())
        v1 = countersign(fed, child="a", child_public_key=ids["a"].public_bytes.hex(), child_count=7,
                         child_entry_hash="cd" * 32, release_id="1:shared:fed", round=1)
        assert v1.to_dict()["type"] == RECEIPT_TYPE and "child_signature" not in v1.to_dict()
        back = Receipt.from_json(v1.to_json())
        assert back == v1 and back.verify_signature() and not back.child_signed()


def test_one_accepted_update_is_countersigned_once_not_once_per_retried_upload(tmp_path: Path) -> None:
    """`RoundBoard.on_update` accepts a re-upload of the same bytes as an idempotent retry, and the server then
    countersigns whatever head the retry carries. A member re-sending its one update with a new entry_count
    each time gets a new "issued" row (Ed25519 signature + fsync) in the aggregator's permanent ledger per call:
    unbounded growth of another node's ledger from one accepted update."""
    import numpy as np

    from worldlm_secure.ledger.receipts import head_message, read_receipts
    from worldlm_secure.transport.chunks import Payload
    from worldlm_secure.transport.handler import Announcement
    from worldlm_secure.transport.testing import connect, make_pki, start_federation

    pki = make_pki(tmp_path / "pki", "fed", ["fed", "site-a"])
    server, board = start_federation(pki, "fed", ["site-a"])
    fed_id = pki.identity("fed")
    parent = Ledger(tmp_path / "fed.sqlite", fed_id)
    board.countersigner = AggregatorReceipts(parent, {1: (1, "key")}.get)
    client = connect(server, pki, "site-a")
    try:
        client.enroll()
        board.announce(Announcement(1, ("site-a",), "none", b"", aggregator_key=fed_id.public_bytes))
        client.heartbeat()
        update = Payload.from_tensors({"vector": np.arange(4, dtype=np.float64)})
        site = pki.identity("site-a")
        for count in range(1, 21):  # the same update, each time with another head (each validly signed by site-a)
            h = bytes([count]) * 32
            sig = site.sign(head_message("site-a", "1:key:fed", count, h.hex()))
            client.upload_update(update, round_id=1, ledger_head=LedgerHead("1:key:fed", count, h, sig))
        issued = read_receipts(tmp_path / "fed.sqlite")
        assert len(issued) <= 1, f"{len(issued)} receipts issued for one accepted update of site-a in link round 1"
        assert len(issued) == 1 and issued[0].receipt.child_count == 1  # the first head, countersigned once
    finally:
        client.close()
        server.stop(0)
        parent.close()


def test_a_member_sends_the_head_at_its_release_entry(tmp_path: Path) -> None:
    """A re-release that wrote no new entry (same update, no fresh noise), after the member released elsewhere,
    names the head ending on that release's entry: what `ledger audit` checks the receipt against."""
    ident = NodeIdentity.generate("a")
    tracker = BudgetTracker(budget=8.0, delta=1e-5, stream="a/user")
    with Ledger(tmp_path / "a.sqlite", ident) as led:
        for rid, dest in (("0:shared:fed", "fed"), ("0:shared:other", "other")):
            led.append(release_entry(
                release_id=rid, round=0, level="site", source="a", destination=dest, group="shared",
                tensor_names=("w",), protocol="masking", cohort_size=3, dropouts=0, dp_level="user",
                mechanism="central_gaussian", clipping_norm=1.0, policy_sha256=SITE_POLICY.sha256,
                charge=tracker.charge(4.0, 1.0),
            ), policy_document=SITE_POLICY.canonical_json())
        head = MemberReceipts(led, _State(), "fed", lambda *a, **k: None).head("0:shared:fed")
        assert (head.entry_count, head.entry_hash.hex()) == (1, led.entry_hash_at(0))
        assert len(head.signature) == 64
