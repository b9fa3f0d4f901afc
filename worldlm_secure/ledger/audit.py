"""`ledger audit`: a whole world's ledgers checked against each other, their policies and pinned keys.

`audit_ledgers(paths, keys=None) -> AuditReport`. Paths are ledger files or folders (simulate's `--out`
or its `ledgers/`, a `world up` state folder): every `*.sqlite` ledger under them is found; each world
(simulate's `ledgers/` and each baseline's `ledgers/METHOD/`, or one `world up` state) is audited alone.

Per ledger: `verify` with the auditor's defaults (policy documents required, the file NAME.sqlite must
be NAME's, the pinned key when `keys` names the node). Across the world (protocols/ledger.md §8):
- aggregation.match: the entries of one release (same destination and release id) agree on round,
  group, protocol, cohort size and tensors;
- aggregation.contributors: as many members hold the release as its cohort size says;
- aggregation.min_cohort: the members holding it meet the largest min_cohort of their policies;
- member.budget: each member's ε composed over all its releases (every group, destination and stream
  of a DP level) stays within the strictest budget of every policy its releases fell under;
- keys.pinned / keys.unpinned: each ledger is signed by the key the world's identities give the node;
- world.base_hash: every entry that records the base weights' hash names the same base;
- receipt.*: every countersigned head (receipts.py) is signed by the parent's key, and the child's and
  parent's ledgers still contain the heads it names (a rolled-back or truncated ledger fails), and both
  copies exist.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from worldlm_secure.errors import LedgerError
from worldlm_secure.ledger.entry import DP_SGD, POST_PROCESSING, RECORD_SUFFIX, LedgerEntry
from worldlm_secure.ledger.policy_rules import is_refusal
from worldlm_secure.ledger.receipts import HELD, ISSUED, Receipt, verify_head
from worldlm_secure.ledger.verification import VerifyReport, verify

LEDGER_FORMAT_PREFIX = "worldlm-secure-ledger/"


@dataclass(frozen=True)
class Finding:
    """One thing wrong: which node, which entry (or receipt, or the file), which rule, and why."""

    node: str
    entry: str  # "entry 3 (3:shared:eu)", "receipt 0", or "" for the whole ledger / aggregation
    rule: str
    what: str
    world: str = ""

    def __str__(self) -> str:
        where = f"{self.node}: {self.entry}" if self.entry else self.node
        return f"{where}: [{self.rule}] {self.what}"


@dataclass(frozen=True)
class MemberSpend:
    """A member's privacy loss at one DP level, composed over every release (all groups, destinations, streams)."""

    node: str
    level: str  # user | record
    epsilon: float
    delta: float
    budget: float | None  # the strictest budget of every policy its releases fell under
    budget_policy: str  # the policy (names) that budget came from
    releases: int
    rounds: tuple[tuple[int, float], ...] = ()  # (round, ε composed up to and including that round)


@dataclass
class WorldAudit:
    """The audit of one world (one folder of ledgers)."""

    root: Path
    reports: list[VerifyReport]
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    parent: dict[str, str] = field(default_factory=dict)  # node -> the node its releases went to
    members: list[MemberSpend] = field(default_factory=list)
    receipts: list[tuple[str, Receipt]] = field(default_factory=list)  # (role, receipt), one per copy

    @property
    def ok(self) -> bool:
        return not self.findings


@dataclass
class AuditReport:
    """`audit_ledgers`' result: one `WorldAudit` per world found."""

    worlds: list[WorldAudit]
    keys: dict[str, str] = field(default_factory=dict)

    @property
    def findings(self) -> list[Finding]:
        return [f for w in self.worlds for f in w.findings]

    @property
    def ok(self) -> bool:
        return bool(self.worlds) and all(w.ok for w in self.worlds)

    def lines(self) -> list[str]:
        many = len(self.worlds) > 1
        return [(f"{f.world}: " if many else "") + str(f) for f in self.findings]

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "keys_pinned": sorted(self.keys),
            "worlds": [
                {
                    "root": str(w.root),
                    "ok": w.ok,
                    "ledgers": [
                        {"node": r.node, "path": str(r.path), "ok": r.ok, "format": r.format, "entries": r.total_rows,
                         "receipts": len(r.receipts), "public_key": r.public_key,
                         "problem": None if r.ok else str(r.problem)}
                        for r in w.reports
                    ],
                    "tree": dict(sorted(w.parent.items())),
                    "members": [asdict(m) for m in w.members],
                    "receipts": len(w.receipts),
                    "findings": [asdict(f) for f in w.findings],
                    "notes": list(w.notes),
                }
                for w in self.worlds
            ],
        }


