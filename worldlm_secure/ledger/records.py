"""Build ledger entries from what the engine knows at release time.

`release_entry` takes the `Charge` that `BudgetTracker.charge` returned (ε already checked
against the budget) plus the release's facts; `code_version()` names the running code.
"""

from __future__ import annotations

import functools
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from worldlm_secure import __version__
from worldlm_secure.ledger.entry import ExtraValue, LedgerEntry
from worldlm_secure.privacy.budget import Charge


@functools.cache
def code_version() -> str:
    """`worldlm-secure <version>`, plus `+g<commit>` (and `.dirty`) when running from a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"worldlm-secure {__version__}"
    return f"worldlm-secure {__version__}+g{rev}" if rev else f"worldlm-secure {__version__}"


def release_entry(
    *,
    release_id: str,
    round: int,
    level: str,
    source: str,
    destination: str,
    group: str,
    tensor_names: Sequence[str],
    protocol: str,
    cohort_size: int,
    dropouts: int,
    dp_level: str,
    mechanism: str,
    clipping_norm: float,
    policy_sha256: str,
    charge: Charge | None,
    stream: str | None = None,
    delta: float = 0.0,
    key_id: str = "",
    extra: Mapping[str, ExtraValue] | None = None,
) -> LedgerEntry:
    """An unsealed entry for `Ledger.append`. `charge` is None only when dp_level is "none"
    (then ε fields are None, noise_multiplier 0.0, accountant "none")."""
    if charge is None:
        return LedgerEntry(
            release_id=release_id, round=round, stream=stream or f"{source}/none", level=level, source=source,
            destination=destination, group=group, tensor_names=tuple(tensor_names), protocol=protocol,
            cohort_size=cohort_size, dropouts=dropouts, dp_level=dp_level, mechanism=mechanism,
            clipping_norm=clipping_norm, noise_multiplier=0.0, sample_rate=1.0, steps=0, accountant="none",
            delta=delta, epsilon=None, epsilon_cumulative=None, epsilon_budget=None,
            policy_sha256=policy_sha256, code_version=code_version(), key_id=key_id, extra=dict(extra or {}),
        )
    return LedgerEntry(
        release_id=release_id, round=round, stream=charge.stream, level=level, source=source,
        destination=destination, group=group, tensor_names=tuple(tensor_names), protocol=protocol,
        cohort_size=cohort_size, dropouts=dropouts, dp_level=dp_level, mechanism=mechanism,
        clipping_norm=clipping_norm, noise_multiplier=charge.noise_multiplier, sample_rate=charge.sample_rate,
        steps=charge.steps, accountant=charge.accountant, delta=charge.delta, epsilon=charge.epsilon,
        epsilon_cumulative=charge.epsilon_cumulative, epsilon_budget=charge.epsilon_budget,
        policy_sha256=policy_sha256, code_version=code_version(), key_id=key_id, extra=dict(extra or {}),
    )
