"""Attacks on CKKS secure aggregation, driven through the real member and aggregator code.

The node link code (`node.ckks_link.member_round` / `aggregate_round`) runs here over an in-memory
`NodeBoard` (the same mailboxes the gRPC server fills), so a malicious aggregator is simply a test that
posts what it likes to the board. Each test states the attack and checks the member refuses it:

- a colluding member that is not a named key holder generates the key epoch (the aggregator hands it
  out): every member must refuse to encrypt under it;
- the aggregator asks the honest generator to seal the secret key to a colluding non-holder;
- the aggregator sends the key holder ONE member's ciphertext (padded with its own encryptions of zeros)
  labelled as the sum of min_cohort members, to read that member's update from the "decrypted sum";
- malformed contributions and malformed holder answers must not kill the aggregator.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import threading

import numpy as np
import pytest
import tenseal as ts

from worldlm_secure.errors import SecAggError
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.node import ckks_link
from worldlm_secure.node.board import NodeBoard
from worldlm_secure.node.ckks_link import CkksRound
from worldlm_secure.secagg import MemberInput, make_secure_sum
from worldlm_secure.secagg import ckks_messages as wire
from worldlm_secure.secagg import ckks_packing as packing
from worldlm_secure.secagg.ckks import RoundSpec, commitments_digest
from worldlm_secure.secagg.ckks_round import CkksSecureSum
from worldlm_secure.secagg.ckks_keys import TransportKey, generate_epoch_keys, unwrap_secret_context
from worldlm_secure.secagg.ckks_params import CkksParams
from worldlm_secure.transport import federation_pb2 as pb
from worldlm_secure.transport.chunks import Payload
from worldlm_secure.transport.handler import Announcement, Inbound

RID = 1
PARAMS = CkksParams(key_holders=("site-0",), value_bits=20, clip_range=1.0)


class BoardClient:
    """The member side of the transport, straight onto a `NodeBoard` (what the gRPC server does)."""

    def __init__(self, board: NodeBoard, name: str) -> None:
        self.board, self.name, self.federation = board, name, board.name

    def send_secagg(self, kind: int, payload: Payload, *, recipient: str = "", round_id: int | None = None):
        self.board.on_secagg(Inbound(self.name, round_id or RID, pb.PAYLOAD_KIND_SECAGG, kind, recipient, payload))

    def fetch_secagg(self, kind: int = 0, *, round_id: int | None = None):
        return self.board.secagg_for(self.name, round_id or RID, kind)

    def upload_update(self, payload: Payload, *, secagg_kind: int = 0, round_id: int | None = None):
        self.board.on_update(Inbound(self.name, round_id or RID, pb.PAYLOAD_KIND_UPDATE_PROTECTED, secagg_kind, "", payload))


def _world(names=("site-0", "site-1", "site-2"), extra=("mallory",)):
    ids = {n: NodeIdentity.generate(n) for n in (*names, *extra)}
    board = NodeBoard("fed")
    ann = Announcement(RID, tuple(names), "ckks", b"{}", 0, tuple((n, ids[n].public_bytes) for n in (*names, *extra)))
    board.announce(ann)
    return ids, board, ann


def _member(board, ids, ann, setup, name, vector, errors, encrypt=None, timeout=3.0):
    def run():
        try:
            ckks_link.member_round(BoardClient(board, name), ids[name], ann, setup, vector,
                                   before_input=lambda cohort, key_id: None, wait_timeout=timeout, encrypt=encrypt)
        except Exception as exc:  # collected: the tests look at how each member ended
            errors[name] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _post(board, member: str, kind: int, body: bytes) -> None:
    board.post_secagg(Inbound(board.name, RID, pb.PAYLOAD_KIND_SECAGG, kind, member, Payload.from_bytes(body)))


def _sent(board, kind: int, tag: str) -> dict[str, wire.Message]:
    out = {}
    for m in board.secagg_received(RID, kind):
        msg = wire.decode(m.payload.to_bytes())
        if msg.tag == tag:
            out[m.sender] = msg
    return out


# ---- 1. the key epoch comes from a key holder the policy names -------------------------------------


def test_member_refuses_a_key_epoch_generated_by_a_colluding_non_holder():
    """Attack: mallory (a cohort member, not a named key holder) makes the epoch and keeps the secret key;
    the aggregator hands it to the victim. Old code: the victim checked only that the generator is a cohort
    member, encrypted under mallory's key, and mallory decrypted the victim's update."""
    ids, board, ann = _world(names=("mallory", "site-0", "site-1"), extra=())
    mallory_tk = TransportKey(ids["mallory"])
    keys = generate_epoch_keys(ids["mallory"], PARAMS, RID, {"mallory": mallory_tk.cert}, {"mallory": ids["mallory"].public_bytes})
    _post(board, "site-1", pb.SECAGG_CKKS_PUBLIC_CONTEXT, wire.epoch_bytes(keys, only="site-1"))
    errors: dict[str, Exception] = {}
    vector = np.random.default_rng(0).uniform(-1, 1, 50)
    _member(board, ids, ann, CkksRound(PARAMS, 2), "site-1", vector, errors, timeout=1.5).join(10)
    up = board.updates(RID).get("site-1")
    if up is not None:  # show what the attack obtains: mallory decrypts the victim's contribution
        c = wire.contribution_from(wire.decode(up.payload.to_bytes()))
        secret = unwrap_secret_context(keys, mallory_tk, ids["mallory"].public_bytes)
        slots = np.asarray(ts.ckks_vector_from(secret, c.chunks[0]).decrypt())
        spec = CkksRound(PARAMS, 2).spec(RID, keys.key_id, 50, ann.cohort)
        leaked = packing.dequantize_sum(packing.unpack_sum(slots, 50, 1, spec.layout), 1, 1.0, PARAMS.value_bits)
        pytest.fail(f"site-1 encrypted under mallory's key; mallory read it (max error {np.max(np.abs(leaked - vector)):.2g})")
    assert isinstance(errors.get("site-1"), SecAggError), errors


def test_generator_never_seals_the_key_to_a_non_holder():
    """Attack: the aggregator adds a colluding non-holder's (validly self-signed) transport key to the
    holder list it sends the generator. Old code: the generator sealed the secret key to it."""
    ids, board, ann = _world()
    mallory_tk = TransportKey(ids["mallory"])
    errors: dict[str, Exception] = {}
    t = _member(board, ids, ann, CkksRound(PARAMS, 2), "site-0", np.zeros(10), errors, timeout=2.0)
    import time

    end = time.monotonic() + 5
    while "site-0" not in _sent(board, pb.SECAGG_CKKS_PUBLIC_CONTEXT, wire.TRANSPORT_CERT) and time.monotonic() < end:
        time.sleep(0.02)
    cert = wire.cert_from(_sent(board, pb.SECAGG_CKKS_PUBLIC_CONTEXT, wire.TRANSPORT_CERT)["site-0"])
    _post(board, "site-0", pb.SECAGG_CKKS_PUBLIC_CONTEXT, wire.certs_bytes([cert, mallory_tk.cert]))
    t.join(10)
    made = _sent(board, pb.SECAGG_CKKS_PUBLIC_CONTEXT, wire.EPOCH_KEYS).get("site-0")
    if made is not None:
        keys = wire.epoch_from(made)
        assert "mallory" not in keys.wrapped, "the generator sealed the secret key to mallory"
    assert isinstance(errors.get("site-0"), SecAggError), errors


def test_in_process_member_and_holder_refuse_an_epoch_from_a_non_holder():
    """The same check in the member classes every transport uses (in process, Ray actors, nodes)."""
    from worldlm_secure.secagg.ckks import CkksKeyHolder, CkksMember, EpochTrust

    ids = {n: NodeIdentity.generate(n) for n in ("a", "b", "mallory")}
    holder = CkksKeyHolder(ids["a"])
    tk = TransportKey(ids["mallory"])
    pubs = {n: i.public_bytes for n, i in ids.items()}
    bad = generate_epoch_keys(ids["mallory"], PARAMS, 0, {"a": holder.transport.cert, "mallory": tk.cert}, pubs)
    trust = EpochTrust(("a",), pubs)
    with pytest.raises(SecAggError, match="not a key holder the policy names"):
        CkksMember(ids["b"]).install(bad, trust)
    with pytest.raises(SecAggError, match="not a key holder the policy names"):
        holder.install(bad, trust)
    # a named holder may generate, but not seal the key to someone the policy does not name
    stray = generate_epoch_keys(ids["a"], PARAMS, 0, {"a": holder.transport.cert, "mallory": tk.cert}, pubs)
    with pytest.raises(SecAggError, match="seals the secret key to mallory"):
        CkksMember(ids["b"]).install(stray, trust)
    good = generate_epoch_keys(ids["a"], PARAMS, 0, {"a": holder.transport.cert}, pubs)
    CkksMember(ids["b"]).install(good, trust)
    holder.install(good, trust)


# ---- 2. a key holder decrypts only a real sum ------------------------------------------------------


def _pad_with_own_zeros(board, ann, setup, victim: str, n_values: int) -> bytes:
    """The malicious aggregator's "sum": the victim's ciphertext plus its own encryptions of packed zeros
    (made with the public context), labelled as the sum of the whole cohort (old SUMMED format)."""
    epoch = wire.epoch_from(next(wire.decode(x.payload.to_bytes()) for x in board.secagg_for(victim, RID, pb.SECAGG_CKKS_PUBLIC_CONTEXT)))
    ctx = ts.context_from(epoch.public_context)
    spec = setup.spec(RID, epoch.key_id, n_values, tuple(ann.cohort))
    c = wire.contribution_from(wire.decode(board.updates(RID)[victim].payload.to_bytes()))
    v, _ = packing.quantize(np.zeros(n_values), spec.clip_range, spec.layout.value_bits)
    slots = packing.pack(v, spec.layout)
    s = spec.slot_count
    padded = np.zeros(spec.n_chunks * s)
    padded[: slots.size] = slots
    chunks = []
    for i, blob in enumerate(c.chunks):
        acc = ts.ckks_vector_from(ctx, blob)
        for _ in range(len(ann.cohort) - 1):
            acc.add_(ts.ckks_vector(ctx, padded[i * s : (i + 1) * s].tolist()))
        chunks.append(acc.serialize())
    f = {"round_id": RID, "key_id": epoch.key_id, "contributors": list(ann.cohort), "n_values": n_values}
    return wire.encode(wire.SUMMED, f, chunks)


def test_holder_refuses_one_members_ciphertext_posing_as_the_sum(monkeypatch):
    """Attack: the aggregator runs the round honestly up to the sum, then sends the key holder site-1's
    ciphertext plus its own encryptions of zeros as "the sum of site-0, site-1, site-2" (min_cohort = 3).
    Old code: the holder checked only the claimed count, decrypted, and the aggregator read site-1's update."""
    ids, board, ann = _world(extra=())
    setup = CkksRound(PARAMS, 3)
    n = 40
    rng = np.random.default_rng(1)
    vectors = {m: rng.uniform(-1, 1, n) for m in ann.cohort}
    monkeypatch.setattr(wire, "summed_bytes", lambda summed, n_values: _pad_with_own_zeros(board, ann, setup, "site-1", n_values))
    errors: dict[str, Exception] = {}
    threads = [_member(board, ids, ann, setup, m, vectors[m], errors, timeout=3.0) for m in ann.cohort]
    try:
        out = ckks_link.aggregate_round(board, ann, setup, lambda exp, t: board.wait_for_updates(RID, len(exp), t),
                                        first_timeout=10, step_timeout=4, alive=lambda m: True)
    except SecAggError as exc:
        out = exc
    for t in threads:
        t.join(10)
    if not isinstance(out, SecAggError):
        err = np.max(np.abs(out.total - vectors["site-1"]))
        assert err > 1e-3, f"the aggregator read site-1's update from the holder's decryption (error {err:.2g})"
    assert isinstance(errors.get("site-0"), SecAggError), errors  # the holder gave up; it decrypted nothing


