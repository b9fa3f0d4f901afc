"""The same CKKS attacks through every channel: the same refusals, by the same party.

Each case rewrites, at the channel (`Channel.exchange`), what the aggregator driver (`ckks_round.aggregate`)
sends a victim (as a malicious aggregator would, alone or with a colluding member) or what a member answers.
The bytes then reach the one member session (`ckks_round.CkksSession`) and the one aggregator driver exactly
as they would from an attacker. The channels: in-memory (`secagg.channel.InMemoryChannel`), Ray actors
(`federation.ray_channel.RayChannel`, the site actor's own `ckks` method) and gRPC/mTLS between real
sockets (`node.link.BoardChannel`, the node's member loop `node.ckks_link.member_round`).

Cohort site-0..site-3, min_cohort 3, the policy names site-0 the only key holder; site-2 is the colluding
member (a cohort member the policy does not name), site-1 the victim.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from worldlm_secure.errors import SecAggError
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.secagg import ckks_messages as wire
from worldlm_secure.secagg.channel import InMemoryChannel
from worldlm_secure.secagg.ckks import Contribution, EpochTrust, SummedCiphertext
from worldlm_secure.secagg.ckks_keys import TransportKey, generate_epoch_keys
from worldlm_secure.secagg.ckks_params import CkksParams
from worldlm_secure.secagg.ckks_round import (
    COMMIT,
    CONTRIBUTE,
    DECRYPT,
    GENERATE,
    CkksKeyring,
    CkksRoundSetup,
    CkksSession,
    aggregate,
)

PARAMS = CkksParams(key_holders=("site-0",), value_bits=20, clip_range=1.0)
NAMES = ("site-0", "site-1", "site-2", "site-3")
HOLDER, VICTIM, MALLORY = "site-0", "site-1", "site-2"
RID, MIN_COHORT = 1, 3
AGGREGATOR = "aggregator"  # the party name of refusals the aggregator makes
Rewrite = Callable[[str, dict[str, bytes], Mapping[str, NodeIdentity]], dict[str, bytes]]


def epoch_from_a_non_holder(step: str, requests: dict[str, bytes], ids: Mapping[str, NodeIdentity]) -> dict[str, bytes]:
    """The aggregator hands the victim an epoch the colluding non-holder made (and holds the secret key of)."""
    if step == COMMIT and VICTIM in requests:
        real = wire.epoch_from(wire.decode(requests[VICTIM]))
        tk = TransportKey(ids[MALLORY])
        keys = generate_epoch_keys(ids[MALLORY], PARAMS, real.epoch, {MALLORY: tk.cert}, {MALLORY: ids[MALLORY].public_bytes})
        requests[VICTIM] = wire.epoch_bytes(keys, only=VICTIM)
    return requests


def forged_epoch_signature(step: str, requests: dict[str, bytes], ids: Mapping[str, NodeIdentity]) -> dict[str, bytes]:
    """The aggregator makes its own key and signs the epoch in the named holder's name (a forged signature)."""
    if step == COMMIT and VICTIM in requests:
        real = wire.epoch_from(wire.decode(requests[VICTIM]))
        keys = generate_epoch_keys(NodeIdentity.generate(HOLDER), PARAMS, real.epoch, {}, {})
        requests[VICTIM] = wire.epoch_bytes(keys, only=VICTIM)
    return requests


def seal_to_a_non_holder(step: str, requests: dict[str, bytes], ids: Mapping[str, NodeIdentity]) -> dict[str, bytes]:
    """The aggregator adds the colluding non-holder's (validly self-signed) transport key to the holder list."""
    if step == GENERATE and HOLDER in requests:
        certs = wire.certs_from(wire.decode(requests[HOLDER]))
        requests[HOLDER] = wire.certs_bytes([*certs.values(), TransportKey(ids[MALLORY]).cert])
    return requests


def one_ciphertext_as_the_sum(step: str, requests: dict[str, bytes], ids: Mapping[str, NodeIdentity]) -> dict[str, bytes]:
    """The aggregator asks the holder to decrypt the victim's contribution alone, as "the sum"."""
    if step == DECRYPT and HOLDER in requests:
        summed, n_values = wire.summed_from(wire.decode(requests[HOLDER]))
        (victim,) = [c for c in summed.contributions if c.member == VICTIM]
        alone = SummedCiphertext(summed.round_id, summed.key_id, (VICTIM,), (victim,))
        requests[HOLDER] = wire.summed_bytes(alone, n_values)
    return requests


def impersonate(step: str, answers: dict[str, bytes], ids: Mapping[str, NodeIdentity]) -> dict[str, bytes]:
    """A malicious member (the victim's channel slot) answers with another member's signed contribution."""
    if step == CONTRIBUTE and VICTIM in answers and MALLORY in answers:
        answers[VICTIM] = answers[MALLORY]
    return answers


