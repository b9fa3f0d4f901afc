"""`ledger verify` checks every entry against the effective policy stored with it, and the ledger's
meta (node, format, key) against its signature and every entry's signed source.

Each attack is what a node operator holding the node's own key (a lying node) or a file-level tamperer
can do; each must fail with one line naming the entry and the rule."""

from __future__ import annotations

import dataclasses
import shutil
import sqlite3
from pathlib import Path

import pytest

from test_ledger_chain import effective_policy

from worldlm_secure.cli import main
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.ledger import Ledger, read_ledger_file, release_entry, verify
from worldlm_secure.ledger.store import FORMAT, FORMAT_V1, head_message
from worldlm_secure.privacy import BudgetTracker

STRICT = effective_policy(differential_privacy={"epsilon_budget": 4.0, "clipping_norm": 1.0})


def _entry(node: str, r: int = 0, *, tracker: BudgetTracker | None = None, z: float = 3.0, **kw: object):
    tracker = tracker or BudgetTracker(budget=4.0, delta=1e-5, stream=f"{node}/user")
    fields = dict(
        release_id=f"{r}:shared:fed", round=r, level="site", source=node, destination="fed", group="shared",
        tensor_names=("model.layers.0.self_attn.q_proj.weight",), protocol="masking", cohort_size=3, dropouts=0,
        dp_level="user", mechanism="central_gaussian", clipping_norm=1.0, policy_sha256=STRICT.sha256,
        charge=tracker.charge(z, 1.0),
    )
    fields.update(kw)
    return release_entry(**fields)  # type: ignore[arg-type]


def _ledger(path: Path, node: str, entries: list, policy=STRICT, identity: NodeIdentity | None = None) -> NodeIdentity:
    ident = identity or NodeIdentity.generate(node)
    with Ledger(path, ident) as led:
        for e in entries:
            led.append(e, policy_document=policy.canonical_json())
    return ident


def test_an_honest_ledger_verifies_against_its_stored_policy(tmp_path: Path) -> None:
    t = BudgetTracker(budget=4.0, delta=1e-5, stream="site-a/user")
    _ledger(tmp_path / "site-a.sqlite", "site-a", [_entry("site-a", r, tracker=t) for r in range(2)])
    rep = verify(tmp_path / "site-a.sqlite", require_policies=True, expected_node="site-a")
    assert rep.ok, rep.problem
    assert rep.format == FORMAT and STRICT.sha256 in rep.policies


def test_a_lying_node_recording_budget_50_clip_10_z_06_under_budget_4_clip_1_is_caught(tmp_path: Path) -> None:
    """The issue's case: the node's own key signs an internally consistent entry (ε recomputes, cumulative
    ≤ the recorded budget 50) that its stored policy (budget 4, clip 1) forbids."""
    liar = BudgetTracker(budget=50.0, delta=1e-5, stream="site-a/user")
    e = _entry("site-a", tracker=liar, z=0.6, clipping_norm=10.0)
    assert e.epsilon_cumulative is not None and 4.0 < e.epsilon_cumulative <= 50.0
    _ledger(tmp_path / "site-a.sqlite", "site-a", [e])
    rep = verify(tmp_path / "site-a.sqlite")
    assert not rep.ok and rep.problem is not None
    line = str(rep.problem)
    assert line.startswith("entry 0 (0:shared:fed): policy differential_privacy.epsilon_budget"), line
    assert "50" in line and "4" in line and "\n" not in line


VIOLATIONS = {
    # name: (entry overrides, rule named in the message)
    "budget": (dict(tracker=BudgetTracker(budget=50.0, delta=1e-5, stream="site-a/user"), z=0.6), "epsilon_budget"),
    "clip": (dict(clipping_norm=10.0), "differential_privacy.clipping_norm"),
    "mechanism": (dict(mechanism="distributed_discrete_gaussian"), "differential_privacy.mechanism"),
    "no DP": (dict(dp_level="none", mechanism="none", charge=None), "differential_privacy.level"),
    "protocol": (dict(protocol="none"), "secure_aggregation.protocol"),
    "min_cohort": (dict(cohort_size=1), "secure_aggregation.min_cohort"),
    "destination": (dict(destination="fed-us"), "egress.destinations"),
    "local layer left": (dict(tensor_names=("lm_head.weight",)), "layers.local"),
    "key tensor as shared": (dict(tensor_names=("model.key.w",)), "layers.shared"),
    "delta": (dict(tracker=BudgetTracker(budget=4.0, delta=1e-3, stream="site-a/user")), "differential_privacy.delta"),
    "accountant": (dict(tracker=BudgetTracker(budget=4.0, delta=1e-5, accountant="prv", stream="site-a/user")),
                   "differential_privacy.accountant"),
}


@pytest.mark.parametrize("name", list(VIOLATIONS))
def test_each_policy_rule_is_checked_and_named(tmp_path: Path, name: str) -> None:
    overrides, rule = VIOLATIONS[name]
    t = BudgetTracker(budget=4.0, delta=1e-5, stream="site-a/user")
    good = _entry("site-a", 0, tracker=t)
    bad = _entry("site-a", 1, **{"tracker": t, **overrides})  # type: ignore[arg-type]
    _ledger(tmp_path / "site-a.sqlite", "site-a", [good, bad])
    rep = verify(tmp_path / "site-a.sqlite")
    assert not rep.ok and rep.problem is not None
    assert rep.problem.seq == 1, str(rep.problem)
    assert f"policy {rule}" in str(rep.problem) or rule in str(rep.problem), str(rep.problem)


