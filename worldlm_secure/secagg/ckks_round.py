"""One CKKS round over any `Channel`: the member session and the aggregator driver, each written once.

`ckks.CkksMember`, `ckks.CkksKeyHolder` and `ckks.CkksAggregator` are the roles (keys and checks);
`ckks_messages` their bytes. This module runs them over a channel (`secagg.channel`), as
`masking_round` does for SecAgg+:

  member      `CkksSession.handle(bytes) -> bytes`, one per member and round, over the member's
              `CkksKeyring` (its identity, the epoch's verified public context and, as a key holder, its
              transport key and unwrapped secret key, kept across the rounds of a key epoch). It decodes
              the aggregator's request by its tag and answers; every check that protects the member is
              made here or in the role it calls, against the member's own `CkksRoundSetup` (the key
              holders its policy names, the peers' verified signing keys, its min_cohort), never the
              aggregator's word.
  aggregator  `aggregate(setup, channel, epoch)`: the key-epoch ceremony when a new epoch starts, then the
              round (`STEPS`, each one exchange); it holds only the public context.

Steps (requests and answers are `ckks_messages` bytes; protocols/ckks.md §3, §4, §6):

  ckks_transport_key  b""            -> the named holders: each answers an identity-signed X25519 key
  ckks_generate       holder_certs   -> the generator (first holder, sorted, that answered): epoch_keys
  ckks_commit         epoch_keys     -> every member (only its own sealed key): installs the epoch if new,
                                        encrypts its vector now and answers a signed commitment to the
                                        ciphertexts (or an abstention); nothing else leaves yet
  ckks_protect        commitments    -> every member that committed: checks the list (its own commitment
                                        unchanged, >= min_cohort distinct cohort members, each signed, this
                                        round and key), answers the contribution it committed to, its
                                        signature also covering the list's SHA-256
  ckks_decrypt        summed         -> the epoch's holders: each re-adds the signed contributions itself,
                                        decrypts once per round, answers sums + signed confirmation

The same two run in process (`CkksSecureSum` below, over an `InMemoryChannel`), on Ray site actors
(`federation.ray_ckks`, `RayChannel`) and between nodes over gRPC/mTLS (`node.ckks_link`, `BoardChannel`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol, TypeVar

import numpy as np
import tenseal as ts

from worldlm_secure.errors import SecAggError
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.secagg import ckks_messages as wire
from worldlm_secure.secagg import ckks_packing as packing
from worldlm_secure.secagg.channel import Channel, InMemoryChannel
from worldlm_secure.secagg.ckks import (
    CkksAggregator,
    CkksKeyHolder,
    CkksMember,
    CkksRoundTrace,
    CkksSumResult,
    Commitment,
    Contribution,
    DecryptedAggregate,
    EpochTrust,
    RoundSpec,
    SummedCiphertext,
    check_commitments,
    commitments_problem,
    key_holders,
    verify_aggregate,
)
from worldlm_secure.secagg.ckks_keys import EpochKeys, TransportCert, generate_epoch_keys
from worldlm_secure.secagg.ckks_params import CkksParams
from worldlm_secure.secagg.protocol import BeforeReveal, DropoutPlan, MemberInput, ProtectionStats, SecureSum

log = logging.getLogger(__name__)

TRANSPORT_KEY = "ckks_transport_key"
GENERATE = "ckks_generate"
COMMIT = "ckks_commit"
CONTRIBUTE = "ckks_protect"  # the reveal
DECRYPT = "ckks_decrypt"
# step -> the message tag a member answers it with (ckks_commit and ckks_protect: or an abstention)
STEPS: dict[str, str] = {TRANSPORT_KEY: wire.TRANSPORT_CERT, GENERATE: wire.EPOCH_KEYS, COMMIT: wire.COMMITMENT,
                         CONTRIBUTE: wire.CONTRIBUTION, DECRYPT: wire.DECRYPTED}

Encrypt = Callable[[CkksMember, RoundSpec, np.ndarray], bytes]


@dataclass(frozen=True)
class CkksRoundSetup:
    """What one party knows of a round from its own side: ``params`` and ``min_cohort`` from its policy, the
    round id, the key epoch it belongs to (over a link: the round id; in process and on Ray: round //
    rotate_every_rounds), the cohort, and ``trust`` (the key holders its policy names among the cohort, the
    peers' verified signing keys)."""

    params: CkksParams
    round_id: int
    epoch: int
    cohort: tuple[str, ...]
    min_cohort: int
    trust: EpochTrust
    context: bytes = b""  # SHA-256 of the round's context (over links: the announcement's params), b"" in process

    def spec(self, key_id: str, n_values: int) -> RoundSpec:
        return RoundSpec.plan(self.params, self.round_id, key_id, n_values, self.cohort, self.min_cohort, self.context)


class CkksKeyring:
    """One member's CKKS keys across rounds: its identity, the current epoch's verified public context
    (``member``) and, while it holds the epoch's secret key, ``holder``; ``pending`` is the key holder whose
    transport key is out for the next epoch."""

    def __init__(self, identity: NodeIdentity) -> None:
        self.identity = identity
        self.member: CkksMember | None = None
        self.holder: CkksKeyHolder | None = None
        self.pending: CkksKeyHolder | None = None

    def install(self, keys: EpochKeys, trust: EpochTrust) -> None:
        """Join ``keys`` (a no-op when it is the epoch already joined): `CkksMember.install` checks the generator
        is a named holder and its signature; a copy sealed to this member is unwrapped with its pending
        transport key (`CkksKeyHolder.install`). The previous epoch's keys are dropped."""
        if self.member is not None and self.member.key_id == keys.key_id:
            return
        member = CkksMember(self.identity)
        member.install(keys, trust)
        holder = None
        if self.identity.name in keys.wrapped:
            if self.pending is None:
                raise SecAggError(f"{self.identity.name}: a secret key was sealed to it without its transport key; refused")
            self.pending.install(keys, trust)
            holder, self.pending = self.pending, None
        self.member, self.holder = member, holder


class CkksSession:
    """One member's side of one CKKS round: aggregator request bytes in, the member's answer bytes out.

    ``vector``: called once, when the member commits; ``before_input(cohort, key_id=...)``: runs right
    before the contribution leaves (the member's ledger entry); ``before_reveal(contributors)``: runs, at a key
    holder, after the forwarded sum passed every check and before its decryption leaves
    (`protocol.BeforeReveal`; it may refuse); ``encrypt``: replaces the honest encoding of
    the contribution (fault-injection tests only). Commit, then reveal: the contribution is encrypted and
    committed to (`ckks_commit`) before the member sees any commitment list, and revealed (`ckks_protect`) only
    under a list it checked. Each step is answered at most once per round; a request this member must not
    serve raises `SecAggError` (the member then leaves the round)."""

    def __init__(
        self,
        keys: CkksKeyring,
        setup: CkksRoundSetup,
        vector: Callable[[], np.ndarray],
        *,
        before_input: Callable[..., None] | None = None,
        before_reveal: BeforeReveal | None = None,
        encrypt: Encrypt | None = None,
    ) -> None:
        self.keys, self.setup = keys, setup
        self._vector, self._before_input, self._encrypt = vector, before_input, encrypt
        self._before_reveal = before_reveal
        self.done: set[str] = set()  # steps answered this round
        self.step = ""  # the step of the last request answered
        # after ckks_commit: the contribution's bytes, decoded (None: bytes that are no contribution, fault
        # injection only), and the signed commitment; None if it abstained
        self._committed: tuple[bytes, Contribution | None, Commitment] | None = None

    @property
    def name(self) -> str:
        return self.keys.identity.name

    @property
    def named_holder(self) -> bool:
        """Whether this member's policy names it a key holder of the round."""
        return self.name in self.setup.trust.holders

    def pending(self) -> tuple[str, ...]:
        """The steps this member may still be asked for this round (none: its part is over)."""
        if COMMIT not in self.done:
            return (GENERATE, COMMIT) if self.named_holder and GENERATE not in self.done else (COMMIT,)
        if DECRYPT in self.done:
            return ()
        reveal = (CONTRIBUTE,) if self._committed is not None and CONTRIBUTE not in self.done else ()
        return reveal + ((DECRYPT,) if self.keys.holder is not None else ())

    def _refuse(self, why: str) -> SecAggError:
        return SecAggError(f"ckks member {self.name!r}: round {self.setup.round_id}: {why}; refused")

    def _once(self, step: str) -> None:
        if step in self.done:
            raise self._refuse(f"a second {step} request (one answer per step and round)")
        self.done.add(step)
        self.step = step

    def handle(self, data: bytes) -> bytes:
        if not data:
            return self._transport_key()
        msg = wire.decode(data)
        if msg.tag == wire.HOLDER_CERTS:
            return self._generate(wire.certs_from(msg))
        if msg.tag == wire.EPOCH_KEYS:
            return self._commit(wire.epoch_from(msg))
        if msg.tag == wire.COMMITMENTS:
            return self._reveal(wire.commitments_from(msg))
        if msg.tag == wire.SUMMED:
            summed, n_values = wire.summed_from(msg)
            return self._decrypt(summed, n_values)
        raise self._refuse(f"a {msg.tag!r} message is not an aggregator request")

    def _transport_key(self) -> bytes:
        """As a key holder the policy names: a fresh identity-signed X25519 transport key for the new epoch."""
        if not self.named_holder:
            raise self._refuse("asked for a transport key, but its policy does not name it a key holder")
        self._once(TRANSPORT_KEY)
        self.keys.pending = CkksKeyHolder(self.keys.identity)
        return wire.cert_bytes(self.keys.pending.transport.cert)

    def _generate(self, certs: Mapping[str, TransportCert]) -> bytes:
        """As the generator: the epoch's key, sealed only to holders its own policy names."""
        trust = self.setup.trust
        if not self.named_holder:
            raise self._refuse("asked to generate a key epoch, but its policy does not name it a key holder")
        stray = sorted(set(certs) - set(trust.holders))
        if stray:  # never seal the key to anyone the policy does not name, whatever the aggregator asks
            raise self._refuse(f"asked to seal the CKKS key to {', '.join(stray)}, not key holders the policy names "
                               f"({', '.join(trust.holders)})")
        self._once(GENERATE)
        keys = generate_epoch_keys(self.keys.identity, self.setup.params, self.setup.epoch, certs, trust.peer_keys)
        return wire.epoch_bytes(keys)

    def _commit(self, keys: EpochKeys) -> bytes:
        """Join the epoch (if new) after every check, encrypt this member's vector now, keep the contribution and
        answer only a signed commitment to its ciphertexts (nothing of them leaves before the reveal)."""
        setup = self.setup
        if keys.epoch != setup.epoch:
            raise self._refuse(f"key epoch {keys.epoch} is not this round's ({setup.epoch})")
        self._once(COMMIT)
        self.keys.install(keys, setup.trust)
        member = self.keys.member
        assert member is not None
        vector = np.asarray(self._vector(), dtype=np.float64)
        spec = setup.spec(keys.key_id, int(vector.size))
        try:
            body = self._encrypt(member, spec, vector) if self._encrypt else wire.contribution_bytes(member.protect(spec, vector))
        except ValueError as exc:  # its own vector cannot be encoded (NaN, infinity): it abstains, stays a holder
            log.warning("round %d: %s cannot encode its vector (%s); abstains", setup.round_id, self.name, exc)
            return wire.abstain_bytes(setup.round_id, self.name, f"cannot encode its vector ({exc})")
        contribution: Contribution | None
        try:
            contribution = wire.contribution_from(wire.decode(body))
            chunks = contribution.chunks
        except SecAggError:  # fault injection: bytes that are no contribution; committed to as they are
            contribution, chunks = None, (body,)
        n_values = contribution.n_values if contribution is not None else spec.n_values
        commitment = member.commit(setup.round_id, n_values, chunks, setup.context)
        self._committed = (body, contribution, commitment)
        return wire.commitment_bytes(commitment)

    def _reveal(self, commitments: tuple[Commitment, ...]) -> bytes:
        """Once, after committing: check the aggregator's commitment list against this member's own setup (its
        own commitment in it unchanged; at least min_cohort distinct cohort members with verified keys, each
        commitment signed, for this round and key), then answer the contribution it committed to, signed
        together with the list's SHA-256."""
        setup = self.setup
        if self._committed is None:
            raise self._refuse("asked to reveal a contribution it never committed to this round")
        body, contribution, own = self._committed
        self._once(CONTRIBUTE)
        mine = [c for c in commitments if c.member == self.name]
        if mine != [own]:
            raise self._refuse("the commitment list does not carry its own commitment unchanged")
        floor = max(setup.min_cohort, setup.trust.min_cohort, 1)
        listed = check_commitments(commitments, setup.trust, setup.round_id, own.key_id, setup.cohort, floor,
                                   f"ckks member {self.name!r}: round {setup.round_id}", setup.context)
        if contribution is not None:
            body = wire.contribution_bytes(contribution.revealed(listed, self.keys.identity))
        if self._before_input is not None:
            self._before_input(setup.cohort, key_id=own.key_id)
        return body

    def _decrypt(self, summed: SummedCiphertext, n_values: int) -> bytes:
        """As a key holder, once per round: re-add the forwarded signed contributions (`CkksKeyHolder.decrypt`:
        at least min_cohort, each verified), decrypt, and sign a confirmation of the sums."""
        holder = self.keys.holder
        if holder is None:
            raise self._refuse("asked to decrypt, but it holds no secret key of this epoch")
        self._once(DECRYPT)
        sums, conf = holder.decrypt(summed, self.setup.spec(summed.key_id, n_values))
        if self._before_reveal is not None:
            self._before_reveal(tuple(sorted(summed.contributors)))
        return wire.decrypted_bytes(sums, conf)


# ---- aggregator ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CkksEpoch:
    """The aggregator's view of a key epoch: its number, the public keys message, the aggregator holding the
    public context, and the holders the secret key was sealed to."""

    number: int
    keys: EpochKeys
    aggregator: CkksAggregator
    holders: tuple[str, ...]


@dataclass
class _Exchanges:
    """The aggregator's bookkeeping over one round's exchanges: bytes by member, time, who left and why."""

    channel: Channel
    round_id: int
    up: dict[str, int] = field(default_factory=dict)
    down: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    step_up: dict[str, int] = field(default_factory=dict)  # step -> bytes of every answer to it
    refused: dict[str, str] = field(default_factory=dict)

    def send(self, step: str, requests: Mapping[str, bytes], timeout: float | None) -> dict[str, bytes]:
        """Send ``requests`` (members refused earlier are out of the round); the answers, as bytes."""
        requests = {m: data for m, data in requests.items() if m not in self.refused}
        for m, data in requests.items():
            self.down[m] = self.down.get(m, 0) + len(data)
        start = time.perf_counter()
        answers = self.channel.exchange(step, requests, timeout)
        self.seconds[step] = self.seconds.get(step, 0.0) + time.perf_counter() - start
        out: dict[str, bytes] = {}
        for m in requests:
            if m in answers:
                data = answers[m]
                out[m] = data if isinstance(data, bytes) else b""  # anything but bytes fails to decode
                self.up[m] = self.up.get(m, 0) + len(out[m])
                self.step_up[step] = self.step_up.get(step, 0) + len(out[m])
        return out

    def __call__(self, step: str, requests: Mapping[str, bytes], timeout: float | None) -> dict[str, wire.Message]:
        """`send`, then the answers decoded, carrying the step's tag (anything else: that member is refused)."""
        out: dict[str, wire.Message] = {}
        for m, data in self.send(step, requests, timeout).items():
            try:
                msg = wire.decode(data)
                if msg.tag != STEPS[step]:
                    raise SecAggError(f"answered with a {msg.tag!r} message, expected {STEPS[step]!r}")
            except SecAggError as exc:
                self.refuse(m, f"{step}: {exc}")
                continue
            out[m] = msg
        return out

    def refuse(self, member: str, why: str) -> None:
        self.refused[member] = why
        log.warning("round %d: %s: %s", self.round_id, member, why)

    def reasons(self, members: tuple[str, ...]) -> str:
        gone = {**dict(self.channel.dropped), **self.refused}
        why = [f"{m}: {gone[m]}" for m in members if m in gone]
        return f" ({' | '.join(why)})" if why else ""


def _ceremony(setup: CkksRoundSetup, ex: _Exchanges, first_timeout: float | None,
              step_timeout: float | None) -> CkksEpoch:
    """A new key epoch, made by a named key holder: the aggregator only relays certificates and sealed keys."""
    rid, holders, peers = setup.round_id, setup.trust.holders, setup.trust.peer_keys
    certs: dict[str, TransportCert] = {}
    for h, msg in ex(TRANSPORT_KEY, dict.fromkeys(holders, b""), first_timeout).items():
        try:
            cert = wire.cert_from(msg)
        except SecAggError as exc:
            ex.refuse(h, f"{TRANSPORT_KEY}: not a transport key ({exc})")
            continue
        if cert.holder != h or h not in peers or not cert.verify(peers[h]):
            ex.refuse(h, f"{TRANSPORT_KEY}: transport key not signed by its identity")
            continue
        certs[h] = cert
    if not certs:
        raise SecAggError(f"round {rid}: no key holder ({', '.join(holders)}) sent a valid transport key; nothing "
                          f"released{ex.reasons(holders)}")
    generator = sorted(certs)[0]
    made = ex(GENERATE, {generator: wire.certs_bytes([certs[h] for h in sorted(certs)])}, step_timeout)
    if generator not in made:
        raise SecAggError(f"round {rid}: key generator {generator!r} made no key epoch; nothing released"
                          f"{ex.reasons((generator,))}")
    try:
        keys = wire.epoch_from(made[generator])
    except SecAggError as exc:
        raise SecAggError(f"round {rid}: key epoch from {generator!r} is malformed ({exc}); nothing released") from None
    if keys.generator != generator or keys.epoch != setup.epoch or set(keys.wrapped) != set(certs):
        raise SecAggError(f"round {rid}: key epoch from {generator!r} is not for this epoch's holders; nothing released")
    aggregator = CkksAggregator(keys, peers[generator], setup.params)  # verifies the signature, refuses secret keys
    return CkksEpoch(setup.epoch, keys, aggregator, tuple(sorted(certs)))


def _abstained(setup: CkksRoundSetup, m: str, msg: wire.Message) -> str | None:
    """The rejection of member ``m``'s abstention, or None when ``msg`` is no abstention; SecAggError when it is
    one for another round or member."""
    if msg.tag != wire.ABSTAIN:
        return None
    rid, member, reason = wire.abstain_from(msg)
    if (rid, member) == (setup.round_id, m):
        return f"ckks: contribution of member {m!r} rejected: it abstained: {reason}"
    raise SecAggError("an abstention for another round or member")


class _Signed(Protocol):
    @property
    def member(self) -> str: ...


_A = TypeVar("_A", bound=_Signed)


def _answers(setup: CkksRoundSetup, answers: Mapping[str, bytes], what: str, parse: Callable[[wire.Message], _A],
             check: Callable[[_A], str | None] | None = None) -> tuple[dict[str, _A], list[str]]:
    """The members' answers that decode as ``what`` (``parse``), come from the member that sent them and pass
    ``check``; a rejection naming the member for every other answer (an abstention included). A rejected
    member stays in the round (a key holder still decrypts)."""
    out: dict[str, _A] = {}
    rejected: list[str] = []
    for m in setup.cohort:
        if m not in answers:
            continue
        try:
            msg = wire.decode(answers[m])
            why = _abstained(setup, m, msg)
            if why is not None:
                rejected.append(why)
                continue
            item = parse(msg)
        except SecAggError as exc:
            rejected.append(f"ckks: contribution of member {m!r} rejected: not a CKKS {what} ({exc})")
            continue
        if item.member != m:
            rejected.append(f"ckks: contribution of member {m!r} rejected: it is signed as {item.member!r}")
            continue
        problem = check(item) if check is not None else None
        if problem:
            rejected.append(f"ckks: contribution of member {m!r} rejected: {problem}")
            continue
        out[m] = item
    return out, rejected


def _commitments(setup: CkksRoundSetup, answers: Mapping[str, bytes], key_id: str
                 ) -> tuple[dict[str, Commitment], list[str]]:
    """The members' commitments that verify (signed by the member, this round and key), and a rejection naming
    the member for each answer that is none."""
    return _answers(setup, answers, "commitment", wire.commitment_from, lambda c: commitments_problem(
        (c,), setup.trust, setup.round_id, key_id, setup.cohort, 0, setup.context))


def _contributions(setup: CkksRoundSetup, answers: Mapping[str, bytes]) -> tuple[dict[str, Contribution], list[str]]:
    """The members' decoded contributions, and a rejection (naming the member) for each answer that is none."""
    return _answers(setup, answers, "contribution", wire.contribution_from)


def aggregate(
    setup: CkksRoundSetup,
    channel: Channel,
    epoch: CkksEpoch | None = None,
    *,
    n_values: int | None = None,
    on_epoch: Callable[[CkksEpoch], None] | None = None,
    first_timeout: float | None = None,
    step_timeout: float | None = None,
) -> tuple[CkksRoundTrace, CkksEpoch]:
    """Run the aggregator's side of one round over ``channel``: a key ceremony unless ``epoch`` (the one the
    caller kept) is this round's, then contributions, the holders' decryption and `verify_aggregate`.

    ``setup``: the aggregator's view (its policy's holders and min_cohort, the members' verified keys);
    ``n_values``: the released length when the engine fixes it (else the length most contributions share);
    ``on_epoch``: told a new epoch as soon as the ceremony made it;
    ``first_timeout`` bounds the waits that follow the members' training (transport keys, contributions),
    ``step_timeout`` the others. Returns the round's trace and the epoch to keep. Aborts with `SecAggError`,
    nothing released, when fewer than min_cohort contributions are accepted or no holder confirms the sum."""
    rid, peers = setup.round_id, setup.trust.peer_keys
    if not setup.trust.holders:
        raise SecAggError(f"round {rid}: no key holder of the policy ({', '.join(setup.params.key_holders) or 'first member'}) "
                          "is in the cohort; nothing released")
    ex = _Exchanges(channel, rid)
    new_epoch = epoch is None or epoch.number != setup.epoch
    if new_epoch:
        epoch = _ceremony(setup, ex, first_timeout, step_timeout)
        if on_epoch is not None:
            on_epoch(epoch)
    assert epoch is not None
    keys, agg = epoch.keys, epoch.aggregator

    # commit, then reveal: no member's ciphertext leaves before every member whose contribution can be summed
    # has committed to its own (a colluding member cannot build its contribution from the others')
    answers = ex.send(COMMIT, {m: wire.epoch_bytes(keys, only=m) for m in setup.cohort}, first_timeout)
    commitments, rejected = _commitments(setup, answers, keys.key_id)
    if len(commitments) < max(setup.min_cohort, 1):
        left_out = tuple(rejected) + tuple(f"{m}: {why}" for m, why in sorted({**dict(channel.dropped), **ex.refused}.items()))
        detail = f"; rejected: {' | '.join(left_out)}" if left_out else ""
        raise SecAggError(f"round {rid}: only {len(commitments)} of {len(setup.cohort)} members committed, below "
                          f"min_cohort={setup.min_cohort}; nothing was released{detail}")
    listed = tuple(commitments[m] for m in sorted(commitments))
    answers = ex.send(CONTRIBUTE, dict.fromkeys(commitments, wire.commitments_bytes(listed)), first_timeout)
    contributions, more = _contributions(setup, answers)
    rejected += more
    start = time.perf_counter()
    lengths = Counter(c.n_values for c in listed)
    if n_values is None:
        n_values = max(sorted(lengths), key=lambda n: lengths[n]) if lengths else 0
    spec = setup.spec(keys.key_id, n_values)
    agg.open_round(spec, listed)
    for m, c in contributions.items():
        agg.receive(c, peers.get(m))
    rejected += [str(e) for e in agg.rejected]
    dropped = {**dict(channel.dropped), **ex.refused}
    left_out = tuple(rejected) + tuple(f"{m}: {why}" for m, why in sorted(dropped.items()))
    if len(agg.contributors) < max(setup.min_cohort, 1):
        detail = f"; rejected: {' | '.join(left_out)}" if left_out else ""
        raise SecAggError(
            f"round {rid}: only {len(agg.contributors)} of {len(setup.cohort)} members contributed, below "
            f"min_cohort={setup.min_cohort}; nothing was released{detail}"
        )
    summed = agg.summed()
    server_seconds = time.perf_counter() - start

    got = ex(DECRYPT, dict.fromkeys(epoch.holders, wire.summed_bytes(summed, n_values)), step_timeout)
    start = time.perf_counter()
    results = {}
    for h, msg in got.items():
        try:
            results[h] = wire.decrypted_from(msg)
        except SecAggError as exc:
            ex.refuse(h, f"{DECRYPT}: not a decryption ({exc})")
    if not results:
        raise SecAggError(f"round {rid}: no key holder online to decrypt ({', '.join(epoch.holders)}); nothing released"
                          f"{ex.reasons(epoch.holders)}")
    online = tuple(h for h in epoch.holders if h in results)
    aggregate = DecryptedAggregate(rid, keys.key_id, summed.contributors, results[online[0]][0], online[0],
                                   tuple(results[h][1] for h in online))
    verify_aggregate(aggregate, peers, online)  # every holder that answered confirms the same sums
    server_seconds += time.perf_counter() - start
    dropped = {**dict(channel.dropped), **ex.refused}
    left_out = tuple(rejected) + tuple(f"{m}: {why}" for m, why in sorted(dropped.items()))
    member_seconds = sum(ex.seconds.get(s, 0.0) for s in (TRANSPORT_KEY, GENERATE, COMMIT, CONTRIBUTE))
    trace = CkksRoundTrace(
        spec, keys.key_id, keys.public_context, epoch.number, new_epoch, setup.trust.holders, online, aggregate,
        left_out, agg.clipped, tuple(c.nbytes for c in contributions.values()), member_seconds, server_seconds,
        ex.seconds.get(DECRYPT, 0.0), uploaded=ex.step_up.get(CONTRIBUTE, 0), bytes_up=dict(ex.up), bytes_down=dict(ex.down),
    )
    return trace, epoch


# ---- in process ------------------------------------------------------------------------------------


class CkksSecureSum(SecureSum):
    """The `ckks` protocol behind the SecureSum interface, among in-process members (every run_round really
    encrypts): each member is a `CkksSession` over its own `CkksKeyring`, the aggregator the one
    driver `aggregate`, all messages through bytes over an `InMemoryChannel`."""

    name = "ckks"

    def __init__(self, params: CkksParams, identities: Mapping[str, NodeIdentity] | None = None) -> None:
        self.params = params
        self.identities: dict[str, NodeIdentity] = dict(identities or {})
        # The in-process roster of identity keys. Every EpochTrust holds this one dict, so a member whose
        # identity is generated after a key epoch started is known to the holders that check its signature.
        self._peer_keys: dict[str, bytes] = {n: i.public_bytes for n, i in self.identities.items()}
        self.intercept: Callable[[Contribution], Contribution] | None = None  # the "network": fault injection
        self._keyrings: dict[str, CkksKeyring] = {}
        self._epoch: CkksEpoch | None = None
        self._holder_names: tuple[str, ...] | None = None
        self.last_spec: RoundSpec | None = None

    def _identity(self, name: str) -> NodeIdentity:
        if name not in self.identities:  # simulation convenience: a member without a configured identity gets one
            self.identities[name] = NodeIdentity.generate(name)
            self._peer_keys[name] = self.identities[name].public_bytes
        return self.identities[name]

    def _keyring(self, name: str) -> CkksKeyring:
        if name not in self._keyrings:
            self._keyrings[name] = CkksKeyring(self._identity(name))
        return self._keyrings[name]

    @property
    def _members(self) -> dict[str, CkksMember]:
        """Each member's joined epoch (for inspection and tests)."""
        return {n: k.member for n, k in self._keyrings.items() if k.member is not None}

    @property
    def _holders(self) -> dict[str, CkksKeyHolder]:
        """The key holders of the current epoch (for inspection and tests)."""
        return {n: k.holder for n, k in self._keyrings.items() if k.holder is not None}

    @property
    def _aggregator(self) -> CkksAggregator:
        if self._epoch is None:
            raise SecAggError("ckks: no key epoch started yet")
        return self._epoch.aggregator

    def holder_names(self, members: Sequence[str]) -> tuple[str, ...]:
        """The key holders (`key_holders`), fixed at the first round."""
        if self._holder_names is None:
            self._holder_names = key_holders(self.params, members)
        return self._holder_names

    def epoch_of(self, round_id: int) -> int:
        r = self.params.rotate_every_rounds
        return round_id // r if r > 0 else 0

    def _started(self, epoch: CkksEpoch) -> None:
        self._epoch = epoch

    @property
    def key_id(self) -> str:
        return self._epoch.keys.key_id if self._epoch else ""

    @property
    def public_context(self) -> ts.Context:
        """The aggregator's context (public key only), for inspection and tests."""
        return self._aggregator.context

    def run_round(
        self,
        round_id: int,
        inputs: Sequence[MemberInput],
        *,
        min_cohort: int,
        dropouts: DropoutPlan = DropoutPlan(),
    ) -> CkksSumResult:
        """As `SecureSum.run_round`. Dropouts: ``before_keys`` and ``after_keys`` members never answer (a key
        holder among them neither makes nor receives the epoch's key), ``after_input`` members contribute but
        answer nothing after (a key holder among them does not decrypt)."""
        names = [m.member for m in inputs]
        if len(set(names)) != len(names):
            raise SecAggError(f"round {round_id}: duplicate member names in the cohort")
        self.params.check_cohort(len(inputs))
        holders = self.holder_names(names)
        keyrings = {n: self._keyring(n) for n in names}
        setup = CkksRoundSetup(self.params, round_id, self.epoch_of(round_id), tuple(names),
                                          max(min_cohort, 1), EpochTrust(holders, self._peer_keys))
        vectors = {m.member: m.vector for m in inputs}
        sessions = {n: CkksSession(keyrings[n], setup, partial(vectors.__getitem__, n)) for n in names}
        gone = dropouts.before_keys | dropouts.after_keys
        silent = {TRANSPORT_KEY: gone, COMMIT: gone, CONTRIBUTE: gone,
                  DECRYPT: dropouts.after_input}
        channel = _Intercepted(InMemoryChannel(sessions, silent, refusals="drop"), self.intercept)
        trace, self._epoch = aggregate(setup, channel, self._epoch, on_epoch=self._started)
        self.last_spec = trace.spec
        return round_result(self.params, names, trace)


class _Intercepted:
    """An in-process `Channel` whose contributions pass through ``intercept`` (fault injection: a tampering
    network); a contribution it makes unencodable arrives as bytes that do not decode."""

    def __init__(self, inner: InMemoryChannel, intercept: Callable[[Contribution], Contribution] | None) -> None:
        self.inner, self.intercept = inner, intercept

    @property
    def dropped(self) -> Mapping[str, str]:
        return self.inner.dropped

    def exchange(self, step: str, requests: Mapping[str, bytes], timeout: float | None) -> dict[str, bytes]:
        answers = self.inner.exchange(step, requests, timeout)
        if self.intercept is None or step != CONTRIBUTE:
            return answers
        out = {}
        for m, data in answers.items():
            msg = wire.decode(data)
            if msg.tag != wire.CONTRIBUTION:
                out[m] = data
                continue
            try:
                out[m] = wire.contribution_bytes(self.intercept(wire.contribution_from(msg)))
            except (TypeError, ValueError, AttributeError):  # fields no encoder takes
                out[m] = b""
        return out


def round_result(params: CkksParams, names: Sequence[str], t: CkksRoundTrace) -> CkksSumResult:
    """The `CkksSumResult` of a verified round: the dequantized sum and its costs (bytes: serialized sizes;
    expansion: ciphertext bytes per float32 of the vector)."""
    spec, layout, contributors = t.spec, t.spec.layout, t.aggregate.contributors
    n_values = spec.n_values
    total = packing.dequantize_sum(t.aggregate.integer_sums, len(contributors), params.clip_range, params.value_bits)
    up = t.up_bytes
    stats = ProtectionStats(
        protocol=CkksSecureSum.name,
        bytes_up_per_member=float(np.mean(up)) if up else 0.0,
        bytes_down_per_member=float(len(t.public_context)) if t.new_epoch else 0.0,
        expansion=(float(np.mean(up)) / (4.0 * n_values)) if up and n_values else 0.0,
        clipped_fraction=t.clipped / max(n_values * len(contributors), 1),
        member_seconds=t.member_seconds,
        server_seconds=t.server_seconds,
        extra={
            "key_id": t.key_id,
            "epoch": float(t.epoch),
            "key_holders": ",".join(t.holders),
            "releaser": t.online[0],
            "confirmed_by": ",".join(t.online),
            "values_per_slot": layout.values_per_slot,
            "slot_bits": float(layout.slot_bits),
            "headroom_bits": float(layout.headroom),
            "clip_range": params.clip_range,
            "precision_per_value": params.precision,
            "quantization_error_bound": params.precision * len(contributors),
            "holder_seconds": t.holder_seconds,
            "rejected": " | ".join(t.rejected),
            "members_sent": float(max(len(up), 1)),
        },
    )
    dropped = tuple(n for n in names if n not in contributors)
    return CkksSumResult(
        total=total, contributors=contributors, dropped=dropped, stats=stats, key_id=t.key_id, rejected=t.rejected,
        aggregate=t.aggregate,
    )


def make_ckks(
    params: object | None = None,
    identities: Mapping[str, NodeIdentity] | None = None,
    clip_range: float | None = None,
    **_: object,
) -> CkksSecureSum:
    """Registry factory: `params` is the policy's ckks section or a CkksParams; unknown kwargs are ignored."""
    return CkksSecureSum(CkksParams.from_policy(params, clip_range), identities)
