"""A node operator's own tooling for tests: it edits its ledger file with sqlite3 and re-signs the head with the
node's signing key, which it holds. Nothing here goes through `Ledger`'s writer: the forgeries are what an
operator could do to the file directly, so the checks under test (`verify`, `audit_ledgers`) must catch them
from the bytes alone.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from worldlm_secure.identity import NodeIdentity
from worldlm_secure.ledger.entry import GENESIS_HASH
from worldlm_secure.ledger.store import head_body, head_message_v2


def resign_head(con: sqlite3.Connection, identity: NodeIdentity) -> None:
    """Sign the format-2 head over the file's current state (entries, policy documents, receipts chain) with
    ``identity``'s key, as the owner's ledger does after each write."""
    last = con.execute("SELECT seq, entry_hash FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
    count, entry_hash = (int(last[0]) + 1, str(last[1])) if last else (0, GENESIS_HASH)
    policies = [str(r[0]) for r in con.execute("SELECT sha256 FROM policies ORDER BY sha256")]
    last = con.execute("SELECT seq, row_hash FROM receipts ORDER BY seq DESC LIMIT 1").fetchone()
    n_receipts, receipt_hash = (int(last[0]) + 1, str(last[1])) if last else (0, GENESIS_HASH)
    body = head_body(count, entry_hash, policies, n_receipts, receipt_hash)
    sig = identity.sign(head_message_v2(body)).hex()
    con.execute(
        "INSERT INTO head (id, count, entry_hash, signature, body) VALUES (0, ?, ?, ?, ?) "
        "ON CONFLICT(id) DO UPDATE SET count = excluded.count, entry_hash = excluded.entry_hash, "
        "signature = excluded.signature, body = excluded.body",
        (count, entry_hash, sig, body),
    )


@contextlib.contextmanager
def rewriting(path: Path, identity: NodeIdentity) -> Iterator[sqlite3.Connection]:
    """One edit of the ledger file at ``path`` in one transaction, after which the head is re-signed with
    ``identity``'s key: the file then verifies on its own."""
    con = sqlite3.connect(path, isolation_level=None)
    try:
        con.execute("BEGIN IMMEDIATE")
        yield con
        resign_head(con, identity)
        con.execute("COMMIT")
    except BaseException:
        if con.in_transaction:
            con.execute("ROLLBACK")
        raise
    finally:
        con.close()


def backup(path: Path, dst: Path) -> None:
    """A consistent copy of the ledger file at ``path`` (committed WAL content included), as a backup tool
    takes it with SQLite's online backup."""
    src, out = sqlite3.connect(path), sqlite3.connect(dst)
    try:
        src.backup(out)
    finally:
        out.close()
        src.close()
