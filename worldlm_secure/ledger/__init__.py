"""The privacy ledger: one append-only, hash-chained, Ed25519-signed SQLite file per node.

- `Ledger(path, identity).append(LedgerEntry(...), policy_document=eff.canonical_json()) -> LedgerEntry`
- `verify(path, expected_public_key=None) -> VerifyReport` (chain, signatures, head, policies, ε recomputed)
- `read_entries(path)`, `export_jsonl(path)`, `report(paths, out_html)`
- `release_entry(..., charge=tracker.charge(z_eff, q))`: an entry from a BudgetTracker `Charge` + the release's facts
"""

from worldlm_secure.ledger.entry import GENESIS_HASH, LedgerEntry, canonical_json
from worldlm_secure.ledger.records import code_version, release_entry
from worldlm_secure.ledger.html_report import report
from worldlm_secure.ledger.store import Ledger, export_jsonl, ledger_path, read_entries, read_ledger_file
from worldlm_secure.ledger.verification import Problem, VerifyReport, verify

__all__ = [
    "GENESIS_HASH",
    "Ledger",
    "LedgerEntry",
    "Problem",
    "VerifyReport",
    "canonical_json",
    "export_jsonl",
    "ledger_path",
    "code_version",
    "release_entry",
    "report",
    "read_entries",
    "read_ledger_file",
    "verify",
]
