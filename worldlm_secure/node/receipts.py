"""Ledger receipts over a deployed link (protocols/ledger.md §7): the `ledger.receipts` exchange that
`simulate` and Ray run in one process, split between the member and its aggregator.

    member:     writes its entry (before_input) -> UploadUpdate(update, ledger_head = its head at that entry,
                signed with its ledger key)
    aggregator: accepts the update -> checks the head's signature (the member's key from its certificate) and
                that its entry count grew -> countersign, once per member and link round
                -> "issued" row in its own ledger -> the receipt (embedding the member's signature) in the reply
    member:     hold(receipt, expected_parent_key = the key of the aggregator's certificate) -> "held" row

Crash safety: before the update leaves, the member stores the head it sends in its node state
(``receipts_pending``); it clears it once the receipt is held, or once the aggregator says it issued none.
A member killed in between asks again on its next announcement (`FetchLedgerReceipt`, answered from the
aggregator's ledger by `ledger.receipts.issued`), so a `kill -9` leaves no "issued but never held" receipt.
An aggregator restarted after it countersigned gets the same head again when the member re-releases, and
`countersign` returns the stored receipt (idempotent by release id and entry count).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from worldlm_secure.errors import LedgerError, TransportError
from worldlm_secure.ledger import receipts
from worldlm_secure.ledger.receipts import Receipt
from worldlm_secure.transport.handler import LedgerHead
from worldlm_secure.transport.refusal import Refused

log = logging.getLogger("worldlm_secure.node")
PENDING = "receipts_pending"  # node-state key: heads sent whose receipt is not held yet


def release_id(world_round: int, phase: str, aggregator: str) -> str:
    """The id of a member's release in a link round, as the member's ledger entry and `simulate` name it."""
    return f"{world_round}:{phase}:{aggregator}"


class AggregatorReceipts:
    """The aggregator's half (a transport `Countersigner`): countersign a member's head sent with an accepted
    update, in the aggregator's own ledger. Runs in server threads (the `Ledger` is thread-safe).

    ``phase_of(link_round)``: the (world round, phase) this aggregator announced for a link round, or None.
    The member's stated release id must be the one that round is for; its key is the one its certificate binds."""

    def __init__(self, ledger: Any, phase_of: Callable[[int], tuple[int, str] | None]) -> None:
        self.ledger = ledger
        self.phase_of = phase_of
        self._lock = threading.Lock()
        self._last: dict[str, int] = {}  # member -> largest entry count countersigned (see `_last_count`)

    def countersign(self, member: str, signing_public_key: bytes, round_id: int, head: LedgerHead) -> bytes:
        phase = self.phase_of(round_id)
        if phase is None:
            raise LedgerError(f"link round {round_id} was not announced by {self.ledger.identity.name}")
        want = release_id(phase[0], phase[1], self.ledger.identity.name)
        if head.release_id != want:
            raise LedgerError(f"{member} sent a ledger head for {head.release_id!r} with its update of link round "
                              f"{round_id}, which is release {want!r}; not countersigned")
        pk, h = signing_public_key.hex(), head.entry_hash.hex()
        # The member's own signature of its head (with the key its certificate binds): without it this node
        # could not show the member ever sent that head, and `ledger audit` would hold the receipt against it.
        if not head.signature or not receipts.verify_head(member, pk, want, head.entry_count, h, head.signature.hex()):
            raise LedgerError(f"{member} sent a ledger head for {want!r} {'without a' if not head.signature else 'with a bad'} "
                              "signature of its ledger key; not countersigned")
        with self._lock:  # the check and the countersignature together: server threads run concurrently
            stored = receipts.issued(self.ledger, child=member, release_id=want, child_count=head.entry_count)
            if stored is not None and stored.child_entry_hash == h and stored.child_public_key == pk:
                return stored.to_json().encode()  # the same head again (a restart, a retried upload)
            # A member's ledger only grows, and every release appends an entry: its countersigned entry count
            # strictly increases across its receipts here. A head not past the last one is stale (it may end
            # before the release's entry) or rewritten: refused.
            last = self._last_count(member)
            if last is not None and head.entry_count <= last:
                raise LedgerError(f"{member} sent a ledger head of {head.entry_count} entries for {want!r}, not past the "
                                  f"{last} this node already countersigned for it; not countersigned")
            r = receipts.countersign(
                self.ledger, child=member, child_public_key=pk, child_count=head.entry_count,
                child_entry_hash=h, release_id=want, round=phase[0], child_signature=head.signature.hex(),
            )
            self._last[member] = max(r.child_count, self._last.get(member, r.child_count))
        return r.to_json().encode()

    def _last_count(self, member: str) -> int | None:
        """The largest entry count this node countersigned for ``member`` (read once from its ledger, then kept)."""
        if member not in self._last:
            counts = [row.receipt.child_count for row in map(receipts.decode_row, self.ledger.receipt_bodies())
                      if row.role == receipts.ISSUED and row.receipt.child == member]
            if counts:
                self._last[member] = max(counts)
        return self._last.get(member)

    def issued(self, member: str, signing_public_key: bytes, head: LedgerHead) -> bytes:
        r = receipts.issued(self.ledger, child=member, release_id=head.release_id, child_count=head.entry_count)
        if r is None or r.child_entry_hash != head.entry_hash.hex() or r.child_public_key != signing_public_key.hex():
            return b""
        return r.to_json().encode()


