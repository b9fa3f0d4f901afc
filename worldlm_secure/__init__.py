"""worldlm-secure: train language models as a federation of federations, with enforced privacy.

The library surface (what the command line calls):

    from worldlm_secure import load_world, simulate, run_study, verify_ledger, audit_ledgers, start_node

Names load on first use (PEP 562): `import worldlm_secure` imports neither torch nor any other heavy
package, so the command line's light commands stay fast (tests/test_cli_imports.py).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> (module, attribute in it)
_HOMES: dict[str, tuple[str, str]] = {
    "load_world": ("worldlm_secure.federation.world", "load_world"),
    "simulate": ("worldlm_secure.api", "simulate"),
    "run_study": ("worldlm_secure.api", "run_study"),
    "verify_ledger": ("worldlm_secure.ledger.verification", "verify"),
    "audit_ledgers": ("worldlm_secure.ledger.audit", "audit_ledgers"),
    "start_node": ("worldlm_secure.node.runner", "start_node"),
    "SimulationResult": ("worldlm_secure.federation.simulate", "SimulationResult"),
    "World": ("worldlm_secure.federation.world", "World"),
}

if TYPE_CHECKING:
    from worldlm_secure.api import run_study, simulate
    from worldlm_secure.federation.simulate import SimulationResult
    from worldlm_secure.federation.world import World, load_world
    from worldlm_secure.ledger.audit import audit_ledgers
    from worldlm_secure.ledger.verification import verify as verify_ledger
    from worldlm_secure.node.runner import start_node


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home[0]), home[1])
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])


__all__ = [
    "SimulationResult", "World", "__version__", "audit_ledgers", "load_world", "run_study", "simulate", "start_node",
    "verify_ledger",
]
