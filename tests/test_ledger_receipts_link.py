"""Receipts over a real mTLS link (protocols/ledger.md §7, `node.receipts`): the member's update carries its
ledger head, the aggregator countersigns it with the key the member's certificate binds and keeps it, the
member checks it against the aggregator's certificate key and holds it; a member killed in between asks
again; a head for another release, or a receipt under another key, is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from worldlm_secure.identity import NodeIdentity
from worldlm_secure.ledger import Ledger, LedgerEntry, verify
from worldlm_secure.ledger.receipts import HELD, ISSUED, read_receipts
from worldlm_secure.node.receipts import (
    PENDING,
    AggregatorReceipts,
    MemberReceipts,
    ReceiptingClient,
)
from worldlm_secure.node.state import NodeState
from worldlm_secure.transport.chunks import Payload
from worldlm_secure.transport.handler import Announcement
from worldlm_secure.transport.testing import connect, make_pki, start_federation


def _entry(source: str, dest: str, rid: str) -> LedgerEntry:
    return LedgerEntry(
        release_id=rid, round=int(rid.split(":")[0]), stream=f"{source}/user", level="site", source=source,
        destination=dest, group=rid.split(":")[1], tensor_names=("w",), protocol="none", cohort_size=1, dropouts=0,
        dp_level="none", mechanism="none", clipping_norm=0.0, noise_multiplier=0.0, sample_rate=1.0, steps=0,
        accountant="none", delta=0.0, epsilon=None, epsilon_cumulative=None, epsilon_budget=None,
        policy_sha256="0" * 64, code_version="test",
    )


@pytest.fixture()
def link(tmp_path: Path):
    pki = make_pki(tmp_path / "pki", "fed", ["fed", "site-a"])
    server, board = start_federation(pki, "fed", ["site-a"])
    fed_id, site_id = pki.identity("fed"), pki.identity("site-a")
    parent = Ledger(tmp_path / "fed.sqlite", fed_id)
    phases: dict[int, tuple[int, str]] = {}
    board.countersigner = AggregatorReceipts(parent, phases.get)
    child = Ledger(tmp_path / "site-a.sqlite", site_id)
    client = connect(server, pki, "site-a")
    client.enroll()
    events: list[tuple[str, dict]] = []
    state = NodeState(tmp_path / "state")
    member = MemberReceipts(child, state, "fed", lambda ev, **kw: events.append((ev, kw)))

    def announce(rid: int, world_round: int, phase: str) -> Announcement:
        phases[rid] = (world_round, phase)
        board.announce(Announcement(rid, ("site-a",), "none", b"", aggregator_key=fed_id.public_bytes))
        client.heartbeat()
        return board.announcement(rid)  # type: ignore[return-value]

    yield dict(pki=pki, server=server, board=board, parent=parent, child=child, client=client, member=member,
               state=state, events=events, announce=announce, fed_id=fed_id, site_id=site_id, tmp=tmp_path)
    client.close()
    server.stop(0)
    parent.close()
    child.close()
    state.close()


def _update() -> Payload:
    return Payload.from_tensors({"vector": np.arange(4, dtype=np.float64)})


def test_an_update_comes_back_with_a_receipt_both_ledgers_keep(link) -> None:
    link["announce"](1, 1, "shared")
    link["child"].append(_entry("site-a", "fed", "1:shared:fed"))
    up = ReceiptingClient(link["client"], link["member"], "1:shared:fed", link["fed_id"].public_bytes)
    up.upload_update(_update(), round_id=1)
    (held,) = read_receipts(link["tmp"] / "site-a.sqlite")
    (issued,) = read_receipts(link["tmp"] / "fed.sqlite")
    assert (held.role, issued.role) == (HELD, ISSUED) and held.receipt == issued.receipt
    r = held.receipt
    # the child's key is the one its certificate binds; the head is the child's own after its entry
    assert r.child_public_key == link["site_id"].public_bytes.hex()
    assert (r.child_count, r.child_entry_hash) == link["child"].head()
    assert r.release_id == "1:shared:fed" and r.parent_public_key == link["fed_id"].public_bytes.hex()
    assert link["state"].get(PENDING) == []
    assert [e for e, _ in link["events"]] == ["receipt_held"]
    for name in ("fed", "site-a"):
        assert verify(link["tmp"] / f"{name}.sqlite").ok


def test_a_member_killed_before_it_held_the_receipt_asks_again(link) -> None:
    link["announce"](1, 1, "key")
    link["child"].append(_entry("site-a", "fed", "1:key:fed"))
    head = link["member"].head("1:key:fed")  # pending, stored before the update leaves
    link["client"].upload_update(_update(), round_id=1, ledger_head=head)  # ... and then "kill -9": reply lost
    assert read_receipts(link["tmp"] / "site-a.sqlite") == []  # issued, not held: `audit` would report it
    assert [r.role for r in read_receipts(link["tmp"] / "fed.sqlite")] == [ISSUED]
    # the restarted member (a new process: new MemberReceipts over the same state) asks again
    again = MemberReceipts(link["child"], NodeState(link["tmp"] / "state"), "fed", lambda *a, **k: None)
    again.recover(link["client"], link["fed_id"].public_bytes)
    assert [r.role for r in read_receipts(link["tmp"] / "site-a.sqlite")] == [HELD]
    assert again.state.get(PENDING) == []
    (held,), (issued,) = read_receipts(link["tmp"] / "site-a.sqlite"), read_receipts(link["tmp"] / "fed.sqlite")
    assert held.receipt == issued.receipt and verify(link["tmp"] / "site-a.sqlite").ok
    again.state.close()


def test_nothing_issued_means_nothing_pending(link) -> None:
    """A head whose update never arrived: the aggregator has no receipt for it, and says so."""
    link["announce"](1, 1, "key")
    link["child"].append(_entry("site-a", "fed", "1:key:fed"))
    link["member"].head("1:key:fed")
    link["member"].recover(link["client"], link["fed_id"].public_bytes)
    assert link["state"].get(PENDING) == [] and read_receipts(link["tmp"] / "fed.sqlite") == []


def test_a_head_for_another_release_is_not_countersigned(link) -> None:
    link["announce"](1, 1, "key")
    link["child"].append(_entry("site-a", "fed", "1:key:fed"))
    up = ReceiptingClient(link["client"], link["member"], "7:key:fed", link["fed_id"].public_bytes)
    assert up.upload_update(_update(), round_id=1).ledger_receipt == b""  # the update itself is accepted
    assert read_receipts(link["tmp"] / "fed.sqlite") == [] and read_receipts(link["tmp"] / "site-a.sqlite") == []
    assert [e for e, _ in link["events"]] == ["receipt_none"]


def test_the_member_refuses_a_receipt_not_signed_by_its_aggregators_certificate_key(link) -> None:
    link["announce"](1, 1, "key")
    link["child"].append(_entry("site-a", "fed", "1:key:fed"))
    other = NodeIdentity.generate("fed").public_bytes  # not the key of the federation's certificate
    ReceiptingClient(link["client"], link["member"], "1:key:fed", other).upload_update(_update(), round_id=1)
    assert read_receipts(link["tmp"] / "site-a.sqlite") == []
    (ev, kw), = link["events"]
    assert ev == "receipt_refused" and "not the parent's" in kw["error"]


def test_an_update_without_a_head_still_decodes_and_gets_no_receipt(link) -> None:
    """Old members send no ledger head: their updates are accepted as before, with no receipt."""
    link["announce"](1, 1, "key")
    assert link["client"].upload_update(_update(), round_id=1).ledger_receipt == b""
    assert read_receipts(link["tmp"] / "fed.sqlite") == []
