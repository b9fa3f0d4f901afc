"""`RoundBoard`: an in-memory, thread-safe `FederationHandler`.

The federation's round logic drives it (`announce`, `wait_for_updates`, `post_secagg`,
`secagg_received`); the transport server calls the handler side. It keeps everything in memory:
durable round state belongs to the node (checkpoints, ledger).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import replace

from worldlm_secure.transport.chunks import Payload
from worldlm_secure.transport.federation_pb2 import RefusalReason as R
from worldlm_secure.transport.handler import Announcement, FederationHandler, Inbound, Member
from worldlm_secure.transport.refusal import Refused


class RoundBoard(FederationHandler):
    """Rounds, models, updates and secure-aggregation mailboxes for one federation."""

    def __init__(self, name: str, start_round: int = 0) -> None:
        """``start_round``: the last round id used before a restart (persisted by the node), so ids never repeat."""
        self.name = name
        self._cond = threading.Condition()
        self._round = start_round
        self._announcements: dict[int, Announcement] = {}
        self._models: dict[int, Payload] = {}
        self._members: dict[str, Member] = {}
        self._last_seen: dict[str, float] = {}
        self._updates: dict[int, dict[str, Inbound]] = defaultdict(dict)
        self._to_aggregator: dict[int, list[Inbound]] = defaultdict(list)
        self._mailbox: dict[tuple[int, str], list[Inbound]] = defaultdict(list)

    # ---- driven by the federation's round logic ----

    def announce(self, announcement: Announcement, model: Payload | None = None) -> None:
        """Open a round (ids strictly increase) and optionally publish the model it starts from.

        Without explicit ``peer_keys``, the announcement carries the CA-bound signing keys of the
        enrolled cohort members, which secure aggregation uses to verify their signed round keys.
        """
        with self._cond:
            if announcement.round_id <= self._round:
                raise ValueError(f"round {announcement.round_id} must follow round {self._round}")
            if not announcement.peer_keys:
                keys = tuple((m, self._members[m].signing_public_key) for m in announcement.cohort if m in self._members)
                announcement = replace(announcement, peer_keys=keys)
            self._round = announcement.round_id
            self._announcements[announcement.round_id] = announcement
            if model is not None:
                self._models[announcement.round_id] = model
            self._cond.notify_all()

    def announcement(self, round_id: int) -> Announcement | None:
        """The announcement of ``round_id`` as members receive it (``peer_keys`` filled in), if any."""
        with self._cond:
            return self._announcements.get(round_id)

    def set_model(self, round_id: int, model: Payload) -> None:
        with self._cond:
            self._models[round_id] = model

    @property
    def members(self) -> dict[str, Member]:
        with self._cond:
            return dict(self._members)

    def last_seen(self, member: str) -> float | None:
        """Monotonic seconds of the member's last enrollment or heartbeat."""
        with self._cond:
            return self._last_seen.get(member)

    def updates(self, round_id: int) -> dict[str, Inbound]:
        with self._cond:
            return dict(self._updates.get(round_id, {}))

    def wait_for_updates(self, round_id: int, count: int, timeout: float) -> dict[str, Inbound]:
        """Wait until ``count`` members uploaded for ``round_id`` or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._updates.get(round_id, {})) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return dict(self._updates.get(round_id, {}))

    def post_secagg(self, message: Inbound) -> None:
        """Queue an aggregator-originated message for ``message.recipient``."""
        with self._cond:
            self._mailbox[(message.round_id, message.recipient)].append(message)
            self._cond.notify_all()

    def secagg_received(self, round_id: int, secagg_kind: int = 0) -> list[Inbound]:
        """Messages members addressed to the aggregator in ``round_id`` (kind 0 = all)."""
        with self._cond:
            return [m for m in self._to_aggregator.get(round_id, []) if secagg_kind in (0, m.secagg_kind)]

    # ---- FederationHandler (called by the server) ----

    def current_round(self) -> int:
        with self._cond:
            return self._round

    def on_enroll(self, member: Member) -> None:
        with self._cond:
            self._members[member.name] = member
            self._last_seen[member.name] = time.monotonic()

    def on_heartbeat(self, member: str, status: str) -> None:
        with self._cond:
            self._last_seen[member] = time.monotonic()

    def next_announcement(self, after_round: int, timeout: float) -> Announcement | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                later = [r for r in self._announcements if r > after_round]
                if later:
                    return self._announcements[min(later)]
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def model_for(self, member: str, round_id: int) -> Payload | None:
        with self._cond:
            return self._models.get(round_id)

    def on_update(self, message: Inbound) -> None:
        with self._cond:
            self._check_cohort(message)
            previous = self._updates[message.round_id].get(message.sender)
            if previous is not None:
                if previous.payload.sha256() == message.payload.sha256():
                    return  # a retried upload of the same bytes: idempotent
                raise Refused(R.REFUSAL_REJECTED, f"{message.sender!r} already uploaded a different update for round {message.round_id}")
            self._updates[message.round_id][message.sender] = message
            self._cond.notify_all()

    def on_secagg(self, message: Inbound) -> None:
        with self._cond:
            self._check_cohort(message)
            if message.recipient:
                ann = self._announcements.get(message.round_id)
                if ann and ann.cohort and message.recipient not in ann.cohort:
                    raise Refused(R.REFUSAL_REJECTED, f"recipient {message.recipient!r} is not in round {message.round_id}'s cohort")
                self._mailbox[(message.round_id, message.recipient)].append(message)
            else:
                self._to_aggregator[message.round_id].append(message)
            self._cond.notify_all()

    def secagg_for(self, member: str, round_id: int, secagg_kind: int) -> list[Inbound]:
        with self._cond:
            # Kept, not consumed: a fetch that breaks off can simply be repeated.
            return [m for m in self._mailbox.get((round_id, member), []) if secagg_kind in (0, m.secagg_kind)]

    def _check_cohort(self, message: Inbound) -> None:
        ann = self._announcements.get(message.round_id)
        if ann is not None and ann.cohort and message.sender not in ann.cohort:
            raise Refused(R.REFUSAL_REJECTED, f"{message.sender!r} is not in round {message.round_id}'s cohort")
