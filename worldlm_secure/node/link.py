"""One secure sum across one link of the tree, with real messages over gRPC/mTLS.

The member side runs `secagg.masking.MaskingMember` and talks through a `SiteClient`; the aggregator
side runs `MaskingAggregator` behind a `RoundBoard` (the federation's `FederationServer` handler).
The order of steps is `masking.drive_round`'s, message for message (protocols/federation.md):

    member: ADVERTISE_KEYS -> (fetch KEY_BUNDLE) -> ENCRYPTED_SHARES -> (fetch deliveries)
            -> UploadUpdate(MASKED_INPUT) -> (fetch UNMASK_REQUEST) -> UNMASK_SHARES
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

import numpy as np

from worldlm_secure.errors import SecAggError
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.node import ckks_link
from worldlm_secure.node.ckks_link import CkksRound
from worldlm_secure.secagg.masking import MaskingAggregator, MaskingMember, RoundConfig
from worldlm_secure.secagg.masking_messages import (
    KeyAdvert,
    MaskedInput,
    NeighbourKeys,
    ShareDelivery,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from worldlm_secure.transport import federation_pb2 as pb
from worldlm_secure.transport.board import RoundBoard
from worldlm_secure.transport.chunks import Payload
from worldlm_secure.transport.client import SiteClient
from worldlm_secure.transport.handler import Announcement, Inbound

log = logging.getLogger("worldlm_secure.node")
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


def _poll(client: SiteClient, kind: int, round_id: int, deadline: float) -> Inbound:
    while True:
        got = client.fetch_secagg(kind, round_id=round_id)
        if got:
            return got[0]
        if time.monotonic() > deadline:
            raise SecAggError(
                f"round {round_id}: no {pb.SecAggKind.Name(kind)} from federation {client.federation!r} within the "
                "step timeout; this member treats the round as aborted"
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
    client.send_secagg(pb.SECAGG_MASKING_ADVERTISE_KEYS, Payload.from_bytes(member.advertise().to_bytes()), round_id=rid)
    keys = NeighbourKeys.from_bytes(_poll(client, pb.SECAGG_MASKING_KEY_BUNDLE, rid, step()).payload.to_bytes())
    client.send_secagg(pb.SECAGG_MASKING_ENCRYPTED_SHARES, Payload.from_bytes(member.share_keys(keys).to_bytes()), round_id=rid)
    delivery = ShareDelivery.from_bytes(_poll(client, pb.SECAGG_MASKING_ENCRYPTED_SHARES, rid, step()).payload.to_bytes())
    masked = member.masked_input(delivery, vector)
    before_input(keys.advertised)
    client.upload_update(Payload.from_bytes(masked.to_bytes()), secagg_kind=pb.SECAGG_MASKING_MASKED_INPUT, round_id=rid)
    request = UnmaskRequest.from_bytes(_poll(client, pb.SECAGG_MASKING_UNMASK_REQUEST, rid, step()).payload.to_bytes())
    client.send_secagg(pb.SECAGG_MASKING_UNMASK_SHARES, Payload.from_bytes(member.unmask(request).to_bytes()), round_id=rid)


# ---- aggregator side --------------------------------------------------------------------------------


class Liveness:
    """Members whose heartbeat went silent for ``silent_after`` seconds count as dropped (not waited for)."""

    def __init__(self, board: RoundBoard, silent_after: float) -> None:
        self.board, self.silent_after = board, silent_after

    def alive(self, member: str) -> bool:
        seen = self.board.last_seen(member)
        return seen is not None and time.monotonic() - seen <= self.silent_after


def _wait(
    board: RoundBoard, rid: int, kind: int, expected: Iterable[str], timeout: float, live: Liveness
) -> dict[str, Inbound]:
    """First message of ``kind`` from each expected member, until all arrived, timeout, or the rest went silent."""
    expected = set(expected)
    deadline = time.monotonic() + timeout
    while True:
        got: dict[str, Inbound] = {}
        for m in board.secagg_received(rid, kind):
            if m.sender in expected:
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
    first_timeout: float,
    step_timeout: float,
    live: Liveness,
    ckks: CkksRound | None = None,
) -> LinkOutcome:
    """Run the aggregator's side of round ``ann.round_id`` (already announced on ``board``)."""
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
    agg = MaskingAggregator(config)
    sent = 0

    def parse(msgs: dict[str, Inbound], cls: type) -> list:
        nonlocal sent
        sent += sum(m.payload.nbytes for m in msgs.values())
        return [cls.from_bytes(msgs[n].payload.to_bytes()) for n in sorted(msgs)]

    adverts = parse(_wait(board, rid, pb.SECAGG_MASKING_ADVERTISE_KEYS, cohort, first_timeout, live), KeyAdvert)
    bundles = agg.collect_adverts(adverts)
    _post(board, rid, pb.SECAGG_MASKING_KEY_BUNDLE, bundles)
    shares = parse(_wait(board, rid, pb.SECAGG_MASKING_ENCRYPTED_SHARES, bundles, step_timeout, live), ShareKeys)
    deliveries = agg.collect_shares(shares)
    _post(board, rid, pb.SECAGG_MASKING_ENCRYPTED_SHARES, deliveries)
    masked = parse(_wait_updates(board, rid, deliveries, step_timeout, live), MaskedInput)
    requests = agg.collect_masked(masked)
    _post(board, rid, pb.SECAGG_MASKING_UNMASK_REQUEST, requests)
    responses = parse(_wait(board, rid, pb.SECAGG_MASKING_UNMASK_SHARES, requests, step_timeout, live), UnmaskResponse)
    outcome = agg.finish(responses)
    return LinkOutcome(
        outcome.total, outcome.contributors, tuple(m for m in cohort if m not in outcome.contributors), sent
    )
