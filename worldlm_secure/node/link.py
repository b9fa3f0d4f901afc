"""One secure sum across one link of the tree, with real messages over gRPC/mTLS.

The member side runs the one member session (`secagg.masking_round.MaskingSession`) and talks through a
`SiteClient`; the aggregator side runs the one aggregator driver (`masking_round.aggregate`) over a
`BoardChannel`, the federation's `RoundBoard` (its `FederationServer` handler). Message for message
(protocols/federation.md; `STEP_KINDS`):

    member: ADVERTISE_KEYS -> (fetch KEY_BUNDLE) -> ENCRYPTED_SHARES -> (fetch deliveries)
            -> UploadUpdate(MASKED_INPUT) -> (fetch UNMASK_REQUEST: SurvivorList) -> UNMASK_SHARES: SurvivorSignature
            -> (fetch UNMASK_REQUEST: UnmaskRequest) -> UNMASK_SHARES: UnmaskResponse
    The unmask phase's two exchanges share their kinds; each message names itself by its SecAgg+ tag.
    Every aggregator message is signed by the federation's identity and checked by the member
    (`MaskingMember`), whatever relayed it.
    aggregator: wait for each step's messages from the members still expected, until all arrived, the
            step's timeout passed, or the member's heartbeat went silent (a dropout); then the next step.

Protocol "ckks" runs the CKKS member session and aggregator driver (`secagg.ckks_round`) the same way:
`node.ckks_link` routes its steps through `BoardChannel` (`CKKS_STEPS` there: key epoch among the member
key holders, contributions checked by the aggregator, re-added, decrypted and confirmed by the holders). Protocol "none" is one
`UploadUpdate(UPDATE_PLAIN)` per member, summed by the aggregator. Dropouts are SecAgg+'s to recover;
fewer than min_cohort survivors abort the round (`SecAggError`), nothing released.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Protocol

import numpy as np

from worldlm_secure.errors import SecAggError
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.secagg.masking import MaskingAggregator, MaskingMember, RoundConfig
from worldlm_secure.secagg.masking_messages import (
    AggregatorMessage,
    Message,
    NeighbourKeys,
    ShareDelivery,
    SurvivorList,
    UnmaskRequest,
)
from worldlm_secure.secagg.masking_round import STEPS, MaskingSession, aggregate
from worldlm_secure.secagg.protocol import BeforeReveal, IntegerNoise
from worldlm_secure.transport import federation_pb2 as pb
from worldlm_secure.transport.board import RoundBoard
from worldlm_secure.transport.chunks import Payload
from worldlm_secure.transport.client import MemberLink
from worldlm_secure.transport.handler import Announcement, Inbound

if TYPE_CHECKING:  # node.ckks_link builds on this module (its steps travel through `BoardChannel`)
    from worldlm_secure.node.ckks_link import CkksRound

log = logging.getLogger("worldlm_secure.node")
POLL_SECONDS = 0.1  # how often a waiting side looks again (loopback; members poll the federation)

# SecAgg+ step (`masking_round.STEPS`) -> (kind the aggregator posts its request under, kind the member
# answers under, the request's message type). Members open the round unasked; the masked input travels as
# an UploadUpdate; the unmask phase's two exchanges share their kinds (each message names itself by its tag).
STEP_KINDS: dict[str, tuple[int | None, int, type[AggregatorMessage] | None]] = {
    "advertise": (None, pb.SECAGG_MASKING_ADVERTISE_KEYS, None),
    "share_keys": (pb.SECAGG_MASKING_KEY_BUNDLE, pb.SECAGG_MASKING_ENCRYPTED_SHARES, NeighbourKeys),
    "masked_input": (pb.SECAGG_MASKING_ENCRYPTED_SHARES, pb.SECAGG_MASKING_MASKED_INPUT, ShareDelivery),
    "confirm": (pb.SECAGG_MASKING_UNMASK_REQUEST, pb.SECAGG_MASKING_UNMASK_SHARES, SurvivorList),
    "unmask": (pb.SECAGG_MASKING_UNMASK_REQUEST, pb.SECAGG_MASKING_UNMASK_SHARES, UnmaskRequest),
}


@dataclass(frozen=True)
class BoardStep:
    """How one protocol step travels over the board: the kind the aggregator posts its request under (None:
    members open the step unasked), the kind the member answers under (as an UploadUpdate when ``upload``),
    and ``claims``: whether a relayed answer claims to be this step's (the member session checks the rest)."""

    post: int | None
    answer: int
    upload: bool = False
    claims: Callable[[Inbound], bool] | None = None


@dataclass(frozen=True)
class LinkOutcome:
    """What the aggregator got: the sum, who is in it, who dropped, and bytes members sent (for stats)."""

    total: np.ndarray
    contributors: tuple[str, ...]
    dropped: tuple[str, ...]
    bytes_up: int
    rejected: tuple[str, ...] = ()  # why a member's input was refused (CKKS: each reason names the member)
    key_id: str = ""  # CKKS: the key epoch the inputs were encrypted under


