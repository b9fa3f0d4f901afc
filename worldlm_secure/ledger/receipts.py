"""Receipts: a parent's signed statement of a child's ledger head, kept by both.

When a child releases to its parent, the parent countersigns the child's ledger head (entry count and
last entry hash, which already include the entry of that release) together with its own head, and
both store the receipt in their ledgers' receipts chain:

    child  --(release, child head: count + hash)-->  parent
    parent: countersign(...) -> Receipt (signed by the parent), stored as "issued" in the parent's ledger
    parent --(receipt)-->  child
    child:  hold(...) checks the receipt and stores it as "held" in its own ledger

A rolled-back or truncated child ledger then contradicts the parent's issued receipts (and a rolled-back
parent contradicts its children's held ones); `ledger audit` compares them. Wire format and threat model:
protocols/ledger.md §7.

In-process (`simulate`, Ray driver): `exchange(parent_ledger, child_ledger, release_id=..., round=...)`.
Over the network (`node.receipts`): the child sends `child_head(ledger)` with its release; the parent calls
`countersign` and returns `receipt.to_json()`; the child calls `hold(ledger, Receipt.from_json(...),
expected_parent_key)`; a child that crashed in between asks again and the parent answers with `issued`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

from worldlm_secure.errors import LedgerError
from worldlm_secure.identity import verify_hex_signature
from worldlm_secure.ledger.entry import canonical_json

RECEIPT_TYPE = "worldlm-secure receipt v1"  # no child signature (older receipts: still parse and verify)
RECEIPT_TYPE_V2 = "worldlm-secure receipt v2"  # with `child_signature`, the child's signature of its head
RECEIPT_CONTEXT = b"worldlm-secure ledger receipt v1\n"
HEAD_CONTEXT = b"worldlm-secure ledger head v1\n"  # what a child signs: the head it sends with a release


def head_message(child: str, release_id: str, count: int, entry_hash: str) -> bytes:
    """The bytes a child signs with its ledger key for the head it sends with ``release_id`` (domain-separated
    from entries, ledger heads and receipts): the parent cannot issue a receipt for a head the child never sent."""
    return HEAD_CONTEXT + canonical_json(
        {"child": child, "release_id": release_id, "child_count": count, "child_entry_hash": entry_hash})


def sign_head(ledger: Any, release_id: str, count: int, entry_hash: str) -> str:
    """The child's signature (hex) of its head ``(count, entry_hash)`` sent with ``release_id``."""
    return str(ledger.identity.sign(head_message(ledger.identity.name, release_id, count, entry_hash)).hex())


def verify_head(child: str, child_public_key: str, release_id: str, count: int, entry_hash: str, signature: str) -> bool:
    """True when ``signature`` (hex) is ``child``'s signature of that head under ``child_public_key`` (hex)."""
    return verify_hex_signature(child_public_key, signature, head_message(child, release_id, count, entry_hash))
ISSUED, HELD = "issued", "held"  # the parent's copy, the child's copy


