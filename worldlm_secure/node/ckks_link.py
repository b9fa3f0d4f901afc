"""One CKKS secure sum across one link of the tree, with real messages over gRPC/mTLS.

The roles are `secagg.ckks`'s (protocols/ckks.md), each in its own process: members run `CkksMember`,
the key holders (members named by the policy's ``ckks.key_holders``; by default the first cohort
member in sorted order) also run `CkksKeyHolder`, and the aggregator runs `CkksAggregator`, which only
ever holds the public context. Every link round is its own key epoch (a fresh key each round: at
least as often as ``rotate_every_rounds`` asks). Messages, in order (protocols/federation.md):

    holders:    PUBLIC_CONTEXT(transport_cert)                 -- X25519 key signed by the identity
    aggregator: PUBLIC_CONTEXT(holder_certs) -> generator      -- first holder (sorted) that sent one
    generator:  PUBLIC_CONTEXT(epoch_keys)                     -- public context + secret context
                                                                  sealed to each holder (ckks_keys)
    aggregator: PUBLIC_CONTEXT(epoch_keys) -> every member     -- each gets only its own sealed key
    members:    UploadUpdate(CIPHERTEXT, contribution)         -- signed ciphertexts, chunk-streamed
    aggregator: AGGREGATE(summed) -> every holder               -- the accepted signed contributions
    holders:    DECRYPTED(sums + signed confirmation)          -- the aggregator verifies they agree

What each member checks itself (its own policy and the CA-verified ``ann.peer_keys``, never the
aggregator's word): the generator it receives an epoch from is a key holder its policy names, and the
epoch is for this round; a generator seals the key only to key holders its policy names; a key holder
decrypts only what it re-adds from at least min_cohort contributions, each signed by its member for this
round and key (`CkksKeyHolder.decrypt`). A malformed message from the aggregator is ignored (the member
waits on); a bad contribution (malformed, signature, key, length, or a ciphertext that does not load)
or a malformed holder answer is dropped with a reason naming the member; the round goes on when
min_cohort contributions remain.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from worldlm_secure.errors import ConfigError, SecAggError
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.secagg import ckks_messages as wire
from worldlm_secure.secagg import ckks_packing as packing
from worldlm_secure.secagg.ckks import (
    CkksAggregator,
    CkksKeyHolder,
    CkksMember,
    CkksSecureSum,
    DecryptedAggregate,
    EpochTrust,
    RoundSpec,
    check_epoch,
    verify_aggregate,
)
from worldlm_secure.secagg.ckks_keys import EpochKeys, generate_epoch_keys
from worldlm_secure.secagg.ckks_params import CkksParams
from worldlm_secure.transport import federation_pb2 as pb
from worldlm_secure.transport.board import RoundBoard
from worldlm_secure.transport.chunks import Payload
from worldlm_secure.transport.client import MemberLink
from worldlm_secure.transport.handler import Announcement, Inbound

if TYPE_CHECKING:
    from worldlm_secure.policy.round import RoundPlan

log = logging.getLogger("worldlm_secure.node")
POLL_SECONDS = 0.1  # how often a waiting side looks again
_T = TypeVar("_T")


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
        cohort = tuple(sorted(cohort))
        try:
            named = CkksSecureSum(self.params).holder_names(cohort)
        except ConfigError:  # no named holder is in this cohort
            return ()
        return tuple(h for h in named if h in cohort)

    def spec(self, round_id: int, key_id: str, n_values: int, cohort: tuple[str, ...]) -> RoundSpec:
        return RoundSpec.plan(self.params, round_id, key_id, n_values, cohort, self.min_cohort)


@dataclass(frozen=True)
class CkksOutcome:
    """The aggregator's result: the decoded sum, contributors, rejected members (with reasons), bytes up."""

    total: np.ndarray
    contributors: tuple[str, ...]
    rejected: tuple[str, ...]
    bytes_up: int
    key_id: str


# ---- member side ------------------------------------------------------------------------------------


def _messages(client: MemberLink, kind: int, rid: int) -> list[wire.Message]:
    """The decodable messages waiting for this member; a malformed one is logged and ignored."""
    out = []
    for got in client.fetch_secagg(kind, round_id=rid):
        try:
            out.append(wire.decode(got.payload.to_bytes()))
        except SecAggError as exc:
            log.warning("round %d: ignoring a %s message from the aggregator: %s", rid, pb.SecAggKind.Name(kind), exc)
    return out