def _resigned(data: bytes, identity: NodeIdentity, chunks: tuple[bytes, ...]) -> Contribution:
    c = dataclasses.replace(wire.contribution_from(wire.decode(data)), chunks=chunks, signature=b"")
    return dataclasses.replace(c, signature=identity.sign(c.message()))


def reveal_other_than_committed(step: str, answers: dict[str, bytes], ids: Mapping[str, NodeIdentity]) -> dict[str, bytes]:
    """A malicious member (the victim's channel slot) reveals, validly signed, ciphertexts other than the ones it
    committed to (here: the colluder's, already revealed)."""
    if step == CONTRIBUTE and VICTIM in answers and MALLORY in answers:
        other = wire.contribution_from(wire.decode(answers[MALLORY])).chunks
        answers[VICTIM] = wire.contribution_bytes(_resigned(answers[VICTIM], ids[VICTIM], other))
    return answers


def swap_after_reveal(step: str, requests: dict[str, bytes], ids: Mapping[str, NodeIdentity]) -> dict[str, bytes]:
    """The aggregator and the colluder replace the colluder's contribution, once every ciphertext is revealed,
    by one made from another member's (the victim's ciphertext under the colluder's name, signed by it)."""
    if step == DECRYPT and HOLDER in requests:
        summed, n_values = wire.summed_from(wire.decode(requests[HOLDER]))
        (victim,) = [c for c in summed.contributions if c.member == VICTIM]
        swapped = tuple(dataclasses.replace(c, chunks=victim.chunks, signature=b"") if c.member == MALLORY else c
                        for c in summed.contributions)
        swapped = tuple(dataclasses.replace(c, signature=ids[MALLORY].sign(c.message())) if c.member == MALLORY else c
                        for c in swapped)
        requests[HOLDER] = wire.summed_bytes(dataclasses.replace(summed, contributions=swapped), n_values)
    return requests


def list_without_own_commitment(step: str, requests: dict[str, bytes], ids: Mapping[str, NodeIdentity]) -> dict[str, bytes]:
    """The aggregator asks the victim to reveal under a commitment list without the victim's own commitment."""
    if step == CONTRIBUTE and VICTIM in requests:
        listed = wire.commitments_from(wire.decode(requests[VICTIM]))
        requests[VICTIM] = wire.commitments_bytes(tuple(c for c in listed if c.member != VICTIM))
    return requests


# case -> (rewrite requests, rewrite answers, the refusing party, its refusal, whether the round still releases)
CASES: dict[str, tuple[Rewrite | None, Rewrite | None, str, str, bool]] = {
    "epoch from a non-holder": (epoch_from_a_non_holder, None, VICTIM,
                                "key epoch generated by 'site-2', not a key holder the policy names", True),
    "forged epoch signature": (forged_epoch_signature, None, VICTIM,
                               "public context is not signed by generator 'site-0'", True),
    "key sealed to a non-holder": (seal_to_a_non_holder, None, HOLDER,
                                   "asked to seal the CKKS key to site-2, not key holders the policy names", False),
    "one ciphertext as the sum": (one_ciphertext_as_the_sum, None, HOLDER,
                                  "refuses to decrypt round 1: a sum over 1 signed contributions, below min_cohort=3", False),
    "impersonating member": (None, impersonate, AGGREGATOR,
                             "contribution of member 'site-1' rejected: it is signed as 'site-2'", True),
    # commit, then reveal (protocols/ckks.md §4): a contribution must be the one its member committed to, and a
    # member reveals only under a commitment list that carries its own commitment
    "revealed other than committed": (None, reveal_other_than_committed, AGGREGATOR,
                                      "contribution of member 'site-1' rejected: does not match its commitment", True),
    "swapped after the reveal": (swap_after_reveal, None, HOLDER,
                                 "refuses to decrypt round 1: contribution of 'site-2' does not match its commitment",
                                 False),
    "list without own commitment": (list_without_own_commitment, None, VICTIM,
                                    "the commitment list does not carry its own commitment unchanged", True),
}


def _tampered(cls: type, monkeypatch: pytest.MonkeyPatch, ids: Callable[[], Mapping[str, NodeIdentity]], case: str) -> None:
    """Patch ``cls.exchange`` (a channel) to apply ``case``'s rewrites to what crosses it; ``ids()``: the members'
    identities (the colluding member's is the attacker's to use)."""
    before, after, _, _, _ = CASES[case]
    real = cls.exchange

    def exchange(self, step: str, requests: Mapping[str, bytes], timeout: float | None) -> dict[str, bytes]:  # type: ignore[no-untyped-def]
        requests = before(step, dict(requests), ids()) if before else requests
        answers = real(self, step, requests, timeout)
        return after(step, dict(answers), ids()) if after else answers

    monkeypatch.setattr(cls, "exchange", exchange)