def test_holder_checks_every_forwarded_contribution():
    """New-format variants of the same attack against `CkksKeyHolder.decrypt` (shared by every transport):
    one contribution repeated under three names, another member's name with the victim's ciphertext,
    a replay from another round, too few contributions. Each is refused; the honest sum is decrypted."""
    from worldlm_secure.secagg.ckks import SummedCiphertext

    ids = {n: NodeIdentity.generate(n) for n in ("m0", "m1", "m2")}
    ss = make_secure_sum("ckks", params=CkksParams(key_holders=("m0",)), identities=ids)
    assert isinstance(ss, CkksSecureSum)
    rng = np.random.default_rng(2)
    ss.run_round(0, [MemberInput(n, rng.uniform(-1, 1, 30)) for n in ids], min_cohort=3)
    spec: RoundSpec = ss.last_spec  # type: ignore[assignment]
    holder = ss._holders["m0"]
    made = {n: ss._members[n].protect(spec, rng.uniform(-1, 1, 30)) for n in ids}
    # commit, then reveal: each member commits to its contribution, then signs it with the list's digest
    listed = tuple(ss._members[n].commit(c.round_id, c.n_values, c.chunks) for n, c in made.items())
    cs = {n: c.revealed(commitments_digest(listed), ids[n]) for n, c in made.items()}

    def attempt(contributors, contributions):
        return holder.decrypt(SummedCiphertext(spec.round_id, spec.key_id, tuple(contributors), tuple(contributions),
                                               listed), spec)

    with pytest.raises(SecAggError, match="repeat"):
        attempt(["m1", "m1", "m1"], [cs["m1"]] * 3)
    relabelled = dataclasses.replace(cs["m1"], member="m2")
    with pytest.raises(SecAggError, match="not signed by 'm2'"):
        attempt(["m0", "m1", "m2"], [cs["m0"], cs["m1"], relabelled])
    other_round = dataclasses.replace(spec, round_id=spec.round_id + 1)
    replay = ss._members["m2"].protect(other_round, np.zeros(30))
    with pytest.raises(SecAggError, match="another round"):
        attempt(["m0", "m1", "m2"], [cs["m0"], cs["m1"], replay])
    with pytest.raises(SecAggError, match="below min_cohort=3"):
        attempt(["m1", "m2"], [cs["m1"], cs["m2"]])
    with pytest.raises(SecAggError, match="does not match"):
        attempt(["m2", "m1", "m0"], [cs["m0"], cs["m1"], cs["m2"]])
    sums, conf = attempt(["m0", "m1", "m2"], [cs["m0"], cs["m1"], cs["m2"]])
    assert conf.contributors == ("m0", "m1", "m2") and sums.shape == (30,)


