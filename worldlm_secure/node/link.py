"""One secure sum across one link of the tree, with real messages over gRPC/mTLS.

The member side runs `secagg.masking.MaskingMember` and talks through a `SiteClient`; the aggregator
side runs `MaskingAggregator` behind a `RoundBoard` (the federation's `FederationServer` handler).
The order of steps is `masking.drive_round`'s, message for message (protocols/federation.md):

    member: ADVERTISE_KEYS -> (fetch KEY_BUNDLE) -> ENCRYPTED_SHARES -> (fetch deliveries)
            -> UploadUpdate(MASKED_INPUT) -> (fetch UNMASK_REQUEST: SurvivorList) -> UNMASK_SHARES: SurvivorSignature
            -> (fetch UNMASK_REQUEST: UnmaskRequest) -> UNMASK_SHARES: UnmaskResponse
    The unmask phase's two exchanges share their kinds; each message names itself by its SecAgg+ tag.
    Every aggregator message is signed by the federation's identity and checked by the member
    (`MaskingMember`), whatever relayed it.
    aggregator: wait for each step's messages from the members still expected, until all arrived, the
            step's timeout passed, or the member's heartbeat went silent (a dropout); then the next step.

Protocol "ckks" runs `node.ckks_link` (key epoch among the member key holders, ciphertexts added by
the aggregator, decrypted and confirmed by the holders). Protocol "none" is one
`UploadUpdate(UPDATE_PLAIN)` per member, summed by the aggregator. Dropouts are SecAgg+'s to recover;
fewer than min_cohort survivors abort the round (`SecAggError`), nothing released.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from worldlm_secure.errors import SecAggError
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.node import ckks_link
from worldlm_secure.node.ckks_link import CkksRound
from worldlm_secure.secagg.masking import MaskingAggregator, MaskingMember, RoundConfig
from worldlm_secure.secagg.masking_messages import (
    KeyAdvert,
    MaskedInput,
    Message,
    NeighbourKeys,
    ShareDelivery,
    ShareKeys,
    SurvivorList,
    SurvivorSignature,
    UnmaskRequest,
    UnmaskResponse,
)
from worldlm_secure.transport import federation_pb2 as pb
from worldlm_secure.transport.board import RoundBoard
from worldlm_secure.transport.chunks import Payload
from worldlm_secure.transport.client import SiteClient
from worldlm_secure.transport.handler import Announcement, Inbound

log = logging.getLogger("worldlm_secure.node")
M = TypeVar("M", bound=Message)
POLL_SECONDS = 0.1  # how often a waiting side looks again (loopback; members poll the federation)


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


def _poll(client: SiteClient, kind: int, round_id: int, deadline: float, cls: type[M]) -> M:
    """The first ``cls`` message of ``kind`` the federation holds for this member, decoded."""
    while True:
        for got in client.fetch_secagg(kind, round_id=round_id):
            if _is(got, cls):
                return cls.from_bytes(got.payload.to_bytes())
        if time.monotonic() > deadline:
            raise SecAggError(
                f"round {round_id}: no {cls.__name__} ({pb.SecAggKind.Name(kind)}) from federation {client.federation!r} "
                "within the step timeout; this member treats the round as aborted"
            )
        time.sleep(POLL_SECONDS)


def member_round(
    client: SiteClient,
    identity: NodeIdentity,
    ann: Announcement,
    config: RoundConfig | None,
    vector: np.ndarray,
    *,
    before_input: Callable[..., None],
    timeout: float,
    noise: object | None = None,
    ckks: CkksRound | None = None,
    wait_timeout: float | None = None,
) -> None:
    """Contribute ``vector`` to the sum of round ``ann.round_id``. ``before_input(cohort)`` runs right before
    the (masked) input leaves: the caller writes its ledger entry there, so a release is never unrecorded.
    ``noise``: this member's distributed DP share generator (`secagg.IntegerNoise`), added before masking.
    ``ckks``: the round's CKKS parameters when ``ann.protocol`` is ckks (``before_input`` then also gets
    ``key_id=``, the epoch's key id); ``wait_timeout`` bounds its waits
    for steps that follow other members' training (default ``timeout``)."""
    rid = ann.round_id
    if ann.protocol == "ckks" and ckks is not None:
        ckks_link.member_round(client, identity, ann, ckks, vector, before_input=before_input,
                               wait_timeout=max(timeout, wait_timeout or 0.0))
        return
    if ann.protocol == "none":
        before_input(ann.cohort)
        client.upload_update(Payload.from_tensors({"vector": np.ascontiguousarray(vector, dtype=np.float64)}), round_id=rid)
        return
    if ann.protocol != "masking" or config is None:
        raise SecAggError(f"round {rid}: protocol {ann.protocol!r} is not supported by node start (masking, ckks or none)")
    member = MaskingMember(identity, config, noise=noise)  # type: ignore[arg-type]
    step = lambda: time.monotonic() + timeout  # noqa: E731
    send = lambda kind, msg: client.send_secagg(kind, Payload.from_bytes(msg.to_bytes()), round_id=rid)  # noqa: E731
    send(pb.SECAGG_MASKING_ADVERTISE_KEYS, member.advertise())
    keys = _poll(client, pb.SECAGG_MASKING_KEY_BUNDLE, rid, step(), NeighbourKeys)
    send(pb.SECAGG_MASKING_ENCRYPTED_SHARES, member.share_keys(keys))
    masked = member.masked_input(_poll(client, pb.SECAGG_MASKING_ENCRYPTED_SHARES, rid, step(), ShareDelivery), vector)
    before_input(keys.advertised)
    client.upload_update(Payload.from_bytes(masked.to_bytes()), secagg_kind=pb.SECAGG_MASKING_MASKED_INPUT, round_id=rid)
    send(pb.SECAGG_MASKING_UNMASK_SHARES, member.confirm(_poll(client, pb.SECAGG_MASKING_UNMASK_REQUEST, rid, step(), SurvivorList)))
    send(pb.SECAGG_MASKING_UNMASK_SHARES, member.unmask(_poll(client, pb.SECAGG_MASKING_UNMASK_REQUEST, rid, step(), UnmaskRequest)))


