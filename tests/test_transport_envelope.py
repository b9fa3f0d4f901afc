"""Envelope rules and the replay cache, without a network."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worldlm_secure.transport import federation_pb2 as pb
from worldlm_secure.transport.envelope import (
    NONCE_BYTES,
    EnvelopeRules,
    ReplayCache,
    check_envelope,
    enroll_message,
    make_envelope,
)
from worldlm_secure.transport.refusal import Refused

RULES = EnvelopeRules(freshness_seconds=60, max_nonces_per_sender=50)


def reason(fn) -> str:
    with pytest.raises(Refused) as info:
        fn()
    return info.value.reason_name


def test_fresh_envelopes_have_distinct_random_nonces():
    nonces = {make_envelope("a", 1).nonce for _ in range(1000)}
    assert len(nonces) == 1000 and all(len(n) == NONCE_BYTES for n in nonces)


def test_envelope_checks():
    env = make_envelope("site-a", 3)
    check_envelope(env, sender="site-a", rules=RULES)
    assert reason(lambda: check_envelope(env, sender="site-b", rules=RULES)) == "SENDER_MISMATCH"
    old = pb.Envelope(); old.CopyFrom(env); old.sent_unix_ms -= 61_000
    assert reason(lambda: check_envelope(old, sender="site-a", rules=RULES)) == "STALE"
    future = pb.Envelope(); future.CopyFrom(env); future.sent_unix_ms += 61_000
    assert reason(lambda: check_envelope(future, sender="site-a", rules=RULES)) == "STALE"
    v2 = pb.Envelope(); v2.CopyFrom(env); v2.protocol_version = 2
    assert reason(lambda: check_envelope(v2, sender="site-a", rules=RULES)) == "VERSION"
    short = pb.Envelope(); short.CopyFrom(env); short.nonce = b"\0" * 15
    assert reason(lambda: check_envelope(short, sender="site-a", rules=RULES)) == "MALFORMED"


def test_replay_cache_refuses_repeats_per_sender_and_round():
    cache = ReplayCache(RULES)
    env = make_envelope("site-a", 3)
    cache.admit(env)
    assert reason(lambda: cache.admit(env)) == "REPLAY"
    other_sender = pb.Envelope(); other_sender.CopyFrom(env); other_sender.sender = "site-b"
    cache.admit(other_sender)  # same nonce, different sender: a different message
    other_round = pb.Envelope(); other_round.CopyFrom(env); other_round.round_id = 4
    cache.admit(other_round)


def test_replay_cache_is_bounded_and_forgets_only_expired_nonces():
    cache = ReplayCache(RULES)
    now = make_envelope("x", 0).sent_unix_ms
    for _ in range(RULES.max_nonces_per_sender):
        cache.admit(make_envelope("site-a", 1), now=now)
    assert reason(lambda: cache.admit(make_envelope("site-a", 1), now=now)) == "RATE_LIMITED"
    cache.admit(make_envelope("site-b", 1), now=now)  # other senders are unaffected
    later = now + 61_000 + 2  # everything site-a sent has expired (and would now be STALE anyway)
    cache.admit(make_envelope("site-a", 1), now=later)
    assert len(cache) == 2


@settings(max_examples=50, deadline=None)
@given(
    field=st.sampled_from(["federation", "sender", "round_id", "nonce", "sent_unix_ms", "fingerprint"]),
    salt=st.binary(min_size=1, max_size=8),
)
def test_enroll_message_binds_every_field(field, salt):
    env = make_envelope("site-a", 5)
    fp = bytes(32)
    base = enroll_message(env, "fed", fp)
    changed = pb.Envelope(); changed.CopyFrom(env)
    fed, fp2 = "fed", fp
    if field == "federation":
        fed = "fed" + salt.hex()
    elif field == "sender":
        changed.sender = "site-a" + salt.hex()
    elif field == "round_id":
        changed.round_id += 1 + salt[0]
    elif field == "nonce":
        changed.nonce = bytes([env.nonce[0] ^ (salt[0] | 1)]) + env.nonce[1:]
    elif field == "sent_unix_ms":
        changed.sent_unix_ms += 1 + salt[0]
    else:
        fp2 = bytes([salt[0] | 1]) + bytes(31)
    assert enroll_message(changed, fed, fp2) != base


def test_enroll_message_length_prefixes_prevent_field_shifting():
    a = make_envelope("b", 1)
    b = pb.Envelope(); b.CopyFrom(a); b.sender = "ab"
    assert enroll_message(a, "fa", bytes(32)) != enroll_message(b, "f", bytes(32))
