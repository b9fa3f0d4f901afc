"""Verify a ledger: chain, signatures, head, policy hashes, and every ε recomputed.

Checks, entry by entry in seq order, stopping at the first failure (everything after a
broken link is unverifiable):
1. the stored body is canonical JSON of a well-typed entry;
2. its seq is its position, its prev_hash is the previous entry's hash (genesis: 64 zeros);
3. entry_hash = SHA-256(body); the signer is the ledger's key (and the auditor's, if pinned);
   the Ed25519 signature verifies;
4. policy_sha256 is a SHA-256; a stored policy document hashes to it and has the same δ/accountant;
5. ε of the release and cumulative ε of its stream, recomputed with the recorded accountant
   from the recorded (noise_multiplier, sample_rate, steps, δ), agree with the recorded ones,
   and cumulative ε never exceeds the recorded budget;
then the signed head: entry count and last hash (catches deletion of trailing entries).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from worldlm_secure.errors import LedgerError
from worldlm_secure.identity import verify_signature
from worldlm_secure.ledger.entry import POST_PROCESSING, GENESIS_HASH, LedgerEntry, entry_from_body
from worldlm_secure.ledger.store import FORMAT, head_message, read_ledger_file
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


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=EPS_REL_TOL, abs_tol=1e-12)


def verify(path: Path | str, *, expected_public_key: str | None = None, recompute: bool = True) -> VerifyReport:
    """Verify one ledger file. `expected_public_key` (hex) pins the node key the auditor trusts."""
    lf = read_ledger_file(path)
    node, pk = lf.meta.get("node", ""), lf.meta.get("public_key", "")
    good: list[LedgerEntry] = []
    spent: dict[str, float] = {}

    def report(problem: Problem | None) -> VerifyReport:
        return VerifyReport(lf.path, node, pk, tuple(good), len(lf.rows), problem, dict(spent))

    if lf.meta.get("format") != FORMAT:
        return report(Problem(None, "", f"not a {FORMAT} file (format {lf.meta.get('format')!r})"))
    if expected_public_key is not None and pk != expected_public_key.lower():
        return report(Problem(None, "", f"ledger key {pk[:16]}… is not the expected key {expected_public_key[:16]}…"))
    try:
        pk_bytes = bytes.fromhex(pk)
    except ValueError:
        return report(Problem(None, "", "meta.public_key is not hex"))

    histories: dict[str, list[MechanismStep]] = {}
    curves: dict[str, list[float]] = {}
    stream_params: dict[str, tuple[float, str]] = {}
    checked_policies: dict[str, str | None] = {}
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
        try:
            sig = bytes.fromhex(e.signature)
        except ValueError:
            return bad("signature is not hex", e)
        if not verify_signature(pk_bytes, sig, e.signed_message()):
            return bad("signature does not verify under the ledger's public key", e)
        why = _check_policy(e, lf.policies, checked_policies)
        if why:
            return bad(why, e)
        # post-processing entries (a federation releasing what it computed from DP-noised aggregates)
        # spend no budget: there is no ε to recompute.
        if recompute and e.dp_level != "none" and e.mechanism != POST_PROCESSING:
            why = _check_epsilon(e, histories, curves, stream_params)
            if why:
                return bad(why, e)
            spent[e.stream] = float(e.epsilon_cumulative or 0.0)
        good.append(e)
        prev = row.entry_hash

    if lf.head is None:
        if lf.rows:
            return report(Problem(None, "", "head record missing: the ledger's signed entry count is gone"))
        return report(None)
    count, head_hash, head_sig = lf.head
    if not verify_signature(pk_bytes, bytes.fromhex(head_sig) if _is_hex(head_sig) else b"", head_message(count, head_hash)):
        return report(Problem(None, "", "head signature does not verify (entry count / last hash were altered)"))
    if count != len(lf.rows) or head_hash != prev:
        missing = count - len(lf.rows)
        what = (
            f"entries {len(lf.rows)}..{count - 1} are missing: the signed head records {count} entries"
            if missing > 0
            else f"the signed head records {count} entries ending in {head_hash[:16]}…, the file has {len(lf.rows)}"
        )
        return report(Problem(len(lf.rows) if missing > 0 else None, "", what))
    return report(None)


def _is_hex(s: str) -> bool:
    try:
        bytes.fromhex(s)
        return True
    except ValueError:
        return False


def _check_policy(e: LedgerEntry, policies: dict[str, bytes], cache: dict[str, str | None]) -> str | None:
    sha = e.policy_sha256
    if len(sha) != 64 or not _is_hex(sha):
        return f"policy_sha256 {sha!r} is not a SHA-256 hex digest"
    doc = policies.get(sha)
    if doc is None:
        return None
    if sha not in cache:
        cache[sha] = None
        if hashlib.sha256(doc).hexdigest() != sha:
            cache[sha] = "the stored policy document does not hash to policy_sha256"
        else:
            try:
                cache[sha] = json.dumps(json.loads(doc).get("differential_privacy") or {})
            except (ValueError, AttributeError):
                cache[sha] = "the stored policy document is not JSON"
    dp_or_err = cache[sha]
    if dp_or_err is None or not dp_or_err.startswith("{"):
        return dp_or_err
    dp = json.loads(dp_or_err)
    # post-processing has no accountant; user- and record-level streams both use the policy's δ and accountant
    if e.dp_level in ("user", "record") and e.mechanism != POST_PROCESSING:
        if dp.get("delta") is not None and not _close(float(dp["delta"]), e.delta):
            return f"delta {e.delta} differs from the policy's {dp['delta']}"
        if dp.get("accountant") and dp["accountant"] != e.accountant:
            return f"accountant {e.accountant} differs from the policy's {dp['accountant']}"
    return None


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