def test_a_deleted_policy_document_row_is_caught(tmp_path: Path) -> None:
    _ledger(tmp_path / "site-a.sqlite", "site-a", [_entry("site-a")])
    con = sqlite3.connect(tmp_path / "site-a.sqlite")
    con.execute("DELETE FROM policies")
    con.commit()
    con.close()
    rep = verify(tmp_path / "site-a.sqlite")  # even without require_policies: the signed head lists it
    assert not rep.ok and rep.problem is not None
    assert rep.problem.seq == 0 and "policy document" in rep.problem.what and "deleted" in rep.problem.what


def test_an_entry_without_its_policy_document_fails_when_policies_are_required(tmp_path: Path) -> None:
    with Ledger(tmp_path / "site-a.sqlite", NodeIdentity.generate("site-a")) as led:
        led.append(_entry("site-a"))  # no policy_document
    assert verify(tmp_path / "site-a.sqlite").ok
    rep = verify(tmp_path / "site-a.sqlite", require_policies=True)
    assert not rep.ok and rep.problem is not None and rep.problem.seq == 0
    assert "no policy document stored" in rep.problem.what
    assert main(["ledger", "verify", str(tmp_path / "site-a.sqlite")]) == 1  # the auditor's default is strict


def _set_meta(path: Path, key: str, value: str | None) -> None:
    con = sqlite3.connect(path)
    if value is None:
        con.execute("DELETE FROM meta WHERE key = ?", (key,))
    else:
        con.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))
    con.commit()
    con.close()


def test_a_changed_meta_node_is_caught(tmp_path: Path) -> None:
    path = tmp_path / "site-a.sqlite"
    _ledger(path, "site-a", [_entry("site-a")])
    _set_meta(path, "node", "site-b")
    rep = verify(path)
    assert not rep.ok and "meta" in str(rep.problem) and "signature" in str(rep.problem)
    # Downgraded to an unsigned format-1 meta: the entries' signed source still disagrees.
    _set_meta(path, "meta_signature", None)
    _set_meta(path, "format", FORMAT_V1)
    rep = verify(path)
    assert not rep.ok and rep.problem is not None
    assert str(rep.problem).startswith("entry 0 (0:shared:fed): signed source 'site-a' is not this ledger's node 'site-b'")


def test_a_renamed_ledger_of_another_node_is_caught(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "ledgers"
    _ledger(d / "site-a.sqlite", "site-a", [_entry("site-a")])
    _ledger(d / "site-b.sqlite", "site-b", [_entry("site-b")])
    shutil.copy(d / "site-b.sqlite", d / "site-a.sqlite")  # site-b's genuine ledger put in site-a's place
    assert verify(d / "site-a.sqlite").ok  # self-consistent: only the expected node (or key) can tell
    rep = verify(d / "site-a.sqlite", expected_node="site-a")
    assert not rep.ok and "belongs to node 'site-b', not 'site-a'" in str(rep.problem)
    assert main(["ledger", "verify", str(d / "site-a.sqlite")]) == 1  # the CLI expects NAME.sqlite to be NAME's
    assert "belongs to node 'site-b'" in capsys.readouterr().out
    assert main(["ledger", "verify", str(d / "site-a.sqlite"), "--node", "site-b"]) == 0


def test_a_format_1_ledger_still_verifies_and_is_upgraded_when_its_node_appends(tmp_path: Path) -> None:
    """A ledger written before format 2 (unsigned meta, head over count + hash only) keeps verifying."""
    path = tmp_path / "site-a.sqlite"
    t = BudgetTracker(budget=4.0, delta=1e-5, stream="site-a/user")
    ident = _ledger(path, "site-a", [_entry("site-a", 0, tracker=t)])
    lf = read_ledger_file(path)
    assert lf.head is not None
    con = sqlite3.connect(path)  # rewrite it exactly as format 1 stored it
    con.execute("DELETE FROM meta WHERE key = 'meta_signature'")
    con.execute("UPDATE meta SET value = ? WHERE key = 'format'", (FORMAT_V1,))
    con.execute("UPDATE head SET signature = ?, body = ''", (ident.sign(head_message(lf.head[0], lf.head[1])).hex(),))
    con.execute("DROP TABLE receipts")
    con.commit()
    con.close()
    rep = verify(path, require_policies=True)
    assert rep.ok, rep.problem
    assert rep.format == FORMAT_V1 and any("format 1" in n for n in rep.notes)
    with Ledger(path, ident) as led:
        led.append(_entry("site-a", 1, tracker=t), policy_document=STRICT.canonical_json())
    rep = verify(path, require_policies=True)
    assert rep.ok, rep.problem
    assert rep.format == FORMAT and rep.total_rows == 2


def test_verify_cli_prints_one_line_naming_entry_and_rule(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    e = dataclasses.replace(_entry("site-a"), clipping_norm=10.0)
    _ledger(tmp_path / "site-a.sqlite", "site-a", [e])
    assert main(["ledger", "verify", str(tmp_path / "site-a.sqlite")]) == 1
    out = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert len(out) == 1
    assert "FAILED" in out[0] and "entry 0 (0:shared:fed): policy differential_privacy.clipping_norm" in out[0]
