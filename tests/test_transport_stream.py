"""Large payloads and whole-round message flows over real gRPC + mutual TLS on 127.0.0.1.

64 MiB is 16x gRPC's default 4 MiB message limit; the chunking code does not depend on size
(benchmarks/transport_stream.py moves a 124M-parameter float32 model, about 500 MB).
"""

from __future__ import annotations

import hashlib
import os
import threading

import numpy as np
import pytest

from worldlm_secure.transport import federation_pb2 as pb
from worldlm_secure.transport.chunks import Payload
from worldlm_secure.transport.handler import Announcement, Inbound
from worldlm_secure.transport.refusal import Refused
from worldlm_secure.transport.testing import connect, make_pki, start_federation

FED = "fed-eu"
MEMBERS = ("site-a", "site-b", "site-c")


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    pki = make_pki(tmp_path_factory.mktemp("pki"), FED, [FED, *MEMBERS])
    server, board = start_federation(pki, FED, MEMBERS)
    clients = {m: connect(server, pki, m) for m in MEMBERS}
    for c in clients.values():
        c.enroll()
    yield pki, server, board, clients
    for c in clients.values():
        c.close()
    server.stop(0)


def random_float32(nbytes: int) -> np.ndarray:
    # os.urandom: arbitrary bit patterns (NaN payloads, denormals) must survive bit-identically.
    return np.frombuffer(os.urandom(nbytes), dtype=np.float32)


def test_64_mib_model_down_and_update_up_bit_identical(fed):
    _pki, _server, board, clients = fed
    model = {"backbone.weight": random_float32(48 << 20).reshape(-1, 1024), "head.bias": random_float32(16 << 20)}
    sent_sha = hashlib.sha256(b"".join(a.tobytes() for a in model.values())).digest()
    board.announce(Announcement(1, MEMBERS, "none"), Payload.from_tensors(model))
    site = clients["site-a"]
    assert next(site.watch_rounds()).round_id == 1

    got = site.download_model()
    assert got.nbytes == 64 << 20 >= 16 * (4 << 20)  # many times gRPC's default message limit
    assert got.sha256() == sent_sha
    arrays = got.as_tensors()
    assert {k: (v.dtype, v.shape) for k, v in arrays.items()} == {k: (v.dtype, v.shape) for k, v in model.items()}
    assert all(arrays[k].tobytes() == model[k].tobytes() for k in model)

    update = {k: v.copy() for k, v in arrays.items()}
    update["head.bias"][::4096] += 1.0
    receipt = site.upload_update(Payload.from_tensors(update))
    assert receipt.sha256 == Payload.from_tensors(update).sha256() != sent_sha
    stored = board.updates(1)["site-a"].payload
    assert stored.sha256() == receipt.sha256
    assert stored.as_tensors()["head.bias"].tobytes() == update["head.bias"].tobytes()
    # A retried upload of the same bytes is idempotent; different bytes for the same round are refused.
    assert site.upload_update(Payload.from_tensors(update)).sha256 == receipt.sha256
    with pytest.raises(Refused) as info:
        site.upload_update(Payload.from_bytes(b"something else"))
    assert info.value.reason_name == "REJECTED"