# ------------------------------------------------------------------------------------- finding files


def _is_ledger(path: Path) -> bool:
    """A ledger, or a damaged one: any *.sqlite except a readable database without the ledger's tables
    (e.g. a node's state.sqlite). A ledger whose meta was damaged is audited (and fails), never skipped."""
    import sqlite3

    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            con.close()
    except sqlite3.DatabaseError:
        return True
    return bool(tables & {"entries", "meta", "head"})


def world_of(path: Path) -> Path:
    """The world a ledger belongs to: `world up`'s STATE for STATE/nodes/NAME/ledger/NAME.sqlite, else its folder."""
    p = path.resolve()
    if p.parent.name == "ledger" and len(p.parents) > 3 and p.parents[2].name == "nodes":
        return p.parents[3]
    return p.parent


def find_ledgers(paths: Iterable[Path | str]) -> dict[Path, list[Path]]:
    """Ledger files under `paths`, grouped by world (raises LedgerError for a path with none)."""
    worlds: dict[Path, list[Path]] = defaultdict(list)
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = [f for f in sorted(p.rglob("*.sqlite")) if not f.name.startswith(".") and _is_ledger(f)]
            if not found:
                raise LedgerError(f"{p}: no ledgers (*.sqlite) under this folder; pass simulate's --out or a world up state")
        elif p.is_file():
            found = [p]
        else:
            raise LedgerError(f"{p}: no such file or folder")
        for f in found:
            if f.resolve() not in worlds[world_of(f)]:
                worlds[world_of(f)].append(f.resolve())
    return dict(worlds)


# ------------------------------------------------------------------------------------- pinned keys


def load_keys(path: Path | str) -> dict[str, str]:
    """Node name -> hex Ed25519 signing key, from the world's identities.

    A folder: every node certificate under it (`keys issue`'s tls.crt, as `world up` lays out
    STATE/keys/NAME/{down,up}/); a certificate next to its ca.crt must be issued by that CA. A file: a
    certificate (.crt/.pem), JSON (`{"node": "hex", ...}` or a `keys` node.json summary), or lines `NAME HEX`.
    """
    p = Path(path)
    out: dict[str, str] = {}

    def add(name: str, key: str, where: Path) -> None:
        key = key.lower()
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise LedgerError(f"{where}: {name!r} has no 32-byte hex Ed25519 key ({key[:20]!r})")
        if out.get(name, key) != key:
            raise LedgerError(f"{where}: node {name!r} has two different signing keys in {p}")
        out[name] = key

    def from_cert(f: Path) -> None:
        from cryptography import x509

        from worldlm_secure.transport.keys import load_certificate, signing_key_of

        cert = load_certificate(f)
        key = signing_key_of(cert)
        if key is None:
            return  # a CA certificate, or a certificate without a signing key
        ca = f.parent / "ca.crt"
        if ca.is_file() and ca != f:
            try:
                cert.verify_directly_issued_by(load_certificate(ca))
            except Exception as exc:  # noqa: BLE001 - any failure means "not issued by this CA"
                raise LedgerError(f"{f}: not issued by {ca} ({exc.__class__.__name__})") from None
        cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        add(str(cn[0].value) if cn else f.parent.name, key.hex(), f)

    if p.is_dir():
        certs = [f for f in sorted(p.rglob("*.crt")) if f.name != "ca.crt"]
        for f in certs:
            from_cert(f)
        if not out:
            raise LedgerError(f"{p}: no node certificates with a signing key under this folder")
        return out
    if not p.is_file():
        raise LedgerError(f"{p}: no such keys file or folder")
    if p.suffix in (".crt", ".pem"):
        from_cert(p)
    elif p.suffix == ".json":
        try:
            data = json.loads(p.read_text())
        except ValueError as exc:
            raise LedgerError(f"{p}: not JSON ({exc})") from None
        if isinstance(data, dict) and "signing_public_key" in data:
            add(str(data["name"]), str(data["signing_public_key"]), p)
        elif isinstance(data, dict):
            for k, v in data.items():
                add(str(k), str(v), p)
        else:
            raise LedgerError(f"{p}: expected {{\"node\": \"hex key\"}}")
    else:
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                parts = line.split()
                if len(parts) != 2:
                    raise LedgerError(f"{p}:{n}: expected 'NODE HEXKEY'")
                add(parts[0], parts[1], p)
    if not out:
        raise LedgerError(f"{p}: no keys in this file")
    return out


