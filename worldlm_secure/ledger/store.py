"""The append-only ledger of one node: SQLite (WAL, synchronous=FULL), one transaction per entry.

Tables: `meta` (node, public key, format, created, and since format 2 `meta_signature` over them),
`entries` (seq, release_id UNIQUE, canonical body, entry_hash, signature), `head` (entry count and
last hash, signed: a deleted last entry is detected; since format 2 the signed `body` also lists
every stored policy document's hash and the receipts chain's length and last hash), `policies`
(sha256 -> canonical JSON of the effective policy, when given), `receipts` (format 2: a hash chain
of countersigned ledger heads this node issued as a parent or holds as a child; see receipts.py).
`append` runs under BEGIN IMMEDIATE: it reads the previous hash, seals and signs the entry,
inserts it and moves the head in ONE transaction, so a kill -9 at any point leaves either
the old ledger or the new one, never half an entry.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import os
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from worldlm_secure.errors import BudgetExceeded, LedgerError
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.ledger.entry import POST_PROCESSING, GENESIS_HASH, LedgerEntry, entry_from_body

FORMAT_V1 = "worldlm-secure-ledger/1"  # unsigned meta, head = count + last hash; still verified
FORMAT = "worldlm-secure-ledger/2"  # signed meta, head also covers policy documents and receipts
FORMATS = (FORMAT_V1, FORMAT)
HEAD_CONTEXT = b"worldlm-secure ledger head v1\n"
HEAD_CONTEXT_V2 = b"worldlm-secure ledger head v2\n"
META_CONTEXT = b"worldlm-secure ledger meta v1\n"
META_FIELDS = ("created", "format", "node", "public_key")
DP_LEVELS = ("user", "record", "none")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY, release_id TEXT NOT NULL UNIQUE, body BLOB NOT NULL,
    entry_hash TEXT NOT NULL, signature TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS head (id INTEGER PRIMARY KEY CHECK (id = 0), count INTEGER NOT NULL,
    entry_hash TEXT NOT NULL, signature TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS policies (sha256 TEXT PRIMARY KEY, document BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS receipts (seq INTEGER PRIMARY KEY, receipt_id TEXT NOT NULL UNIQUE,
    body BLOB NOT NULL, row_hash TEXT NOT NULL);
"""


def ledger_path(out_dir: Path | str, node: str) -> Path:
    """Where simulate keeps a node's ledger: DIR/ledgers/NODE.sqlite."""
    return Path(out_dir) / "ledgers" / f"{node}.sqlite"


def head_message(count: int, entry_hash: str) -> bytes:
    """What a format-1 head signature covers: the entry count and the last entry's hash."""
    return HEAD_CONTEXT + f"{count}:{entry_hash}".encode()


def head_message_v2(body: str) -> bytes:
    """What a format-2 head signature covers: the canonical JSON `body` (see `head_body`)."""
    return HEAD_CONTEXT_V2 + body.encode()


def head_body(count: int, entry_hash: str, policies: list[str], receipts: int, receipt_hash: str) -> str:
    """The signed state of a format-2 ledger: entries (count, last hash), the hashes of every stored policy
    document (sorted), and the receipts chain (count, last row hash)."""
    from worldlm_secure.ledger.entry import canonical_json

    return canonical_json({
        "count": count, "entry_hash": entry_hash, "policies": sorted(policies),
        "receipts": receipts, "receipt_hash": receipt_hash,
    }).decode()


def meta_message(meta: dict[str, str]) -> bytes:
    """What `meta_signature` covers: format, node, public key and creation time."""
    from worldlm_secure.ledger.entry import canonical_json

    return META_CONTEXT + canonical_json({k: meta.get(k, "") for k in META_FIELDS})


def _meta_rows(identity: NodeIdentity, created: str) -> list[tuple[str, str]]:
    meta = {"format": FORMAT, "node": identity.name, "public_key": identity.public_bytes.hex(), "created": created}
    meta["meta_signature"] = identity.sign(meta_message(meta)).hex()
    return sorted(meta.items())