def test_secure_aggregation_round_trip_through_the_aggregator_and_protected_uploads(fed):
    """Masking-shaped flow: keys to the aggregator, a bundle back, sealed shares to the aggregator and
    each member's delivery back from it (no member-to-member relay), masked inputs up. Payloads are
    opaque bytes to the transport."""
    _pki, _server, board, clients = fed
    rid = board.current_round() + 1
    board.announce(Announcement(rid, MEMBERS, "masking", params=b'{"bits": 32}'), None)
    for c in clients.values():
        c.heartbeat()
    for name, c in clients.items():
        c.send_secagg(pb.SECAGG_MASKING_ADVERTISE_KEYS, Payload.from_bytes(f"keys-of-{name}".encode()))
    adverts = board.secagg_received(rid, pb.SECAGG_MASKING_ADVERTISE_KEYS)
    assert sorted(m.sender for m in adverts) == sorted(MEMBERS)
    bundle = b"|".join(m.payload.to_bytes() for m in adverts)
    for name in MEMBERS:
        board.post_secagg(Inbound(FED, rid, pb.PAYLOAD_KIND_SECAGG, pb.SECAGG_MASKING_KEY_BUNDLE, name, Payload.from_bytes(bundle)))
    for name, c in clients.items():
        (got,) = c.fetch_secagg(pb.SECAGG_MASKING_KEY_BUNDLE)
        assert (got.sender, got.payload.to_bytes()) == (FED, bundle)
        c.send_secagg(pb.SECAGG_MASKING_ENCRYPTED_SHARES, Payload.from_bytes(f"shares-of-{name}".encode()))
    got = board.secagg_received(rid, pb.SECAGG_MASKING_ENCRYPTED_SHARES)
    assert sorted(m.payload.to_bytes().decode() for m in got) == sorted(f"shares-of-{n}" for n in MEMBERS)
    for name in MEMBERS:
        board.post_secagg(Inbound(FED, rid, pb.PAYLOAD_KIND_SECAGG, pb.SECAGG_MASKING_ENCRYPTED_SHARES, name,
                                  Payload.from_bytes(f"delivery-for-{name}".encode())))
    for name, c in clients.items():
        (delivery,) = c.fetch_secagg(pb.SECAGG_MASKING_ENCRYPTED_SHARES)
        assert (delivery.sender, delivery.payload.to_bytes().decode()) == (FED, f"delivery-for-{name}")
    masked = {n: np.frombuffer(os.urandom(3 << 20), dtype=np.uint32) for n in MEMBERS}  # 3 MiB: several chunks
    for name, c in clients.items():
        c.upload_update(Payload.from_tensors({"masked": masked[name]}), secagg_kind=pb.SECAGG_MASKING_MASKED_INPUT)
    ups = board.wait_for_updates(rid, len(MEMBERS), timeout=5)
    assert {n: u.secagg_kind for n, u in ups.items()} == {n: pb.SECAGG_MASKING_MASKED_INPUT for n in MEMBERS}
    assert all(np.array_equal(ups[n].payload.as_tensors()["masked"], masked[n]) for n in MEMBERS)


def test_watchers_see_every_announcement_in_order(fed):
    _pki, _server, board, clients = fed
    start = board.current_round()
    seen: dict[str, list[int]] = {m: [] for m in MEMBERS}

    def watch(name: str) -> None:
        for ann in clients[name].watch_rounds(after_round=start):
            seen[name].append(ann.round_id)
            if len(seen[name]) == 3:
                return

    threads = [threading.Thread(target=watch, args=(m,), daemon=True) for m in MEMBERS]
    for t in threads:
        t.start()
    for r in range(start + 1, start + 4):
        board.announce(Announcement(r, MEMBERS, "ckks"))
    for t in threads:
        t.join(timeout=10)
    assert seen == {m: [start + 1, start + 2, start + 3] for m in MEMBERS}


def test_secagg_to_a_recipient_outside_the_cohort_is_rejected(fed):
    _pki, _server, board, clients = fed
    rid = board.current_round() + 1
    board.announce(Announcement(rid, ("site-a", "site-b"), "masking"))
    assert clients["site-a"].heartbeat() == rid  # members learn the round from the federation
    with pytest.raises(Refused) as info:
        clients["site-a"].send_secagg(pb.SECAGG_MASKING_ENCRYPTED_SHARES, Payload.from_bytes(b"x"), recipient="site-c")
    assert info.value.reason_name == "REJECTED"
    with pytest.raises(Refused) as info:
        clients["site-c"].upload_update(Payload.from_bytes(b"u"), round_id=rid)
    assert info.value.reason_name == "REJECTED"


def test_announcements_carry_the_cohorts_ca_bound_signing_keys(fed):
    pki, _server, board, clients = fed
    rid = board.current_round() + 1
    board.announce(Announcement(rid, ("site-a", "site-b"), "masking"))
    ann = next(clients["site-c"].watch_rounds(after_round=rid - 1))
    assert dict(ann.peer_keys) == {m: pki.identity(m).public_bytes for m in ("site-a", "site-b")}
