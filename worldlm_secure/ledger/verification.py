"""Verify a ledger: meta, chain, signatures, head, policies, receipts, and every ε recomputed.

First the file: its format, the signed meta (format 2: node, key, format, created), the pinned key
and node name if the auditor gives them. Then, entry by entry in seq order, stopping at the first
failure (everything after a broken link is unverifiable):
1. the stored body is canonical JSON of a well-typed entry;
2. its seq is its position, its prev_hash is the previous entry's hash (genesis: 64 zeros);
3. entry_hash = SHA-256(body); the signer is the ledger's key (and the auditor's, if pinned);
   the Ed25519 signature verifies; its `source` is the ledger's node;
4. the entry is one the writer could have produced (entry_rules.py: one entry per release id, the member's
   one stream per level, steps, refusals, record-level companions); policy_sha256 is a SHA-256; the stored policy document hashes to it, and the entry obeys it
   (budget, clip, mechanism, δ, accountant, protocols, min_cohort, destinations, layers: policy_rules.py);
   with `require_policies` an entry without its document fails; every entry that records the base weights'
   hash (`base_hash`) names the same one;
5. the noise was sized for the release's sensitivity: a recorded `extra.noise_sensitivity` is at least
   S (clip, or C_t·z_Δ/z with adaptive clipping) + `extra.quantization_slack`, and under central noise on a
   quantizing protocol the slack is at least what the protocol implies (noise_rules.py, protocols/dp.md §2.8);
6. ε of the release and cumulative ε of its stream, recomputed with the recorded accountant
   from the recorded (noise_multiplier, sample_rate, steps, δ), agree with the recorded ones,
   and cumulative ε never exceeds the recorded budget;
then the signed head: entry count and last hash (catches deletion of trailing entries), and in
format 2 the set of stored policy documents (catches a deleted policy row) and the receipts chain,
whose every receipt must be signed by its parent and name this ledger's entries.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from worldlm_secure.errors import LedgerError
from worldlm_secure.identity import is_canonical_hex, verify_hex_signature
from worldlm_secure.ledger.entry import POST_PROCESSING, GENESIS_HASH, LedgerEntry, entry_from_body
from worldlm_secure.ledger.entry_rules import check_kind
from worldlm_secure.ledger.noise_rules import check_noise_sensitivity, unrecorded
from worldlm_secure.ledger.policy_rules import check_entry, is_refusal
from worldlm_secure.ledger.receipts import HELD, ISSUED, ReceiptRow, decode_row
from worldlm_secure.ledger.store import (
    FORMAT, FORMAT_V1, FORMATS, LedgerFile, head_message, head_message_v2, meta_message, read_ledger_file,
)
from worldlm_secure.privacy.accountant import MechanismStep, epsilon_from_rdp, epsilon_of, rdp_curve

EPS_REL_TOL = 1e-6  # recomputation must agree to this relative precision (same code, same inputs)


@dataclass(frozen=True)
class Problem:
    """The first thing wrong with a ledger, naming the entry (seq None: the file or its head)."""

    seq: int | None
    release_id: str
    what: str

    def __str__(self) -> str:
        if self.seq is None:
            return self.what
        rid = f" ({self.release_id})" if self.release_id else ""
        return f"entry {self.seq}{rid}: {self.what}"


@dataclass(frozen=True)
class VerifyReport:
    """Outcome of verifying one ledger file."""

    path: Path
    node: str
    public_key: str
    entries: tuple[LedgerEntry, ...]  # the entries that verified (all of them when ok)
    total_rows: int
    problem: Problem | None
    spent: dict[str, float] = field(default_factory=dict)  # stream -> cumulative ε (verified)
    format: str = ""
    receipts: tuple[ReceiptRow, ...] = ()  # the receipts chain (all rows when ok)
    policies: dict[str, dict] = field(default_factory=dict)  # sha256 -> stored effective policy (parsed)
    notes: tuple[str, ...] = ()  # what could not be checked (e.g. a format-1 file has no signed meta)

    @property
    def ok(self) -> bool:
        return self.problem is None

    def summary(self) -> str:
        if self.ok:
            budgets = {e.stream: e.epsilon_budget for e in self.entries}
            spent = "; ".join(
                f"{s} ε={eps:.4g}" + (f"/{budgets[s]:.4g}" if budgets.get(s) is not None else "")
                for s, eps in self.spent.items()
            )
            return (
                f"{self.path}: OK — {self.total_rows} entries, node {self.node}, key {self.public_key[:16]}…"
                + (f", spent {spent}" if spent else "")
            )
        return f"{self.path}: FAILED — {self.problem}"

    def to_dict(self) -> dict[str, object]:
        """The report as JSON-ready data (`ledger verify --json`): `findings` holds the first problem, if any."""
        p = self.problem
        return {
            "path": str(self.path), "node": self.node, "ok": self.ok, "format": self.format,
            "entries": self.total_rows, "verified_entries": len(self.entries), "receipts": len(self.receipts),
            "public_key": self.public_key, "spent": dict(self.spent),
            "findings": [] if p is None else [{"seq": p.seq, "release_id": p.release_id, "what": p.what,
                                               "message": str(p)}],
            "notes": list(self.notes),
        }


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=EPS_REL_TOL, abs_tol=1e-12)


def verify(
    path: Path | str,
    *,
    expected_public_key: str | None = None,
    expected_node: str | None = None,
    recompute: bool = True,
    require_policies: bool = False,
) -> VerifyReport:
    """Verify one ledger file.

    `expected_public_key` (hex) pins the node key the auditor trusts; `expected_node` the node the file
    must belong to (the CLI passes the file's NAME of NAME.sqlite). `require_policies`: an entry whose
    effective policy document is not stored fails (it cannot be checked against its policy); off by
    default for ledgers written without documents by tests and tools, on in `ledger verify` and `audit`.
    """
    lf = read_ledger_file(path)
    node, pk = lf.meta.get("node", ""), lf.meta.get("public_key", "")
    good: list[LedgerEntry] = []
    by_id: dict[str, LedgerEntry] = {}  # this ledger's entries so far, by release id (`entry_rules.check_kind`)
    spent: dict[str, float] = {}
    receipts: list[ReceiptRow] = []
    notes: list[str] = []
    parsed: dict[str, dict] = {}

    def report(problem: Problem | None) -> VerifyReport:
        return VerifyReport(lf.path, node, pk, tuple(good), len(lf.rows), problem, dict(spent), lf.format,
                            tuple(receipts), dict(parsed), tuple(notes))

    def file_problem(what: str) -> VerifyReport:
        return report(Problem(None, "", what))

    if lf.format not in FORMATS:
        return file_problem(f"not a {FORMAT} file (format {lf.meta.get('format')!r})")
    if not is_canonical_hex(pk):
        return file_problem("meta.public_key is not lowercase hex")
    if lf.format == FORMAT:
        msig = lf.meta.get("meta_signature", "")
        if not verify_hex_signature(pk, msig, meta_message(lf.meta)):
            return file_problem("meta (node, format, key) was changed: its signature does not verify")
    else:
        notes.append("format 1: the meta (node, key) is not signed; it is checked against every entry's signed source")
    if expected_node is not None and node != expected_node:
        return file_problem(f"ledger belongs to node {node!r}, not {expected_node!r} (a renamed or swapped ledger file)")
    if expected_public_key is not None and pk != expected_public_key.lower():
        return file_problem(f"ledger key {pk[:16]}… is not the expected key {expected_public_key[:16]}…")

    histories: dict[str, list[MechanismStep]] = {}
    curves: dict[str, list[float]] = {}
    stream_params: dict[str, tuple[float, str]] = {}
    docs: dict[str, dict | str] = {}  # sha -> parsed document, or why it is unusable
    base: LedgerEntry | None = None  # the first entry that names its base weights
    unsized: list[LedgerEntry] = []  # central noise on a quantizing protocol, no noise_sensitivity recorded
    prev = GENESIS_HASH
    for pos, row in enumerate(lf.rows):
        def bad(what: str, e: LedgerEntry | None = None) -> VerifyReport:
            return report(Problem(pos, e.release_id if e else row.release_id, what))

        try:
            e = entry_from_body(row.body, row.entry_hash, row.signature)
        except LedgerError as exc:
            return bad(f"malformed: {exc}")
        if row.seq > pos and e.seq == row.seq:
            return bad(f"missing: the next stored entry is seq {row.seq}", e)
        if row.seq != pos or e.seq != pos:
            return bad(f"out of order: position {pos} holds row seq {row.seq} whose body says seq {e.seq}", e)
        if e.release_id != row.release_id:
            return bad("release_id column does not match the signed body", e)
        if e.prev_hash != prev:
            return bad(f"chain broken: prev_hash {e.prev_hash[:16]}… is not the previous entry's hash {prev[:16]}…", e)
        if hashlib.sha256(row.body).hexdigest() != row.entry_hash:
            return bad("content changed: SHA-256 of the body does not match entry_hash", e)
        if e.public_key != pk:
            return bad(f"signed by key {e.public_key[:16]}…, not this ledger's key {pk[:16]}…", e)
        if not is_canonical_hex(e.signature):
            return bad("signature is not lowercase hex", e)
        if not verify_hex_signature(pk, e.signature, e.signed_message()):
            return bad("signature does not verify under the ledger's public key", e)
        if e.source != node:
            return bad(f"signed source {e.source!r} is not this ledger's node {node!r} (meta.node changed?)", e)
        if e.base_hash and not _is_hex64(e.base_hash):
            return bad(f"base_hash {e.base_hash[:20]!r} is not a SHA-256", e)
        if e.base_hash and base is not None and e.base_hash != base.base_hash:
            return bad(f"base_hash {e.base_hash[:16]}… differs from entry {base.seq}'s {base.base_hash[:16]}…: "
                       "one node released updates of two different base models", e)
        if e.base_hash and base is None:
            base = e
        why = check_kind(e, by_id) or _check_policy(e, lf.policies, docs, require_policies)
        if why:
            return bad(why, e)
        by_id[e.release_id] = e
        # post-processing entries (a federation releasing what it computed from DP-noised aggregates)
        # spend no budget, and refusals released nothing: there is no ε to recompute.
        if e.dp_level != "none" and e.mechanism != POST_PROCESSING and not is_refusal(e):
            doc = docs.get(e.policy_sha256)
            why = check_noise_sensitivity(e, doc if isinstance(doc, dict) else None)
            if why:
                return bad(why, e)
            if unrecorded(e):
                unsized.append(e)
        if recompute and e.dp_level != "none" and e.mechanism != POST_PROCESSING and not is_refusal(e):
            why = _check_epsilon(e, histories, curves, stream_params)
            if why:
                return bad(why, e)
            spent[e.stream] = float(e.epsilon_cumulative or 0.0)
        good.append(e)
        prev = row.entry_hash
    parsed.update({k: v for k, v in docs.items() if isinstance(v, dict)})
    if unsized:
        notes.append(
            f"{len(unsized)} {'entry' if len(unsized) == 1 else 'entries'} under central noise on a quantizing "
            "protocol record no noise_sensitivity "
            f"(first: entry {unsized[0].seq} ({unsized[0].release_id})): what their noise was sized at cannot be "
            "checked (protocols/dp.md §2.8)"
        )

    if lf.head is None:
        if lf.rows or lf.receipts:
            return file_problem("head record missing: the ledger's signed entry count is gone")
        if lf.policies:
            return file_problem("policy documents are stored but no signed head lists them")
        return report(None)
    count, head_hash, head_sig = lf.head
    if lf.format == FORMAT_V1:
        if not verify_hex_signature(pk, head_sig, head_message(count, head_hash)):
            return file_problem("head signature does not verify (entry count / last hash were altered)")
        signed_policies: list[str] | None = None
        n_receipts, receipt_hash = 0, GENESIS_HASH
    else:
        if not verify_hex_signature(pk, head_sig, head_message_v2(lf.head_body)):
            return file_problem("head signature does not verify (entry count / last hash / policies / receipts were altered)")
        try:
            hb = json.loads(lf.head_body)
            signed_policies = list(hb["policies"])
            n_receipts, receipt_hash = int(hb["receipts"]), str(hb["receipt_hash"])
            if (int(hb["count"]), str(hb["entry_hash"])) != (count, head_hash):
                return file_problem("head columns do not match the signed head")
        except (ValueError, KeyError, TypeError):
            return file_problem("the signed head is not valid JSON")
    if count != len(lf.rows) or head_hash != prev:
        missing = count - len(lf.rows)
        what = (
            f"entries {len(lf.rows)}..{count - 1} are missing: the signed head records {count} entries"
            if missing > 0
            else f"the signed head records {count} entries ending in {head_hash[:16]}…, the file has {len(lf.rows)}"
        )
        return report(Problem(len(lf.rows) if missing > 0 else None, "", what))
    if signed_policies is not None:
        gone = sorted(set(signed_policies) - set(lf.policies))
        if gone:
            user = next((e for e in good if e.policy_sha256 == gone[0]), None)
            what = f"policy document {gone[0][:16]}… was deleted (the signed head lists it)"
            return report(Problem(user.seq, user.release_id, what) if user else Problem(None, "", what))
        added = sorted(set(lf.policies) - set(signed_policies))
        if added:
            return file_problem(f"policy document {added[0][:16]}… was added after the head was signed")
    why = _check_receipts(lf, node, pk, good, receipts)
    if why:
        return file_problem(why)
    if lf.format == FORMAT and (len(lf.receipts), lf.receipts[-1][3] if lf.receipts else GENESIS_HASH) != (n_receipts, receipt_hash):
        return file_problem(
            f"receipts: the signed head records {n_receipts} receipts, the file has {len(lf.receipts)} "
            "(receipts were deleted or added)"
        )
    return report(None)


def _check_receipts(lf: LedgerFile, node: str, pk: str, entries: list[LedgerEntry], out: list[ReceiptRow]) -> str | None:
    """The receipts chain: canonical rows, chained, each receipt signed by its parent and about this node."""
    prev = GENESIS_HASH
    for pos, (seq, rid, body, row_hash) in enumerate(lf.receipts):
        where = f"receipt {pos}"
        try:
            row = decode_row(body)
        except LedgerError as exc:
            return f"{where}: malformed: {exc}"
        r = row.receipt
        if seq != pos or row.seq != pos:
            return f"{where}: out of order or missing (row seq {seq}, body seq {row.seq})"
        if row.prev_hash != prev:
            return f"{where}: chain broken (prev_hash {row.prev_hash[:16]}…)"
        if hashlib.sha256(body).hexdigest() != row_hash:
            return f"{where}: content changed (SHA-256 of the row does not match row_hash)"
        if rid != r.receipt_id(row.role):
            return f"{where}: receipt_id column does not match the row"
        if row.role == ISSUED and (r.parent != node or r.parent_public_key != pk):
            return f"{where} ({r.release_id}): issued by {r.parent!r}, not by this ledger's node {node!r} and key"
        if row.role == HELD:
            if r.child != node or r.child_public_key != pk:
                return f"{where} ({r.release_id}): held for {r.child!r}, not this ledger's node {node!r} and key"
            if r.child_count > len(entries) or (r.child_count and entries[r.child_count - 1].entry_hash != r.child_entry_hash):
                return (f"{where} ({r.release_id}): {r.parent} countersigned this ledger at {r.child_count} entries ending "
                        f"in {r.child_entry_hash[:16]}…, which this ledger does not have (rolled back or rewritten)")
        if not r.verify_signature():
            return f"{where} ({r.release_id}): the parent {r.parent!r}'s signature does not verify"
        out.append(row)
        prev = row_hash
    return None


def _is_hex64(s: str) -> bool:
    return len(s) == 64 and all(c in "0123456789abcdef" for c in s)


def _check_policy(e: LedgerEntry, policies: dict[str, bytes], docs: dict[str, dict | str], require: bool) -> str | None:
    sha = e.policy_sha256
    if len(sha) != 64 or not is_canonical_hex(sha):
        return f"policy_sha256 {sha!r} is not a SHA-256 hex digest"
    raw = policies.get(sha)
    if raw is None:
        if require:
            return f"no policy document stored for policy_sha256 {sha[:16]}…: the entry cannot be checked against its policy"
        return None
    if sha not in docs:
        if hashlib.sha256(raw).hexdigest() != sha:
            docs[sha] = "the stored policy document does not hash to policy_sha256"
        else:
            try:
                doc = json.loads(raw)
                docs[sha] = doc if isinstance(doc, dict) else "the stored policy document is not a JSON object"
            except ValueError:
                docs[sha] = "the stored policy document is not JSON"
    doc_or_err = docs[sha]
    if isinstance(doc_or_err, str):
        return doc_or_err
    return check_entry(e, doc_or_err)


def _check_epsilon(
    e: LedgerEntry,
    histories: dict[str, list[MechanismStep]],
    curves: dict[str, list[float]],
    stream_params: dict[str, tuple[float, str]],
) -> str | None:
    if e.epsilon is None or e.epsilon_cumulative is None:
        return "a DP release without epsilon / epsilon_cumulative"
    params = stream_params.setdefault(e.stream, (e.delta, e.accountant))
    if params != (e.delta, e.accountant):
        return f"stream {e.stream!r} changed δ/accountant mid-stream ({params} -> {(e.delta, e.accountant)})"
    step = MechanismStep(e.noise_multiplier, e.sample_rate, e.steps)
    try:
        alone = epsilon_of([step], e.delta, e.accountant)
        hist = histories.setdefault(e.stream, [])
        curve = None
        if e.accountant == "rdp":  # replay incrementally: RDP curves add
            curve = rdp_curve([step], curves.get(e.stream))
            cumulative = epsilon_from_rdp(curve, e.delta)
        else:
            cumulative = epsilon_of([*hist, step], e.delta, e.accountant)
    except LedgerError as exc:  # pragma: no cover - accountant errors are PolicyErrors
        return str(exc)
    except Exception as exc:  # a bad recorded parameter (e.g. sample_rate 0) makes the accountant refuse
        return f"ε cannot be recomputed from the recorded parameters ({exc})"
    if not _close(alone, e.epsilon):
        return f"recorded ε={e.epsilon!r} but the {e.accountant} accountant gives {alone!r} for these parameters"
    if not _close(cumulative, e.epsilon_cumulative):
        return (
            f"recorded cumulative ε={e.epsilon_cumulative!r} but replaying stream {e.stream!r} "
            f"gives {cumulative!r}"
        )
    if e.epsilon_budget is not None and e.epsilon_cumulative > e.epsilon_budget:
        return f"cumulative ε={e.epsilon_cumulative:.4g} exceeds the budget ε={e.epsilon_budget:.4g}"
    hist.append(step)
    if curve is not None:
        curves[e.stream] = curve
    return None
