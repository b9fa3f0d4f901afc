"""The privacy ledger: one append-only, hash-chained, Ed25519-signed SQLite file per node.

- `Ledger(path, identity).append(LedgerEntry(...), policy_document=eff.canonical_json()) -> LedgerEntry`
- `verify(path, expected_public_key=None, expected_node=None, require_policies=False) -> VerifyReport`
  (meta, chain, signatures, head, every entry against its stored policy, receipts, ε recomputed)
- `audit_ledgers(paths, keys=None) -> AuditReport`: a whole world across nodes (audit.py)
- `receipts.exchange / countersign / hold / issued`: a parent's signed receipt of a child's ledger head
  (in one process, or split over a deployed link: `node.receipts`)
- `Ledger(path, identity, base_hash=...)`: every entry records the base model's weights hash (`base_hash`)
- `read_entries(path)`, `export_jsonl(path)`, `dp_events.export_ledger(path)`, `report(paths, out_html)`
- `release_entry(..., charge=tracker.charge(z_eff, q))`: an entry from a BudgetTracker `Charge` + the release's facts
"""

from worldlm_secure.ledger.entry import GENESIS_HASH, LedgerEntry, canonical_json
from worldlm_secure.ledger.records import code_version, release_entry
from worldlm_secure.ledger.audit import AuditReport, Finding, audit_ledgers, load_keys
from worldlm_secure.ledger.html_report import report
from worldlm_secure.ledger.receipts import Receipt, countersign, exchange, hold
from worldlm_secure.ledger.store import Ledger, export_jsonl, ledger_path, read_entries, read_ledger_file
from worldlm_secure.ledger.verification import Problem, VerifyReport, verify

__all__ = [
    "GENESIS_HASH",
    "AuditReport",
    "Finding",
    "Ledger",
    "LedgerEntry",
    "Problem",
    "Receipt",
    "VerifyReport",
    "audit_ledgers",
    "canonical_json",
    "countersign",
    "exchange",
    "export_jsonl",
    "hold",
    "ledger_path",
    "load_keys",
    "code_version",
    "release_entry",
    "report",
    "read_entries",
    "read_ledger_file",
    "verify",
]
