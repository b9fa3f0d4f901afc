"""CKKS rounds end to end: sums, weighted and attentive aggregation, dropouts, bad input, decryption path."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worldlm_secure.errors import SecAggError
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.secagg import DropoutPlan, MemberInput, make_secure_sum
from worldlm_secure.secagg.ckks import (
    CkksMember,
    Contribution,
    DecryptedAggregate,
    SummedCiphertext,
    verify_aggregate,
)
from worldlm_secure.secagg.ckks_params import CkksParams
from worldlm_secure.secagg.ckks_round import CkksSecureSum

NAMES = ("m0", "m1", "m2", "m3", "m4")


def build(params: CkksParams | None = None, names=NAMES) -> tuple[CkksSecureSum, dict[str, NodeIdentity]]:
    ids = {n: NodeIdentity.generate(n) for n in names}
    ss = make_secure_sum("ckks", params=params or CkksParams(), identities=ids)
    assert isinstance(ss, CkksSecureSum)
    return ss, ids


def inputs(rng, d: int, names=NAMES, scale: float = 1.0) -> list[MemberInput]:
    return [MemberInput(n, rng.uniform(-scale, scale, d)) for n in names]


def resign(c: Contribution, ident: NodeIdentity, **changes) -> Contribution:
    c = dataclasses.replace(c, signature=b"", **changes)
    return dataclasses.replace(c, signature=ident.sign(c.message()))


@settings(deadline=None, max_examples=8)
@given(d=st.integers(1, 9000), n=st.integers(1, 5), seed=st.integers(0, 2**32 - 1))
def test_sum_matches_plaintext_within_documented_bound(d, n, seed):
    rng = np.random.default_rng(seed)
    ss, _ = build(names=NAMES[:n])
    ins = inputs(rng, d, NAMES[:n], scale=1.3)  # some values beyond clip_range=1: clipped, reported
    res = ss.run_round(0, ins, min_cohort=1)
    exact = np.sum([np.clip(m.vector, -1, 1) for m in ins], axis=0)
    assert res.total.shape == (d,)
    assert np.max(np.abs(res.total - exact)) <= res.stats.extra["quantization_error_bound"]
    assert res.stats.extra["quantization_error_bound"] == pytest.approx(n / (2**21 - 2))
    clipped = sum(int(np.sum(np.abs(m.vector) > 1)) for m in ins)
    assert res.stats.clipped_fraction == pytest.approx(clipped / (n * d))
    assert res.contributors == NAMES[:n]


def test_large_vector_spans_many_ciphertexts_and_expansion_is_reported():
    rng = np.random.default_rng(1)
    ss, _ = build(names=NAMES[:3])
    ins = inputs(rng, 100_003, NAMES[:3])
    res = ss.run_round(0, ins, min_cohort=3)
    assert np.max(np.abs(res.total - np.sum([m.vector for m in ins], axis=0))) <= res.stats.extra["quantization_error_bound"]
    assert res.stats.bytes_up_per_member > 20 * 65_000  # about 30 ciphertexts of N=4096
    assert res.stats.expansion < 8.0
    assert res.stats.extra["values_per_slot"] >= 1.5


def test_small_ring_splits_values_across_slots():
    # N=2048 allows 54 modulus bits: one 30-bit data prime leaves 14-bit slots, less than one 21-bit value
    p = CkksParams(poly_modulus_degree=2048, coeff_mod_bit_sizes=(30, 24), scale_bits=14)
    rng = np.random.default_rng(2)
    ss, _ = build(p, NAMES[:2])
    ins = inputs(rng, 3000, NAMES[:2])
    res = ss.run_round(0, ins, min_cohort=2)
    assert res.stats.extra["values_per_slot"] < 1
    assert np.max(np.abs(res.total - np.sum([m.vector for m in ins], axis=0))) <= res.stats.extra["quantization_error_bound"]


def test_weighted_and_attentive_aggregation_equal_plaintext():
    """Members submit concat(w_k * delta_k, [w_k]); the aggregator only adds; division after decryption."""
    rng = np.random.default_rng(3)
    ss, _ = build()
    d, tau = 500, 0.5
    server = rng.normal(0, 1, d)
    thetas = {n: server + rng.normal(0, 0.05, d) for n in NAMES}
    scores = {n: -float(np.linalg.norm(thetas[n] - server)) for n in NAMES}
    hi = max(scores.values())
    w = {n: float(np.exp((scores[n] - hi) / tau)) for n in NAMES}  # in (0, 1]: inside the clip range
    ins = [MemberInput(n, np.concatenate([w[n] * (thetas[n] - server), [w[n]]])) for n in NAMES]
    res = ss.run_round(0, ins, min_cohort=3)
    secure = server + res.total[:d] / res.total[d]
    alpha = np.array([w[n] for n in NAMES]) / sum(w.values())
    plain = np.sum([a * thetas[n] for a, n in zip(alpha, NAMES)], axis=0)
    err = res.stats.extra["quantization_error_bound"]
    wsum = sum(w.values())
    bound = err * (1 + np.max(np.abs(res.total[:d] / res.total[d]))) / (wsum - err)
    assert np.max(np.abs(secure - plain)) <= bound
    assert bound < 1e-5
    # example-count weights (FedAvg) have the same shape: w_k = n_k / max n (public bound 1)
    counts = {"m0": 10, "m1": 300, "m2": 55, "m3": 1, "m4": 120}
    top = max(counts.values())
    ins = [MemberInput(n, np.concatenate([counts[n] / top * (thetas[n] - server), [counts[n] / top]])) for n in NAMES]
    res = ss.run_round(1, ins, min_cohort=3)
    assert res.stats.clipped_fraction == 0.0
    secure = server + res.total[:d] / res.total[d]
    fedavg = np.sum([counts[n] * thetas[n] for n in NAMES], axis=0) / sum(counts.values())
    wsum = sum(counts.values()) / top
    bound = err * (1 + np.max(np.abs(res.total[:d] / res.total[d]))) / (wsum - err)
    assert np.max(np.abs(secure - fedavg)) <= bound


def test_dropouts_leave_contributions_out_and_min_cohort_applies():
    rng = np.random.default_rng(4)
    ss, _ = build()
    ins = inputs(rng, 300)
    plan = DropoutPlan(before_keys=frozenset({"m1"}), after_keys=frozenset({"m2"}), after_input=frozenset({"m4"}))
    res = ss.run_round(0, ins, min_cohort=3, dropouts=plan)
    # after_input: the ciphertext was already sent; CKKS needs nothing more from that member
    assert res.contributors == ("m0", "m3", "m4")
    assert res.dropped == ("m1", "m2")
    keep = [m.vector for m in ins if m.member in res.contributors]
    assert np.max(np.abs(res.total - np.sum(keep, axis=0))) <= res.stats.extra["quantization_error_bound"]
    with pytest.raises(SecAggError, match="below min_cohort=4; nothing was released"):
        ss.run_round(1, ins, min_cohort=4, dropouts=plan)


# ---- bad input: each names the member, the round goes on without it --------------------------


def _bad_round(mutate, min_cohort=3, victim="m2", d=5000):
    rng = np.random.default_rng(5)
    ss, ids = build()
    ins = inputs(rng, d)

    def net(c: Contribution) -> Contribution:
        return mutate(c, ids[c.member], ss) if c.member == victim else c

    ss.intercept = net
    res = ss.run_round(0, ins, min_cohort=min_cohort)
    assert victim not in res.contributors and victim in res.dropped
    assert len(res.rejected) == 1 and f"member {victim!r}" in res.rejected[0]
    assert victim in res.stats.extra["rejected"]
    keep = [m.vector for m in ins if m.member != victim]
    assert np.max(np.abs(res.total - np.sum(keep, axis=0))) <= res.stats.extra["quantization_error_bound"]
    return res.rejected[0]


def _other_federation(c: Contribution, params: CkksParams) -> Contribution:
    """A contribution of zeros made by a member of another federation (own key, maybe other parameters)."""
    other, _ = build(params, ("x0",))
    other.run_round(0, [MemberInput("x0", np.zeros(c.n_values))], min_cohort=1)
    assert other.last_spec is not None
    return other._members["x0"].protect(other.last_spec, np.zeros(c.n_values))


def _other_federation_chunks(c: Contribution, params: CkksParams) -> tuple[bytes, ...]:
    return _other_federation(c, params).chunks


def test_ciphertext_from_other_context_is_rejected_naming_member():
    # a member holding another key (a stale epoch, another federation): its key id does not match
    other_key = {}

    def stale(c, ident, ss):
        o = _other_federation(c, CkksParams())
        other_key["id"] = o.key_id
        return resign(c, ident, key_id=o.key_id, chunks=o.chunks)

    msg = _bad_round(stale)
    assert f"encrypted under key {other_key['id']}" in msg and "fetch the current public context" in msg

    # other parameters (N=8192) under the right key id: the ciphertexts do not load
    def other_params(c, ident, ss):
        chunks = _other_federation_chunks(c, CkksParams(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 60)))
        return resign(c, ident, chunks=(chunks * len(c.chunks))[: len(c.chunks)])

    msg = _bad_round(other_params)
    assert "does not load under the federation context" in msg, msg


def test_same_parameters_other_key_with_lying_header_aborts_at_decryption(monkeypatch):
    """A member that encrypts under another key yet claims the federation's key id cannot be caught by the
    aggregator (semantic security); the key holders' integrity check catches the garbage sum. (The member
    lies when it encrypts, so it commits to the lie: commit, then reveal, cannot tell it from an honest one.)"""
    rng = np.random.default_rng(6)
    ss, ids = build()
    ins = inputs(rng, 2000)
    honest = CkksMember.protect

    def liar(self, spec, vector):
        c = honest(self, spec, vector)
        if self.name != "m3":
            return c
        return resign(c, ids["m3"], chunks=_other_federation_chunks(c, CkksParams()))

    monkeypatch.setattr(CkksMember, "protect", liar)
    with pytest.raises(SecAggError, match="integrity check.*round aborted"):
        ss.run_round(0, ins, min_cohort=3)


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_truncated_ciphertext_is_rejected_naming_member(where):
    def truncate(c, ident, ss):
        i = {"first": 0, "middle": len(c.chunks) // 2, "last": len(c.chunks) - 1}[where]
        chunks = list(c.chunks)
        chunks[i] = chunks[i][: len(chunks[i]) // 3]
        return resign(c, ident, chunks=tuple(chunks))

    assert "does not load" in _bad_round(truncate)


@settings(deadline=None, max_examples=6)
@given(pos=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_corrupted_ciphertext_in_transit_is_rejected_naming_member(pos, bit):
    # a flipped bit usually still deserializes (SEAL accepts any in-range coefficient): the member's
    # signature over the payload is what catches it
    def flip(c, ident, ss):
        blob = bytearray(c.chunks[0])
        blob[int(pos * len(blob))] ^= 1 << bit
        return dataclasses.replace(c, chunks=(bytes(blob), *c.chunks[1:]))

    assert "signature does not verify" in _bad_round(flip, d=300)


def test_corrupted_by_the_member_itself_is_rejected_or_caught():
    # the member signs garbage: the aggregator refuses streams that do not load
    def garbage(c, ident, ss):
        return resign(c, ident, chunks=(b"\x00" * 100,) * len(c.chunks))

    assert "does not load" in _bad_round(garbage)


def test_wrong_length_stream_is_rejected_naming_member():
    def drop_chunk(c, ident, ss):
        return resign(c, ident, chunks=c.chunks[:-1])

    assert "wrong-length stream" in _bad_round(drop_chunk)

    def lie_length(c, ident, ss):
        return resign(c, ident, n_values=c.n_values + 1)

    assert "wrong-length stream" in _bad_round(lie_length)

    # a member whose vector has the wrong length
    rng = np.random.default_rng(7)
    ss, _ = build()
    ins = inputs(rng, 5000)
    ins[1] = MemberInput("m1", rng.uniform(-1, 1, 7000))
    res = ss.run_round(0, ins, min_cohort=3)
    assert res.contributors == ("m0", "m2", "m3", "m4")
    assert "m1" in res.rejected[0] and "wrong-length stream" in res.rejected[0]


def test_replayed_or_foreign_contribution_is_rejected():
    def replay_round(c, ident, ss):
        return resign(c, ident, round_id=c.round_id + 7)

    assert "replay" in _bad_round(replay_round)

    def impostor(c, ident, ss):
        return resign(c, NodeIdentity.generate(c.member))  # right name, wrong key

    assert "signature does not verify" in _bad_round(impostor)


def test_nan_vector_is_rejected_naming_member():
    rng = np.random.default_rng(8)
    ss, _ = build()
    ins = inputs(rng, 100)
    v = ins[0].vector.copy()
    v[3] = np.nan
    ins[0] = MemberInput("m0", v)
    res = ss.run_round(0, ins, min_cohort=3)
    assert res.contributors == ("m1", "m2", "m3", "m4") and "m0" in res.rejected[0]


def test_rejections_below_min_cohort_abort_with_names():
    def garbage(c):
        if c.member in ("m1", "m3"):
            return dataclasses.replace(c, chunks=c.chunks[:1])
        return c

    rng = np.random.default_rng(9)
    ss, _ = build()
    ss.intercept = garbage
    with pytest.raises(SecAggError, match=r"below min_cohort=4.*'m1'.*'m3'"):
        ss.run_round(0, inputs(rng, 5000), min_cohort=4)


# ---- decryption path -------------------------------------------------------------------------


def test_releasing_holder_and_confirmations():
    rng = np.random.default_rng(10)
    ss, ids = build(CkksParams(key_holders=("m1", "m3")))
    ins = inputs(rng, 800)
    res = ss.run_round(0, ins, min_cohort=3)
    agg = res.aggregate
    assert isinstance(agg, DecryptedAggregate)
    assert agg.releaser == "m1" and {c.holder for c in agg.confirmations} == {"m1", "m3"}
    pubs = {n: ids[n].public_bytes for n in ids}
    verify_aggregate(agg, pubs, ["m1", "m3"])
    # a releaser that alters the sums is not confirmed by the other holder
    forged = dataclasses.replace(agg, integer_sums=agg.integer_sums + 1)
    with pytest.raises(SecAggError, match="does not confirm"):
        verify_aggregate(forged, pubs, ["m1", "m3"])
    # the aggregator's own context, as the protocol runs it, cannot decrypt the sum it made
    import tenseal as ts

    pub = ss.public_context
    assert not pub.has_secret_key() and not pub.has_galois_keys() and not pub.has_relin_keys()
    agg_sum = ss._aggregator.summed()
    with pytest.raises(ValueError, match="secret"):
        ts.ckks_vector_from(pub, agg_sum.contributions[0].chunks[0]).decrypt()
    missing = dataclasses.replace(agg, confirmations=agg.confirmations[:1])
    with pytest.raises(SecAggError, match="no confirmation from key holder 'm3'"):
        verify_aggregate(missing, pubs, ["m1", "m3"])


def test_offline_holder_is_replaced_and_no_holder_aborts():
    rng = np.random.default_rng(11)
    ss, _ = build(CkksParams(key_holders=("m1", "m3")))
    ins = inputs(rng, 200)
    res = ss.run_round(0, ins, min_cohort=3, dropouts=DropoutPlan(after_input=frozenset({"m1"})))
    assert res.stats.extra["releaser"] == "m3" and "m1" in res.contributors
    with pytest.raises(SecAggError, match="no key holder online"):
        ss.run_round(1, ins, min_cohort=2, dropouts=DropoutPlan(after_input=frozenset({"m1", "m3"})))


@pytest.mark.parametrize("kind", ["scale", "short"])
def test_right_key_wrong_scale_or_size_is_rejected(kind):
    import tenseal as ts

    def skew(c, ident, ss):
        ctx = ss.public_context
        if kind == "scale":
            bad = ts.ckks_vector(ctx, [0.0] * ss.params.slot_count, scale=2.0**20).serialize()
        else:
            bad = ts.ckks_vector(ctx, [0.0] * 100).serialize()
        return resign(c, ident, chunks=(bad, *c.chunks[1:]))

    assert "wrong shape, level or scale" in _bad_round(skew)


def test_holder_refuses_to_decrypt_a_single_contribution_posing_as_a_sum():
    """A curious aggregator that forwards one member's ciphertext as 'the sum' of too few members is refused."""
    rng = np.random.default_rng(12)
    ss, ids = build(CkksParams(key_holders=("m0",)))
    ss.run_round(0, inputs(rng, 100), min_cohort=3)
    spec = ss.last_spec
    one = ss._members["m2"].protect(spec, rng.uniform(-1, 1, 100))
    fake = SummedCiphertext(spec.round_id, spec.key_id, ("m2",), (one,))
    with pytest.raises(SecAggError, match="m0.*refuses to decrypt.*sum over 1 signed contributions"):
        ss._holders["m0"].decrypt(fake, spec)


