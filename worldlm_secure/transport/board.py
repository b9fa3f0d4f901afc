"""`RoundBoard`: an in-memory, thread-safe `FederationHandler`.

The federation's round logic drives it (`announce`, `wait_for_updates`, `post_secagg`,
`secagg_received`); the transport server calls the handler side. It keeps everything in memory:
durable round state belongs to the node (checkpoints, ledger).

Memory is bounded (`BoardLimits`): each member may queue at most so many secure-aggregation messages
and bytes per round (refused ``OVER_QUOTA`` beyond that, checked on the transfer's declared size
before its data is read), holds one update per round, and the board keeps only the last
``keep_rounds`` rounds (announcements, models, updates, messages); older rounds are dropped when a
new one is announced.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, replace

from worldlm_secure.transport import federation_pb2 as pb
from worldlm_secure.transport.chunks import Payload
from worldlm_secure.transport.federation_pb2 import RefusalReason as R
from worldlm_secure.transport.handler import Announcement, Countersigner, FederationHandler, Inbound, LedgerHead, Member
from worldlm_secure.transport.refusal import Refused


@dataclass(frozen=True)
class BoardLimits:
    """Per-member caps on what the board holds for one round, and how many rounds it keeps.

    An honest member sends at most 3 secure-aggregation messages per masked round (keys, shares,
    unmask shares; 4 with the consistency round) and at most 3 per CKKS round, plus one update, so
    16 leaves room for retries. The byte cap covers the largest honest message (a CKKS key epoch or
    decrypted sum of a large vector); lower it for small models.
    """

    max_messages_per_member_round: int = 16
    max_bytes_per_member_round: int = 1 << 30  # 1 GiB of secure-aggregation messages (updates: one per round)
    keep_rounds: int = 3  # the current round and the two before it; older state is dropped


class RoundBoard(FederationHandler):
    """Rounds, models, updates and secure-aggregation mailboxes for one federation."""

    def __init__(self, name: str, start_round: int = 0, limits: BoardLimits | None = None,
                 countersigner: Countersigner | None = None) -> None:
        """``start_round``: the last round id used before a restart (persisted by the node), so ids never repeat.
        ``countersigner``: the aggregator's ledger, which countersigns members' ledger heads (None: no receipts)."""
        self.name = name
        self.limits = limits or BoardLimits()
        self.countersigner = countersigner
        self._cond = threading.Condition()
        self._round = start_round
        self._announcements: dict[int, Announcement] = {}
        self._models: dict[int, Payload] = {}
        self._members: dict[str, Member] = {}
        self._last_seen: dict[str, float] = {}
        self._updates: dict[int, dict[str, Inbound]] = defaultdict(dict)
        self._to_aggregator: dict[int, list[Inbound]] = defaultdict(list)
        self._mailbox: dict[tuple[int, str], list[Inbound]] = defaultdict(list)
        self._quota: dict[tuple[int, str], list[int]] = {}  # (round, member) -> [messages, bytes] queued
        self._countersigned: dict[tuple[int, str], bytes] = {}  # (round, member) -> the ledger receipt issued

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
            self._prune()
            self._cond.notify_all()

    def _prune(self) -> None:
        """Drop every round but the last ``keep_rounds`` (called with the lock held)."""
        oldest = self._round - max(1, self.limits.keep_rounds) + 1
        for table in (self._announcements, self._models, self._updates, self._to_aggregator):
            for r in [r for r in table if r < oldest]:
                del table[r]
        for keyed in (self._mailbox, self._quota, self._countersigned):  # keyed by (round, member)
            for key in [k for k in keyed if k[0] < oldest]:
                del keyed[key]

    def rounds_held(self) -> list[int]:
        """Round ids the board still holds anything for (announcement, model, updates, messages)."""
        with self._cond:
            rounds = set(self._announcements) | set(self._models) | set(self._updates) | set(self._to_aggregator)
            rounds |= {r for r, _ in self._mailbox}
            return sorted(rounds)

    def held_bytes(self) -> int:
        """Payload bytes held: models, updates and queued secure-aggregation messages of the kept rounds."""
        with self._cond:
            total = sum(p.nbytes for p in self._models.values())
            total += sum(m.payload.nbytes for ups in self._updates.values() for m in ups.values())
            total += sum(m.payload.nbytes for msgs in self._to_aggregator.values() for m in msgs)
            total += sum(m.payload.nbytes for msgs in self._mailbox.values() for m in msgs)
            return total

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

    def countersign(self, message: Inbound, signing_public_key: bytes) -> bytes:
        """Countersign the ledger head of an accepted update, once per (member, round): the head is the one the
        first accepted update carried; a retried upload of it gets the receipt already issued, and a retry with
        another head is refused (nothing is countersigned: one update, one receipt)."""
        if self.countersigner is None or message.ledger_head is None:
            return b""
        key = (message.round_id, message.sender)
        with self._cond:
            first = self._updates.get(message.round_id, {}).get(message.sender)
            if first is None:
                raise Refused(R.REFUSAL_REJECTED, f"no accepted update of {message.sender!r} for round {message.round_id}")
            if first.ledger_head != message.ledger_head:
                raise Refused(R.REFUSAL_REJECTED, f"{message.sender!r} re-sent its update of round {message.round_id} "
                              "with another ledger head than the first; not countersigned")
            done = self._countersigned.get(key)
        if done is not None:
            return done
        body = self.countersigner.countersign(message.sender, signing_public_key, message.round_id, message.ledger_head)
        with self._cond:
            if message.round_id in self._updates:  # not pruned meanwhile
                self._countersigned.setdefault(key, body)
        return body

    def ledger_receipt(self, member: str, signing_public_key: bytes, head: LedgerHead) -> bytes:
        return b"" if self.countersigner is None else self.countersigner.issued(member, signing_public_key, head)

    def admit_transfer(self, sender: str, round_id: int, kind: int, secagg_kind: int, total_bytes: int) -> None:
        if kind != pb.PAYLOAD_KIND_SECAGG:
            return  # updates: one per member and round (on_update), each within the transfer limits
        with self._cond:
            if round_id < self._round - max(1, self.limits.keep_rounds) + 1:
                raise Refused(R.REFUSAL_WRONG_ROUND, f"round {round_id} is over and no longer held")
            self._check_quota(sender, round_id, total_bytes)

    def _check_quota(self, sender: str, round_id: int, nbytes: int) -> list[int]:
        used = self._quota.get((round_id, sender), [0, 0])
        lim = self.limits
        if used[0] + 1 > lim.max_messages_per_member_round:
            raise Refused(R.REFUSAL_OVER_QUOTA, f"{sender!r} already queued {used[0]} messages in round {round_id}; "
                          f"the cap is {lim.max_messages_per_member_round} messages per member and round")
        if used[1] + nbytes > lim.max_bytes_per_member_round:
            raise Refused(R.REFUSAL_OVER_QUOTA, f"{sender!r} would queue {used[1] + nbytes} bytes in round {round_id}; "
                          f"the cap is {lim.max_bytes_per_member_round} bytes per member and round")
        return used

    def on_secagg(self, message: Inbound) -> None:
        if message.recipient:  # the server refuses these first; a handler keeps the rule too
            raise Refused(R.REFUSAL_REJECTED, f"{message.sender!r} addressed a message to {message.recipient!r}: "
                          "no protocol defines a member-to-member message; send it to the aggregator")
        with self._cond:
            self._check_cohort(message)
            if message.round_id < self._round - max(1, self.limits.keep_rounds) + 1:
                raise Refused(R.REFUSAL_WRONG_ROUND, f"round {message.round_id} is over and no longer held")
            used = self._check_quota(message.sender, message.round_id, message.payload.nbytes)
            self._quota[(message.round_id, message.sender)] = [used[0] + 1, used[1] + message.payload.nbytes]
            self._to_aggregator[message.round_id].append(message)
            self._cond.notify_all()

    def secagg_for(self, member: str, round_id: int, secagg_kind: int) -> list[Inbound]:
        with self._cond:
            # Kept, not consumed: a fetch that breaks off can simply be repeated. Only the aggregator posts here.
            return [m for m in self._mailbox.get((round_id, member), []) if secagg_kind in (0, m.secagg_kind)]

    def _check_cohort(self, message: Inbound) -> None:
        ann = self._announcements.get(message.round_id)
        if ann is not None and ann.cohort and message.sender not in ann.cohort:
            raise Refused(R.REFUSAL_REJECTED, f"{message.sender!r} is not in round {message.round_id}'s cohort")
