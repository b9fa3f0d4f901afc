"""How a protocol's aggregator driver talks to its members, whatever carries the bytes.

A `Channel` sends each member one request per protocol step and returns the answers of the members that
answered in time. It carries bytes only: every check on what a member is told happens in the member's
session (`masking_round.MaskingSession`, `ckks_round.CkksSession`), every check on what the aggregator is
told in the driver, so one fix holds in every backend. Three channels exist:

  in-memory  `InMemoryChannel` (below): members are sessions in this process (simulate, tests);
  Ray        `federation.ray_channel.RayChannel`: members are site actors;
  gRPC/mTLS  `node.link.BoardChannel`: members are site nodes polling the federation's board.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, Protocol

from worldlm_secure.errors import SecAggError


class MemberSession(Protocol):
    """One member's side of one round: each aggregator request in, this member's answer out (bytes).

    The first request of a round is empty (b""): the member then opens the round (e.g. advertises keys)."""

    def handle(self, data: bytes) -> bytes: ...


class Channel(Protocol):
    """The aggregator's only view of its members."""

    def exchange(self, step: str, requests: Mapping[str, bytes], timeout: float | None) -> dict[str, bytes]:
        """Send ``requests[m]`` to every member ``m`` for protocol ``step``; return, by member, the answers that
        arrived within ``timeout`` seconds (None: as long as members are alive). A member that does not
        answer has dropped out of the round from this step on; ``dropped`` says why."""
        ...

    @property
    def dropped(self) -> Mapping[str, str]:
        """Member -> why it stopped answering (the first step it missed, and the reason if known)."""
        ...


class InMemoryChannel:
    """Members are sessions in this process; ``silent`` maps step -> members that never answer it
    (simulated dropouts: the request reaches them, no answer comes back). A member that refuses a request
    (`SecAggError`) stops the round here (``refusals="raise"``, what `simulate` wants: a refusal in one
    process is a bug or an attack to surface), or drops out of it as it would over the network
    (``refusals="drop"``: the reason is kept in ``dropped``)."""

    def __init__(self, sessions: Mapping[str, MemberSession], silent: Mapping[str, frozenset[str]] | None = None,
                 refusals: Literal["raise", "drop"] = "raise") -> None:
        self.sessions = dict(sessions)
        self.silent = dict(silent or {})
        self.refusals = refusals
        self._dropped: dict[str, str] = {}

    @property
    def dropped(self) -> Mapping[str, str]:
        return self._dropped

    def exchange(self, step: str, requests: Mapping[str, bytes], timeout: float | None) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for member, data in requests.items():
            if member in self.silent.get(step, frozenset()) or member in self._dropped:
                self._dropped.setdefault(member, f"{step}: silent (simulated dropout)")
                continue
            try:
                out[member] = self.sessions[member].handle(data)
            except SecAggError as exc:
                if self.refusals == "raise":
                    raise
                self._dropped[member] = f"{step}: {exc}"
        return out