def _vectors() -> dict[str, np.ndarray]:
    return {m: np.linspace(-0.9, 0.9, 50) * (i + 1) / 4 for i, m in enumerate(NAMES)}


def _setup(ids: Mapping[str, NodeIdentity]) -> CkksRoundSetup:
    trust = EpochTrust((HOLDER,), {n: i.public_bytes for n, i in ids.items()}, MIN_COHORT)
    return CkksRoundSetup(PARAMS, RID, RID, NAMES, MIN_COHORT, trust)


def _check(case: str, refusals: Mapping[str, str], total: np.ndarray | None, contributors: tuple[str, ...]) -> None:
    """``refusals``: party -> what it refused (members by name, the aggregator as AGGREGATOR)."""
    _, _, party, why, releases = CASES[case]
    assert why in refusals.get(party, ""), refusals
    assert (total is not None) == releases, refusals
    if total is not None:
        assert VICTIM not in contributors and len(contributors) == MIN_COHORT
        exact = sum(_vectors()[m] for m in contributors)
        assert np.max(np.abs(total - exact)) <= len(contributors) * PARAMS.precision  # the contributors' sum


def _driver(setup: CkksRoundSetup, channel: Any) -> dict[str, Any]:
    """The one aggregator driver over ``channel``; refusals by party, the released sum (None: aborted)."""
    from worldlm_secure.secagg.ckks_round import round_result

    try:
        trace, _ = aggregate(setup, channel, first_timeout=60, step_timeout=60)
    except SecAggError as exc:
        refusals = {m: why for m, why in channel.dropped.items()}
        return {"refusals": {**refusals, AGGREGATOR: str(exc)}, "total": None, "contributors": ()}
    res = round_result(PARAMS, NAMES, trace)
    refusals = {m: why for m, why in channel.dropped.items()}
    return {"refusals": {**refusals, AGGREGATOR: " | ".join(trace.rejected)}, "total": res.total,
            "contributors": res.contributors}