# ------------------------------------------------------------------------------------- the audit


def audit_ledgers(
    paths: Iterable[Path | str],
    keys: Mapping[str, str] | Path | str | None = None,
    *,
    require_receipts: bool = False,
) -> AuditReport:
    """Audit every world found under `paths`. `keys`: node -> hex key, or a path for `load_keys`.
    `require_receipts`: a release no receipt countersigns is a finding (else a note)."""
    pinned = dict(load_keys(keys)) if isinstance(keys, (str, Path)) else dict(keys or {})
    with warnings.catch_warnings():  # Opacus warns per ε recomputed at a small optimal RDP order
        warnings.simplefilter("ignore", UserWarning)
        worlds = [
            _audit_world(root, files, pinned, require_receipts) for root, files in sorted(find_ledgers(paths).items())
        ]
    return AuditReport(worlds, pinned)


def _where(e: LedgerEntry) -> str:
    return f"entry {e.seq} ({e.release_id})"


def _audit_world(root: Path, files: Sequence[Path], keys: Mapping[str, str], require_receipts: bool) -> WorldAudit:
    reports: list[VerifyReport] = []
    unreadable: list[tuple[Path, str]] = []
    for f in files:
        try:
            reports.append(verify(f, expected_node=f.stem, expected_public_key=keys.get(f.stem), require_policies=True))
        except LedgerError as exc:
            unreadable.append((f, str(exc)))
    w = WorldAudit(root, reports)
    label = root.name

    def find(node: str, entry: str, rule: str, what: str) -> None:
        w.findings.append(Finding(node, entry, rule, what, label))

    for f, why in unreadable:
        find(f.stem, "", "verify", why)

    by_node: dict[str, VerifyReport] = {}  # keyed by the file's NAME (NAME.sqlite): whose ledger it should be
    for r in reports:
        node = r.path.stem
        if node in by_node:
            find(node, "", "tree.duplicate", f"two ledgers for one node: {by_node[node].path} and {r.path}")
            continue
        by_node[node] = r
        if not r.ok:
            rule = "keys.pinned" if "expected key" in str(r.problem) else "verify"
            p = r.problem
            entry = "" if p is None or p.seq is None else f"entry {p.seq}" + (f" ({p.release_id})" if p.release_id else "")
            find(node, entry, rule, (p.what if p else "") + f" [{r.path}]")
        if keys and node not in keys:
            find(node, "", "keys.unpinned", f"no key for node {node!r} in the pinned identities; its signatures chain to nothing the auditor trusts")
    # another node's ledger under this name (caught above) contributes nothing to the cross-node checks
    entries = {n: list(r.entries) if r.node == n else [] for n, r in by_node.items()}

    # the tree: a node's releases go to its parent
    for n, es in entries.items():
        dests = Counter(e.destination for e in es if not is_refusal(e))
        if dests:
            w.parent[n] = dests.most_common(1)[0][0]

    _check_aggregations(entries, by_node, find)
    _check_base(entries, find)
    w.members = _member_spend(entries, by_node, find)
    _check_receipts(w, by_node, entries, keys, find, require_receipts)
    return w


def _base_id(rid: str) -> str:
    return rid.removesuffix(RECORD_SUFFIX)