def _poll(client: MemberLink, kind: int, rid: int, tag: str, deadline: float,
          read: Callable[[wire.Message], _T]) -> _T:
    """The first ``tag`` message that ``read`` accepts (a SecAggError from ``read`` skips the message)."""
    while True:
        for msg in _messages(client, kind, rid):
            if msg.tag == tag:
                try:
                    return read(msg)
                except SecAggError as exc:
                    log.warning("round %d: ignoring a %s message from the aggregator: %s", rid, tag, exc)
        if time.monotonic() > deadline:
            raise SecAggError(
                f"round {rid}: no {tag} from federation {client.federation!r} within the timeout; this member treats "
                "the round as aborted"
            )
        time.sleep(POLL_SECONDS)


def member_round(
    client: MemberLink,
    identity: NodeIdentity,
    ann: Announcement,
    setup: CkksRound,
    vector: np.ndarray,
    *,
    before_input: Callable[..., None],
    wait_timeout: float,
    encrypt: Callable[[CkksMember, RoundSpec, np.ndarray], bytes] | None = None,
) -> None:
    """Contribute ``vector`` to the CKKS sum of round ``ann.round_id``; key holders also generate (the
    first), receive the sealed secret key and decrypt. ``wait_timeout`` bounds each wait for the
    aggregator (it covers the other members' training). ``before_input(cohort, key_id=KEY_ID)`` runs right
    before the ciphertexts leave (the caller's ledger entry records the epoch's key id). ``encrypt``: replaces the honest encoding of the
    contribution (fault-injection tests only)."""
    rid, me = ann.round_id, identity.name
    peers = dict(ann.peer_keys)
    trust = EpochTrust(setup.holders(ann.cohort), peers, setup.min_cohort)
    holder = CkksKeyHolder(identity) if me in trust.holders else None
    deadline = lambda: time.monotonic() + wait_timeout  # noqa: E731
    if holder is not None:
        client.send_secagg(pb.SECAGG_CKKS_PUBLIC_CONTEXT, Payload.from_bytes(wire.cert_bytes(holder.transport.cert)), round_id=rid)
    epoch = None
    generated = False
    end = deadline()
    while epoch is None:
        for msg in _messages(client, pb.SECAGG_CKKS_PUBLIC_CONTEXT, rid):
            try:
                if msg.tag == wire.EPOCH_KEYS:
                    epoch = _epoch_for_me(wire.epoch_from(msg), trust, rid, me)
                elif msg.tag == wire.HOLDER_CERTS and holder is not None and not generated:
                    # This holder is the generator: make the epoch's key and seal it to every holder's transport key.
                    certs = wire.certs_from(msg)
                    stray = sorted(set(certs) - set(trust.holders))
                    if stray:  # never seal the key to anyone the policy does not name, whatever the aggregator asks
                        raise SecAggError(f"round {rid}: asked to seal the CKKS key to {', '.join(stray)}, not key holders "
                                          f"the policy names ({', '.join(trust.holders)}); refused")
                    keys = generate_epoch_keys(identity, setup.params, rid, certs, peers)
                    client.send_secagg(pb.SECAGG_CKKS_PUBLIC_CONTEXT, Payload.from_bytes(wire.epoch_bytes(keys)), round_id=rid)
                    generated = True
            except SecAggError as exc:
                if msg.tag == wire.HOLDER_CERTS:
                    raise
                log.warning("round %d: %s", rid, exc)
                epoch = None
            if epoch is not None:
                break
        if epoch is None:
            if time.monotonic() > end:
                raise SecAggError(f"round {rid}: no key epoch from federation {client.federation!r} within the timeout; round aborted here")
            time.sleep(POLL_SECONDS)
    member = CkksMember(identity)
    member.install(epoch, trust)  # the generator is a named holder and signed the public context
    if holder is not None:
        holder.install(epoch, trust)
    spec = setup.spec(rid, epoch.key_id, int(np.asarray(vector).size), tuple(ann.cohort))
    body = (encrypt or (lambda m, s, v: wire.contribution_bytes(m.protect(s, v))))(member, spec, np.asarray(vector, dtype=np.float64))
    before_input(tuple(ann.cohort), key_id=epoch.key_id)
    client.upload_update(Payload.from_bytes(body), secagg_kind=pb.SECAGG_CKKS_CIPHERTEXT, round_id=rid)
    if holder is None:
        return
    summed, n_values = _poll(client, pb.SECAGG_CKKS_AGGREGATE, rid, wire.SUMMED, deadline(), wire.summed_from)
    # decrypts only a sum it re-adds from >= min_cohort contributions signed by their members (else SecAggError)
    sums, conf = holder.decrypt(summed, setup.spec(rid, epoch.key_id, n_values, tuple(ann.cohort)))
    client.send_secagg(pb.SECAGG_CKKS_DECRYPTED, Payload.from_bytes(wire.decrypted_bytes(sums, conf)), round_id=rid)