@dataclass(frozen=True)
class Receipt:
    """The parent's signed statement: "when I received `release_id` from `child`, its ledger had
    `child_count` entries ending in `child_entry_hash`, and mine had `parent_count` ending in `parent_entry_hash`"."""

    parent: str
    parent_public_key: str  # hex, raw Ed25519
    parent_count: int
    parent_entry_hash: str
    child: str
    child_public_key: str
    child_count: int
    child_entry_hash: str
    release_id: str
    round: int
    timestamp: str
    signature: str = ""  # hex, the parent's Ed25519 signature over RECEIPT_CONTEXT + statement bytes
    child_signature: str = ""  # hex, the child's signature of its head (`head_message`); "" in a v1 receipt

    def statement(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        del d["signature"]
        if not self.child_signature:
            del d["child_signature"]
            return {"type": RECEIPT_TYPE, **d}
        return {"type": RECEIPT_TYPE_V2, **d}

    def child_signed(self) -> bool:
        """True when the receipt carries the child's valid signature of the head it countersigns."""
        return verify_head(self.child, self.child_public_key, self.release_id, self.child_count,
                           self.child_entry_hash, self.child_signature)

    def statement_bytes(self) -> bytes:
        return canonical_json(self.statement())

    def signed_message(self) -> bytes:
        return RECEIPT_CONTEXT + self.statement_bytes()

    def verify_signature(self, parent_public_key: str | None = None) -> bool:
        """True when the signature verifies under `parent_public_key` (default: the key the receipt names)."""
        return verify_hex_signature(parent_public_key or self.parent_public_key, self.signature, self.signed_message())

    def to_dict(self) -> dict[str, Any]:
        return {**self.statement(), "signature": self.signature}

    def to_json(self) -> str:
        return canonical_json(self.to_dict()).decode()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Receipt":
        if not isinstance(d, dict) or d.get("type") not in (RECEIPT_TYPE, RECEIPT_TYPE_V2):
            raise LedgerError(f"not a {RECEIPT_TYPE!r} or {RECEIPT_TYPE_V2!r} receipt")
        names = {f.name: f.type for f in dataclasses.fields(cls)}
        if d["type"] == RECEIPT_TYPE:
            if "child_signature" in d:
                raise LedgerError(f"a {RECEIPT_TYPE!r} receipt has no child_signature")
            del names["child_signature"]
        elif not d.get("child_signature"):
            raise LedgerError(f"a {RECEIPT_TYPE_V2!r} receipt needs a child_signature")
        unknown = set(d) - set(names) - {"type"}
        if unknown:
            raise LedgerError(f"receipt has unknown field(s) {sorted(unknown)}")
        kwargs: dict[str, Any] = {}
        for name, typ in names.items():
            if name not in d:
                raise LedgerError(f"receipt is missing field {name!r}")
            v = d[name]
            want = int if typ in (int, "int") else str
            if isinstance(v, bool) or not isinstance(v, want):
                raise LedgerError(f"receipt field {name!r} must be {want.__name__} (got {v!r})")
            kwargs[name] = v
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Receipt":
        try:
            return cls.from_dict(json.loads(text))
        except ValueError as exc:
            raise LedgerError(f"receipt is not valid JSON ({exc})") from None

    def receipt_id(self, role: str) -> str:
        return f"{role}:{self.parent}>{self.child}:{self.release_id}:{self.child_count}"

    def __str__(self) -> str:
        return (f"receipt {self.parent}>{self.child} for {self.release_id} "
                f"(child head {self.child_count}:{self.child_entry_hash[:12]}…)")


@dataclass(frozen=True)
class ReceiptRow:
    """One row of a ledger's receipts chain (after decoding)."""

    seq: int
    prev_hash: str
    role: str  # issued | held
    receipt: Receipt


def row_body(seq: int, prev_hash: str, role: str, receipt: Receipt) -> bytes:
    return canonical_json({"seq": seq, "prev_hash": prev_hash, "role": role, "receipt": receipt.to_dict()})


def decode_row(body: bytes) -> ReceiptRow:
    """Decode a stored receipts row (raises LedgerError when it is not canonical)."""
    try:
        d = json.loads(body.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise LedgerError(f"receipt row is not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(d, dict) or set(d) != {"seq", "prev_hash", "role", "receipt"}:
        raise LedgerError("receipt row must have exactly seq, prev_hash, role, receipt")
    if d["role"] not in (ISSUED, HELD) or not isinstance(d["seq"], int) or not isinstance(d["prev_hash"], str):
        raise LedgerError("receipt row has a bad seq, prev_hash or role")
    row = ReceiptRow(d["seq"], d["prev_hash"], d["role"], Receipt.from_dict(d["receipt"]))
    if row_body(row.seq, row.prev_hash, row.role, row.receipt) != body:
        raise LedgerError("receipt row is not in canonical form")
    return row


def child_head(ledger: Any) -> tuple[str, str, int, str]:
    """What a child sends with its release: (node, public key hex, entry count, last entry hash)."""
    count, h = ledger.head()
    return ledger.identity.name, ledger.public_key_hex, count, h


def countersign(
    parent: Any, *, child: str, child_public_key: str, child_count: int, child_entry_hash: str,
    release_id: str, round: int, child_signature: str = "",
) -> Receipt:
    """The parent (`parent`: its open `Ledger`) countersigns a child's head on receiving `release_id` and
    stores the receipt in its own ledger ("issued"). Idempotent: the same child head and release give
    the stored receipt back (a restarted parent re-receiving a release does not add a second row).

    ``child_signature``: the child's signature of the head (`sign_head`), checked here under
    ``child_public_key`` and embedded (a v2 receipt). Without it (a v1 receipt) `ledger audit` holds the receipt
    against the parent, not the child: nothing shows the child ever sent that head."""
    if child_count < 0 or len(child_entry_hash) != 64:
        raise LedgerError(f"countersign: bad child head ({child_count}, {child_entry_hash[:16]!r})")
    if child_signature and not verify_head(child, child_public_key, release_id, child_count, child_entry_hash, child_signature):
        raise LedgerError(f"countersign: {child}'s signature of its head ({child_count}, {child_entry_hash[:16]}…) "
                          f"for {release_id!r} does not verify under its key {child_public_key[:16]}…")
    p_count, p_hash = parent.head()
    r = Receipt(
        parent=parent.identity.name, parent_public_key=parent.public_key_hex, parent_count=p_count,
        parent_entry_hash=p_hash, child=child, child_public_key=child_public_key, child_count=child_count,
        child_entry_hash=child_entry_hash, release_id=release_id, round=round,
        timestamp=dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds"), child_signature=child_signature,
    )
    r = dataclasses.replace(r, signature=parent.identity.sign(r.signed_message()).hex())
    stored = parent.add_receipt_row(r.receipt_id(ISSUED), lambda seq, prev: row_body(seq, prev, ISSUED, r))
    return decode_row(stored).receipt


def hold(child: Any, receipt: Receipt, *, expected_parent_key: str | None = None) -> Receipt:
    """The child (`child`: its open `Ledger`) checks the parent's receipt and stores it ("held").

    Refuses a receipt that is not for this node and key, that names a head this ledger does not have, or
    whose signature does not verify (under `expected_parent_key`, the parent's key from its certificate,
    when given). Idempotent like `countersign`."""
    me, pk = child.identity.name, child.public_key_hex
    if receipt.child != me or receipt.child_public_key != pk:
        raise LedgerError(f"{receipt}: is for {receipt.child!r} with key {receipt.child_public_key[:16]}…, not this node {me!r}")
    if expected_parent_key is not None and receipt.parent_public_key != expected_parent_key.lower():
        raise LedgerError(f"{receipt}: signed by key {receipt.parent_public_key[:16]}…, not the parent's {expected_parent_key[:16]}…")
    if not receipt.verify_signature():
        raise LedgerError(f"{receipt}: the parent's signature does not verify")
    count, _ = child.head()
    if receipt.child_count > count or (
        receipt.child_count > 0 and child.entry_hash_at(receipt.child_count - 1) != receipt.child_entry_hash
    ):
        raise LedgerError(f"{receipt}: names a head this ledger does not have ({count} entries)")
    stored = child.add_receipt_row(receipt.receipt_id(HELD), lambda seq, prev: row_body(seq, prev, HELD, receipt))
    return decode_row(stored).receipt


def issued(parent: Any, *, child: str, release_id: str, child_count: int) -> Receipt | None:
    """The receipt `parent` (its open `Ledger`) issued to `child` for `release_id` at `child_count` entries, if
    any: what a child that crashed before storing it asks for again (a deployed parent answers from here)."""
    rid = f"{ISSUED}:{parent.identity.name}>{child}:{release_id}:{child_count}"
    body = parent.receipt_body(rid)
    return decode_row(body).receipt if body is not None else None


def exchange(parent: Any, child: Any, *, release_id: str, round: int) -> Receipt:
    """Both halves in one process (simulate, the Ray driver): countersign the child's current head and
    give the receipt to the child. Call it right after the child's entry for `release_id` is appended."""
    name, pk, count, h = child_head(child)
    r = countersign(parent, child=name, child_public_key=pk, child_count=count, child_entry_hash=h,
                    release_id=release_id, round=round, child_signature=sign_head(child, release_id, count, h))
    return hold(child, r, expected_parent_key=parent.public_key_hex)


def read_receipts(path: Any) -> list[ReceiptRow]:
    """Decode a ledger file's receipts chain (no verification: `verify` does that)."""
    from worldlm_secure.ledger.store import read_ledger_file

    return [decode_row(body) for _, _, body, _ in read_ledger_file(path).receipts]