def _create(path: Path, identity: NodeIdentity) -> None:
    """Create an empty ledger for ``identity`` atomically: schema and meta go into a hidden temp file
    that is fsynced and renamed into place, so a crash during creation leaves no ledger or a complete
    empty one, never a file without its meta (which `verify` would have to reject)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.creating")
    tmp.unlink(missing_ok=True)
    con = sqlite3.connect(str(tmp))
    try:
        con.executescript(_SCHEMA)
        _add_head_body(con)
        now = dt.datetime.now(dt.timezone.utc).isoformat()
        con.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", _meta_rows(identity, now))
        con.commit()
    finally:
        con.close()
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


def _add_head_body(con: sqlite3.Connection) -> None:
    """Format 2's head has a `body` column (the signed JSON state); add it to a format-1 file."""
    cols = [r[1] for r in con.execute("PRAGMA table_info(head)")]
    if "body" not in cols:
        con.execute("ALTER TABLE head ADD COLUMN body TEXT NOT NULL DEFAULT ''")


def _connect(path: Path) -> sqlite3.Connection:
    # Shared between threads under `Ledger._lock` (an aggregator countersigns in its server's threads).
    con = sqlite3.connect(str(path), isolation_level=None, timeout=30.0, check_same_thread=False)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    return con


@dataclass(frozen=True)
class Row:
    """One stored entry as it is on disk (before any checking)."""

    seq: int
    release_id: str
    body: bytes
    entry_hash: str
    signature: str


@dataclass(frozen=True)
class LedgerFile:
    """Everything stored in a ledger file, unverified."""

    path: Path
    meta: dict[str, str]
    rows: tuple[Row, ...]
    head: tuple[int, str, str] | None  # (count, entry_hash, signature)
    policies: dict[str, bytes]
    head_body: str = ""  # format 2: the signed JSON state (`head_body`); "" in format 1
    receipts: tuple[tuple[int, str, bytes, str], ...] = ()  # (seq, receipt_id, body, row_hash)

    @property
    def format(self) -> str:
        return self.meta.get("format", "")


def read_ledger_file(path: Path | str) -> LedgerFile:
    """Read a ledger without modifying it (raises LedgerError if it is not a ledger)."""
    path = Path(path)
    if not path.is_file():
        raise LedgerError(f"{path}: no such ledger file; pass the NODE.sqlite path written by the node")
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0)
        try:
            meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
            rows = tuple(
                Row(int(s), str(r), bytes(b), str(h), str(g))
                for s, r, b, h, g in con.execute(
                    "SELECT seq, release_id, body, entry_hash, signature FROM entries ORDER BY seq"
                )
            )
            head_cols = [r[1] for r in con.execute("PRAGMA table_info(head)")]
            head_row = con.execute(
                "SELECT count, entry_hash, signature" + (", body" if "body" in head_cols else "") + " FROM head WHERE id = 0"
            ).fetchone()
            policies = {str(k): bytes(v) for k, v in con.execute("SELECT sha256, document FROM policies")}
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            receipts = tuple(
                (int(q), str(i), bytes(b), str(h))
                for q, i, b, h in con.execute("SELECT seq, receipt_id, body, row_hash FROM receipts ORDER BY seq")
            ) if "receipts" in tables else ()
        finally:
            con.close()
        head = (int(head_row[0]), str(head_row[1]), str(head_row[2])) if head_row else None
    except sqlite3.DatabaseError as exc:
        raise LedgerError(f"{path}: not a readable ledger database ({exc})") from None
    except (TypeError, ValueError) as exc:  # e.g. a BLOB column rewritten as TEXT: a damaged ledger, not a crash
        raise LedgerError(f"{path}: a column holds a value of the wrong type ({exc}); the file was altered") from None
    body = str(head_row[3]) if head_row is not None and len(head_row) > 3 else ""
    return LedgerFile(path, meta, rows, head, policies, body, receipts)


def read_entries(path: Path | str) -> list[LedgerEntry]:
    """Decode every entry (no verification; use `verify` for that)."""
    lf = read_ledger_file(path)
    out = []
    for r in lf.rows:
        try:
            out.append(entry_from_body(r.body, r.entry_hash, r.signature))
        except LedgerError as exc:
            raise LedgerError(f"{lf.path}: entry {r.seq}: {exc}; run `worldlm-secure ledger verify`") from None
    return out