class MemberReceipts:
    """The member's half: the head to send, holding the receipt that comes back, and asking again after a crash.

    ``ledger``: the member's open `Ledger`; ``state``: its `NodeState`; ``parent``: the aggregator's name;
    ``emit``: the node's progress events (``receipt_held``, ``receipt_refused``, ``receipt_none``)."""

    def __init__(self, ledger: Any, state: Any, parent: str, emit: Callable[..., None]) -> None:
        self.ledger, self.state, self.parent, self.emit = ledger, state, parent, emit

    def _pending(self) -> list[list[Any]]:
        return [list(p) for p in (self.state.get(PENDING, []) or [])]

    def _drop(self, rid: str, count: int) -> None:
        self.state.put(**{PENDING: [p for p in self._pending() if (p[0], p[1]) != (rid, count)]})

    def head(self, rid: str) -> LedgerHead:
        """This member's head at its entry for ``rid`` (normally its head now: the protocol just wrote it),
        remembered as pending before it leaves. The head ends on that entry (or its latest ``:retryLINK``): a
        re-release that wrote no new entry, after other releases, still names the head of its own entry, which
        is what the aggregator countersigned before (and what `ledger audit` checks the receipt against)."""
        count, h = self.ledger.head()
        if count:
            from worldlm_secure.ledger.audit import _release_of

            entries = self.ledger.entries()
            mine = [e for e in entries if e.destination == self.parent and _release_of(e.release_id, rid)]
            if mine and mine[-1].seq != count - 1:
                count, h = mine[-1].seq + 1, mine[-1].entry_hash
        pending = self._pending()
        if [rid, count, h] not in pending:
            self.state.put(**{PENDING: pending + [[rid, count, h]]})
        return self._signed(rid, count, h)

    def _signed(self, rid: str, count: int, h: str) -> LedgerHead:
        """The head signed with this member's ledger key (Ed25519 is deterministic: the same head, the same bytes)."""
        return LedgerHead(rid, count, bytes.fromhex(h), bytes.fromhex(receipts.sign_head(self.ledger, rid, count, h)))

    def hold(self, head: LedgerHead, body: bytes, parent_key: bytes) -> Receipt | None:
        """Check the aggregator's receipt of ``head`` and store it ("held"). ``parent_key``: the Ed25519 key of
        the aggregator's certificate (`Announcement.aggregator_key`, checked by this member's client). A receipt
        that fails a check is refused (an event and a warning: the update already left; `ledger audit` then
        reports the missing held copy); nothing is stored."""
        rid, count, h = head.release_id, head.entry_count, head.entry_hash.hex()
        if not body:
            self.emit("receipt_none", release=rid, count=count)
            self._drop(rid, count)
            return None
        try:
            r = Receipt.from_json(body)
            if (r.parent, r.release_id, r.child_count, r.child_entry_hash) != (self.parent, rid, count, h) or (
                    head.signature and r.child_signature != head.signature.hex()):
                raise LedgerError(f"{r} does not countersign the head this member sent ({self.parent}, {rid}, {count}:{h[:12]}…)")
            held = receipts.hold(self.ledger, r, expected_parent_key=parent_key.hex())
        except LedgerError as exc:
            log.warning("receipt for %s from %s refused: %s", rid, self.parent, exc)
            self.emit("receipt_refused", release=rid, count=count, error=str(exc))
            self._drop(rid, count)
            return None
        self._drop(rid, count)
        self.emit("receipt_held", release=rid, count=count)
        return held

    def recover(self, client: Any, parent_key: bytes) -> None:
        """Ask the aggregator again for every receipt this member sent a head for but never held (it crashed,
        or the reply was lost). Kept pending while the aggregator cannot be reached."""
        for rid, count, h in self._pending():
            head = self._signed(rid, int(count), h)
            try:
                body = client.fetch_ledger_receipt(head)
            except (Refused, TransportError) as exc:
                log.info("asking %s again for the receipt of %s: %s", self.parent, rid, exc)
                return
            self.hold(head, body, parent_key)


class ReceiptingClient:
    """A member's `SiteClient` for one release: its update carries the member's ledger head, and the receipt
    in the reply is checked and held. Everything else passes through. The head is read when the update
    leaves, after the protocol's ``before_input`` wrote the release's entry (every protocol uploads once)."""

    def __init__(self, client: Any, receipts_: MemberReceipts, rid: str, parent_key: bytes) -> None:
        self._client, self._receipts, self._rid, self._parent_key = client, receipts_, rid, parent_key

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def upload_update(self, payload: Any, **kwargs: Any) -> Any:
        head = self._receipts.head(self._rid)
        reply = self._client.upload_update(payload, ledger_head=head, **kwargs)
        self._receipts.hold(head, reply.ledger_receipt, self._parent_key)
        return reply
