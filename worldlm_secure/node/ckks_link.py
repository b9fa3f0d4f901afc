"""One CKKS secure sum across one link of the tree, with real messages over gRPC/mTLS.

The member side runs the one member session (`secagg.ckks_round.CkksSession`, every key and every check)
and talks through a `SiteClient`; the aggregator side runs the one aggregator driver
(`ckks_round.aggregate`, which only ever holds the public context) over the federation's `BoardChannel`.
Every link round is its own key epoch (a fresh key each round: at least as often as
``rotate_every_rounds`` asks; the epoch number is the link round id). The steps as they travel
(`CKKS_STEPS`; protocols/federation.md, "CKKS over a link"):

    ckks_transport_key  holders send PUBLIC_CONTEXT(transport_cert) unasked   -- X25519 key signed by the identity
    ckks_generate       PUBLIC_CONTEXT(holder_certs) -> generator -> PUBLIC_CONTEXT(epoch_keys)
    ckks_commit         PUBLIC_CONTEXT(epoch_keys, only its own sealed key) -> every member
                        -> PUBLIC_CONTEXT(commitment or abstain)             -- a hash, no ciphertext
    ckks_protect        PUBLIC_CONTEXT(commitments) -> every committed member
                        -> UploadUpdate(CIPHERTEXT, contribution)             -- chunk-streamed
    ckks_decrypt        AGGREGATE(summed) -> every holder -> DECRYPTED(sums + signed confirmation)

What each member checks (in the session, against its own policy and the CA-verified ``ann.peer_keys``,
never the aggregator's word) is `ckks_round`'s. A message from the aggregator that does not even decode is
ignored (the member waits on); a request the member refuses ends its part of the round (`SecAggError`).
"""

from __future__ import annotations

import hashlib

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from worldlm_secure.errors import ConfigError, SecAggError
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.node.link import POLL_SECONDS, Alive, BoardChannel, BoardStep
from worldlm_secure.secagg import ckks_messages as wire
from worldlm_secure.secagg.ckks import EpochTrust, RoundSpec, key_holders
from worldlm_secure.secagg.ckks_params import CkksParams
from worldlm_secure.secagg.ckks_round import (
    COMMIT,
    CONTRIBUTE,
    DECRYPT,
    GENERATE,
    TRANSPORT_KEY,
    CkksKeyring,
    CkksRoundSetup,
    CkksSession,
    Encrypt,
    aggregate,
    round_result,
)
from worldlm_secure.secagg.protocol import BeforeReveal
from worldlm_secure.transport import federation_pb2 as pb
from worldlm_secure.transport.board import RoundBoard
from worldlm_secure.transport.chunks import Payload
from worldlm_secure.transport.client import MemberLink
from worldlm_secure.transport.handler import Announcement, Inbound

if TYPE_CHECKING:
    from worldlm_secure.policy.round import RoundPlan

log = logging.getLogger("worldlm_secure.node")


def _claims(*tags: str) -> Callable[[Inbound], bool]:
    """Whether a relayed message decodes as a CKKS message with one of ``tags`` (the session checks the rest)."""

    def claims(message: Inbound) -> bool:
        try:
            return wire.decode(message.payload.to_bytes()).tag in tags
        except SecAggError:
            return False

    return claims


# `ckks_round` step -> how it travels over the board (the contribution is an upload)
CKKS_STEPS: dict[str, BoardStep] = {
    TRANSPORT_KEY: BoardStep(None, pb.SECAGG_CKKS_PUBLIC_CONTEXT, claims=_claims(wire.TRANSPORT_CERT)),
    GENERATE: BoardStep(pb.SECAGG_CKKS_PUBLIC_CONTEXT, pb.SECAGG_CKKS_PUBLIC_CONTEXT, claims=_claims(wire.EPOCH_KEYS)),
    COMMIT: BoardStep(pb.SECAGG_CKKS_PUBLIC_CONTEXT, pb.SECAGG_CKKS_PUBLIC_CONTEXT,
                      claims=_claims(wire.COMMITMENT, wire.ABSTAIN)),
    CONTRIBUTE: BoardStep(pb.SECAGG_CKKS_PUBLIC_CONTEXT, pb.SECAGG_CKKS_CIPHERTEXT, upload=True),
    DECRYPT: BoardStep(pb.SECAGG_CKKS_AGGREGATE, pb.SECAGG_CKKS_DECRYPTED, claims=_claims(wire.DECRYPTED)),
}