def export_jsonl(path: Path | str) -> Iterator[str]:
    """One canonical JSON line per entry, every field included (signature, hashes, public key)."""
    from worldlm_secure.ledger.entry import canonical_json

    for e in read_entries(path):
        yield canonical_json(e.to_dict()).decode()


class Ledger:
    """The node's own ledger, opened for appending with its signing identity. Thread-safe: every use of its
    connection holds one lock (a node's aggregator countersigns receipts in server threads while its main
    thread appends)."""

    def __init__(self, path: Path | str, identity: NodeIdentity, *, base_hash: str | None = None) -> None:
        """``base_hash``: the SHA-256 of the base weights this node loaded; `append` seals it into every
        entry that does not carry one, and refuses an entry that names another."""
        self.path = Path(path)
        self.identity = identity
        self.base_hash = base_hash.lower() if base_hash else None
        self._lock = threading.RLock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            _create(self.path, identity)
        self._con = _connect(self.path)
        pk = identity.public_bytes.hex()
        self._con.execute("BEGIN IMMEDIATE")
        try:
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    self._con.execute(stmt)
            meta = dict(self._con.execute("SELECT key, value FROM meta").fetchall())
            if not meta:
                now = dt.datetime.now(dt.timezone.utc).isoformat()
                _add_head_body(self._con)
                self._con.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", _meta_rows(identity, now))
            elif meta.get("public_key") != pk or meta.get("node") != identity.name:
                raise LedgerError(
                    f"{self.path}: ledger belongs to node {meta.get('node')!r} with key {meta.get('public_key', '')[:16]}…, "
                    f"not {identity.name!r} with key {pk[:16]}…; use that node's key or a new ledger path"
                )
            elif meta.get("format") == FORMAT_V1:
                # Upgrade in place (the owner holds the key): sign the meta and re-sign the head in format 2.
                # The entries are untouched, so everything format 1 verified still verifies.
                _add_head_body(self._con)
                self._con.execute("DELETE FROM meta WHERE key IN ('format', 'meta_signature')")
                rows = _meta_rows(identity, meta.get("created", ""))
                self._con.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", rows)
                self._write_head()
            self._con.execute("COMMIT")
        except BaseException:
            self._con.execute("ROLLBACK")
            raise

    @property
    def public_key_hex(self) -> str:
        return self.identity.public_bytes.hex()

    def close(self) -> None:
        with self._lock:
            self._con.close()

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def entries(self) -> list[LedgerEntry]:
        with self._lock:
            return list(self._iter())

    def _iter(self) -> Iterator[LedgerEntry]:
        for body, h, sig in self._con.execute("SELECT body, entry_hash, signature FROM entries ORDER BY seq"):
            yield entry_from_body(bytes(body), h, sig)

    def get(self, release_id: str) -> LedgerEntry | None:
        with self._lock:
            row = self._con.execute(
                "SELECT body, entry_hash, signature FROM entries WHERE release_id = ?", (release_id,)
            ).fetchone()
        return entry_from_body(bytes(row[0]), row[1], row[2]) if row else None

    def append(self, entry: LedgerEntry, *, policy_document: str | bytes | None = None) -> LedgerEntry:
        """Seal (seq, prev_hash, timestamp, public key), hash, sign and store `entry` atomically.

        Idempotent by `release_id`: if an entry with that id exists (a restarted node replaying a
        round), the stored entry is returned and nothing is written; if the stored one describes a
        different release (round, group, destination, tensors, stream), LedgerError is raised.
        `policy_document` (the effective policy's canonical JSON) is stored once per hash so
        `verify` can check `policy_sha256`. Raises BudgetExceeded if epsilon_cumulative > epsilon_budget.
        """
        if self.base_hash is not None:
            if not entry.base_hash:
                entry = dataclasses.replace(entry, base_hash=self.base_hash)
            elif entry.base_hash != self.base_hash:
                raise LedgerError(
                    f"{self.path}: entry {entry.release_id!r} names base weights {entry.base_hash} but this node "
                    f"loaded {self.base_hash}; a release of another base is refused"
                )
        _validate(entry, self.path)
        doc = policy_document.encode() if isinstance(policy_document, str) else policy_document
        if doc is not None and hashlib.sha256(doc).hexdigest() != entry.policy_sha256:
            raise LedgerError(
                f"{self.path}: policy_document does not hash to policy_sha256 {entry.policy_sha256[:16]}…; "
                "pass eff.canonical_json() with eff.sha256"
            )
        with self._writing() as con:
            row = con.execute(
                "SELECT body, entry_hash, signature FROM entries WHERE release_id = ?", (entry.release_id,)
            ).fetchone()
            if row is not None:
                con.execute("ROLLBACK")
                old = entry_from_body(bytes(row[0]), row[1], row[2])
                _same_release(old, entry, self.path)
                return old
            last = con.execute("SELECT seq, entry_hash FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
            seq, prev = (int(last[0]) + 1, str(last[1])) if last else (0, GENESIS_HASH)
            sealed = dataclasses.replace(
                entry,
                seq=seq,
                timestamp=dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds"),
                prev_hash=prev,
                public_key=self.public_key_hex,
                entry_hash="",
                signature="",
            )
            h = sealed.compute_hash()
            sig = self.identity.sign(sealed.signed_message()).hex()
            sealed = dataclasses.replace(sealed, entry_hash=h, signature=sig)
            con.execute(
                "INSERT INTO entries (seq, release_id, body, entry_hash, signature) VALUES (?, ?, ?, ?, ?)",
                (seq, entry.release_id, sealed.body_bytes(), h, sig),
            )
            if doc is not None:
                con.execute("INSERT OR IGNORE INTO policies (sha256, document) VALUES (?, ?)", (entry.policy_sha256, doc))
        return sealed

    # ---- the signed head --------------------------------------------------------------------------
    def head(self) -> tuple[int, str]:
        """(entry count, last entry hash) — what a parent countersigns (`receipts.countersign`)."""
        with self._lock:
            last = self._con.execute("SELECT seq, entry_hash FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
        return (int(last[0]) + 1, str(last[1])) if last else (0, GENESIS_HASH)

    def entry_hash_at(self, seq: int) -> str | None:
        """The stored entry_hash of entry `seq` (None when there is no such entry)."""
        with self._lock:
            row = self._con.execute("SELECT entry_hash FROM entries WHERE seq = ?", (seq,)).fetchone()
        return str(row[0]) if row else None

    def _write_head(self) -> None:
        """Re-sign the head from the current state (inside the caller's transaction)."""
        con = self._con
        count, h = self.head()
        policies = [str(r[0]) for r in con.execute("SELECT sha256 FROM policies ORDER BY sha256")]
        last = con.execute("SELECT seq, row_hash FROM receipts ORDER BY seq DESC LIMIT 1").fetchone()
        n_receipts, receipt_hash = (int(last[0]) + 1, str(last[1])) if last else (0, GENESIS_HASH)
        body = head_body(count, h, policies, n_receipts, receipt_hash)
        sig = self.identity.sign(head_message_v2(body)).hex()
        con.execute(
            "INSERT INTO head (id, count, entry_hash, signature, body) VALUES (0, ?, ?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET count = excluded.count, entry_hash = excluded.entry_hash, "
            "signature = excluded.signature, body = excluded.body",
            (count, h, sig, body),
        )

    @contextlib.contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """One write under BEGIN IMMEDIATE: the signed head is rewritten and committed with it; an error
        rolls everything back. A block that finds its write already done rolls back itself (idempotence)."""
        with self._lock:
            con = self._con
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
                if con.in_transaction:
                    self._write_head()
                    con.execute("COMMIT")
            except BaseException:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise

    # ---- receipts (see receipts.py) ---------------------------------------------------------------
    def add_receipt_row(self, receipt_id: str, make_body: "Callable[[int, str], bytes]") -> bytes:
        """Append one row to the receipts chain, idempotent by ``receipt_id``: ``make_body(seq, prev_hash)``
        returns its canonical bytes. Returns the stored body (the earlier one if the id exists)."""
        with self._writing() as con:
            row = con.execute("SELECT body FROM receipts WHERE receipt_id = ?", (receipt_id,)).fetchone()
            if row is not None:
                con.execute("ROLLBACK")
                return bytes(row[0])
            last = con.execute("SELECT seq, row_hash FROM receipts ORDER BY seq DESC LIMIT 1").fetchone()
            seq, prev = (int(last[0]) + 1, str(last[1])) if last else (0, GENESIS_HASH)
            body = make_body(seq, prev)
            con.execute(
                "INSERT INTO receipts (seq, receipt_id, body, row_hash) VALUES (?, ?, ?, ?)",
                (seq, receipt_id, body, hashlib.sha256(body).hexdigest()),
            )
        return body

    def receipt_bodies(self) -> list[bytes]:
        with self._lock:
            return [bytes(r[0]) for r in self._con.execute("SELECT body FROM receipts ORDER BY seq")]

    def receipt_body(self, receipt_id: str) -> bytes | None:
        """The stored receipts row with id ``receipt_id`` (None when there is none)."""
        with self._lock:
            row = self._con.execute("SELECT body FROM receipts WHERE receipt_id = ?", (receipt_id,)).fetchone()
        return bytes(row[0]) if row else None



def _same_release(old: LedgerEntry, new: LedgerEntry, path: Path) -> None:
    keys = ("round", "stream", "source", "destination", "group", "tensor_names", "dp_level")
    diff = [k for k in keys if getattr(old, k) != getattr(new, k)]
    if diff:
        raise LedgerError(
            f"{path}: release_id {new.release_id!r} is already recorded for a different release "
            f"(differs in {', '.join(diff)}); release ids must be unique per release"
        )


def _validate(e: LedgerEntry, path: Path) -> None:
    where = f"{path}: entry {e.release_id!r}"
    if not e.release_id:
        raise LedgerError(f"{where}: release_id must be non-empty (e.g. '3:shared:fed-eu')")
    if e.dp_level not in DP_LEVELS:
        raise LedgerError(f"{where}: dp_level must be one of {DP_LEVELS} (got {e.dp_level!r})")
    if not _HEX64.match(e.policy_sha256):
        raise LedgerError(f"{where}: policy_sha256 must be 64 lowercase hex digits (pass eff.sha256)")
    if e.base_hash and not _HEX64.match(e.base_hash):
        raise LedgerError(f"{where}: base_hash must be empty or 64 lowercase hex digits (model.base_hash)")
    if e.cohort_size < 0 or not 0 <= e.dropouts <= e.cohort_size or e.steps < 0:
        raise LedgerError(f"{where}: need 0 <= dropouts <= cohort_size and steps >= 0")
    if e.mechanism == POST_PROCESSING:
        if e.noise_multiplier != 0.0 or e.epsilon is not None or e.epsilon_cumulative is not None:
            raise LedgerError(f"{where}: a post-processing release adds no noise and spends no ε (record charge=None)")
    elif e.dp_level != "none":
        if e.accountant not in ("rdp", "prv"):
            raise LedgerError(f"{where}: accountant must be rdp or prv for a DP release (got {e.accountant!r})")
        if not (e.noise_multiplier > 0 and 0 < e.sample_rate <= 1 and 0 < e.delta < 1):
            raise LedgerError(f"{where}: a DP release needs noise_multiplier > 0, 0 < sample_rate <= 1, 0 < delta < 1")
        if e.epsilon is None or e.epsilon_cumulative is None:
            raise LedgerError(f"{where}: a DP release needs epsilon and epsilon_cumulative (from BudgetTracker.charge)")
        if e.epsilon_budget is not None and e.epsilon_cumulative > e.epsilon_budget:
            raise BudgetExceeded(
                f"{where}: refusing to record a release over budget: cumulative ε={e.epsilon_cumulative:.4g} "
                f"> budget ε={e.epsilon_budget:.4g} at δ={e.delta:g}; charge the BudgetTracker before releasing"
            )
