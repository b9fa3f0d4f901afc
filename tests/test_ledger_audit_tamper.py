"""Property: any single-byte change, any row deletion, any reordering and any truncation (even with the
head re-signed by the node's own key) of any ledger in a world's bundle is detected by `ledger audit`.

The bundle is the receipt-writing world of test_ledger_audit (three sites, a federation, the root; two
rounds; every release countersigned as protocols/ledger.md §7 specifies). 100% of generated cases must
fail the audit."""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ledger_operator
from test_ledger_audit import build_world

from worldlm_secure.identity import NodeIdentity
from worldlm_secure.ledger import Ledger
from worldlm_secure.ledger.audit import audit_ledgers

NODES = ("a", "b", "c", "fed", "world")
# (table, text/blob columns an attacker can edit, key column)
COLUMNS = {
    "entries": (("body", "entry_hash", "signature", "release_id"), "seq"),
    "receipts": (("body", "row_hash", "receipt_id"), "seq"),
    "policies": (("document", "sha256"), "sha256"),
    "head": (("body", "signature", "entry_hash"), "id"),
    "meta": (("value",), "key"),
}

_STATE: dict[str, object] = {}


@pytest.fixture(scope="module", autouse=True)
def bundle(tmp_path_factory: pytest.TempPathFactory) -> None:
    d = tmp_path_factory.mktemp("bundle")
    ids = build_world(d)
    assert audit_ledgers([d / "ledgers"], require_receipts=True).ok
    _STATE.update(src=d / "ledgers", ids=ids, scratch=tmp_path_factory.mktemp("tampered"))


def _copy() -> Path:
    dst = Path(tempfile.mkdtemp(dir=_STATE["scratch"])) / "ledgers"  # type: ignore[arg-type]
    shutil.copytree(_STATE["src"], dst)  # type: ignore[arg-type]
    return dst


def _keys(con: sqlite3.Connection, table: str, key: str) -> list[object]:
    return [r[0] for r in con.execute(f"SELECT {key} FROM {table} ORDER BY {key}")]


@settings(deadline=None, max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_tamper_of_any_ledger_in_the_bundle_is_caught_by_audit(data: st.DataObject) -> None:
    d = _copy()
    node = data.draw(st.sampled_from(NODES), label="node")
    path = d / f"{node}.sqlite"
    kind = data.draw(st.sampled_from(["byte", "delete", "reorder", "truncate"]), label="kind")
    con = sqlite3.connect(path)
    tables = [t for t in COLUMNS if _keys(con, t, COLUMNS[t][1])]
    if kind == "byte":
        table = data.draw(st.sampled_from(tables), label="table")
        cols, key = COLUMNS[table]
        k = data.draw(st.sampled_from(_keys(con, table, key)), label="row")
        col = data.draw(st.sampled_from(cols), label="column")
        (raw,) = con.execute(f"SELECT {col} FROM {table} WHERE {key} = ?", (k,)).fetchone()
        b = bytearray(raw if isinstance(raw, bytes) else str(raw).encode())
        i = data.draw(st.integers(0, len(b) - 1), label="byte")
        b[i] ^= data.draw(st.integers(1, 127), label="xor")  # stays ASCII: a text column stays text
        new: object = bytes(b) if isinstance(raw, bytes) else bytes(b).decode("ascii")
        try:
            con.execute(f"UPDATE {table} SET {col} = ? WHERE {key} = ?", (new, k))
        except sqlite3.IntegrityError:  # the edit collided with another row's unique key: nothing changed
            con.close()
            return
    elif kind == "delete":
        table = data.draw(st.sampled_from(tables), label="table")
        key = COLUMNS[table][1]
        k = data.draw(st.sampled_from(_keys(con, table, key)), label="row")
        con.execute(f"DELETE FROM {table} WHERE {key} = ?", (k,))
    elif kind == "reorder":
        table = data.draw(st.sampled_from([t for t in ("entries", "receipts") if len(_keys(con, t, "seq")) >= 2] or ["entries"]),
                          label="table")
        seqs = _keys(con, table, "seq")
        if len(seqs) < 2:
            con.close()
            return
        i, j = data.draw(st.lists(st.sampled_from(seqs), min_size=2, max_size=2, unique=True), label="pair")
        rows = {s: con.execute(f"SELECT * FROM {table} WHERE seq = ?", (s,)).fetchone() for s in (i, j)}
        con.execute(f"DELETE FROM {table} WHERE seq IN (?, ?)", (i, j))
        for pos, src in ((i, rows[j]), (j, rows[i])):
            con.execute(f"INSERT INTO {table} VALUES ({', '.join('?' * len(src))})", (pos, *src[1:]))
    con.commit()
    con.close()
    if kind == "truncate":  # the node's operator cuts the tail and re-signs the head with the node's own key
        ident: NodeIdentity = _STATE["ids"][node]  # type: ignore[index]
        with Ledger(path, ident) as led:
            n_entries = len(led.entries())
            n_receipts = len(led.receipt_bodies())
            keep_e = data.draw(st.integers(0, n_entries), label="keep entries")
            keep_r = data.draw(st.integers(0, n_receipts), label="keep receipts")
            if (keep_e, keep_r) == (n_entries, n_receipts):
                return
        with ledger_operator.rewriting(path, ident) as con:
            con.execute("DELETE FROM entries WHERE seq >= ?", (keep_e,))
            con.execute("DELETE FROM receipts WHERE seq >= ?", (keep_r,))
    rep = audit_ledgers([d])
    assert not rep.ok, f"{kind} of {node} not detected"
