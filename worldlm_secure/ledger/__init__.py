"""The privacy ledger: one append-only, hash-chained, Ed25519-signed SQLite file per node.

- `Ledger(path, identity).append(LedgerEntry(...), policy_document=eff.canonical_json()) -> LedgerEntry`
- `verify(path, expected_public_key=None) -> VerifyReport` (chain, signatures, head, policies, ε recomputed)
- `read_entries(path)`, `export_jsonl(path)`, `report(paths, out_html)`
- `entry_for_release(...)`: build an entry from a BudgetTracker `Charge` and the release's facts
"""

from worldlm_secure.ledger.entry import GENESIS_HASH, LedgerEntry, canonical_json
from worldlm_secure.ledger.store import Ledger, read_entries, read_ledger_file
from worldlm_secure.ledger.verify import Problem, VerifyReport, verify

__all__ = [
    "GENESIS_HASH",
    "Ledger",
    "LedgerEntry",
    "Problem",
    "VerifyReport",
    "canonical_json",
    "read_entries",
    "read_ledger_file",
    "verify",
]