# ---- 3. malformed input never kills the aggregator ------------------------------------------------


@pytest.mark.parametrize("bad", [
    {"round_id": -1}, {"n_values": 10**30}, {"clipped": -5}, {"member": None}, {"key_id": 7},
    {"chunks": ()}, {"chunks": ("x",)}, {"signature": None}, {"member": "\ud800"},
])
def test_in_process_round_drops_a_malformed_contribution_and_goes_on(bad):
    """A contribution with out-of-range or wrong-typed fields (old code: struct.error / TypeError out of
    run_round) is rejected by name; the round releases the others' sum since min_cohort still holds."""
    ids = {n: NodeIdentity.generate(n) for n in ("m0", "m1", "m2", "m3")}
    ss = make_secure_sum("ckks", params=CkksParams(key_holders=("m0",)), identities=ids)
    assert isinstance(ss, CkksSecureSum)
    ss.intercept = lambda c: dataclasses.replace(c, **bad) if c.member == "m2" else c
    rng = np.random.default_rng(3)
    ins = [MemberInput(n, rng.uniform(-1, 1, 20)) for n in ids]
    res = ss.run_round(0, ins, min_cohort=3)
    assert res.contributors == ("m0", "m1", "m3") and len(res.rejected) == 1
    exact = sum(m.vector for m in ins if m.member != "m2")
    assert np.max(np.abs(res.total - exact)) <= res.stats.extra["quantization_error_bound"]


