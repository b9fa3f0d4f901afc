"""Secure aggregation: "protect this update under that policy". Nobody outside secagg/ touches keys or nonces.

The names below load on first use (PEP 562), so that importing a pure submodule such as `ckks_params` (the
policy schema takes its CKKS defaults from it) does not import TenSEAL and the protocols with it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worldlm_secure.secagg.protocol import DropoutPlan, IntegerNoise, MemberInput, ProtectionStats, SecureSum, SumResult
    from worldlm_secure.secagg.registry import available, make_secure_sum, register

_HOMES = {
    "DropoutPlan": "protocol",
    "IntegerNoise": "protocol",
    "MemberInput": "protocol",
    "ProtectionStats": "protocol",
    "SecureSum": "protocol",
    "SumResult": "protocol",
    "available": "registry",
    "make_secure_sum": "registry",
    "register": "registry",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