def _check_aggregations(entries: Mapping[str, list[LedgerEntry]], by_node: Mapping[str, VerifyReport], find: Any) -> None:
    groups: dict[tuple[str, str], list[LedgerEntry]] = defaultdict(list)
    for n, es in entries.items():
        for e in es:
            if is_refusal(e) or e.release_id.endswith(RECORD_SUFFIX):
                continue  # a refusal left nothing; ":record" is the second entry of a release already counted
            groups[(e.destination, e.release_id)].append(e)
    # Only the root may lack a ledger (it releases nothing); with several ledger-less receivers, one of them
    # is a missing ledger, and which releases lack contributors cannot be told apart.
    ledgerless = sorted({dest for dest, _ in groups if dest not in by_node})
    if len(ledgerless) > 1:
        find(", ".join(ledgerless), "", "tree.missing_ledger",
             f"{len(ledgerless)} nodes receive releases but have no ledger ({', '.join(ledgerless)}); only the root may "
             "lack one: a ledger is missing from the audited set")
    for (dest, rid), es in sorted(groups.items()):
        # the majority's view of the release; members that disagree are named
        def view(e: LedgerEntry) -> tuple[Any, ...]:
            return (e.round, e.group, e.protocol, e.cohort_size, e.tensor_names)

        common, _ = Counter(view(e) for e in es).most_common(1)[0]
        for e in es:
            v = view(e)
            if v != common:
                diff = [name for name, a, b in zip(("round", "group", "protocol", "cohort", "tensors"), v, common) if a != b]
                find(e.source, _where(e), "aggregation.match",
                     f"its release to {dest} disagrees with the other contributors on {', '.join(diff)}")
        cohort = common[3]
        holders = sorted(e.source for e in es)
        complete = all(n in by_node and by_node[n].ok for n in holders) and (dest in by_node or len(ledgerless) == 1)
        mins = []
        for e in es:
            doc = by_node[e.source].policies.get(e.policy_sha256) if e.source in by_node else None
            m = ((doc or {}).get("secure_aggregation") or {}).get("min_cohort")
            if isinstance(m, int):
                mins.append((m, e.source))
        need, who = max(mins) if mins else (0, "")
        if len(es) < cohort and complete:
            below = f"; {len(es)} is below {who}'s min_cohort {need}" if len(es) < need else ""
            find(dest, f"release {rid}", "aggregation.min_cohort" if below else "aggregation.contributors",
                 f"cohort of {cohort} recorded but only {len(es)} member ledger(s) hold this release ({', '.join(holders)}){below}")
        elif len(es) < need:
            find(dest, f"release {rid}", "aggregation.min_cohort",
                 f"{len(es)} contributor(s) ({', '.join(holders)}) but {who}'s policy requires at least {need}")
        if len(es) > cohort:
            find(dest, f"release {rid}", "aggregation.contributors",
                 f"{len(es)} members hold this release but its recorded cohort is {cohort} ({', '.join(holders)})")


def _check_base(entries: Mapping[str, list[LedgerEntry]], find: Any) -> None:
    """world.base_hash: every entry of the world that records the base weights' hash names the same base
    (entries written before the field existed record none). The majority's base is taken as the world's; each
    node whose first entry naming another is reported once."""
    bases = Counter(e.base_hash for es in entries.values() for e in es if e.base_hash)
    if len(bases) < 2:
        return
    (world_base, n), = bases.most_common(1)
    for node, es in sorted(entries.items()):
        other = next((e for e in es if e.base_hash and e.base_hash != world_base), None)
        if other is not None:
            find(node, _where(other), "world.base_hash",
                 f"trained from base weights {other.base_hash[:16]}…, not the world's {world_base[:16]}… "
                 f"({n} entries): its releases do not update the same model")