# ---- aggregator side --------------------------------------------------------------------------------


class Liveness:
    """Members whose heartbeat went silent for ``silent_after`` seconds count as dropped (not waited for)."""

    def __init__(self, board: RoundBoard, silent_after: float) -> None:
        self.board, self.silent_after = board, silent_after

    def alive(self, member: str) -> bool:
        seen = self.board.last_seen(member)
        return seen is not None and time.monotonic() - seen <= self.silent_after


def _wait(
    board: RoundBoard, rid: int, kind: int, expected: Iterable[str], timeout: float, live: Liveness,
    cls: type[Message] | None = None,
) -> dict[str, Inbound]:
    """First message of ``kind`` (and SecAgg+ type ``cls``, if given) from each expected member, until all
    arrived, timeout, or the rest went silent."""
    expected = set(expected)
    deadline = time.monotonic() + timeout
    while True:
        got: dict[str, Inbound] = {}
        for m in board.secagg_received(rid, kind):
            if m.sender in expected and (cls is None or _is(m, cls)):
                got.setdefault(m.sender, m)
        missing = expected - set(got)
        if not missing or time.monotonic() > deadline or not any(live.alive(m) for m in missing):
            if missing:
                log.warning("round %d: no %s from %s; continuing without", rid, pb.SecAggKind.Name(kind), sorted(missing))
            return got
        time.sleep(POLL_SECONDS)


def _wait_updates(board: RoundBoard, rid: int, expected: Iterable[str], timeout: float, live: Liveness) -> dict[str, Inbound]:
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


def _post(board: RoundBoard, rid: int, kind: int, messages: dict[str, object]) -> None:
    for member, msg in messages.items():
        board.post_secagg(Inbound(board.name, rid, pb.PAYLOAD_KIND_SECAGG, kind, member, Payload.from_bytes(msg.to_bytes())))  # type: ignore[attr-defined]


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
        out = ckks_link.aggregate_round(
            board, ann, ckks, lambda expected, t: _wait_updates(board, rid, expected, t, live),
            first_timeout=first_timeout, step_timeout=step_timeout, alive=live.alive,
        )
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
    agg = MaskingAggregator(config, identity)
    sent = 0

    def parse(msgs: dict[str, Inbound], cls: type[M]) -> list[M]:
        """Decode each member's message; a member whose bytes do not decode drops out of the round."""
        nonlocal sent
        sent += sum(m.payload.nbytes for m in msgs.values())
        out = []
        for n in sorted(msgs):
            try:
                out.append(cls.from_bytes(msgs[n].payload.to_bytes()))
            except SecAggError as exc:
                log.warning("round %d: %s from %s refused (%s); it drops out", rid, cls.__name__, n, exc)
        return out

    adverts = parse(_wait(board, rid, pb.SECAGG_MASKING_ADVERTISE_KEYS, cohort, first_timeout, live), KeyAdvert)
    bundles = agg.collect_adverts(adverts)
    _post(board, rid, pb.SECAGG_MASKING_KEY_BUNDLE, bundles)
    shares = parse(_wait(board, rid, pb.SECAGG_MASKING_ENCRYPTED_SHARES, bundles, step_timeout, live), ShareKeys)
    deliveries = agg.collect_shares(shares)
    _post(board, rid, pb.SECAGG_MASKING_ENCRYPTED_SHARES, deliveries)
    masked = parse(_wait_updates(board, rid, deliveries, step_timeout, live), MaskedInput)
    lists = agg.collect_masked(masked)
    _post(board, rid, pb.SECAGG_MASKING_UNMASK_REQUEST, lists)
    signatures = parse(_wait(board, rid, pb.SECAGG_MASKING_UNMASK_SHARES, lists, step_timeout, live, SurvivorSignature), SurvivorSignature)
    requests = agg.collect_signatures(signatures)
    _post(board, rid, pb.SECAGG_MASKING_UNMASK_REQUEST, requests)
    responses = parse(_wait(board, rid, pb.SECAGG_MASKING_UNMASK_SHARES, requests, step_timeout, live, UnmaskResponse), UnmaskResponse)
    outcome = agg.finish(responses)
    return LinkOutcome(
        outcome.total, outcome.contributors, tuple(m for m in cohort if m not in outcome.contributors), sent
    )