@pytest.mark.parametrize("case", sorted(CASES))
def test_in_memory_channel(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = {n: NodeIdentity.generate(n) for n in NAMES}
    setup = _setup(ids)
    vectors = _vectors()
    sessions = {n: CkksSession(CkksKeyring(ids[n]), setup, lambda n=n: vectors[n]) for n in NAMES}
    _tampered(InMemoryChannel, monkeypatch, lambda: ids, case)
    out = _driver(setup, InMemoryChannel(sessions, refusals="drop"))
    _check(case, out["refusals"], out["total"], out["contributors"])


@pytest.mark.ray
@pytest.mark.slow
def test_ray_channel(local_ray: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ray = local_ray
    from worldlm_secure.federation.ray_channel import RayChannel
    from worldlm_secure.federation.site_actor import SiteMember

    @ray.remote
    class Member(SiteMember):
        """The site actor's own member side (`SiteMember.ckks`, the one member session), without a model."""

        def __init__(self, name: str) -> None:
            SiteMember.__init__(self, name, NodeIdentity.generate(name))  # keys of its own until the first case

        def reset(self, key_file: Path, vector: np.ndarray) -> None:
            """A new member for the next case (new keys, no keyring, no session), as a fresh actor would be;
            one actor per member for every case, because each new actor process imports torch (~5 CPU-s)."""
            SiteMember.__init__(self, self.name, NodeIdentity.load(self.name, key_file))
            self.prepare_vector(vector)  # as after SiteActor.prepare: one session over this vector

    actors = {n: Member.remote(n) for n in NAMES}
    for case in sorted(CASES):
        with monkeypatch.context() as mp:
            ids = {n: NodeIdentity.generate(n) for n in NAMES}
            for n, identity in ids.items():
                identity.save(tmp_path / case / f"{n}.pem")
            setup = _setup(ids)
            ray.get([actors[n].reset.remote(tmp_path / case / f"{n}.pem", v) for n, v in _vectors().items()])
            _tampered(RayChannel, mp, lambda: ids, case)
            out = _driver(setup, RayChannel(ray, actors, setup, method="ckks", opening=(setup,)))
            # a Ray refusal arrives as the actor's error: the member's SecAggError is its last line
            _check(case, out["refusals"], out["total"], out["contributors"])
    for a in actors.values():
        ray.kill(a)


def _grpc_round(tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """One CKKS link round over real gRPC/mTLS sockets: members run `node.link.member_round` in threads, the
    federation `node.link.aggregate_round`, whose `BoardChannel` the case tampers with."""
    from worldlm_secure.node import link
    from worldlm_secure.node.board import NodeBoard
    from worldlm_secure.node.ckks_link import CkksRound
    from worldlm_secure.node.heartbeat import Heartbeat
    from worldlm_secure.transport.client import RetryPolicy, SiteClient
    from worldlm_secure.transport.handler import Announcement
    from worldlm_secure.transport.server import FederationServer, ServerConfig
    from worldlm_secure.transport.testing import make_pki
    from worldlm_secure.transport.tls import Roster

    pki = make_pki(tmp_path, "fed", ["fed", *NAMES])
    ids = {n: pki.identity(n) for n in NAMES}
    _tampered(link.BoardChannel, monkeypatch, lambda: ids, case)
    board = NodeBoard("fed")
    server = FederationServer(pki.credentials("fed"), Roster.of(list(NAMES)), board, ServerConfig())
    server.start()
    vectors = _vectors()
    clients = {m: SiteClient(server.target, pki.credentials(m), "fed", identity=ids[m], members=list(NAMES),
                             retry=RetryPolicy(attempts=2, initial_backoff=0.05)) for m in NAMES}
    for c in clients.values():
        c.enroll()
    aggregator = pki.identity("fed")
    board.announce(Announcement(RID, NAMES, "ckks", b"{}", 0, aggregator_key=aggregator.public_bytes))
    seen = {m: next(iter(clients[m].watch_rounds(after_round=0))) for m in NAMES}
    setup = CkksRound(PARAMS, MIN_COHORT)
    # A member that refuses goes silent while its heartbeat goes on: the aggregator waits ``first_timeout`` for
    # it, so members wait longer than that for the aggregator's next request.
    errors: dict[str, str] = {}

    def member(m: str) -> None:
        try:
            link.member_round(clients[m], ids[m], seen[m], None, vectors[m], ckks=setup, wait_timeout=40, timeout=8,
                              before_input=lambda cohort, key_id: None)
        except Exception as exc:  # collected: each member's refusal, by name
            errors[m] = f"{type(exc).__name__}: {exc}"

    beats = [Heartbeat(lambda c=clients[m]: c.heartbeat("x"), 0.5) for m in NAMES]
    for b in beats:
        b.start()
    threads = [threading.Thread(target=member, args=(m,)) for m in NAMES]
    for t in threads:
        t.start()
    try:
        ann = board.announcement(RID)
        assert ann is not None
        got = link.aggregate_round(board, ann, None, MIN_COHORT, identity=aggregator, first_timeout=10, step_timeout=4,
                                   live=link.Liveness(board, silent_after=3.0), ckks=setup)
        out = {"refusals": {**errors, AGGREGATOR: " | ".join(got.rejected)}, "total": got.total,
               "contributors": got.contributors}
    except SecAggError as exc:
        out = {"refusals": {AGGREGATOR: str(exc)}, "total": None, "contributors": ()}
    for t in threads:
        t.join(timeout=30)
    out["refusals"] = {**errors, **out["refusals"]}
    for b in beats:
        b.stop()
    for c in clients.values():
        c.close()
    server.stop()
    return out


@pytest.mark.network
@pytest.mark.parametrize("case", sorted(CASES))
def test_grpc_channel(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = _grpc_round(tmp_path, case, monkeypatch)
    _check(case, out["refusals"], out["total"], out["contributors"])


def test_a_holder_decrypts_once_per_round() -> None:
    """Differencing: an aggregator that has one round's sum decrypted, then asks again for the sum without the
    victim, would learn the victim's contribution. The holder's session answers one decryption per round.
    (Over a link the holder's part of the round ends with its one decryption: it reads no further request.)"""
    ids = {n: NodeIdentity.generate(n) for n in NAMES}
    setup = _setup(ids)
    vectors = _vectors()
    sessions = {n: CkksSession(CkksKeyring(ids[n]), setup, lambda n=n: vectors[n]) for n in NAMES}
    sent: dict[str, bytes] = {}
    real = InMemoryChannel.exchange

    class Recording(InMemoryChannel):
        def exchange(self, step: str, requests: Mapping[str, bytes], timeout: float | None) -> dict[str, bytes]:
            sent.update({step: requests[HOLDER]} if HOLDER in requests else {})
            return real(self, step, requests, timeout)

    aggregate(setup, Recording(sessions))
    summed, n_values = wire.summed_from(wire.decode(sent[DECRYPT]))
    keep = tuple(c for c in summed.contributions if c.member != VICTIM)
    without = dataclasses.replace(summed, contributors=tuple(c.member for c in keep), contributions=keep)
    with pytest.raises(SecAggError, match="ckks member 'site-0'.*a second ckks_decrypt request"):
        sessions[HOLDER].handle(wire.summed_bytes(without, n_values))