# ---- member side ------------------------------------------------------------------------------------


def _is(message: Inbound, cls: type[Message]) -> bool:
    """Whether a relayed payload claims to be a ``cls`` (its SecAgg+ tag); decoding checks the rest."""
    head = message.payload.to_bytes()[:5]
    return len(head) == 5 and head[4] == cls.TAG


# The SecAgg+ steps as `BoardChannel` carries them (`STEP_KINDS`; the masked input is an upload).
MASKING_STEPS: dict[str, BoardStep] = {
    step: BoardStep(post, answer, answer == pb.SECAGG_MASKING_MASKED_INPUT, partial(_is, cls=STEPS[step]))
    for step, (post, answer, _) in STEP_KINDS.items()
}


def _poll(client: MemberLink, kind: int, round_id: int, deadline: float, cls: type[Message]) -> bytes:
    """The first message of ``kind`` claiming to be a ``cls`` that the federation holds for this member
    (bytes: the member session decodes and checks it)."""
    while True:
        for got in client.fetch_secagg(kind, round_id=round_id):
            if _is(got, cls):
                return got.payload.to_bytes()
        if time.monotonic() > deadline:
            raise SecAggError(
                f"round {round_id}: no {cls.__name__} ({pb.SecAggKind.Name(kind)}) from federation {client.federation!r} "
                "within the step timeout; this member treats the round as aborted"
            )
        time.sleep(POLL_SECONDS)


def member_round(
    client: MemberLink,
    identity: NodeIdentity,
    ann: Announcement,
    config: RoundConfig | None,
    vector: np.ndarray,
    *,
    before_input: Callable[..., None],
    before_reveal: BeforeReveal | None = None,
    timeout: float,
    noise: IntegerNoise | None = None,
    ckks: CkksRound | None = None,
    wait_timeout: float | None = None,
) -> None:
    """Contribute ``vector`` to the sum of round ``ann.round_id``. ``before_input(cohort)`` runs right before
    the (masked) input leaves: the caller writes its ledger entry there, so a release is never unrecorded;
    ``before_reveal(contributors)`` right before what completes a sum leaves (`NodeRelease.reveal_guard`).
    ``noise``: this member's distributed DP share generator (`secagg.IntegerNoise`), added before masking.
    ``ckks``: the round's CKKS parameters when ``ann.protocol`` is ckks (``before_input`` then also gets
    ``key_id=``, the epoch's key id); ``wait_timeout`` bounds its waits
    for steps that follow other members' training (default ``timeout``)."""
    rid = ann.round_id
    if ann.protocol == "ckks" and ckks is not None:
        ckks.run_member(client, identity, ann, vector, before_input=before_input, before_reveal=before_reveal,
                        wait_timeout=max(timeout, wait_timeout or 0.0))
        return
    if ann.protocol == "none":
        before_input(ann.cohort)
        client.upload_update(Payload.from_tensors({"vector": np.ascontiguousarray(vector, dtype=np.float64)}), round_id=rid)
        return
    if ann.protocol != "masking" or config is None:
        raise SecAggError(f"round {rid}: protocol {ann.protocol!r} is not supported by node start (masking, ckks or none)")
    session = MaskingSession(MaskingMember(identity, config, noise=noise), lambda: vector,
                             before_input=before_input, before_reveal=before_reveal)
    step = lambda: time.monotonic() + timeout  # noqa: E731
    client.send_secagg(pb.SECAGG_MASKING_ADVERTISE_KEYS, Payload.from_bytes(session.handle(b"")), round_id=rid)
    for post_kind, answer_kind, request in (STEP_KINDS[s] for s in STEPS if s != "advertise"):
        assert post_kind is not None and request is not None
        answer = Payload.from_bytes(session.handle(_poll(client, post_kind, rid, step(), request)))
        if answer_kind == pb.SECAGG_MASKING_MASKED_INPUT:
            client.upload_update(answer, secagg_kind=answer_kind, round_id=rid)
        else:
            client.send_secagg(answer_kind, answer, round_id=rid)


# ---- aggregator side --------------------------------------------------------------------------------


class Alive(Protocol):
    """Whether a member still counts as online (`Liveness`)."""

    def alive(self, member: str) -> bool: ...


class Liveness:
    """Members whose heartbeat went silent for ``silent_after`` seconds count as dropped (not waited for)."""

    def __init__(self, board: RoundBoard, silent_after: float) -> None:
        self.board, self.silent_after = board, silent_after

    def alive(self, member: str) -> bool:
        seen = self.board.last_seen(member)
        return seen is not None and time.monotonic() - seen <= self.silent_after


