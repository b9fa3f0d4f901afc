"""Attacker review of the privacy ledger (session 9): a node operator holding its own signing key, or someone
with only the files, tries to make `verify` / `audit_ledgers` pass while the ledger misstates what was released.

Each test drives the real writer (`Ledger.append`, `receipts.exchange`) and then tampers with sqlite3 or
re-signs with the node's own key, and asserts the SECURE behaviour. Tests marked ``HOLE:`` failed on the code
they were written against (c67fe67 + session 9's first commits); they are closed by `ledger/entry_rules.py` and
`store.read_ledger_file`. The others document attacks that were already caught.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import sqlite3
from collections.abc import Callable
from pathlib import Path

import ledger_operator
from test_ledger_audit import FED_POLICY, SITE_POLICY, SITES
from test_ledger_chain import effective_policy

from worldlm_secure.identity import NodeIdentity
from worldlm_secure.ledger import Ledger, LedgerEntry, release_entry, verify
from worldlm_secure.ledger.audit import audit_ledgers
from worldlm_secure.ledger.receipts import exchange
from worldlm_secure.privacy import BudgetTracker

TENSORS = ("model.layers.0.self_attn.q_proj.weight",)


# ------------------------------------------------------------------------------------------------ helpers


def _site_entry(site: str, r: int, charge, **kw: object) -> LedgerEntry:
    fields = dict(
        release_id=f"{r}:shared:fed", round=r, level="site", source=site, destination="fed", group="shared",
        tensor_names=TENSORS, protocol="masking", cohort_size=3, dropouts=0, dp_level="user",
        mechanism="central_gaussian", clipping_norm=1.0, policy_sha256=SITE_POLICY.sha256, charge=charge,
    )
    fields.update(kw)
    return release_entry(**fields)  # type: ignore[arg-type]


Maker = Callable[[str, int, BudgetTracker], list[LedgerEntry]]


def _honest(site: str, r: int, tracker: BudgetTracker) -> list[LedgerEntry]:
    return [_site_entry(site, r, tracker.charge(4.0, 1.0))]


def build_world(d: Path, make: Maker = _honest, *, rounds: int = 2, sites: tuple[str, ...] = SITES,
                site_policy=SITE_POLICY, receipts: bool = True) -> tuple[Path, dict[str, NodeIdentity]]:
    """Like tests/test_ledger_audit.py's world (sites -> fed -> world, receipts after every release), but each
    site's entries of round r come from ``make(site, r, tracker)`` (the operator writes what it likes, signed
    with its own key through the real `Ledger.append`). Returns the ledgers folder and the identities."""
    ids = {n: NodeIdentity.generate(n) for n in (*sites, "fed", "world")}
    led = {n: Ledger(d / "ledgers" / f"{n}.sqlite", ids[n]) for n in ids}
    trackers = {s: BudgetTracker(budget=8.0, delta=1e-5, stream=f"{s}/user") for s in sites}
    try:
        for r in range(rounds):
            for s in sites:
                for e in make(s, r, trackers[s]):
                    led[s].append(e, policy_document=site_policy.canonical_json())
                    if receipts:
                        exchange(led["fed"], led[s], release_id=e.release_id, round=r)
            up = release_entry(
                release_id=f"{r}:shared:world", round=r, level="federation", source="fed", destination="world",
                group="shared", tensor_names=TENSORS, protocol="masking", cohort_size=1, dropouts=0, dp_level="user",
                mechanism="post_processing", clipping_norm=0.0, policy_sha256=FED_POLICY.sha256, charge=None,
                stream="fed/post_processing",
            )
            led["fed"].append(up, policy_document=FED_POLICY.canonical_json())
            if receipts:
                exchange(led["world"], led["fed"], release_id=up.release_id, round=r)
    finally:
        for x in led.values():
            x.close()
    return d / "ledgers", ids


def _drop_unique_release_id(path: Path) -> None:
    """Rebuild the entries table without its UNIQUE(release_id) constraint (the file is the operator's)."""
    con = sqlite3.connect(path)
    con.executescript("""
        BEGIN;
        CREATE TABLE entries2 (seq INTEGER PRIMARY KEY, release_id TEXT NOT NULL, body BLOB NOT NULL,
                               entry_hash TEXT NOT NULL, signature TEXT NOT NULL);
        INSERT INTO entries2 SELECT seq, release_id, body, entry_hash, signature FROM entries;
        DROP TABLE entries;
        ALTER TABLE entries2 RENAME TO entries;
        COMMIT;
    """)
    con.close()


def _forge_append(path: Path, identity: NodeIdentity, entry: LedgerEntry) -> None:
    """Seal, sign and insert ``entry`` exactly as `Ledger.append` does, but without its idempotency lookup
    (the operator holds the key), and re-sign the head."""
    with ledger_operator.rewriting(path, identity) as con:  # the operator's own tooling
        last = con.execute("SELECT seq, entry_hash FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
        seq, prev = int(last[0]) + 1, str(last[1])
        sealed = dataclasses.replace(
            entry, seq=seq, prev_hash=prev, public_key=identity.public_bytes.hex(), entry_hash="", signature="",
            timestamp=dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds"),
        )
        h = sealed.compute_hash()
        sig = identity.sign(sealed.signed_message()).hex()
        con.execute("INSERT INTO entries (seq, release_id, body, entry_hash, signature) VALUES (?, ?, ?, ?, ?)",
                    (seq, entry.release_id, sealed.body_bytes(), h, sig))


def _one_ledger(path: Path, node: str, entries: list[LedgerEntry], policy=SITE_POLICY) -> NodeIdentity:
    ident = NodeIdentity.generate(node)
    with Ledger(path, ident) as led:
        for e in entries:
            led.append(e, policy_document=policy.canonical_json())
    return ident


def _rules(rep) -> set[str]:
    return {f.rule for f in rep.findings}


# ------------------------------------------------------------------------------------------------ holes


def test_user_level_release_recorded_with_zero_steps_is_refused(tmp_path: Path) -> None:
    # HOLE: a user-level (central/distributed noise) release with steps=0 recomputes to ε=0, so a node can
    # release every round and charge nothing; only a DP-SGD (:record / dp_sgd) entry may legitimately have 0 steps.
    t = BudgetTracker(budget=8.0, delta=1e-5, stream="a/user")
    entries = [_site_entry("a", r, t.charge(0.5, 1.0, steps=0)) for r in range(20)]  # z=0.5: ~ε 10 each if charged
    assert all(e.epsilon == 0.0 for e in entries)
    _one_ledger(tmp_path / "a.sqlite", "a", entries)
    rep = verify(tmp_path / "a.sqlite", require_policies=True, expected_node="a")
    assert not rep.ok, "20 user-level releases at z=0.5 recorded as spending ε=0 verify"


def test_site_release_recorded_as_post_processing_is_refused(tmp_path: Path) -> None:
    # HOLE: a *site* labels its own raw update `post_processing` (dp_level user, z=0, no ε): verify skips every
    # DP rule for it and audit charges nothing, though a leaf has no DP-noised input it could post-process.
    def make(site: str, r: int, t: BudgetTracker) -> list[LedgerEntry]:
        if site == "a" and r == 1:
            return [_site_entry(site, r, None, mechanism="post_processing", clipping_norm=0.0,
                                stream="a/post_processing")]
        return _honest(site, r, t)

    d, _ = build_world(tmp_path, make)
    rep_v = verify(d / "a.sqlite", require_policies=True, expected_node="a")
    rep_a = audit_ledgers([d])
    assert not rep_v.ok and not rep_a.ok, (
        f"a site's un-noised release recorded as post_processing: verify ok={rep_v.ok}, audit ok={rep_a.ok}")


def test_record_companion_without_its_user_level_entry_is_refused(tmp_path: Path) -> None:
    # HOLE: under a user-level policy, a release recorded only as its `R:G:D:record` DP-SGD "companion" is exempt
    # from the level rule in verify, skipped by audit's aggregation checks and accepted by receipt.child_release:
    # the whole cohort drops user-level DP and the world still audits clean.
    def make(site: str, r: int, t: BudgetTracker) -> list[LedgerEntry]:
        if r == 1:
            rec = BudgetTracker(budget=8.0, delta=1e-5, stream=f"{site}/record")
            return [_site_entry(site, r, rec.charge(1.0, 0.01, steps=10), release_id="1:shared:fed:record",
                                dp_level="record", mechanism="dp_sgd")]
        return _honest(site, r, t)

    d, _ = build_world(tmp_path, make)
    rep_v = verify(d / "a.sqlite", require_policies=True, expected_node="a")
    rep_a = audit_ledgers([d])
    assert not rep_v.ok and not rep_a.ok, (
        f"a cohort's lone :record companions under a user-level policy: verify ok={rep_v.ok}, audit ok={rep_a.ok}")


def test_duplicate_release_id_in_one_ledger_is_refused(tmp_path: Path) -> None:
    # HOLE: verify never checks that release ids are unique; an operator rebuilds the table without UNIQUE and
    # signs its entry of a release twice, and audit's aggregation counts it as two contributors (len(entries),
    # not distinct sources), so a release by one member meets cohort 2 / min_cohort 2.
    def make(site: str, r: int, t: BudgetTracker) -> list[LedgerEntry]:
        if site == "b" and r == 1:
            return []  # b did not take part in round 1: a released alone (SITE_POLICY's min_cohort is 2)
        return [_site_entry(site, r, t.charge(4.0, 1.0), cohort_size=2)]

    d, ids = build_world(tmp_path, make, sites=("a", "b"), receipts=False)
    assert "aggregation.min_cohort" in _rules(audit_ledgers([d])), "baseline: a lone member is caught"
    # a, holding its key, drops the UNIQUE constraint and signs a second copy of its round-1 entry
    t = BudgetTracker(budget=8.0, delta=1e-5, stream="a/user")
    for _ in range(2):
        t.charge(4.0, 1.0)
    _drop_unique_release_id(d / "a.sqlite")
    _forge_append(d / "a.sqlite", ids["a"], _site_entry("a", 1, t.charge(4.0, 1.0), cohort_size=2))
    rep_v = verify(d / "a.sqlite", require_policies=True, expected_node="a")
    rep_a = audit_ledgers([d])
    assert not rep_v.ok and not rep_a.ok, (
        f"release 1:shared:fed held twice by a: verify ok={rep_v.ok}, audit ok={rep_a.ok} {sorted(_rules(rep_a))}")


RECORD_POLICY = effective_policy(
    differential_privacy={"level": "record", "epsilon_budget": 4.0, "record": {"max_grad_norm": 1.0, "epsilon_budget": 4.0}},
    egress={"destinations": ["fed", "world"], "require": ["secure_aggregation"]},
)


def test_record_level_entries_with_a_non_dp_sgd_mechanism_are_charged_or_refused(tmp_path: Path) -> None:
    # HOLE: under a record-level policy a site records its releases as dp_level "record" with mechanism
    # central_gaussian (not dp_sgd), each on its own stream. verify checks each stream alone (each under ε 4), and
    # audit's member.budget counts record level only for mechanism dp_sgd and user level only for dp_level user,
    # so these entries are charged nowhere: 2 × ~3.7 = ~7 > 4 audits clean.
    def make(site: str, r: int, t: BudgetTracker) -> list[LedgerEntry]:
        s = BudgetTracker(budget=4.0, delta=1e-5, stream=f"{site}/record-{r}")
        return [_site_entry(site, r, s.charge(1.3, 1.0), dp_level="record", policy_sha256=RECORD_POLICY.sha256)]

    d, _ = build_world(tmp_path, make, site_policy=RECORD_POLICY)
    rep_v = verify(d / "a.sqlite", require_policies=True, expected_node="a")
    # refused by verify (`entry_rules`: record level is DP-SGD), so the audit reports the ledger too
    assert not rep_v.ok and rep_v.problem is not None and "must be DP-SGD" in rep_v.problem.what, rep_v.problem
    rep_a = audit_ledgers([d])
    assert not rep_a.ok and "verify" in _rules(rep_a), sorted(_rules(rep_a))


def test_user_level_releases_split_over_two_streams_fail_verify(tmp_path: Path) -> None:
    # HOLE: verify does not bind `stream` to MEMBER/user: a site charges alternate releases to "a/user" and
    # "a/user-b", each stream stays under budget 8 and `ledger verify` prints OK with two in-budget streams though
    # the member spent more than 8. (`ledger audit`'s member.budget does catch it: asserted below.)
    t1 = BudgetTracker(budget=8.0, delta=1e-5, stream="a/user")
    t2 = BudgetTracker(budget=8.0, delta=1e-5, stream="a/user-b")
    entries = [_site_entry("a", r, (t1 if r % 2 == 0 else t2).charge(1.0, 1.0)) for r in range(4)]
    _one_ledger(tmp_path / "a.sqlite", "a", entries)
    rep = verify(tmp_path / "a.sqlite", require_policies=True, expected_node="a")
    total = BudgetTracker(budget=1e9, delta=1e-5, stream="x")
    for _ in range(4):
        c = total.charge(1.0, 1.0)
    assert c.epsilon_cumulative > 8.0 and max(rep.spent.values(), default=0.0) <= 8.0
    assert not rep.ok, f"user-level ε {c.epsilon_cumulative:.3g} > 8 split over streams {sorted(rep.spent)} verifies"


def test_audit_catches_user_level_stream_split(tmp_path: Path) -> None:
    """Caught: audit composes every user-level release of a member, whatever its stream."""
    def make(site: str, r: int, t: BudgetTracker) -> list[LedgerEntry]:
        s = BudgetTracker(budget=8.0, delta=1e-5, stream=f"{site}/user-{r}")
        return [_site_entry(site, r, s.charge(0.7, 1.0))]

    d, _ = build_world(tmp_path, make)
    rep = verify(d / "a.sqlite", require_policies=True, expected_node="a")  # now verify alone refuses it too
    assert not rep.ok and rep.problem is not None and "one stream 'a/user'" in rep.problem.what, rep.problem
    assert not audit_ledgers([d]).ok


def test_receipt_countersigning_a_refusal_is_a_finding(tmp_path: Path) -> None:
    # HOLE: the federation releases a local (lm_head) tensor with no DP and no secure aggregation to the root,
    # records it as a `refused` entry under the release's own id, and the root countersigns it. verify checks a
    # refusal only for δ/accountant, audit skips refusals everywhere, and receipt.child_release accepts the
    # refusal as "the entry of the release": a countersigned receipt for a release the ledger says never left.
    d, ids = build_world(tmp_path, rounds=1)
    with Ledger(d / "fed.sqlite", ids["fed"]) as fed, Ledger(d / "world.sqlite", ids["world"]) as world:
        e = release_entry(
            release_id="1:shared:world", round=1, level="federation", source="fed", destination="world",
            group="shared", tensor_names=("lm_head.weight",), protocol="none", cohort_size=1, dropouts=0,
            dp_level="none", mechanism="refused", clipping_norm=0.0, policy_sha256=FED_POLICY.sha256, charge=None,
            stream="fed/user",
        )
        fed.append(e, policy_document=FED_POLICY.canonical_json())
        exchange(world, fed, release_id=e.release_id, round=1)
    rep_v = verify(d / "fed.sqlite", require_policies=True, expected_node="fed")
    rep_a = audit_ledgers([d], require_receipts=True)
    assert not rep_v.ok or not rep_a.ok, (
        f"a countersigned release recorded as refused: verify ok={rep_v.ok}, audit ok={rep_a.ok}")


def test_a_damaged_policy_column_makes_audit_report_not_crash(tmp_path: Path) -> None:
    # HOLE: without any key, storing a policy document (or entry body) as TEXT instead of BLOB makes
    # read_ledger_file raise TypeError (bytes(str)), which neither verify nor audit_ledgers catches: one
    # operator stops `ledger audit` / `ledger report` of the whole world instead of getting a finding.
    d, _ = build_world(tmp_path, rounds=1)
    con = sqlite3.connect(d / "a.sqlite")
    con.execute("UPDATE policies SET document = CAST(document AS TEXT)")
    con.commit()
    con.close()
    try:
        rep = audit_ledgers([d])
    except Exception as exc:  # noqa: BLE001
        raise AssertionError(f"audit crashed on a damaged ledger instead of reporting it: {exc!r}") from None
    assert "verify" in _rules(rep)


# ------------------------------------------------------------------------------------------------ caught


def _resign_last_body(path: Path, ident: NodeIdentity, rewrite: Callable[[bytes], bytes]) -> None:
    """The operator rewrites its last entry's body bytes, recomputes entry_hash, re-signs it and the head."""
    import hashlib

    from worldlm_secure.ledger.entry import SIGNATURE_CONTEXT

    with ledger_operator.rewriting(path, ident) as con:
        seq, body = con.execute("SELECT seq, body FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
        new = rewrite(bytes(body))
        assert new != bytes(body)
        sig = ident.sign(SIGNATURE_CONTEXT + new).hex()
        con.execute("UPDATE entries SET body = ?, entry_hash = ?, signature = ? WHERE seq = ?",
                    (new, hashlib.sha256(new).hexdigest(), sig, seq))


NON_CANONICAL = {
    # name: body rewrite (each is the same entry, or a lie, in another JSON spelling)
    "duplicate key, the later one smaller": lambda b: b.replace(b'"epsilon_budget":8.0', b'"epsilon_budget":99.0,"epsilon_budget":8.0'),
    "float field as int": lambda b: b.replace(b'"clipping_norm":1.0', b'"clipping_norm":1'),
    "NaN in extra": lambda b: b.replace(b'"extra":{}', b'"extra":{"noise_sensitivity":NaN}'),
    "Infinity delta": lambda b: b.replace(b'"delta":1e-05', b'"delta":Infinity'),
    "raw UTF-8 instead of \\u escape": lambda b: b.replace(b'"extra":{}', '"extra":{"n":"\u00e9"}'.encode()),
    "upper-case \\u escape": lambda b: b.replace(b'"extra":{}', b'"extra":{"n":"\\u00E9"}'),
    "whitespace": lambda b: b.replace(b'","', b'", "', 1),
    "exponent spelling": lambda b: b.replace(b'"delta":1e-05', b'"delta":1E-05'),
}


def test_non_canonical_bodies_signed_by_the_operator_are_refused(tmp_path: Path) -> None:
    """Caught: every JSON respelling of a body (duplicate keys, 1 for 1.0, NaN/Infinity, raw UTF-8, upper-case
    escapes, whitespace, 1E-05) fails canonical re-encoding even when re-hashed and re-signed with the key."""
    t = BudgetTracker(budget=8.0, delta=1e-5, stream="a/user")
    base = [_site_entry("a", r, t.charge(4.0, 1.0)) for r in range(2)]
    ident = _one_ledger(tmp_path / "a.sqlite", "a", base)
    assert verify(tmp_path / "a.sqlite", require_policies=True).ok
    for name, rewrite in NON_CANONICAL.items():
        p = tmp_path / f"{name.replace(' ', '_').replace(chr(92), '')}.sqlite"
        p.write_bytes((tmp_path / "a.sqlite").read_bytes())
        _resign_last_body(p, ident, rewrite)
        rep = verify(p, require_policies=True)
        assert not rep.ok and rep.problem is not None and rep.problem.seq == 1, (name, rep.problem)
        assert "malformed" in rep.problem.what, (name, rep.problem)


def test_renamed_ledger_tables_do_not_hide_a_node_from_audit(tmp_path: Path) -> None:
    """Caught (through receipts): renaming a site's tables makes `_is_ledger` skip its file silently, but the
    parent's issued receipts then name a child with no ledger (receipt.child_head)."""
    d, _ = build_world(tmp_path, rounds=1)
    con = sqlite3.connect(d / "a.sqlite")
    for t in ("entries", "meta", "head"):
        con.execute(f"ALTER TABLE {t} RENAME TO old_{t}")
    con.commit()
    con.close()
    rep = audit_ledgers([d])
    assert "receipt.child_head" in _rules(rep)


def test_rollback_to_an_older_copy_is_caught_by_receipts(tmp_path: Path) -> None:
    """Caught: a site's ledger replaced by its own genuine copy from before round 1 contradicts fed's receipts."""
    import shutil

    d, ids = build_world(tmp_path, rounds=1)
    old = tmp_path / "a-old.sqlite"
    shutil.copy(d / "a.sqlite", old)
    with Ledger(d / "a.sqlite", ids["a"]) as a, Ledger(d / "fed.sqlite", ids["fed"]) as fed:
        t = BudgetTracker(budget=8.0, delta=1e-5, stream="a/user")
        t.charge(4.0, 1.0)
        e = _site_entry("a", 1, t.charge(4.0, 1.0))
        a.append(e, policy_document=SITE_POLICY.canonical_json())
        exchange(fed, a, release_id=e.release_id, round=1)
    for suffix in ("-wal", "-shm"):
        Path(f"{d / 'a.sqlite'}{suffix}").unlink(missing_ok=True)
    shutil.copy(old, d / "a.sqlite")
    assert verify(d / "a.sqlite", require_policies=True, expected_node="a").ok  # the file alone cannot tell
    assert "receipt.child_head" in _rules(audit_ledgers([d]))
