"""`ledger audit`: a world's ledgers checked against each other, their policies, receipts and pinned keys.

The worlds here are written the way the release path writes them (entries with their effective policy
documents, then `receipts.exchange` right after each member's entry, as protocols/ledger.md §7 says the
release path must), with three sites under `fed` under `world`. Each tamper is something a node operator
holding its own key, or anyone with the files, can do; each must give a finding naming node, entry and rule.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sqlite3
from pathlib import Path

import pytest

import ledger_operator
from test_ledger_chain import effective_policy

from worldlm_secure.cli import main
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.ledger import Ledger, release_entry, verify
from worldlm_secure.ledger.audit import audit_ledgers, load_keys
from worldlm_secure.ledger.receipts import exchange
from worldlm_secure.privacy import BudgetTracker

SITES = ("a", "b", "c")
SITE_POLICY = effective_policy(
    differential_privacy={"epsilon_budget": 8.0},
    egress={"destinations": ["fed", "world"], "require": ["secure_aggregation"]},
)
FED_POLICY = effective_policy(
    secure_aggregation={"min_cohort": 1},
    egress={"destinations": ["world"], "require": []},
)


def build_world(
    d: Path, *, rounds: int = 2, receipts: bool = True, identities: dict[str, NodeIdentity] | None = None,
    lie: dict[str, object] | None = None, snapshot_after: int | None = None, base: dict[str, str] | None = None,
) -> dict[str, NodeIdentity]:
    """Ledgers in ``d/ledgers``. ``lie``: fields a's round-1 entry records instead of the truth (re-signed
    by a's own key). ``snapshot_after``: copy every ledger to ``d/snap-R`` after round R. ``base``: node ->
    the base-weights hash its ledger records in every entry (none by default)."""
    ids = identities or {n: NodeIdentity.generate(n) for n in (*SITES, "fed", "world")}
    led = {n: Ledger(d / "ledgers" / f"{n}.sqlite", ids[n], base_hash=(base or {}).get(n)) for n in ids}
    trackers = {s: BudgetTracker(budget=8.0, delta=1e-5, stream=f"{s}/user") for s in SITES}
    try:
        for r in range(rounds):
            for s in SITES:
                e = release_entry(
                    release_id=f"{r}:shared:fed", round=r, level="site", source=s, destination="fed", group="shared",
                    tensor_names=("model.layers.0.self_attn.q_proj.weight",), protocol="masking", cohort_size=3,
                    dropouts=0, dp_level="user", mechanism="central_gaussian", clipping_norm=1.0,
                    policy_sha256=SITE_POLICY.sha256, charge=trackers[s].charge(4.0, 1.0),
                )
                if lie and s == "a" and r == 1:
                    e = dataclasses.replace(e, **lie)  # type: ignore[arg-type]
                led[s].append(e, policy_document=SITE_POLICY.canonical_json())
                if receipts:
                    exchange(led["fed"], led[s], release_id=e.release_id, round=r)
            up = release_entry(
                release_id=f"{r}:shared:world", round=r, level="federation", source="fed", destination="world",
                group="shared", tensor_names=("model.layers.0.self_attn.q_proj.weight",), protocol="masking",
                cohort_size=1, dropouts=0, dp_level="user", mechanism="post_processing", clipping_norm=0.0,
                policy_sha256=FED_POLICY.sha256, charge=None, stream="fed/post_processing",
            )
            led["fed"].append(up, policy_document=FED_POLICY.canonical_json())
            if receipts:
                exchange(led["world"], led["fed"], release_id=up.release_id, round=r)
            if snapshot_after == r:  # a consistent copy of each file, as a backup tool would take
                (d / f"snap-{r}").mkdir()
                for n, x in led.items():
                    ledger_operator.backup(x.path, d / f"snap-{r}" / f"{n}.sqlite")
    finally:
        for x in led.values():
            x.close()
    return ids


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, NodeIdentity]]:
    d = tmp_path_factory.mktemp("world")
    ids = build_world(d, snapshot_after=0)
    return d, ids


def _copy(world: tuple[Path, dict[str, NodeIdentity]], tmp_path: Path) -> Path:
    shutil.copytree(world[0], tmp_path / "w")
    return tmp_path / "w"


def _restore(src: Path, dst: Path) -> None:
    """Put an older copy of a ledger file in place (and nothing of the newer one's WAL)."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{dst}{suffix}").unlink(missing_ok=True)
    shutil.copy(src, dst)


def _rules(rep) -> set[str]:  # type: ignore[no-untyped-def]
    return {f.rule for f in rep.findings}


def test_an_honest_world_with_receipts_passes(world: tuple[Path, dict[str, NodeIdentity]]) -> None:
    rep = audit_ledgers([world[0] / "ledgers"], {n: i.public_bytes.hex() for n, i in world[1].items()},
                        require_receipts=True)
    assert rep.ok, rep.lines()
    w = rep.worlds[0]
    assert w.parent == {"a": "fed", "b": "fed", "c": "fed", "fed": "world"}
    assert len(w.receipts) == 2 * (2 * 3 + 2)  # every receipt in both ledgers
    assert {m.node: m.budget for m in w.members} == {"a": 8.0, "b": 8.0, "c": 8.0}
    assert all(m.epsilon <= 8.0 for m in w.members)
    for r in w.reports:
        assert verify(r.path, require_policies=True).ok


def test_a_rolled_back_site_ledger_is_caught_by_its_parents_receipts(world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    d = _copy(world, tmp_path)
    _restore(d / "snap-0" / "a.sqlite", d / "ledgers" / "a.sqlite")  # a genuine older state: verifies alone
    assert verify(d / "ledgers" / "a.sqlite", require_policies=True).ok
    rep = audit_ledgers([d / "ledgers"])
    assert not rep.ok
    lines = rep.lines()
    assert any(ln.startswith("a: receipt for 1:shared:fed: [receipt.child_head] rolled back or truncated: fed countersigned 2 entries")
               for ln in lines), lines
    assert all("\n" not in ln for ln in lines)


def test_a_truncated_then_resigned_head_is_caught(world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The operator of b deletes its last entry and re-signs the head with b's own key."""
    d = _copy(world, tmp_path)
    path = d / "ledgers" / "b.sqlite"
    with ledger_operator.rewriting(path, world[1]["b"]) as con:
        con.execute("DELETE FROM entries WHERE seq = (SELECT max(seq) FROM entries)")
        con.execute("DELETE FROM receipts WHERE seq = (SELECT max(seq) FROM receipts)")
    assert verify(path, require_policies=True).ok  # consistent on its own
    rep = audit_ledgers([d / "ledgers"])
    assert "receipt.child_head" in _rules(rep) and any(f.node == "b" for f in rep.findings), rep.lines()


def test_a_rolled_back_parent_is_caught_by_its_childrens_receipts(world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    d = _copy(world, tmp_path)
    _restore(d / "snap-0" / "fed.sqlite", d / "ledgers" / "fed.sqlite")
    rep = audit_ledgers([d / "ledgers"])
    lines = rep.lines()
    # the root's receipt names fed's lost entry; a's receipt from round 1 names a receipt fed no longer has
    assert any(ln.startswith("fed: receipt for 1:shared:world: [receipt.child_head] rolled back or truncated: "
                             "world countersigned 2 entries") for ln in lines), lines
    assert any(ln.startswith("fed: receipt for 1:shared:fed: [receipt.missing_issued] a holds this receipt signed by fed")
               for ln in lines), lines


def test_a_missing_member_ledger_is_caught(world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    d = _copy(world, tmp_path)
    (d / "ledgers" / "c.sqlite").unlink()
    rep = audit_ledgers([d / "ledgers"])
    assert "aggregation.contributors" in _rules(rep) and "receipt.child_head" in _rules(rep), rep.lines()
    assert any("cohort of 3 recorded but only 2 member ledger(s) hold this release (a, b)" in ln for ln in rep.lines())


def test_a_member_that_records_another_cohort_or_round_is_caught(tmp_path: Path) -> None:
    build_world(tmp_path, lie={"cohort_size": 4}, receipts=False)
    rep = audit_ledgers([tmp_path / "ledgers"])
    assert any(ln.startswith("a: entry 1 (1:shared:fed): [aggregation.match]") and "cohort" in ln for ln in rep.lines()), rep.lines()


def test_a_cohort_below_min_cohort_across_ledgers_is_caught(tmp_path: Path) -> None:
    """Each entry claims cohort 3 (its own min_cohort check passes), but only two members hold the release."""
    build_world(tmp_path, receipts=False)
    (tmp_path / "ledgers" / "c.sqlite").unlink()
    (tmp_path / "ledgers" / "b.sqlite").unlink()
    rep = audit_ledgers([tmp_path / "ledgers"])
    assert "aggregation.min_cohort" in _rules(rep), rep.lines()
    assert any(ln.startswith("fed: release 0:shared:fed: [aggregation.min_cohort] cohort of 3 recorded but only 1 member "
                             "ledger(s) hold this release (a); 1 is below a's min_cohort 2") for ln in rep.lines()), rep.lines()


def test_a_member_splitting_its_budget_over_two_streams_is_caught(tmp_path: Path) -> None:
    """Each stream stays under ε 8, but one member's total over all its releases does not: `verify` refuses
    the second stream's name (a member's user-level releases compose on SOURCE/user), and the audit's
    member.budget composes every user-level release of the member whatever its stream."""
    ident = NodeIdentity.generate("a")
    with Ledger(tmp_path / "ledgers" / "a.sqlite", ident) as led:
        for stream, group in (("a/user", "shared"), ("a/user-key", "key")):
            t = BudgetTracker(budget=8.0, delta=1e-5, stream=stream)
            for r in range(2):
                led.append(release_entry(
                    release_id=f"{r}:{group}:fed", round=r, level="site", source="a", destination="fed", group=group,
                    tensor_names=("model.layers.0.self_attn.q_proj.weight",) if group == "shared" else ("model.key.w",),
                    protocol="masking", cohort_size=3, dropouts=0, dp_level="user", mechanism="central_gaussian",
                    clipping_norm=1.0, policy_sha256=SITE_POLICY.sha256, charge=t.charge(1.2, 1.0),
                ), policy_document=SITE_POLICY.canonical_json())
    rep_v = verify(tmp_path / "ledgers" / "a.sqlite", require_policies=True)
    assert not rep_v.ok and rep_v.problem is not None and "one stream 'a/user'" in rep_v.problem.what
    rep = audit_ledgers([tmp_path / "ledgers"])  # an unverifiable ledger is a finding of the audit too
    assert [f.rule for f in rep.findings if f.node == "a"] == ["verify"], rep.lines()


def test_signatures_must_chain_to_the_pinned_keys(world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    d = _copy(world, tmp_path)
    keys = {n: i.public_bytes.hex() for n, i in world[1].items()}
    (tmp_path / "keys.json").write_text(json.dumps(keys))
    assert audit_ledgers([d / "ledgers"], tmp_path / "keys.json").ok
    # An impostor rewrote b's whole ledger under its own key (self-consistent, verifies alone):
    (d / "ledgers" / "b.sqlite").unlink()
    impostor = {**world[1], "b": NodeIdentity.generate("b")}
    build_world(tmp_path / "imp", identities=impostor)
    _restore(tmp_path / "imp" / "ledgers" / "b.sqlite", d / "ledgers" / "b.sqlite")
    rep = audit_ledgers([d / "ledgers"], tmp_path / "keys.json")
    assert any(f.node == "b" and f.rule == "keys.pinned" for f in rep.findings), rep.lines()
    # Without pinned keys, the parent's receipts still name b's real key:
    rep = audit_ledgers([d / "ledgers"])
    assert any(f.node == "b" and f.rule in ("receipt.child_key", "receipt.child_head") for f in rep.findings), rep.lines()
    # A node the identities do not know:
    partial = {k: v for k, v in keys.items() if k != "c"}
    rep = audit_ledgers([world[0] / "ledgers"], partial)
    assert [f.rule for f in rep.findings] == ["keys.unpinned"] and rep.findings[0].node == "c"


def test_keys_from_a_world_up_identity_folder(tmp_path: Path) -> None:
    """`--keys STATE/keys`: the signing keys bound into the nodes' CA-issued certificates."""
    from worldlm_secure.transport import keys as tk

    tk.init_ca("fed", tmp_path / "ca" / "fed")
    tk.init_ca("world", tmp_path / "ca" / "world")
    ids: dict[str, NodeIdentity] = {}
    for n in (*SITES, "fed", "world"):
        ca = tmp_path / "ca" / ("world" if n in ("fed", "world") else "fed")
        issued = tk.issue_node(ca, n, tmp_path / "keys" / n / "down")
        ids[n] = NodeIdentity.load(n, issued.signing_key)
    got = load_keys(tmp_path / "keys")
    assert got == {n: i.public_bytes.hex() for n, i in ids.items()}
    build_world(tmp_path / "run", identities=ids)
    assert audit_ledgers([tmp_path / "run"], tmp_path / "keys").ok
    # a certificate not issued by the CA beside it is refused
    shutil.copy(tmp_path / "ca" / "world" / "ca.crt", tmp_path / "keys" / "a" / "down" / "ca.crt")
    with pytest.raises(Exception, match="not issued by"):
        load_keys(tmp_path / "keys")


def test_a_renamed_ledger_and_a_policy_lie_are_findings(world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    d = _copy(world, tmp_path)
    _restore(d / "ledgers" / "b.sqlite", d / "ledgers" / "a.sqlite")
    rep = audit_ledgers([d / "ledgers"])
    assert any(f.node == "a" and f.rule == "verify" and "belongs to node 'b', not 'a'" in f.what for f in rep.findings), rep.lines()
    build_world(tmp_path / "lie", lie={"clipping_norm": 10.0}, receipts=False)
    rep = audit_ledgers([tmp_path / "lie"])
    assert any(ln.startswith("a: entry 1 (1:shared:fed): [verify] policy differential_privacy.clipping_norm") for ln in rep.lines())


def test_audit_cli_lines_exit_code_and_json(world, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    assert main(["ledger", "audit", str(world[0] / "ledgers")]) == 0
    assert "audit PASSED" in capsys.readouterr().out
    d = _copy(world, tmp_path)
    _restore(d / "snap-0" / "a.sqlite", d / "ledgers" / "a.sqlite")
    assert main(["ledger", "audit", str(d / "ledgers")]) == 1
    out = capsys.readouterr().out.splitlines()
    findings = [ln for ln in out if ln.startswith("FINDING")]
    assert "FINDING a: receipt for 1:shared:fed: [receipt.child_head] rolled back or truncated" in "\n".join(findings), out
    assert "FINDING fed: release 1:shared:fed: [aggregation.contributors]" in "\n".join(findings), out
    assert "audit FAILED" in out[-1]
    assert main(["ledger", "audit", str(d / "ledgers"), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and "a" in {f["node"] for f in doc["worlds"][0]["findings"]}
    assert {"node", "entry", "rule", "what"} <= set(doc["worlds"][0]["findings"][0])


def test_audit_finds_ledgers_in_simulate_and_world_up_layouts(world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # world up: STATE/nodes/NAME/ledger/NAME.sqlite beside state.sqlite (not a ledger)
    state = tmp_path / "state"
    for f in (world[0] / "ledgers").glob("*.sqlite"):
        dst = state / "nodes" / f.stem / "ledger" / f.name
        dst.parent.mkdir(parents=True)
        shutil.copy(f, dst)
        sqlite3.connect(state / "nodes" / f.stem / "state.sqlite").execute("CREATE TABLE kv (k, v)").connection.close()
    rep = audit_ledgers([state])
    assert rep.ok and len(rep.worlds) == 1 and len(rep.worlds[0].reports) == 5, rep.lines()
    # simulate --out with a baseline: ledgers/ and ledgers/fedavg/ are two worlds
    out = tmp_path / "out"
    shutil.copytree(world[0] / "ledgers", out / "ledgers")
    shutil.copytree(world[0] / "ledgers", out / "ledgers" / "fedavg")
    rep = audit_ledgers([out])
    assert rep.ok and len(rep.worlds) == 2


def test_the_world_report_shows_the_verdict_and_findings_first_and_exits_1(world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import re

    out = tmp_path / "ok.html"
    assert main(["ledger", "report", str(world[0] / "ledgers"), "--out", str(out)]) == 0
    page = out.read_text()
    assert "PASSED" in page and "Receipts (countersigned ledger heads)" in page and "agree" in page
    assert len(re.findall(r"data:image/png;base64,", page)) == 1  # one ε plot: the members of fed
    assert "a, b, c (user-level) — identical" not in page  # (legend text is inside the PNG, not the HTML)
    d = _copy(world, tmp_path)
    _restore(d / "snap-0" / "a.sqlite", d / "ledgers" / "a.sqlite")
    out = tmp_path / "bad.html"
    assert main(["ledger", "report", str(d / "ledgers"), "--out", str(out)]) == 1
    page = out.read_text()
    first = page.index("FAILED")
    assert first < page.index("Privacy spent against budget") < page.index("What left each node")
    assert "receipt.child_head" in page[:page.index("Privacy spent against budget")]
    assert "see findings" in page  # the receipts table marks the pair


def test_receipts_are_idempotent_and_hold_refuses_what_is_not_its_own(tmp_path: Path) -> None:
    from worldlm_secure.errors import LedgerError
    from worldlm_secure.ledger.receipts import Receipt, child_head, countersign, hold, read_receipts

    ids = {n: NodeIdentity.generate(n) for n in ("a", "b", "fed")}
    led = {n: Ledger(tmp_path / f"{n}.sqlite", i) for n, i in ids.items()}
    t = BudgetTracker(budget=8.0, delta=1e-5, stream="a/user")
    led["a"].append(release_entry(
        release_id="0:shared:fed", round=0, level="site", source="a", destination="fed", group="shared",
        tensor_names=("model.layers.0.w",), protocol="masking", cohort_size=3, dropouts=0, dp_level="user",
        mechanism="central_gaussian", clipping_norm=1.0, policy_sha256=SITE_POLICY.sha256, charge=t.charge(4.0, 1.0),
    ), policy_document=SITE_POLICY.canonical_json())
    name, pk, count, h = child_head(led["a"])
    r1 = countersign(led["fed"], child=name, child_public_key=pk, child_count=count, child_entry_hash=h,
                     release_id="0:shared:fed", round=0)
    r2 = countersign(led["fed"], child=name, child_public_key=pk, child_count=count, child_entry_hash=h,
                     release_id="0:shared:fed", round=0)  # a restarted parent receiving the same release again
    assert r1 == r2 and len(read_receipts(tmp_path / "fed.sqlite")) == 1
    assert Receipt.from_json(r1.to_json()) == r1 and r1.verify_signature(ids["fed"].public_bytes.hex())
    with pytest.raises(LedgerError, match="not this node"):
        hold(led["b"], r1)
    with pytest.raises(LedgerError, match="not the parent's"):
        hold(led["a"], r1, expected_parent_key=ids["b"].public_bytes.hex())
    forged = dataclasses.replace(r1, child_count=1, parent_count=5)
    with pytest.raises(LedgerError, match="signature does not verify"):
        hold(led["a"], forged)
    ahead = countersign(led["fed"], child=name, child_public_key=pk, child_count=2, child_entry_hash=h,
                        release_id="1:shared:fed", round=1)
    with pytest.raises(LedgerError, match="head this ledger does not have"):
        hold(led["a"], ahead)
    assert hold(led["a"], r1) == hold(led["a"], r1) == r1
    for x in led.values():
        x.close()
    assert len(read_receipts(tmp_path / "a.sqlite")) == 1
    assert all(verify(tmp_path / f"{n}.sqlite").ok for n in ids)


def test_simulate_writes_receipts_and_a_rolled_back_site_is_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """simulate's release path countersigns every member's ledger head (`receipts.exchange`, right after the
    member's entry): a real simulated world audits clean with --require-receipts, and a site's ledger restored
    from a backup taken before round 2 is caught, though it verifies on its own."""
    from conftest import write_distributed_world

    from worldlm_secure.federation.methods import METHODS
    from worldlm_secure.federation.release import ReleasePath
    from worldlm_secure.federation.simulate import simulate

    backup = tmp_path / "backup-f0-s0.sqlite"
    original = ReleasePath.record_release

    def record_release(self, round_id, group, member, destination, names, *args):  # type: ignore[no-untyped-def]
        if self.ledger_dir is not None and member == "f0-s0" and round_id == 2 and not backup.exists():
            # the site's ledger as it was after round 1 (receipts included)
            ledger_operator.backup(self.ledger(member).path, backup)
        original(self, round_id, group, member, destination, names, *args)

    monkeypatch.setattr(ReleasePath, "record_release", record_release)
    world = write_distributed_world(tmp_path)
    out = tmp_path / "ledgers"
    simulate(world, methods=[METHODS["worldlm"]], device="cpu", ledger_root=out)
    rep = audit_ledgers([out], require_receipts=True)
    assert rep.ok, rep.lines()
    assert rep.worlds[0].receipts and rep.worlds[0].parent["f0-s0"] == "f0"
    _restore(backup, out / "f0-s0.sqlite")
    assert verify(out / "f0-s0.sqlite", require_policies=True).ok  # a genuine older state
    rep = audit_ledgers([out])
    assert any(f.node == "f0-s0" and f.rule == "receipt.child_head" for f in rep.findings), rep.lines()