@dataclass(frozen=True)
class CkksRound:
    """The public parameters of a CKKS link round, identical at members and aggregator."""

    params: CkksParams
    min_cohort: int

    @classmethod
    def from_plan(cls, plan: RoundPlan) -> "CkksRound":
        """From a `policy.plan_round` plan whose protocol is ckks (as the engine builds its CkksSecureSum)."""
        params = plan.params
        return cls(CkksParams.from_policy(params, getattr(params, "clip_range", None)), max(int(plan.min_cohort), 1))

    def holders(self, cohort: Iterable[str]) -> tuple[str, ...]:
        """The key holders of a round: the policy's choice among the cohort (holders outside it cannot take part)."""
        try:
            return key_holders(self.params, tuple(sorted(cohort)))
        except ConfigError:  # no named holder is in this cohort
            return ()

    def spec(self, round_id: int, key_id: str, n_values: int, cohort: tuple[str, ...]) -> RoundSpec:
        return RoundSpec.plan(self.params, round_id, key_id, n_values, cohort, self.min_cohort)

    def setup(self, ann: Announcement) -> CkksRoundSetup:
        """This node's view of round ``ann`` (verified by it): its own policy's holders and min_cohort, the
        peers' keys from CA-verified certificates; the key epoch is the link round."""
        cohort = tuple(ann.cohort)
        trust = EpochTrust(self.holders(cohort), dict(ann.peer_keys), self.min_cohort)
        # the announcement (its phase, the served model's SHA-256) goes into every commitment: members and
        # holders of one sum check they were all told the same (protocols/ckks.md §4)
        return CkksRoundSetup(self.params, ann.round_id, ann.round_id, cohort, self.min_cohort, trust,
                              hashlib.sha256(ann.params).digest())

    def run_member(self, client: MemberLink, identity: NodeIdentity, ann: Announcement, vector: np.ndarray, *,
                   before_input: Callable[..., None], before_reveal: BeforeReveal | None = None,
                   wait_timeout: float) -> None:
        member_round(client, identity, ann, self, vector, before_input=before_input, before_reveal=before_reveal,
                     wait_timeout=wait_timeout)

    def run_aggregator(self, board: RoundBoard, ann: Announcement, live: Alive, *, first_timeout: float,
                       step_timeout: float) -> "CkksOutcome":
        return aggregate_round(board, ann, self, None, first_timeout=first_timeout, step_timeout=step_timeout,
                               alive=live.alive)


@dataclass(frozen=True)
class CkksOutcome:
    """The aggregator's result: the decoded sum, contributors, rejected members (with reasons), bytes up."""

    total: np.ndarray
    contributors: tuple[str, ...]
    rejected: tuple[str, ...]
    bytes_up: int
    key_id: str


# ---- member side ------------------------------------------------------------------------------------


def _answer(client: MemberLink, rid: int, step: str, data: bytes) -> None:
    how = CKKS_STEPS[step]
    if how.upload:
        client.upload_update(Payload.from_bytes(data), secagg_kind=how.answer, round_id=rid)
    else:
        client.send_secagg(how.answer, Payload.from_bytes(data), round_id=rid)


def member_round(
    client: MemberLink,
    identity: NodeIdentity,
    ann: Announcement,
    setup: CkksRound,
    vector: np.ndarray,
    *,
    before_input: Callable[..., None],
    before_reveal: BeforeReveal | None = None,
    wait_timeout: float,
    encrypt: Encrypt | None = None,
) -> None:
    """Contribute ``vector`` to the CKKS sum of round ``ann.round_id`` through the member session; key holders
    also send their transport key, generate (the first) and decrypt. ``wait_timeout`` bounds each wait for
    the aggregator (it covers the other members' training). ``before_input(cohort, key_id=KEY_ID)`` runs
    right before the ciphertexts leave (the caller's ledger entry records the epoch's key id);
    ``before_reveal(contributors)``, at a key holder, right before its decryption leaves.
    ``encrypt``: replaces the honest encoding of the contribution (fault-injection tests only)."""
    rid = ann.round_id
    session = CkksSession(CkksKeyring(identity), setup.setup(ann), lambda: vector, before_input=before_input,
                          before_reveal=before_reveal, encrypt=encrypt)
    if session.named_holder:
        _answer(client, rid, TRANSPORT_KEY, session.handle(b""))
    seen: Counter[int] = Counter()  # requests already read, by kind (the board keeps its mailbox)
    end = time.monotonic() + wait_timeout
    while steps := session.pending():
        for kind in sorted({k for s in steps if (k := CKKS_STEPS[s].post) is not None}):
            new = client.fetch_secagg(kind, round_id=rid)[seen[kind]:]
            seen[kind] += len(new)
            for got in new:
                data = got.payload.to_bytes()
                try:
                    wire.decode(data)
                except SecAggError as exc:
                    log.warning("round %d: ignoring a %s message from the aggregator: %s", rid, pb.SecAggKind.Name(kind), exc)
                    continue
                answer = session.handle(data)  # a refusal (SecAggError) ends this member's part of the round
                _answer(client, rid, session.step, answer)
                end = time.monotonic() + wait_timeout
        if not session.pending():
            return
        if time.monotonic() > end:
            raise SecAggError(
                f"round {rid}: no {' or '.join(steps)} request from federation {client.federation!r} within the "
                "timeout; this member treats the round as aborted"
            )
        time.sleep(POLL_SECONDS)


# ---- aggregator side --------------------------------------------------------------------------------


class _Alive:
    def __init__(self, alive: Callable[[str], bool]) -> None:
        self.alive = alive


def aggregate_round(
    board: RoundBoard,
    ann: Announcement,
    setup: CkksRound,
    wait_updates: Callable[[Iterable[str], float], dict[str, Inbound]] | None,
    *,
    first_timeout: float,
    step_timeout: float,
    alive: Callable[[str], bool],
) -> CkksOutcome:
    """The aggregator's side of CKKS round ``ann.round_id`` (announced on ``board``): the one driver over a
    `BoardChannel`; it never holds a secret key. ``wait_updates(expected, timeout)``: how uploads are awaited
    (None: `BoardChannel`'s rule); ``alive(member)``: whether a silent member is still worth waiting for."""
    channel = BoardChannel(board, ann.round_id, _Alive(alive), CKKS_STEPS, wait_updates)
    trace, _ = aggregate(setup.setup(ann), channel, first_timeout=first_timeout, step_timeout=step_timeout)
    out = round_result(setup.params, tuple(ann.cohort), trace)
    return CkksOutcome(out.total, out.contributors, trace.rejected, trace.uploaded, trace.key_id)
