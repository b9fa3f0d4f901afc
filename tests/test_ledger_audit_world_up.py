"""`ledger audit` over a real `world up` deployment (separate processes, gRPC + mTLS): the state folder
audits clean with the signing keys pinned from the world's own certificates (STATE/keys), and the
tamper table is caught on the deployed ledgers. Rollback and truncation need receipts, which the
deployed release path does not write yet (protocols/ledger.md §7): that row is an xfail until it does."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from nodeworld import small_world
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.ledger import Ledger, verify
from worldlm_secure.ledger.audit import audit_ledgers, load_keys

pytestmark = pytest.mark.slow  # one world up of 2 rounds: real processes


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from worldlm_secure.node.world_up import world_up

    d = tmp_path_factory.mktemp("wup")
    world = small_world(d / "w", source="world.yaml", rounds=2)
    payload = world_up(world, d / "state", timeout=600)
    assert payload.get("failed_nodes") is None, payload.get("exit_codes")
    return d / "state"


def _copy(state: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "state"
    shutil.copytree(state, dst, ignore=shutil.ignore_patterns("*.safetensors", "checkpoints"))
    return dst


def _ledger(state: Path, node: str) -> Path:
    return state / "nodes" / node / "ledger" / f"{node}.sqlite"


def test_a_deployed_world_audits_clean_with_keys_pinned_from_its_certificates(deployed: Path) -> None:
    keys = load_keys(deployed / "keys")
    rep = audit_ledgers([deployed], deployed / "keys")
    assert rep.ok, rep.lines()
    (w,) = rep.worlds
    nodes = {r.node for r in w.reports}
    assert nodes and nodes <= set(keys)
    assert all(keys[r.node] == r.public_key for r in w.reports)


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


TAMPERS = {
    "renamed ledger": (_rename, "eu-a", "verify"),
    "deleted policy row": (_delete_policy, "eu-a", "verify"),
    "changed meta.node": (_meta_node, "us-a", "verify"),
    "deleted ledger": (_delete_ledger, "us", "aggregation."),
    "impostor key": (_impostor, "eu-a", "keys.pinned"),
}


@pytest.mark.parametrize("name", list(TAMPERS))
def test_the_tamper_table_on_deployed_ledgers(deployed: Path, tmp_path: Path, name: str) -> None:
    tamper, node, rule = TAMPERS[name]
    state = _copy(deployed, tmp_path)
    tamper(state)
    rep = audit_ledgers([state], state / "keys")
    assert any(f.node == node and f.rule.startswith(rule) for f in rep.findings), rep.lines()


@pytest.mark.xfail(strict=True, reason="the deployed release path does not write receipts yet (protocols/ledger.md §7)")
def test_a_whole_cohort_truncated_and_resigned_by_its_operators_is_caught(deployed: Path, tmp_path: Path) -> None:
    """One site's lost entry already shows as a short cohort; every member of the cohort dropping its last
    entry together (each head re-signed with the site's own key) is consistent everywhere but in the
    receipts its federation would hold."""
    state = _copy(deployed, tmp_path)
    sites = sorted(p.name for p in (state / "nodes").iterdir() if p.name.startswith("eu-"))
    for node in sites:
        path = _ledger(state, node)
        with Ledger(path, _identity(state, node)) as led:
            led._con.execute("BEGIN IMMEDIATE")
            led._con.execute("DELETE FROM entries WHERE seq = (SELECT max(seq) FROM entries)")
            led._write_head()
            led._con.execute("COMMIT")
        assert verify(path, require_policies=True).ok
    rep = audit_ledgers([state], state / "keys")
    assert not rep.ok, "a cohort rolled back together is invisible without receipts"