def _crafted(member, spec, vector) -> bytes:
    """A member's upload whose header carries an absurd number (old decoder: OverflowError)."""
    msg = wire.decode(wire.contribution_bytes(member.protect(spec, vector)))
    head = json.dumps({"tag": msg.tag, "fields": dict(msg.fields, clipped="@"), "sizes": [len(b) for b in msg.blobs]})
    head = head.replace('"@"', "1e400").encode()
    return b"".join([struct.pack(">I", len(head)), head, *msg.blobs])


def _link_round_with(monkeypatch, holders: tuple[str, ...], crafted: str | None, garbage_holder: str | None):
    """A link round of site-0..3 (min_cohort 2) where ``crafted`` uploads a contribution with ``1e400`` in its
    header and ``garbage_holder`` answers garbage sums; returns the outcome (or the SecAggError) and the vectors."""
    ids, board, ann = _world(names=("site-0", "site-1", "site-2", "site-3"), extra=())
    setup = CkksRound(dataclasses.replace(PARAMS, key_holders=holders), 2)
    rng = np.random.default_rng(4)
    vectors = {m: rng.uniform(-1, 1, 30) for m in ann.cohort}
    real = wire.decrypted_bytes

    def garbage(sums, conf):  # integer sums of 3 bytes (old decoder: ValueError from numpy)
        if conf.holder != garbage_holder:
            return real(sums, conf)
        msg = wire.decode(real(sums, conf))
        return wire.encode(msg.tag, msg.fields, [b"abc", *msg.blobs[1:]])

    monkeypatch.setattr(wire, "decrypted_bytes", garbage)
    errors: dict[str, Exception] = {}
    threads = [_member(board, ids, ann, setup, m, vectors[m], errors, encrypt=_crafted if m == crafted else None,
                       timeout=5.0) for m in ann.cohort]
    try:
        out: object = ckks_link.aggregate_round(board, ann, setup,
                                                lambda exp, t: board.wait_for_updates(RID, len(exp), t),
                                                first_timeout=10, step_timeout=5, alive=lambda m: True)
    except SecAggError as exc:
        out = exc
    for t in threads:
        t.join(10)
    return out, vectors


