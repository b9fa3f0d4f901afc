"""`ledger audit` over a real `world up` deployment (separate processes, gRPC + mTLS): the state folder
audits clean with the signing keys pinned from the world's own certificates (STATE/keys), and the
tamper table is caught on the deployed ledgers. Rollback and truncation are caught through the receipts the
deployed nodes exchange with every release (protocols/ledger.md §7: the member's update carries its ledger
head, the aggregator countersigns it and both keep the receipt)."""

from __future__ import annotations

import shutil
import sqlite3
from collections import Counter
from pathlib import Path

import pytest

import ledger_operator
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.ledger import Ledger, verify
from worldlm_secure.ledger.audit import audit_ledgers, load_keys

# one world up of 2 rounds (real processes), shared with test_node_world_up_dp (conftest.deployed_dp_world)
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("deployed_dp_world")]


@pytest.fixture
def deployed(deployed_dp_world: tuple[Path, Path]) -> Path:
    return deployed_dp_world[1]


def _copy(state: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "state"
    shutil.copytree(state, dst, ignore=shutil.ignore_patterns("*.safetensors", "checkpoints"))
    return dst


def _ledger(state: Path, node: str) -> Path:
    return state / "nodes" / node / "ledger" / f"{node}.sqlite"


def test_a_deployed_world_audits_clean_with_keys_pinned_from_its_certificates(deployed: Path) -> None:
    keys = load_keys(deployed / "keys")
    rep = audit_ledgers([deployed], deployed / "keys", require_receipts=True)
    assert rep.ok, rep.lines()
    (w,) = rep.worlds
    nodes = {r.node for r in w.reports}
    assert nodes and nodes <= set(keys)
    assert all(keys[r.node] == r.public_key for r in w.reports)
    # every release was countersigned by its receiver and both copies are kept: no release uncovered
    assert "world" in nodes and not w.notes, w.notes
    roles = Counter(role for role, _ in w.receipts)
    assert roles["issued"] == roles["held"] > 0
    assert {rc.child for _, rc in w.receipts} == nodes - {"world"}


def _rename(state: Path) -> None:
    shutil.copy(_ledger(state, "eu-b"), _ledger(state, "eu-a"))


def _delete_policy(state: Path) -> None:
    con = sqlite3.connect(_ledger(state, "eu-a"))
    con.execute("DELETE FROM policies")
    con.commit()
    con.close()


def _meta_node(state: Path) -> None:
    con = sqlite3.connect(_ledger(state, "us-a"))
    con.execute("UPDATE meta SET value = 'us-b' WHERE key = 'node'")
    con.commit()
    con.close()


def _delete_ledger(state: Path) -> None:
    _ledger(state, "us-b").unlink()


def _impostor(state: Path) -> None:
    """eu-a's whole ledger re-signed under a key the world's CA never certified."""
    path = _ledger(state, "eu-a")
    entries = [e for e in Ledger(path, _identity(state, "eu-a")).entries()]
    lf_docs = dict(sqlite3.connect(path).execute("SELECT sha256, document FROM policies").fetchall())
    path.unlink()
    import dataclasses

    with Ledger(path, NodeIdentity.generate("eu-a")) as led:
        for e in entries:
            led.append(dataclasses.replace(e, seq=-1, timestamp="", prev_hash="", public_key="", entry_hash="",
                                           signature=""), policy_document=lf_docs.get(e.policy_sha256))


def _identity(state: Path, node: str) -> NodeIdentity:
    key = next(p for p in (state / "keys" / node).rglob("signing.key"))
    return NodeIdentity.load(node, key)


def _truncate(state: Path, node: str, *, entries: int = 1, receipts: int = 0) -> None:
    """``node``'s operator drops its last entries (and receipts rows) and re-signs the head with the node's
    own key: the ledger verifies alone, as a genuine older copy restored over it would."""
    path = _ledger(state, node)
    with ledger_operator.rewriting(path, _identity(state, node)) as con:
        for table, n in (("entries", entries), ("receipts", receipts)):
            if n:
                con.execute(f"DELETE FROM {table} WHERE seq > (SELECT max(seq) FROM {table}) - ?", (n,))
    assert verify(path, require_policies=True).ok


def _rolled_back_federation(state: Path) -> None:
    """eu's upward releases to the root: no other member ledger holds them, only the root's receipts do."""
    _truncate(state, "eu", entries=2, receipts=2)


def _rolled_back_root(state: Path) -> None:
    """The root has no parent: its rollback shows through the receipts its children hold."""
    _truncate(state, "world", entries=0, receipts=3)


def _rolled_back_site_receipts(state: Path) -> None:
    """A site that keeps its entries but drops the receipts it holds (to hide which head its parent saw)."""
    _truncate(state, "us-c", entries=0, receipts=1)


TAMPERS = {
    "renamed ledger": (_rename, "eu-a", "verify"),
    "deleted policy row": (_delete_policy, "eu-a", "verify"),
    "changed meta.node": (_meta_node, "us-a", "verify"),
    "deleted ledger": (_delete_ledger, "us", "aggregation."),
    "impostor key": (_impostor, "eu-a", "keys.pinned"),
    "federation truncated and re-signed": (_rolled_back_federation, "eu", "receipt.child_head"),
    "root receipts rolled back": (_rolled_back_root, "world", "receipt.missing_issued"),
    "site's held receipts rolled back": (_rolled_back_site_receipts, "us-c", "receipt.missing_held"),
}


@pytest.mark.parametrize("name", list(TAMPERS))
def test_the_tamper_table_on_deployed_ledgers(deployed: Path, tmp_path: Path, name: str) -> None:
    tamper, node, rule = TAMPERS[name]
    state = _copy(deployed, tmp_path)
    tamper(state)
    rep = audit_ledgers([state], state / "keys")
    assert any(f.node == node and f.rule.startswith(rule) for f in rep.findings), rep.lines()


def test_a_whole_cohort_truncated_and_resigned_by_its_operators_is_caught(deployed: Path, tmp_path: Path) -> None:
    """One site's lost entry already shows as a short cohort; every member of the cohort dropping its last
    entry together (with the receipt it held for it, each head re-signed with the site's own key) is
    consistent everywhere but in the receipts its federation issued."""
    state = _copy(deployed, tmp_path)
    sites = sorted(p.name for p in (state / "nodes").iterdir() if p.name.startswith("eu-"))
    for node in sites:  # the last entry and the receipt held for it: each ledger verifies alone
        _truncate(state, node, entries=1, receipts=1)
    rep = audit_ledgers([state], state / "keys")
    caught = {f.node for f in rep.findings if f.rule == "receipt.child_head"}
    assert caught == set(sites), rep.lines()  # each site's head contradicts the receipt eu issued it
