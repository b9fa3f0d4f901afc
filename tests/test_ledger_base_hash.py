"""The base model's hash in every ledger entry (issue #17 item 1): a signed field sealed by the node's ledger,
absent from entries written before it existed (which still verify byte for byte), one base per ledger
(`verify`) and one base per world (`audit`, rule world.base_hash)."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path

import pytest
from test_ledger_audit import SITES, build_world
from test_ledger_chain import effective_policy

from worldlm_secure.errors import LedgerError
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.ledger import Ledger, release_entry, verify
from worldlm_secure.ledger.audit import audit_ledgers

BASE, OTHER = "a1" * 32, "b2" * 32
POLICY = effective_policy()


def _entry(rid: str, **fields: object):
    e = release_entry(release_id=rid, round=1, level="site", source="s", destination="fed", group="shared",
                      tensor_names=("model.layers.0.mlp.up_proj.weight",), protocol="masking", cohort_size=3, dropouts=0,
                      dp_level="none", mechanism="none", clipping_norm=0.0, policy_sha256=POLICY.sha256, charge=None)
    return dataclasses.replace(e, **fields)  # type: ignore[arg-type]


def _bodies(path: Path) -> list[dict]:
    con = sqlite3.connect(path)
    try:
        return [json.loads(b) for (b,) in con.execute("SELECT body FROM entries ORDER BY seq")]
    finally:
        con.close()


def test_the_ledger_seals_its_base_into_every_entry_and_signs_it(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    with Ledger(path, NodeIdentity.generate("s"), base_hash=BASE.upper()) as led:
        e = led.append(_entry("1:shared:fed"))
        assert e.base_hash == BASE
        with pytest.raises(LedgerError, match="another base"):
            led.append(_entry("2:shared:fed", base_hash=OTHER))
    assert [b["base_hash"] for b in _bodies(path)] == [BASE]
    assert verify(path).ok
    # the field is in the signed body: editing it (even with the hash recomputed) breaks the signature
    con = sqlite3.connect(path)
    (body,) = con.execute("SELECT body FROM entries").fetchone()
    forged = body.replace(BASE.encode(), OTHER.encode())
    import hashlib
    con.execute("UPDATE entries SET body = ?, entry_hash = ?", (forged, hashlib.sha256(forged).hexdigest()))
    con.commit()
    con.close()
    assert not verify(path).ok


def test_entries_written_before_the_field_existed_still_verify(tmp_path: Path) -> None:
    """No base: the body has no base_hash key at all, the same bytes as before the field existed."""
    path = tmp_path / "s.sqlite"
    with Ledger(path, NodeIdentity.generate("s")) as led:
        led.append(_entry("1:shared:fed"))
        # a node upgraded in place: its later entries record the base, the old ones stay as they were
        led.base_hash = BASE
        led.append(_entry("2:shared:fed"))
    assert ["base_hash" in b for b in _bodies(path)] == [False, True]
    assert verify(path).ok


def test_verify_refuses_one_ledger_recording_two_bases(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    with Ledger(path, NodeIdentity.generate("s")) as led:
        led.append(_entry("1:shared:fed", base_hash=BASE))
        led.append(_entry("2:shared:fed", base_hash=OTHER))
    rep = verify(path)
    assert not rep.ok and rep.problem.seq == 1 and "base_hash" in rep.problem.what and "entry 0" in rep.problem.what


def test_audit_finds_the_node_whose_base_differs_from_the_world(tmp_path: Path) -> None:
    same = {n: BASE for n in (*SITES, "fed", "world")}
    build_world(tmp_path / "ok", base=same)
    rep = audit_ledgers([tmp_path / "ok" / "ledgers"], require_receipts=True)
    assert rep.ok, rep.lines()
    build_world(tmp_path / "bad", base={**same, "c": OTHER})
    rep = audit_ledgers([tmp_path / "bad" / "ledgers"])
    found = [f for f in rep.findings if f.rule == "world.base_hash"]
    assert [(f.node, f.entry) for f in found] == [("c", "entry 0 (0:shared:fed)")], rep.lines()
    assert OTHER[:16] in found[0].what and BASE[:16] in found[0].what