def _wait(
    board: RoundBoard, rid: int, kind: int, expected: Iterable[str], timeout: float, live: Alive,
    claims: Callable[[Inbound], bool] | None = None,
) -> dict[str, Inbound]:
    """First message of ``kind`` (that ``claims`` to be the step's answer, if given) from each expected member,
    until all arrived, timeout, or the rest went silent."""
    expected = set(expected)
    deadline = time.monotonic() + timeout
    while True:
        got: dict[str, Inbound] = {}
        for m in board.secagg_received(rid, kind):
            if m.sender in expected and m.sender not in got and (claims is None or claims(m)):
                got[m.sender] = m
        missing = expected - set(got)
        if not missing or time.monotonic() > deadline or not any(live.alive(m) for m in missing):
            if missing:
                log.warning("round %d: no %s from %s; continuing without", rid, pb.SecAggKind.Name(kind), sorted(missing))
            return got
        time.sleep(POLL_SECONDS)


def _wait_updates(board: RoundBoard, rid: int, expected: Iterable[str], timeout: float, live: Alive) -> dict[str, Inbound]:
    expected = set(expected)
    deadline = time.monotonic() + timeout
    while True:
        got = {k: v for k, v in board.updates(rid).items() if k in expected}
        missing = expected - set(got)
        if not missing or time.monotonic() > deadline or not any(live.alive(m) for m in missing):
            if missing:
                log.warning("round %d: no update from %s; continuing without", rid, sorted(missing))
            return got
        board.wait_for_updates(rid, len(expected), POLL_SECONDS)


class BoardChannel:
    """The federation's `secagg.channel.Channel` over gRPC/mTLS: requests are posted on its `RoundBoard`
    for the member to fetch; answers are what the member sent (its mTLS identity is the sender).
    ``steps``: how each protocol step travels (`MASKING_STEPS`, `node.ckks_link.CKKS_STEPS`);
    ``wait_updates(expected, timeout)``: how uploads are awaited (default: until all, timeout or silence)."""

    def __init__(self, board: RoundBoard, round_id: int, live: Alive, steps: Mapping[str, BoardStep] = MASKING_STEPS,
                 wait_updates: Callable[[Iterable[str], float], dict[str, Inbound]] | None = None) -> None:
        self.board, self.round_id, self.live, self.steps = board, round_id, live, steps
        self.wait_updates = wait_updates or (lambda expected, t: _wait_updates(board, round_id, expected, t, live))
        self._dropped: dict[str, str] = {}

    @property
    def dropped(self) -> dict[str, str]:
        return self._dropped

    def exchange(self, step: str, requests: Mapping[str, bytes], timeout: float | None) -> dict[str, bytes]:
        how = self.steps[step]
        rid, wait = self.round_id, float("inf") if timeout is None else timeout
        if how.post is not None:
            for member, data in requests.items():
                self.board.post_secagg(Inbound(self.board.name, rid, pb.PAYLOAD_KIND_SECAGG, how.post, member, Payload.from_bytes(data)))
        if how.upload:
            got = self.wait_updates(requests, wait)
        else:
            got = _wait(self.board, rid, how.answer, requests, wait, self.live, how.claims)
        for member in requests:
            if member not in got:
                self._dropped.setdefault(member, f"{step}: no answer in time (or its heartbeat went silent)")
        return {m: got[m].payload.to_bytes() for m in requests if m in got}


def aggregate_round(
    board: RoundBoard,
    ann: Announcement,
    config: RoundConfig | None,
    min_cohort: int,
    *,
    identity: NodeIdentity,
    first_timeout: float,
    step_timeout: float,
    live: Liveness,
    ckks: CkksRound | None = None,
) -> LinkOutcome:
    """Run the aggregator's side of round ``ann.round_id`` (already announced on ``board``); ``identity`` is
    this federation's, which signs every message it sends to members."""
    rid, cohort = ann.round_id, ann.cohort
    if ann.protocol == "ckks" and ckks is not None:
        out = ckks.run_aggregator(board, ann, live, first_timeout=first_timeout, step_timeout=step_timeout)
        return LinkOutcome(out.total, out.contributors, tuple(m for m in cohort if m not in out.contributors),
                           out.bytes_up, out.rejected, out.key_id)
    if ann.protocol == "none":
        ups = _wait_updates(board, rid, cohort, first_timeout, live)
        if len(ups) < min_cohort:
            raise SecAggError(f"round {rid}: only {len(ups)} of {len(cohort)} members sent an update, below min_cohort={min_cohort}; round aborted, nothing released")
        names = sorted(ups)
        total = np.sum([np.asarray(ups[m].payload.as_tensors()["vector"], dtype=np.float64) for m in names], axis=0)
        return LinkOutcome(total, tuple(names), tuple(m for m in cohort if m not in ups), sum(ups[m].payload.nbytes for m in names))
    if ann.protocol != "masking" or config is None:
        raise SecAggError(f"round {rid}: protocol {ann.protocol!r} is not supported by node start (masking, ckks or none)")
    channel = BoardChannel(board, rid, live)
    trace = aggregate(MaskingAggregator(config, identity), channel, first_timeout=first_timeout, step_timeout=step_timeout)
    outcome = trace.outcome
    return LinkOutcome(
        outcome.total, outcome.contributors, tuple(m for m in cohort if m not in outcome.contributors),
        sum(trace.bytes_up.values()), tuple(f"{m}: {why}" for m, why in sorted(trace.refused.items())),
    )