def _epoch_for_me(keys: EpochKeys, trust: EpochTrust, rid: int, me: str) -> EpochKeys:
    """The epoch if it is this round's and made by a key holder the policy names (`check_epoch`), else SecAggError."""
    if keys.epoch != rid:
        raise SecAggError(f"round {rid}: key epoch {keys.epoch} is not this round's; refused")
    check_epoch(keys, trust, me)
    return keys


# ---- aggregator side --------------------------------------------------------------------------------


def _collect(board: RoundBoard, rid: int, kind: int, tag: str, expected: Iterable[str], timeout: float,
             alive: Callable[[str], bool]) -> dict[str, wire.Message]:
    """First ``tag`` message from each expected member, until all arrived, timeout, or the rest went silent."""
    expected = set(expected)
    deadline = time.monotonic() + timeout
    while True:
        got: dict[str, wire.Message] = {}
        for m in board.secagg_received(rid, kind):
            if m.sender in expected and m.sender not in got:
                try:
                    msg = wire.decode(m.payload.to_bytes())
                except SecAggError as exc:
                    log.warning("round %d: %s from %s: %s", rid, pb.SecAggKind.Name(kind), m.sender, exc)
                    continue
                if msg.tag == tag:
                    got[m.sender] = msg
        missing = expected - set(got)
        if not missing or time.monotonic() > deadline or not any(alive(m) for m in missing):
            if missing:
                log.warning("round %d: no %s from %s; continuing without", rid, tag, sorted(missing))
            return got
        time.sleep(POLL_SECONDS)


def _post(board: RoundBoard, rid: int, kind: int, member: str, body: bytes) -> None:
    board.post_secagg(Inbound(board.name, rid, pb.PAYLOAD_KIND_SECAGG, kind, member, Payload.from_bytes(body)))


