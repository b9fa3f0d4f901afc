"""gRPC transport between nodes: mutual TLS, roster admission, replay-safe envelopes, chunked transfers.

A federation runs `FederationServer` with a `FederationHandler` (e.g. `RoundBoard`); its members
connect outbound with `SiteClient`. Certificates come from `transport.keys` (`worldlm-secure keys`).
Wire format: protocols/federation.proto; round state machine: protocols/federation.md.
"""

from __future__ import annotations

import importlib
from typing import Any

# Names load on first use (PEP 562): `import worldlm_secure.transport.keys` (the `keys` command) must not
# pull in grpc.
_HOMES = {
    "RoundBoard": "board",
    "DEFAULT_CHUNK_BYTES": "chunks", "Payload": "chunks", "TensorLayout": "chunks", "TransferLimits": "chunks",
    "Enrollment": "client", "Receipt": "client", "RetryPolicy": "client", "SiteClient": "client",
    "EnvelopeRules": "envelope",
    "Announcement": "handler", "FederationHandler": "handler", "Inbound": "handler", "Member": "handler",
    "Refused": "refusal",
    "FederationServer": "server", "ServerConfig": "server",
    "NodeCredentials": "tls", "Roster": "tls",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)


__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "Announcement",
    "Enrollment",
    "EnvelopeRules",
    "FederationHandler",
    "FederationServer",
    "Inbound",
    "Member",
    "Payload",
    "Receipt",
    "Refused",
    "RetryPolicy",
    "RoundBoard",
    "ServerConfig",
    "SiteClient",
    "NodeCredentials",
    "Roster",
    "TensorLayout",
    "TransferLimits",
]
