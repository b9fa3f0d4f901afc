"""`NodeBoard`: the transport's `RoundBoard` plus what members say about themselves in heartbeats."""

from __future__ import annotations

import logging

from worldlm_secure.transport.board import RoundBoard
from worldlm_secure.transport.handler import Inbound

log = logging.getLogger("worldlm_secure.node")
EXAMPLES_STATUS = "examples="  # heartbeat status word: the member's example count (its public round weight)
DONE_STATUS = "done"  # heartbeat status word: the member has the final model


class NodeBoard(RoundBoard):
    """A `RoundBoard` that also remembers what members say in heartbeats: their example counts (public
    round weights, as in the engine) and that they are done."""

    def __init__(self, name: str, start_round: int = 0) -> None:
        super().__init__(name, start_round)
        self.examples: dict[str, int] = {}
        self.done: set[str] = set()

    def on_update(self, message: Inbound) -> None:
        super().on_update(message)
        super().on_heartbeat(message.sender, "")  # a member that sends is alive

    def on_secagg(self, message: Inbound) -> None:
        super().on_secagg(message)
        super().on_heartbeat(message.sender, "")

    def on_heartbeat(self, member: str, status: str) -> None:
        super().on_heartbeat(member, status)
        for part in status.split():
            if part.startswith(EXAMPLES_STATUS):
                try:
                    self.examples[member] = int(part[len(EXAMPLES_STATUS):])
                except ValueError:
                    log.warning("heartbeat from %s: bad example count %r", member, part)
            elif part == DONE_STATUS:
                self.done.add(member)