def aggregate_round(
    board: RoundBoard,
    ann: Announcement,
    setup: CkksRound,
    wait_updates: Callable[[Iterable[str], float], dict[str, Inbound]],
    *,
    first_timeout: float,
    step_timeout: float,
    alive: Callable[[str], bool],
) -> CkksOutcome:
    """The aggregator's side of CKKS round ``ann.round_id`` (announced on ``board``); it never holds a
    secret key. ``wait_updates(expected, timeout)``: the members' uploads (link.py's waiting rule)."""
    rid, cohort = ann.round_id, tuple(ann.cohort)
    peers = dict(ann.peer_keys)
    holders = setup.holders(cohort)
    if not holders:
        raise SecAggError(f"round {rid}: no key holder of the policy ({', '.join(setup.params.key_holders) or 'first member'}) is in the cohort; nothing released")
    got = _collect(board, rid, pb.SECAGG_CKKS_PUBLIC_CONTEXT, wire.TRANSPORT_CERT, holders, first_timeout, alive)
    certs = {}
    for h, cert_msg in got.items():
        try:
            certs[h] = wire.cert_from(cert_msg)
        except SecAggError as exc:
            log.warning("round %d: transport key of holder %s: %s; left out", rid, h, exc)
    bad = [h for h, c in certs.items() if c.holder != h or h not in peers or not c.verify(peers[h])]
    for h in bad:
        log.warning("round %d: transport key of holder %s is not signed by its identity; left out", rid, h)
        certs.pop(h)
    if not certs:
        raise SecAggError(f"round {rid}: no key holder ({', '.join(holders)}) sent a valid transport key; nothing released")
    generator = sorted(certs)[0]
    _post(board, rid, pb.SECAGG_CKKS_PUBLIC_CONTEXT, generator, wire.certs_bytes([certs[h] for h in sorted(certs)]))
    got = _collect(board, rid, pb.SECAGG_CKKS_PUBLIC_CONTEXT, wire.EPOCH_KEYS, [generator], step_timeout, alive)
    if generator not in got:
        raise SecAggError(f"round {rid}: key generator {generator!r} sent no key epoch; nothing released")
    try:
        keys = wire.epoch_from(got[generator])
    except SecAggError as exc:
        raise SecAggError(f"round {rid}: key epoch from {generator!r} is malformed ({exc}); nothing released") from None
    if keys.generator != generator or keys.epoch != rid or set(keys.wrapped) != set(certs):
        raise SecAggError(f"round {rid}: key epoch from {generator!r} is not for this round's holders; nothing released")
    agg = CkksAggregator(keys, peers[generator], setup.params)  # verifies the signature, refuses secret keys
    for m in cohort:
        _post(board, rid, pb.SECAGG_CKKS_PUBLIC_CONTEXT, m, wire.epoch_bytes(keys, only=m))

    ups = wait_updates(cohort, first_timeout)
    sent = sum(u.payload.nbytes for u in ups.values())
    contributions = {}
    rejected: list[str] = []
    for m in sorted(ups):
        try:
            c = wire.contribution_from(wire.decode(ups[m].payload.to_bytes()))
        except SecAggError as exc:
            rejected.append(f"ckks: contribution of member {m!r} rejected: not a CKKS contribution ({exc})")
            continue
        if c.member != m:
            rejected.append(f"ckks: contribution of member {m!r} rejected: it is signed as {c.member!r}")
            continue
        contributions[m] = c
    lengths = Counter(c.n_values for c in contributions.values())
    n_values = max(sorted(lengths), key=lambda n: lengths[n]) if lengths else 0
    spec = setup.spec(rid, keys.key_id, n_values, cohort)
    agg.open_round(spec)
    for m, c in contributions.items():
        agg.receive(c, peers.get(m))
    rejected += [str(e) for e in agg.rejected]
    for r in rejected:
        log.warning("round %d: %s", rid, r)
    if len(agg.contributors) < setup.min_cohort:
        detail = f"; rejected: {' | '.join(rejected)}" if rejected else ""
        raise SecAggError(
            f"round {rid}: only {len(agg.contributors)} of {len(cohort)} members contributed, below "
            f"min_cohort={setup.min_cohort}; nothing released{detail}"
        )
    summed = agg.summed()
    body = wire.summed_bytes(summed, n_values)
    for h in sorted(certs):
        _post(board, rid, pb.SECAGG_CKKS_AGGREGATE, h, body)
    got = _collect(board, rid, pb.SECAGG_CKKS_DECRYPTED, wire.DECRYPTED, sorted(certs), step_timeout, alive)
    if not got:
        raise SecAggError(f"round {rid}: no key holder ({', '.join(sorted(certs))}) decrypted the sum; nothing released")
    results = {}
    for h, decrypted_msg in got.items():
        try:
            results[h] = wire.decrypted_from(decrypted_msg)
        except SecAggError as exc:
            log.warning("round %d: decryption from key holder %s dropped: %s", rid, h, exc)
    if not results:
        raise SecAggError(f"round {rid}: no key holder ({', '.join(sorted(certs))}) returned a well-formed decryption; nothing released")
    releaser = sorted(results)[0]
    aggregate = DecryptedAggregate(rid, keys.key_id, summed.contributors, results[releaser][0], releaser,
                                   tuple(results[h][1] for h in sorted(results)))
    verify_aggregate(aggregate, peers, sorted(results))  # every holder that answered confirms the same sums
    p = setup.params
    total = packing.dequantize_sum(aggregate.integer_sums, len(summed.contributors), p.clip_range, p.value_bits)
    return CkksOutcome(total, summed.contributors, tuple(rejected), sent, keys.key_id)
