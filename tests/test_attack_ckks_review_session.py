"""Security review: attacks on CKKS secure aggregation through the REAL member session and aggregator driver.

Every test drives `ckks_round.CkksSession` (one per member, over its own `CkksKeyring`) and, where the
attacker lets the round run, `ckks_round.aggregate`, over an `InMemoryChannel` the attacker subclasses (the
aggregator routes every message: it may reorder, rewrite, drop or replay them). The same session runs on Ray
and over gRPC links (protocols/ckks.md §4), so what it refuses here it refuses everywhere.

Tests marked ``xfail(strict=True, reason="HOLE: ...")`` are attacks that SUCCEED against the current code
(the assertion states what the protocol should guarantee); the others are attacks that are refused.

Cohort site-0..site-3, min_cohort 3; the policy names site-0 the key holder (site-0 and site-3 where two
holders are needed); site-1 is the victim, site-2 (mallory) a colluding member that is not a key holder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import numpy as np
import pytest
import tenseal as ts

from worldlm_secure.errors import SecAggError
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.secagg import ckks_messages as wire
from worldlm_secure.secagg import ckks_packing as packing
from worldlm_secure.secagg.channel import InMemoryChannel
from worldlm_secure.secagg.ckks import Contribution, EpochTrust, RoundSpec, SummedCiphertext
from worldlm_secure.secagg.ckks_round import round_result
from worldlm_secure.secagg.ckks_keys import TransportKey, generate_epoch_keys
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
    aggregate,
)

pytestmark = pytest.mark.ckks

PARAMS = CkksParams(key_holders=("site-0",), value_bits=20, clip_range=1.0)
NAMES = ("site-0", "site-1", "site-2", "site-3")
HOLDER, VICTIM, MALLORY, OTHER = "site-0", "site-1", "site-2", "site-3"
RID, MIN_COHORT = 1, 3
N_VALUES = 50
TOL = 4 * PARAMS.precision  # quantization bound of a 4-member sum


def _vectors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {m: rng.uniform(-0.9, 0.9, N_VALUES) for m in NAMES}


def _ids(extra: tuple[str, ...] = ()) -> dict[str, NodeIdentity]:
    return {n: NodeIdentity.generate(n) for n in (*NAMES, *extra)}


def _setup(ids: Mapping[str, NodeIdentity], *, params: CkksParams = PARAMS, rid: int = RID, epoch: int | None = None,
           cohort: tuple[str, ...] = NAMES, min_cohort: int = MIN_COHORT, holders: tuple[str, ...] | None = None
           ) -> CkksRoundSetup:
    holders = tuple(h for h in params.key_holders if h in cohort) if holders is None else holders
    trust = EpochTrust(holders, {n: i.public_bytes for n, i in ids.items()}, min_cohort)
    return CkksRoundSetup(params, rid, rid if epoch is None else epoch, cohort, min_cohort, trust)


def _sessions(ids, setup, vectors, keyrings=None, encrypt=None) -> dict[str, CkksSession]:
    keyrings = keyrings if keyrings is not None else {n: CkksKeyring(ids[n]) for n in setup.cohort}
    encrypt = encrypt or {}
    return {n: CkksSession(keyrings[n], setup, lambda n=n: vectors[n], encrypt=encrypt.get(n)) for n in setup.cohort}


Hook = Callable[[str, dict[str, bytes]], dict[str, bytes]]


class Attacker(InMemoryChannel):
    """The malicious aggregator's network position: ``before`` rewrites requests, ``after`` answers; every
    request and answer that crosses is kept in ``seen`` (step -> member -> bytes)."""

    def __init__(self, sessions, *, before: Hook | None = None, after: Hook | None = None, refusals="drop") -> None:
        super().__init__(sessions, refusals=refusals)
        self.before, self.after = before, after
        self.requests: dict[str, dict[str, bytes]] = {}
        self.answers: dict[str, dict[str, bytes]] = {}

    def exchange(self, step, requests, timeout):
        requests = self.before(step, dict(requests)) if self.before else dict(requests)
        self.requests.setdefault(step, {}).update(requests)
        answers = super().exchange(step, requests, timeout)
        self.answers.setdefault(step, {}).update(answers)
        return self.after(step, dict(answers)) if self.after else answers


def _decode_sum(sums: np.ndarray, k: int) -> np.ndarray:
    return packing.dequantize_sum(sums, k, PARAMS.clip_range, PARAMS.value_bits)


# ==== HOLES ==================================================================================================


def test_hole_colluding_member_cancels_honest_ciphertexts_so_the_holder_decrypts_the_victim_alone():
    """Aggregator + one non-holder member (the claim, §7: without a key holder it cannot learn any one member's
    contribution). The aggregator asks the honest members first, hands their ciphertexts to mallory, who
    answers with -C_site-0 - C_site-3 + 3*Enc(packed zeros), signed as its own. Before commit-then-reveal
    everything passed the aggregator's and the holder's checks and the decrypted "sum of 4" was the victim's
    vector. Now the honest ciphertexts leave only under a commitment list fixed before mallory saw them, so
    mallory's crafted contribution and theirs are never revealed under one list: the holder refuses the sum
    under either list."""
    ids = _ids()
    setup = _setup(ids)
    vectors = _vectors()
    stolen: dict[str, bytes] = {}

    def craft(member, spec: RoundSpec, vector: np.ndarray) -> bytes:
        ctx = member._ctx  # mallory's own (public) context of the epoch
        zero = member.protect(spec, np.zeros(spec.n_values))
        others = [wire.contribution_from(wire.decode(stolen[m])) for m in (HOLDER, OTHER)]
        chunks = []
        for i in range(spec.n_chunks):
            acc = ts.ckks_vector_from(ctx, zero.chunks[i])
            for o in others:  # one packed-zero encoding per member cancelled, so the centering count matches k
                acc.add_(ts.ckks_vector_from(ctx, zero.chunks[i]))
                acc.sub_(ts.ckks_vector_from(ctx, o.chunks[i]))
            chunks.append(acc.serialize())
        c = Contribution(spec.round_id, member.name, member.key_id, spec.n_values, tuple(chunks), 0)
        return wire.contribution_bytes(dataclasses.replace(c, signature=member.identity.sign(c.message())))

    class Colluding(Attacker):
        # Commit, then reveal: no ciphertext leaves before a commitment list is fixed, so the aggregator fixes one
        # without mallory (the honest three are >= min_cohort), has the honest members reveal under it, hands
        # their ciphertexts to mallory, and only then has mallory commit to its crafted combination.
        def exchange(self, step, requests, timeout):
            if step == COMMIT:
                honest = {m: r for m, r in requests.items() if m != MALLORY}
                out = super().exchange(step, honest, timeout)  # the honest members commit first ...
                listed = tuple(wire.commitment_from(wire.decode(out[m])) for m in sorted(out))
                revealed = super().exchange(CONTRIBUTE, dict.fromkeys(honest, wire.commitments_bytes(listed)), timeout)
                stolen.update(revealed)  # ... reveal, and the aggregator hands their ciphertexts to mallory
                out.update(super().exchange(step, {MALLORY: requests[MALLORY]}, timeout))
                return out
            if step == CONTRIBUTE:  # the honest members revealed already (once per round): replay their answers
                out = {m: stolen[m] for m in requests if m in stolen}
                out.update(super().exchange(step, {m: r for m, r in requests.items() if m not in stolen}, timeout))
                return out
            return super().exchange(step, requests, timeout)

    channel = Colluding(_sessions(ids, setup, vectors, encrypt={MALLORY: craft}))
    try:
        trace, _ = aggregate(setup, channel)
    except SecAggError:  # refused by the driver's own checks (the honest contributions name another list)
        trace = None
    if trace is not None:
        res = round_result(PARAMS, NAMES, trace)
        err = float(np.max(np.abs(res.total - vectors[VICTIM])))
        assert err > 1e-2, (f"released 'sum' of {res.contributors} equals the victim's vector (max error {err:.2g}); "
                            f"site-0, site-2 and site-3 were cancelled homomorphically by mallory's signed contribution")
    # A malicious aggregator skips its own checks and forwards all four revealed contributions to the holder,
    # under the list the honest members revealed under, then under the one mallory revealed under.
    assert MALLORY in channel.answers[CONTRIBUTE], channel.dropped  # mallory did reveal its crafted combination
    key_id = wire.epoch_from(wire.decode(channel.requests[COMMIT][HOLDER])).key_id
    spec = setup.spec(key_id, N_VALUES)
    cs = tuple(wire.contribution_from(wire.decode(channel.answers[CONTRIBUTE][m])) for m in NAMES)
    holder = channel.sessions[HOLDER].keys.holder
    for m in (HOLDER, MALLORY):
        listed = wire.commitments_from(wire.decode(channel.requests[CONTRIBUTE][m]))
        with pytest.raises(SecAggError, match="does not match its commitment|revealed under another commitment list"):
            holder.decrypt(SummedCiphertext(RID, key_id, NAMES, cs, listed), spec)


def test_two_holders_asked_for_sums_over_different_members_of_one_list_refuse_the_smaller():
    """Differencing across holders: key_holders [site-0, site-3]. site-0 is asked for the sum of all four,
    site-3 for the sum without the victim (still >= min_cohort). With several holders every sum must cover the
    whole commitment list (`CkksKeyHolder.verified_contributions`), so site-3 refuses (this was a hole: each
    holder decrypted once, and the difference of their answers was the victim's vector)."""
    params = dataclasses.replace(PARAMS, key_holders=(HOLDER, OTHER))
    ids = _ids()
    setup = _setup(ids, params=params)
    vectors = _vectors()

    def before(step, requests):
        if step == DECRYPT and OTHER in requests:
            summed, n = wire.summed_from(wire.decode(requests[OTHER]))
            keep = tuple(c for c in summed.contributions if c.member != VICTIM)
            requests[OTHER] = wire.summed_bytes(
                dataclasses.replace(summed, contributors=tuple(c.member for c in keep), contributions=keep), n)
        return requests

    channel = Attacker(_sessions(ids, setup, vectors), before=before)
    try:
        aggregate(setup, channel)  # site-0's answer alone releases the full sum, as the protocol allows
    except SecAggError:
        pass
    got = channel.answers.get(DECRYPT, {})
    assert HOLDER in got, channel.dropped
    full, _ = wire.decrypted_from(wire.decode(got[HOLDER]))
    leak = ""
    if OTHER in got:
        without, _ = wire.decrypted_from(wire.decode(got[OTHER]))
        err = float(np.max(np.abs(_decode_sum(full - without, 1) - vectors[VICTIM])))
        leak = f"; full sum minus site-3's sum equals the victim's vector (max error {err:.2g})"
    assert OTHER not in got, f"site-3 decrypted the sum without the victim after site-0 decrypted the full sum{leak}"


@pytest.mark.xfail(strict=True, reason=(
    "NON-GUARANTEE, documented (protocols/ckks.md §7, SECURITY.md): holders re-add the signed contributions "
    "themselves (§6), so they receive each member's ciphertext and one curious holder, without the aggregator, "
    "can decrypt each member's vector; holders are trusted with individual contributions"))
def test_hole_a_curious_holder_alone_reads_every_individual_contribution():
    ids = _ids()
    setup = _setup(ids)
    vectors = _vectors()
    sessions = _sessions(ids, setup, vectors)
    channel = Attacker(sessions)  # an HONEST aggregator: it only records what the holder receives
    trace, _ = aggregate(setup, channel)
    summed, n = wire.summed_from(wire.decode(channel.requests[DECRYPT][HOLDER]))
    secret = sessions[HOLDER].keys.holder._secret[summed.key_id]  # the holder's own key
    (c,) = [c for c in summed.contributions if c.member == VICTIM]
    slots = np.concatenate([np.asarray(ts.ckks_vector_from(secret, b).decrypt()) for b in c.chunks])
    try:
        leaked = _decode_sum(packing.unpack_sum(slots, n, 1, trace.spec.layout), 1)
    except packing.PackingError:
        return  # could not be read alone: defended
    err = float(np.max(np.abs(leaked - vectors[VICTIM])))
    assert err > 1e-2, f"the holder alone decrypted the victim's individual contribution (max error {err:.2g})"


def test_a_ray_actor_opens_one_session_per_prepared_release():
    from worldlm_secure.federation.site_actor import SiteMember

    ids = _ids()
    setup = _setup(ids)
    vectors = _vectors()

    class Opening:  # what RayChannel does: the first request of a member carries the setup
        def __init__(self, actor: SiteMember) -> None:
            self.actor, self.opened = actor, False

        def handle(self, data: bytes) -> bytes:
            first, self.opened = not self.opened, True
            return self.actor.ckks(data, setup) if first else self.actor.ckks(data)

    actors = {n: SiteMember(n, ids[n]) for n in NAMES}  # the site actor's member side, without a model
    for n, a in actors.items():
        a.prepare_vector(vectors[n])  # as after SiteActor.prepare
    channel = Attacker({n: Opening(a) for n, a in actors.items()})
    aggregate(setup, channel)
    summed, n = wire.summed_from(wire.decode(channel.requests[DECRYPT][HOLDER]))
    keep = tuple(c for c in summed.contributions if c.member != VICTIM)
    without = wire.summed_bytes(dataclasses.replace(summed, contributors=tuple(c.member for c in keep),
                                                    contributions=keep), n)
    with pytest.raises(SecAggError, match="a second protocol round over the same prepared release"):
        actors[HOLDER].ckks(without, setup)  # a second "opening" of the same round: a fresh session refused


# ==== DEFENDED ===============================================================================================


def test_replayed_epoch_keys_of_an_earlier_epoch_are_refused():
    """In process / Ray: epoch = round // rotate_every_rounds. Round 0 is epoch 0; in round 1 (epoch 1) the
    aggregator skips the ceremony and hands every member the epoch-0 keys again (replay)."""
    params = dataclasses.replace(PARAMS, rotate_every_rounds=1)
    ids = _ids()
    vectors = _vectors()
    keyrings = {n: CkksKeyring(ids[n]) for n in NAMES}
    s0 = _setup(ids, params=params, rid=0, epoch=0)
    _, ep0 = aggregate(s0, InMemoryChannel(_sessions(ids, s0, vectors, keyrings)))
    s1 = _setup(ids, params=params, rid=1, epoch=1)
    channel = InMemoryChannel(_sessions(ids, s1, vectors, keyrings), refusals="drop")
    with pytest.raises(SecAggError, match="only 0 of 4"):
        aggregate(s1, channel, dataclasses.replace(ep0, number=1))
    assert all("key epoch 0 is not this round's (1)" in channel.dropped[n] for n in NAMES), channel.dropped


def test_contributions_of_a_previous_round_are_not_re_added():
    """Same key epoch (rotate 0): round 0's signed contributions are substituted into round 1's sum (the
    victim's alone, then the whole round-0 sum relabelled as round 1). The holder refuses both."""
    ids = _ids()
    vectors = _vectors()
    keyrings = {n: CkksKeyring(ids[n]) for n in NAMES}
    s0 = _setup(ids, rid=0, epoch=0)
    c0 = Attacker(_sessions(ids, s0, vectors, keyrings))
    _, ep0 = aggregate(s0, c0)
    old, _ = wire.summed_from(wire.decode(c0.requests[DECRYPT][HOLDER]))

    for variant in ("victim's old contribution", "whole old sum relabelled"):
        s1 = _setup(ids, rid=1, epoch=0)

        def before(step, requests, variant=variant):
            if step == DECRYPT:
                summed, n = wire.summed_from(wire.decode(requests[HOLDER]))
                if variant.startswith("victim"):
                    swap = tuple(next(o for o in old.contributions if o.member == VICTIM) if c.member == VICTIM else c
                                 for c in summed.contributions)
                    summed = dataclasses.replace(summed, contributions=swap)
                else:
                    summed = dataclasses.replace(old, round_id=1)
                requests[HOLDER] = wire.summed_bytes(summed, n)
            return requests

        channel = Attacker(_sessions(ids, s1, vectors, keyrings), before=before)
        with pytest.raises(SecAggError, match="no key holder online"):
            aggregate(s1, channel, ep0)
        assert "for another round, key or length" in channel.dropped[HOLDER], (variant, channel.dropped)


def test_decrypt_before_protect_then_a_second_subset_is_refused():
    """Round 1 of a key epoch the holder already holds (in process / Ray keep the keyring): the aggregator
    asks the holder to decrypt BEFORE asking its contribution, then asks its contribution, then asks a second
    decryption over another contributor set (their difference would isolate one member)."""
    ids = _ids()
    vectors = _vectors()
    keyrings = {n: CkksKeyring(ids[n]) for n in NAMES}
    s0 = _setup(ids, rid=0, epoch=0)
    _, ep0 = aggregate(s0, InMemoryChannel(_sessions(ids, s0, vectors, keyrings)))
    s1 = _setup(ids, rid=1, epoch=0)
    sessions = _sessions(ids, s1, vectors, keyrings)

    def commit(members):
        return {m: wire.commitment_from(wire.decode(sessions[m].handle(wire.epoch_bytes(ep0.keys, only=m))))
                for m in members}

    def reveal(members, listed):
        return {m: wire.contribution_from(wire.decode(sessions[m].handle(wire.commitments_bytes(listed))))
                for m in members}

    first = commit((VICTIM, MALLORY, OTHER))
    listed = tuple(first[m] for m in sorted(first))
    cs = reveal((VICTIM, MALLORY, OTHER), listed)

    def summed(members, listed):
        return wire.summed_bytes(SummedCiphertext(1, ep0.keys.key_id, tuple(members), tuple(cs[m] for m in members),
                                                  listed), N_VALUES)

    sessions[HOLDER].handle(summed((VICTIM, MALLORY, OTHER), listed))  # decrypts (a real sum of 3)
    listed_4 = tuple(sorted((*listed, *commit((HOLDER,)).values()), key=lambda c: c.member))
    cs.update(reveal((HOLDER,), listed_4))
    with pytest.raises(SecAggError, match="a second ckks_decrypt request"):
        sessions[HOLDER].handle(summed((HOLDER, MALLORY, OTHER), listed))


def test_decrypt_request_with_another_n_values_is_refused():
    ids = _ids()
    setup = _setup(ids)

    def before(step, requests):
        if step == DECRYPT:
            summed, n = wire.summed_from(wire.decode(requests[HOLDER]))
            requests[HOLDER] = wire.summed_bytes(summed, n + 1)
        return requests

    channel = Attacker(_sessions(ids, setup, _vectors()), before=before)
    with pytest.raises(SecAggError, match="no key holder online"):
        aggregate(setup, channel)
    assert "another round, key or length" in channel.dropped[HOLDER], channel.dropped


def test_aggregator_setup_with_an_outsider_and_min_cohort_1_is_refused_by_the_holder():
    """The aggregator's own setup differs from the members': an extra (colluding) cohort member 'outsider'
    with a verified key, and min_cohort 1. It drops two honest contributions, so the sum is victim +
    outsider (outsider's vector known to it). The holder checks against ITS cohort and min_cohort."""
    ids = _ids(extra=("outsider",))
    vectors = {**_vectors(), "outsider": np.zeros(N_VALUES)}
    members = _setup(ids)
    agg = _setup(ids, cohort=(*NAMES, "outsider"), min_cohort=1)
    sessions = _sessions(ids, members, vectors)
    sessions["outsider"] = CkksSession(CkksKeyring(ids["outsider"]), agg, lambda: vectors["outsider"])

    def after(step, answers):
        if step == CONTRIBUTE:
            for m in (MALLORY, OTHER, HOLDER):
                answers.pop(m, None)
        return answers

    channel = Attacker(sessions, after=after)
    with pytest.raises(SecAggError, match="no key holder online"):
        aggregate(agg, channel)
    # commit, then reveal: the holder (as every member) already refuses to reveal under a commitment list that
    # names a member outside its cohort
    assert "the commitment of 'outsider' is a repeat, or not from a cohort member" in channel.dropped[HOLDER], \
        channel.dropped


def test_forged_abstention_for_the_victim_is_rejected_by_name_and_the_victim_still_counts():
    ids = _ids()
    setup = _setup(ids)
    vectors = _vectors()

    def after(step, answers):
        if step == CONTRIBUTE:
            answers[MALLORY] = wire.abstain_bytes(RID, VICTIM, "forged by mallory")
        return answers

    trace, _ = aggregate(setup, Attacker(_sessions(ids, setup, vectors), after=after))
    res = round_result(PARAMS, NAMES, trace)
    assert res.contributors == (HOLDER, VICTIM, OTHER)
    assert any("'site-2'" in r and "another round or member" in r for r in res.rejected), res.rejected
    assert np.max(np.abs(res.total - (vectors[HOLDER] + vectors[VICTIM] + vectors[OTHER]))) <= TOL


def test_holder_list_naming_the_aggregator_gives_it_nothing():
    """Policy key_holders: [aggregator] (a node outside the cohort). Members compute no holder; an epoch the
    aggregator generates (validly signed with a key the member knows) is refused, and no member generates."""
    from worldlm_secure.node.ckks_link import CkksRound

    params = dataclasses.replace(PARAMS, key_holders=("aggregator",))
    assert CkksRound(params, MIN_COHORT).holders(NAMES) == ()
    ids = _ids(extra=("aggregator",))
    setup = _setup(ids, params=params)  # trust.holders == (), peer_keys include the aggregator's key
    assert setup.trust.holders == ()
    with pytest.raises(SecAggError, match="no key holder"):
        aggregate(setup, InMemoryChannel(_sessions(ids, setup, _vectors())))
    tk = TransportKey(ids["aggregator"])
    keys = generate_epoch_keys(ids["aggregator"], params, RID, {"aggregator": tk.cert},
                               {"aggregator": ids["aggregator"].public_bytes})
    s = _sessions(ids, setup, _vectors())
    with pytest.raises(SecAggError, match="not a key holder the policy names"):
        s[VICTIM].handle(wire.epoch_bytes(keys, only=VICTIM))
    with pytest.raises(SecAggError, match="does not name it a key holder"):
        s[HOLDER].handle(b"")  # asked for a transport key
    with pytest.raises(SecAggError, match="does not name it a key holder"):
        s[HOLDER].handle(wire.certs_bytes([tk.cert]))  # asked to generate


def test_generator_asked_twice_in_a_round_and_epoch_of_another_round_refused():
    """The aggregator asks the generator for a second epoch in the same round, and hands a member the
    epoch made for link round 1 in link round 2 (over links epoch = link round id)."""
    ids = _ids()
    vectors = _vectors()
    s1 = _setup(ids)
    c1 = Attacker(_sessions(ids, s1, vectors))
    _, ep1 = aggregate(s1, c1)
    with pytest.raises(SecAggError, match="a second ckks_generate request"):
        c1.sessions[HOLDER].handle(c1.requests[GENERATE][HOLDER])
    with pytest.raises(SecAggError, match="a second ckks_transport_key request"):
        c1.sessions[HOLDER].handle(b"")
    s2 = _setup(ids, rid=2)
    fresh = _sessions(ids, s2, vectors)
    with pytest.raises(SecAggError, match="key epoch 1 is not this round's"):
        fresh[VICTIM].handle(wire.epoch_bytes(ep1.keys, only=VICTIM))
    assert TRANSPORT_KEY in c1.requests