_FUZZ: dict[str, object] = {}


def _fuzz_setup():
    if not _FUZZ:
        ss, ids = build(names=NAMES[:3])
        rng = np.random.default_rng(13)
        ss.run_round(0, inputs(rng, 100, NAMES[:3]), min_cohort=1)
        good = ss._members["m1"].protect(ss.last_spec, np.zeros(100))
        _FUZZ.update(ss=ss, ids=ids, good=good)
    return _FUZZ["ss"], _FUZZ["ids"], _FUZZ["good"]


@settings(deadline=None, max_examples=40)
@given(tail=st.binary(max_size=300), cut=st.integers(0, 70_000), signed=st.booleans())
def test_arbitrary_bytes_never_crash_the_aggregator(tail, cut, signed):
    ss, ids, good = _fuzz_setup()
    blob = good.chunks[0][:cut] + tail
    c = dataclasses.replace(good, chunks=(blob,))
    if signed:
        c = resign(c, ids["m1"])
    agg = ss._aggregator
    agg.open_round(ss.last_spec)
    accepted = agg.receive(c, ids["m1"].public_bytes)
    if blob == good.chunks[0] and signed:
        assert accepted
    else:
        assert not accepted
        assert "'m1'" in str(agg.rejected[-1])


def test_exact_at_the_largest_cohort_the_noise_budget_allows():
    p = CkksParams()
    n = p.max_members()
    names = tuple(f"s{i:02d}" for i in range(n))
    rng = np.random.default_rng(14)
    ss, _ = build(p, names)
    ins = [MemberInput(m, rng.choice([-1.0, 1.0, 0.999999], 6000)) for m in names]  # extremes stress carries
    res = ss.run_round(0, ins, min_cohort=n)
    exact = np.sum([m.vector for m in ins], axis=0)
    assert len(res.contributors) == n and res.stats.extra["headroom_bits"] == 6
    assert np.max(np.abs(res.total - exact)) <= res.stats.extra["quantization_error_bound"]