def test_link_aggregator_drops_a_malformed_upload_by_name_and_releases_the_others(monkeypatch):
    """Over the node link, one key holder: a member uploads a contribution with ``1e400`` in its header. The
    aggregator drops it by name and releases the others' sum."""
    out, vectors = _link_round_with(monkeypatch, ("site-0",), "site-3", None)
    assert not isinstance(out, SecAggError), out
    assert sorted(out.contributors) == ["site-0", "site-1", "site-2"]  # type: ignore[attr-defined]
    assert any("'site-3'" in r for r in out.rejected), out.rejected  # type: ignore[attr-defined]
    exact = vectors["site-0"] + vectors["site-1"] + vectors["site-2"]
    assert np.max(np.abs(out.total - exact)) <= 3 * PARAMS.precision  # type: ignore[attr-defined]


def test_link_aggregator_drops_a_malformed_holder_answer_by_name(monkeypatch):
    """Two key holders, one of which answers garbage: the other's answer releases the sum of all four."""
    out, vectors = _link_round_with(monkeypatch, ("site-0", "site-1"), None, "site-1")
    assert not isinstance(out, SecAggError), out
    assert sorted(out.contributors) == ["site-0", "site-1", "site-2", "site-3"]  # type: ignore[attr-defined]
    assert np.max(np.abs(out.total - sum(vectors.values()))) <= 4 * PARAMS.precision  # type: ignore[attr-defined]


def test_with_two_holders_a_committed_member_left_out_aborts_the_round(monkeypatch):
    """The price of the cross-holder rule (protocols/ckks.md §6): with several key holders every sum must
    cover the whole commitment list, so a member whose reveal is rejected after it committed stops the round
    (nothing released), where one holder would release the others' sum."""
    out, _ = _link_round_with(monkeypatch, ("site-0", "site-1"), "site-3", None)
    assert isinstance(out, SecAggError), out


def test_a_malicious_member_moves_the_sum_far_beyond_clip_range_and_nothing_flags_it(monkeypatch):
    """The stated non-guarantee (SECURITY.md, protocols/ckks.md): no range proofs, so a member can fill the
    carry headroom of its packed fields (room for the whole cohort's sum). With 4 members at -clip_range the
    sum is -4*clip; one member alone moves it to +2*clip (a shift of 6*clip = 2(n-1)*clip beyond its
    honest range), the holders' integrity check passes and the clipped fraction stays 0."""
    params = CkksParams()
    names = [f"m{i}" for i in range(4)]
    real_pack = packing.pack
    calls: list[int] = []

    def evil_pack(v, layout):  # the first member to encrypt adds 3 x its largest value to every field
        slots = real_pack(v, layout)
        calls.append(1)
        if len(calls) > 1:
            return slots
        s = slots.reshape(-1, layout.block_slots).copy()
        for p in layout.pieces:
            s[:, p.slot] += float((3 * ((1 << p.width) - 1)) << p.offset)
        return s.reshape(-1)

    monkeypatch.setattr(packing, "pack", evil_pack)
    proto = make_secure_sum("ckks", params=params, identities={m: NodeIdentity.generate(m) for m in names})
    res = proto.run_round(1, [MemberInput(m, -np.full(16, params.clip_range)) for m in names], min_cohort=2)
    assert np.allclose(res.total, 2 * params.clip_range, atol=1e-4)  # honest: -4 * clip_range
    assert res.stats.clipped_fraction == 0.0
