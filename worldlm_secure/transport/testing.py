"""Helpers for tests and local demos: a throwaway PKI and a federation server on loopback.

Not for production: keys are written to whatever directory you pass (use a temporary one).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worldlm_secure.identity import NodeIdentity
from worldlm_secure.transport import keys
from worldlm_secure.transport.board import RoundBoard
from worldlm_secure.transport.client import RetryPolicy, SiteClient
from worldlm_secure.transport.server import FederationServer, ServerConfig
from worldlm_secure.transport.tls import NodeCredentials, Roster


@dataclass
class Pki:
    """A CA directory and the node directories issued from it."""

    root: Path
    ca_name: str
    nodes: dict[str, Path] = field(default_factory=dict)

    @property
    def ca_dir(self) -> Path:
        return self.root / f"ca-{self.ca_name}"

    def issue(self, node: str, *, expired: bool = False, label: str | None = None, **kwargs: Any) -> Path:
        """Issue ``node``; ``expired`` makes a certificate whose validity ended yesterday."""
        out = self.root / (label or node)
        if expired:
            now = dt.datetime.now(dt.timezone.utc)
            kwargs.setdefault("not_before", now - dt.timedelta(days=10))
            kwargs.setdefault("not_after", now - dt.timedelta(days=1))
        keys.issue_node(self.ca_dir, node, out, **kwargs)
        self.nodes[label or node] = out
        return out

    def credentials(self, label: str) -> NodeCredentials:
        return NodeCredentials.load(self.nodes[label])

    def identity(self, label: str) -> NodeIdentity:
        return NodeIdentity.load(self.credentials(label).name, self.nodes[label] / keys.NODE_SIGNING_KEY)


def make_pki(root: Path, ca_name: str, nodes: Iterable[str] = ()) -> Pki:
    """A fresh CA named ``ca_name`` under ``root`` with ``nodes`` issued."""
    pki = Pki(Path(root), ca_name)
    keys.init_ca(ca_name, pki.ca_dir)
    for node in nodes:
        pki.issue(node)
    return pki


def start_federation(
    pki: Pki, federation: str, roster: Iterable[str], config: ServerConfig | None = None
) -> tuple[FederationServer, RoundBoard]:
    """Start ``federation`` (already issued in ``pki``) on 127.0.0.1 with a `RoundBoard`."""
    board = RoundBoard(federation)
    server = FederationServer(pki.credentials(federation), Roster.of(roster), board, config or ServerConfig())
    server.start()
    return server, board


def connect(server: FederationServer, pki: Pki, label: str, *, attempts: int = 1, **kwargs: Any) -> SiteClient:
    """A `SiteClient` for node ``label`` of ``pki`` (no retries by default: tests want the first answer)."""
    return SiteClient(
        server.target,
        pki.credentials(label),
        server.name,
        identity=pki.identity(label),
        retry=RetryPolicy(attempts=attempts, initial_backoff=0.05),
        **kwargs,
    )
