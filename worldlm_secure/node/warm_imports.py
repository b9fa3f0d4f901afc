"""Imported once by `world up`'s fork server (`node.launcher`): what a node imports before it reads its config.

Each import is tried on its own and any failure is ignored, because an exception other than ImportError in a
fork server's preload kills the server; a node then imports what is missing itself.
"""

from __future__ import annotations

import importlib

MODULES = (
    "torch", "transformers", "worldlm_secure.cli", "worldlm_secure.cli.node", "worldlm_secure.node.runner",
    "worldlm_secure.node.site", "worldlm_secure.node.federation", "worldlm_secure.node.root", "worldlm_secure.model",
    "opacus", "peft",
)

for _name in MODULES:
    try:
        importlib.import_module(_name)
    except Exception:  # noqa: BLE001 - see the module docstring
        pass
