"""gRPC transport between nodes: mutual TLS, roster admission, replay-safe envelopes, chunked transfers.

A federation runs `FederationServer` with a `FederationHandler` (e.g. `RoundBoard`); its members
connect outbound with `SiteClient`. Certificates come from `transport.keys` (`worldlm-secure keys`).
Wire format: protocols/federation.proto; round state machine: protocols/federation.md.
"""

from worldlm_secure.transport.board import RoundBoard
from worldlm_secure.transport.chunks import DEFAULT_CHUNK_BYTES, Payload, TensorLayout, TransferLimits
from worldlm_secure.transport.client import Enrollment, Receipt, RetryPolicy, SiteClient
from worldlm_secure.transport.envelope import EnvelopeRules
from worldlm_secure.transport.handler import Announcement, FederationHandler, Inbound, Member
from worldlm_secure.transport.refusal import Refused
from worldlm_secure.transport.server import FederationServer, ServerConfig
from worldlm_secure.transport.tls import NodeCredentials, Roster

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
