"""SecAgg+ against a curious or malicious aggregator and tampered traffic: forged keys, replays, tampering."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from worldlm_secure.errors import SecAggError
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.secagg import DropoutPlan
from worldlm_secure.secagg.masking import MaskingAggregator, MaskingMember, MaskingParams, RoundConfig
from worldlm_secure.secagg.masking_round import drive_round
from worldlm_secure.secagg.masking_messages import AggregatorMessage, MaskedInput, ShareDelivery, SurvivorList, UnmaskRequest
from worldlm_secure.secagg.masking_vectors import DeterministicEntropy
from worldlm_secure.secagg.quantize import quantize
from worldlm_secure.secagg.shamir import PRIME, Share

NAMES = ("alice", "bob", "carol", "dave", "erin")
AGGREGATOR = NodeIdentity.generate("federation")


def signed(msg: AggregatorMessage, by: NodeIdentity = AGGREGATOR) -> AggregatorMessage:
    """``msg`` signed as the aggregator signs what it sends (a malicious aggregator signs its lies too)."""
    return dataclasses.replace(msg, signature=by.sign(msg.signed_payload()))


def _setup(round_id: int = 7, names: tuple[str, ...] = NAMES, *, min_cohort: int = 3, label: str = "x", **kw: object):
    params = MaskingParams(clip_range=1.0, **kw)  # type: ignore[arg-type]
    ids = {n: NodeIdentity.generate(n) for n in names}
    cfg = RoundConfig.build(
        params, round_id, names, {n: i.public_bytes for n, i in ids.items()}, min_cohort,
        aggregator_key=AGGREGATOR.public_bytes,
    )

    def entropy(n: str) -> DeterministicEntropy:
        return DeterministicEntropy(hashlib.sha256(f"{label}/{round_id}/{n}".encode()).digest())

    members = {n: MaskingMember(ids[n], cfg, entropy=entropy(n)) for n in names}
    return cfg, ids, members, MaskingAggregator(cfg, AGGREGATOR)


def _to_masking(members, server):  # -> (neighbour keys, deliveries)
    keys = server.collect_adverts([m.advertise() for m in members.values()])
    deliveries = server.collect_shares([members[n].share_keys(keys[n]) for n in keys])
    return keys, deliveries


def _responses(members, server, masked, names):  # survivor list, signatures, unmask: the members' answers
    lists = server.collect_masked(masked)
    requests = server.collect_signatures([members[n].confirm(lists[n]) for n in names])
    return [members[n].unmask(requests[n]) for n in names]


# ---- forged and swapped keys ----


def test_forged_advert_is_rejected_naming_the_member() -> None:
    _, _, members, server = _setup()
    adverts = [m.advertise() for m in members.values()]
    mallory = NodeIdentity.generate("carol")  # right name, wrong long-term key
    forged = dataclasses.replace(adverts[2], signature=mallory.sign(adverts[2].signed_payload()))
    with pytest.raises(SecAggError, match="key advert of 'carol' has a bad signature"):
        server.collect_adverts(adverts[:2] + [forged] + adverts[3:])


@pytest.mark.parametrize("field", ["enc_public", "mask_public", "self_mask_commitment"])
def test_aggregator_swapping_a_key_is_caught_by_the_member(field: str) -> None:
    _, _, members, server = _setup()
    keys = server.collect_adverts([m.advertise() for m in members.values()])
    bundle = keys["bob"]
    victim = bundle.adverts[0]
    swapped = dataclasses.replace(victim, **{field: hashlib.sha256(b"aggregator's own key").digest()})
    evil = signed(dataclasses.replace(bundle, adverts=(swapped,) + bundle.adverts[1:]))
    with pytest.raises(SecAggError, match=f"key advert of '{victim.member}' has a bad signature"):
        members["bob"].share_keys(evil)


def test_aggregator_dropping_a_neighbours_key_is_caught() -> None:
    _, _, members, server = _setup()
    keys = server.collect_adverts([m.advertise() for m in members.values()])
    evil = signed(dataclasses.replace(keys["bob"], adverts=keys["bob"].adverts[1:]))
    with pytest.raises(SecAggError, match="key advert of neighbour .* is missing"):
        members["bob"].share_keys(evil)


# ---- replays ----


def test_advert_from_another_round_is_refused() -> None:
    _, ids, old_members, _ = _setup(round_id=6)
    old = old_members["alice"].advertise()
    cfg, _, members, server = _setup(round_id=7)
    # Same identities in both rounds: rebuild round 7 with the identities of round 6.
    cfg = dataclasses.replace(cfg, identity_keys={n: i.public_bytes for n, i in ids.items()})
    members = {n: MaskingMember(ids[n], cfg) for n in NAMES}
    server = MaskingAggregator(cfg, AGGREGATOR)
    fresh = [m.advertise() for n, m in members.items() if n != "alice"]
    with pytest.raises(SecAggError, match="from 'alice' belongs to round 6; replayed or stale"):
        server.collect_adverts([old] + fresh)
    relabelled = dataclasses.replace(old, round_id=7)  # the signature binds the round: relabelling fails
    with pytest.raises(SecAggError, match="key advert of 'alice' has a bad signature"):
        MaskingAggregator(cfg, AGGREGATOR).collect_adverts([relabelled] + fresh)


def test_member_refuses_messages_from_another_round_and_out_of_order_steps() -> None:
    _, _, members, server = _setup()
    keys = server.collect_adverts([m.advertise() for m in members.values()])
    with pytest.raises(SecAggError, match="belongs to round 8"):
        members["bob"].share_keys(signed(dataclasses.replace(keys["bob"], round_id=8)))
    with pytest.raises(SecAggError, match="out-of-order or repeated"):
        members["bob"].advertise()


def test_masked_input_replayed_into_a_later_round_is_refused() -> None:
    _, _, old_members, old_server = _setup(round_id=3, label="old")
    _, old_deliveries = _to_masking(old_members, old_server)
    stale = old_members["alice"].masked_input(old_deliveries["alice"], np.zeros(4))
    _, _, members, server = _setup(round_id=4)
    _, deliveries = _to_masking(members, server)
    fresh = [members[n].masked_input(deliveries[n], np.zeros(4)) for n in NAMES if n != "alice"]
    with pytest.raises(SecAggError, match="MaskedInput from 'alice' belongs to round 3"):
        server.collect_masked([stale] + fresh)


def test_a_member_answers_one_unmask_request_only_so_never_reveals_both_secrets() -> None:
    _, _, members, server = _setup()
    _, deliveries = _to_masking(members, server)
    masked = [members[n].masked_input(deliveries[n], np.zeros(3)) for n in NAMES]
    lists = server.collect_masked(masked)
    requests = server.collect_signatures([members[n].confirm(lists[n]) for n in NAMES])
    first = members["bob"].unmask(requests["bob"])
    assert {o for o, _ in first.self_mask_shares} and not first.mask_key_shares
    # A second request that now claims 'alice' dropped (to get her mask key as well) is refused.
    second = signed(UnmaskRequest(7, "bob", tuple(n for n in NAMES if n != "alice"), requests["bob"].confirmations))
    with pytest.raises(SecAggError, match="out-of-order or repeated"):
        members["bob"].unmask(second)


@pytest.mark.parametrize(
    ("survivors", "error"),
    [
        (("alice", "carol", "dave", "erin"), "inconsistent survivor list"),  # leaves the recipient out
        (("alice", "bob"), "below min_cohort"),
        (("alice", "bob", "mallory"), "inconsistent survivor list"),
    ],
)
def test_member_refuses_bad_survivor_lists(survivors: tuple[str, ...], error: str) -> None:
    _, _, members, server = _setup()
    _, deliveries = _to_masking(members, server)
    members["bob"].masked_input(deliveries["bob"], np.zeros(3))
    with pytest.raises(SecAggError, match=error):
        members["bob"].confirm(signed(SurvivorList(7, "bob", survivors)))


def test_member_refuses_a_survivor_list_whose_graph_splits() -> None:
    names = tuple(f"m{i}" for i in range(8))
    cfg, _, members, server = _setup(names=names, min_cohort=2, neighbours=2)
    _, deliveries = _to_masking(members, server)
    g = server.graph
    me = names[0]
    members[me].masked_input(deliveries[me], np.zeros(3))
    far = next(n for n in names if n != me and n not in g[me])  # not adjacent: {me, far} is disconnected
    with pytest.raises(SecAggError, match="splits into 2 parts"):
        members[me].confirm(signed(SurvivorList(cfg.round_id, me, (me, far))))


# ---- tampering ----


@settings(deadline=None, max_examples=30)
@given(where=st.sampled_from(["ciphertext", "nonce", "redirect"]), position=st.integers(0, 10_000))
def test_tampered_share_ciphertext_is_detected_naming_the_sender(where: str, position: int) -> None:
    _, _, members, server = _setup(label=f"tamper-{where}")
    _, deliveries = _to_masking(members, server)
    d = deliveries["carol"]
    enc = d.shares[0]
    if where == "redirect":  # a share meant for someone else, relabelled for carol
        other = next(s for s in deliveries["dave"].shares if s.sender != "carol")
        tampered = dataclasses.replace(other, recipient="carol")
        sender = other.sender
        if sender not in members["carol"].neighbours:
            return
    else:
        raw = bytearray(getattr(enc, where))
        raw[position % len(raw)] ^= 1 << (position % 8)
        tampered = dataclasses.replace(enc, **{where: bytes(raw)})
        sender = enc.sender
    evil = signed(ShareDelivery(d.round_id, "carol", tuple(tampered if s.sender == sender else s for s in d.shares)))
    with pytest.raises(SecAggError, match=f"share ciphertext from '{sender}' to 'carol' failed AES-GCM authentication"):
        members["carol"].masked_input(evil, np.zeros(3))


def test_tampered_shamir_share_in_unmask_response_is_detected() -> None:
    _, _, members, server = _setup(threshold=1.0)
    _, deliveries = _to_masking(members, server)
    responses = _responses(members, server, [members[n].masked_input(deliveries[n], np.zeros(3)) for n in NAMES], NAMES)
    owner, raw = responses[0].self_mask_shares[0]
    s = Share.from_bytes(raw)
    bad = Share(s.x, (s.y + 1) % PRIME).to_bytes()
    responses[0] = dataclasses.replace(responses[0], self_mask_shares=((owner, bad),) + responses[0].self_mask_shares[1:])
    with pytest.raises(SecAggError, match=f"self-mask seed of '{owner}' (does not match its commitment|is not a valid secret)"):
        server.finish(responses)


def test_response_with_share_of_the_wrong_kind_is_refused() -> None:
    _, _, members, server = _setup()
    _, deliveries = _to_masking(members, server)
    responses = _responses(members, server, [members[n].masked_input(deliveries[n], np.zeros(3)) for n in NAMES], NAMES)
    r = responses[1]
    wrong = dataclasses.replace(r, self_mask_shares=r.self_mask_shares[1:], mask_key_shares=r.self_mask_shares[:1])
    with pytest.raises(SecAggError, match=f"'{r.sender}' returned a share of .* wrong kind"):
        server.finish(responses[:1] + [wrong] + responses[2:])


# ---- what one masked vector reveals ----


def _uniform_p_value(words: np.ndarray) -> float:
    """Chi-square goodness of fit of the top and bottom bytes of the words against uniform."""
    top = (words >> np.uint32(24)).astype(np.int64)
    low = (words & np.uint32(0xFF)).astype(np.int64)
    return min(stats.chisquare(np.bincount(b, minlength=256)).pvalue for b in (top, low))


@pytest.mark.parametrize("value", [0.0, 1.0, -0.37])
def test_one_masked_vector_is_indistinguishable_from_uniform(value: float) -> None:
    cfg, _, members, server = _setup(label=f"uniform-{value}")
    trace = drive_round(members, server, {n: np.full(1 << 16, value) for n in NAMES}, DropoutPlan(), record=True)
    assert np.allclose(trace.outcome.total, 5 * value, atol=cfg.quant.sum_error_bound(5))
    masked = [data for who, data in trace.wire if who == "alice" and data[4] == MaskedInput.TAG]
    words = MaskedInput.from_bytes(masked[0]).words()[:-1]
    assert _uniform_p_value(words) > 1e-4
    # The same test does see through an unmasked (quantized) vector: it has power.
    plain = quantize(np.full(1 << 16, value), cfg.quant).values
    assert _uniform_p_value(plain) < 1e-10


def test_tampered_mask_key_share_of_a_dropped_member_is_detected() -> None:
    _, _, members, server = _setup(threshold=0.75, label="mask-key")
    _, deliveries = _to_masking(members, server)
    alive = [n for n in NAMES if n != "erin"]  # erin drops after sharing keys
    responses = _responses(members, server, [members[n].masked_input(deliveries[n], np.zeros(3)) for n in alive], alive)
    i = next(i for i, r in enumerate(responses) if r.mask_key_shares)
    owner, raw = responses[i].mask_key_shares[0]
    s = Share.from_bytes(raw)
    responses[i] = dataclasses.replace(responses[i], mask_key_shares=((owner, Share(s.x, s.y ^ 1).to_bytes()),))
    with pytest.raises(SecAggError, match="mask key of 'erin' (does not match its advert|is not a valid secret)"):
        server.finish(responses)


def test_low_order_round_key_from_a_malicious_member_is_refused_naming_it() -> None:
    _, ids, members, server = _setup(label="low-order")
    adverts = [m.advertise() for m in members.values()]
    evil = dataclasses.replace(adverts[0], mask_public=bytes(32), signature=b"")
    evil = dataclasses.replace(evil, signature=ids[evil.member].sign(evil.signed_payload()))  # validly signed
    keys = server.collect_adverts([evil] + adverts[1:])
    victim = next(n for n in NAMES if n != evil.member and evil.member in server.graph[n])
    deliveries = server.collect_shares([members[n].share_keys(keys[n]) for n in keys])
    with pytest.raises(SecAggError, match=f"X25519 public key of '{evil.member}' is invalid"):
        members[victim].masked_input(deliveries[victim], np.zeros(3))