def _member_spend(entries: Mapping[str, list[LedgerEntry]], by_node: Mapping[str, VerifyReport], find: Any) -> list[MemberSpend]:
    from worldlm_secure.privacy.accountant import MechanismStep, epsilon_of

    out: list[MemberSpend] = []
    for n, es in sorted(entries.items()):
        for level in ("user", "record"):
            dp = [e for e in es if e.dp_level == level and e.mechanism not in (POST_PROCESSING,) and not is_refusal(e)
                  and e.epsilon is not None and (level == "record") == (e.mechanism == DP_SGD)]
            if not dp:
                continue
            delta = min(e.delta for e in dp)
            accountant = "rdp" if any(e.accountant == "rdp" for e in dp) else dp[0].accountant
            budgets: list[tuple[float, int, str]] = []  # (budget, 0 = a policy's / 1 = recorded, where)
            for e in dp:
                if e.epsilon_budget is not None:
                    budgets.append((e.epsilon_budget, 1, f"recorded in {_where(e)}"))
                doc = by_node[n].policies.get(e.policy_sha256, {})
                sec = doc.get("differential_privacy") or {}
                b = ((sec.get("record") or {}).get("epsilon_budget") or sec.get("epsilon_budget")) if level == "record" \
                    else (sec.get("epsilon_budget") if sec.get("level") == "user" else None)
                if b is not None:
                    names = list(doc.get("policies") or ["?"])
                    names = [x for i, x in enumerate(names) if i == 0 or names[i - 1] != x]
                    budgets.append((float(b), 0, "policy " + " → ".join(names)))
            budget, _, source = min(budgets) if budgets else (None, 0, "")
            steps: list[MechanismStep] = []
            curve: list[tuple[int, float]] = []
            for e in sorted(dp, key=lambda x: (x.round, x.seq)):
                steps.append(MechanismStep(e.noise_multiplier, e.sample_rate, e.steps))
                if curve and curve[-1][0] == e.round:
                    curve.pop()
                curve.append((e.round, epsilon_of(steps, delta, accountant)))
            total = curve[-1][1] if curve else 0.0
            out.append(MemberSpend(n, level, total, delta, budget, source, len(dp), tuple(curve)))
            if budget is not None and total > budget * (1 + 1e-6):
                streams = sorted({e.stream for e in dp})
                find(n, "", "member.budget",
                     f"{level}-level ε={total:.4g} at δ={delta:g} over {len(dp)} releases (streams {', '.join(streams)}; "
                     f"all groups and destinations) exceeds the strictest budget {budget:g} ({source})")
    return out


def _release_of(entry_release_id: str, rid: str) -> bool:
    """True when a ledger entry's release id is release ``rid``'s: ``rid`` itself, a re-release with fresh noise
    (``rid:retryLINK``) or a DP-SGD companion entry (``rid:record``, ``rid:retryLINK:record``)."""
    if entry_release_id in (rid, rid + RECORD_SUFFIX):
        return True
    retry = entry_release_id.removesuffix(RECORD_SUFFIX)
    return retry.startswith(rid + ":retry") and retry[len(rid) + 6:].isdigit()


def _check_receipts(
    w: WorldAudit, by_node: Mapping[str, VerifyReport], entries: Mapping[str, list[LedgerEntry]],
    keys: Mapping[str, str], find: Any, require: bool,
) -> None:
    copies: dict[tuple[str, str, str, int, str], dict[str, Receipt]] = defaultdict(dict)
    for n, r in by_node.items():
        for row in r.receipts:
            rc = row.receipt
            w.receipts.append((row.role, rc))
            copies[(rc.parent, rc.child, rc.release_id, rc.child_count, rc.child_entry_hash)][row.role] = rc
    if not w.receipts:
        msg = "no receipts in this world: a rolled-back or truncated ledger cannot be detected across nodes"
        if require:
            find(w.root.name, "", "receipt.none", msg)
        else:
            w.notes.append(msg)
        return
    covered: dict[str, int] = defaultdict(int)  # child -> largest countersigned entry count
    for (parent, child, rid, count, h), roles in sorted(copies.items()):
        rc = roles.get(ISSUED) or roles[HELD]
        tag = f"receipt for {rid}"
        # the parent's key: pinned, else the parent's ledger's
        parent_key = keys.get(parent) or (by_node[parent].public_key if parent in by_node else None)
        if parent not in by_node:
            find(parent, tag, "receipt.parent_missing", f"{child} holds a receipt signed by {parent!r}, whose ledger is missing")
        if parent_key is None:
            pass
        elif rc.parent_public_key != parent_key or not rc.verify_signature(parent_key):
            find(child, tag, "receipt.signature", f"not signed by {parent}'s key {parent_key[:16]}…")
        child_key = keys.get(child) or (by_node[child].public_key if child in by_node else None)
        # the head must be one the child signed (v2 receipts), with the key the parent countersigned for it: else
        # only the parent says the child sent it, and nothing is held against the child (a parent alone could
        # frame it as rolled back). A key that is not the child's pinned one is the parent's word too.
        signed = verify_head(child, rc.child_public_key, rid, count, h, rc.child_signature)
        if not signed:
            find(parent, tag, "receipt.child_signature",
                 f"{parent} countersigned a head of {child} ({count} entries) that {child} did not sign"
                 + (" (a v1 receipt, without the child's signature)" if not rc.child_signature else "")
                 + ": nothing shows the child sent it; not held against the child")
        elif child in keys and rc.child_public_key != keys[child]:
            signed = False
            find(parent, tag, "receipt.child_key",
                 f"{parent} countersigned key {rc.child_public_key[:16]}… for {child}, whose pinned key is "
                 f"{keys[child][:16]}…: not held against the child")
        elif child_key is not None and rc.child_public_key != child_key:
            find(child, tag, "receipt.child_key",
                 f"{parent} countersigned key {rc.child_public_key[:16]}… but {child}'s ledger/identity key is {child_key[:16]}…")
        # the child's ledger must still hold the head the parent saw
        if not signed:
            pass
        elif child not in by_node:
            find(child, tag, "receipt.child_head", f"{parent} countersigned {child}'s head at {count} entries but there is no ledger for {child}")
        else:
            ces = entries[child]
            if by_node[child].ok and (count > len(ces) or (count and ces[count - 1].entry_hash != h)):
                what = (f"rolled back or truncated: {parent} countersigned {count} entries ending in {h[:16]}…, the ledger has {len(ces)}"
                        if count > len(ces) else
                        f"rewritten: {parent} countersigned entry {count - 1} as {h[:16]}…, the ledger's is {ces[count - 1].entry_hash[:16]}…")
                find(child, tag, "receipt.child_head", what)
            elif by_node[child].ok:
                # the head must end in the entry of the release countersigned (or its retry / record companion):
                # a head from before that entry would let the child drop the release and still match its receipt
                last = ces[count - 1] if count else None
                if last is None or last.destination != parent or not _release_of(last.release_id, rid):
                    got = (f"its entry {count - 1} is {last.release_id!r} to {last.destination!r}" if last is not None
                           else "it had no entries")
                    find(child, tag, "receipt.child_release",
                         f"{parent} countersigned {child}'s head at {count} entries for release {rid!r}, but {got}: "
                         f"the head does not cover that release (stale head; the release may have been dropped)")
            covered[child] = max(covered[child], count)
        # and the parent's ledger the parent head it stated
        if parent in by_node and by_node[parent].ok:
            pes = entries[parent]
            if rc.parent_count > len(pes) or (rc.parent_count and pes[rc.parent_count - 1].entry_hash != rc.parent_entry_hash):
                find(parent, tag, "receipt.parent_head",
                     f"rolled back or rewritten: its receipt to {child} stated {rc.parent_count} entries ending in "
                     f"{rc.parent_entry_hash[:16]}…, the ledger has {len(pes)}")
        if ISSUED not in roles and parent in by_node and by_node[parent].ok:
            find(parent, tag, "receipt.missing_issued",
                 f"{child} holds this receipt signed by {parent}, but {parent}'s ledger has no copy (rolled back)")
        if HELD not in roles and signed and child in by_node and by_node[child].ok:
            find(child, tag, "receipt.missing_held",
                 f"{parent} issued this receipt but {child}'s ledger has no copy (rolled back, or the receipt never arrived)")
    # releases no receipt covers (written after the last countersigned head)
    for n, es in entries.items():
        if n not in w.parent:
            continue
        late = [e for e in es if not is_refusal(e) and e.seq >= covered.get(n, 0)]
        if late:
            msg = f"{len(late)} release(s) after the last countersigned head ({_where(late[0])} onward)"
            if require:
                find(n, _where(late[0]), "receipt.uncovered", msg)
            else:
                w.notes.append(f"{n}: {msg}")


def summary_line(rep: AuditReport) -> str:
    n_ledgers = sum(len(w.reports) for w in rep.worlds)
    n_entries = sum(r.total_rows for w in rep.worlds for r in w.reports)
    n_receipts = sum(len(w.receipts) for w in rep.worlds)
    verdict = "PASSED" if rep.ok else f"FAILED ({len(rep.findings)} finding{'s' if len(rep.findings) != 1 else ''})"
    return (f"audit {verdict}: {len(rep.worlds)} world(s), {n_ledgers} ledgers, {n_entries} entries, "
            f"{n_receipts} receipt copies" + (f", {len(rep.keys)} pinned keys" if rep.keys else ", keys not pinned"))

