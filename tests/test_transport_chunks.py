"""Chunked transfers without a network: exact round trips, and every way a stream can be bad."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worldlm_secure.transport import federation_pb2 as pb
from worldlm_secure.transport.chunks import Assembler, Payload, TransferLimits, iter_parts
from worldlm_secure.transport.refusal import Refused

LIMITS = TransferLimits(max_chunk_bytes=4096, max_total_bytes=1 << 20)
DTYPES = ["<f4", "<f8", "<f2", "<i8", "<u4", "|u1", "|b1"]


def send(payload: Payload, chunk: int) -> list[pb.TransferPart]:
    return list(iter_parts(pb.TransferHeader(kind=pb.PAYLOAD_KIND_MODEL), payload, chunk))


def receive(parts: list[pb.TransferPart], limits: TransferLimits = LIMITS) -> Payload:
    assembler = Assembler(parts[0].header, limits)
    for p in parts[1:]:
        assembler.feed(p.chunk)
    return assembler.finish()


def reason(fn) -> str:
    with pytest.raises(Refused) as info:
        fn()
    return info.value.reason_name


tensors = st.dictionaries(
    st.text(min_size=1, max_size=12),
    st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 24), max_size=3)),
    max_size=5,
)


@settings(max_examples=60, deadline=None)
@given(spec=tensors, chunk=st.integers(1, 4096), seed=st.binary(min_size=32, max_size=32))
def test_any_tensors_any_chunk_size_round_trip_exactly(spec, chunk, seed):
    arrays = {}
    for i, (name, (dtype, shape)) in enumerate(spec.items()):
        n = math.prod(shape) * np.dtype(dtype).itemsize
        raw = np.frombuffer((seed * (n // 32 + 1))[:n], dtype=np.uint8) ^ np.uint8(i)
        arrays[name] = raw.view(dtype).reshape(shape)
    sent = Payload.from_tensors(arrays)
    parts = send(sent, chunk)
    assert parts[0].header.total_chunks == len(parts) - 1 == math.ceil(sent.nbytes / chunk)
    assert all(len(p.chunk.data) <= chunk for p in parts[1:])
    got = receive(parts).as_tensors()
    assert list(got) == list(arrays)
    for name, arr in arrays.items():
        assert got[name].dtype == arr.dtype and got[name].shape == arr.shape
        assert got[name].tobytes() == arr.tobytes()


@settings(max_examples=60, deadline=None)
@given(data=st.binary(min_size=1, max_size=20_000), chunk=st.integers(1, 4096), where=st.integers(0, 10**6), bit=st.integers(0, 7))
def test_any_single_bit_flip_is_caught(data, chunk, where, bit):
    parts = send(Payload.from_bytes(data), chunk)
    i = 1 + where % (len(parts) - 1)
    buf = bytearray(parts[i].chunk.data)
    buf[where % len(buf)] ^= 1 << bit
    parts[i].chunk.data = bytes(buf)
    assert reason(lambda: receive(parts)) == "INTEGRITY"


@settings(max_examples=40, deadline=None)
@given(data=st.binary(min_size=2, max_size=20_000), chunk=st.integers(1, 2048), keep=st.integers(0, 10**6))
def test_any_truncation_is_caught(data, chunk, keep):
    parts = send(Payload.from_bytes(data), chunk)
    cut = 1 + keep % (len(parts) - 1)  # keep the header and fewer than all chunks
    assert reason(lambda: receive(parts[:cut])) == "TRUNCATED"


def test_bad_streams_each_refused_with_its_reason():
    data = bytes(range(256)) * 40  # 10240 bytes -> 3 chunks of 4096
    parts = send(Payload.from_bytes(data), 4096)

    swapped = parts[:1] + [parts[2], parts[1]] + parts[3:]
    assert reason(lambda: receive(swapped)) == "INTEGRITY"
    dup = parts + [parts[-1]]
    assert reason(lambda: receive(dup)) == "OVERSIZED"
    big = send(Payload.from_bytes(data), 8192)
    big[0].header.total_chunks = 3
    assert reason(lambda: receive(big)) == "OVERSIZED"  # an 8 KiB chunk over a 4 KiB cap
    empty = parts[:1] + [pb.TransferPart(chunk=pb.ChunkData(index=0, data=b""))]
    assert reason(lambda: receive(empty)) == "MALFORMED"


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda h: setattr(h, "total_bytes", (1 << 20) + 1), "OVERSIZED"),
        (lambda h: setattr(h, "sha256", b"short"), "MALFORMED"),
        (lambda h: setattr(h, "total_chunks", 1), "MALFORMED"),  # 10240 bytes cannot fit one 4 KiB chunk
        (lambda h: setattr(h, "total_chunks", 10**6), "MALFORMED"),  # more chunks than bytes
        (lambda h: setattr(h.tensors[0], "dtype", "O"), "MALFORMED"),
        (lambda h: setattr(h.tensors[0], "dtype", "<c16"), "MALFORMED"),
        (lambda h: h.tensors[0].shape.append(2), "MALFORMED"),  # layout no longer sums to total_bytes
        (lambda h: setattr(h.tensors[1], "name", h.tensors[0].name), "MALFORMED"),
        (lambda h: setattr(h.tensors[0], "name", ""), "MALFORMED"),
    ],
)
def test_bad_headers_refused_before_any_data(mutate, expected):
    payload = Payload.from_tensors({"a": np.zeros(1280, np.float32), "b": np.zeros(1280, np.float32)})
    header = send(payload, 4096)[0].header
    mutate(header)
    assert reason(lambda: Assembler(header, LIMITS)) == expected


def test_empty_payload_is_a_valid_transfer():
    parts = send(Payload.from_bytes(b""), 1024)
    assert len(parts) == 1 and parts[0].header.total_chunks == 0
    assert receive(parts).to_bytes() == b""


def test_big_endian_input_is_sent_little_endian():
    arr = np.arange(10, dtype=">f8")
    got = receive(send(Payload.from_tensors({"x": arr}), 16)).as_tensors()["x"]
    assert got.dtype == np.dtype("<f8") and np.array_equal(got, arr)


def test_received_payloads_are_read_only_and_carry_their_verified_digest():
    arr = np.arange(1000, dtype=np.float32)
    got = receive(send(Payload.from_tensors({"x": arr}), 1000))
    x = got.as_tensors()["x"]
    assert not x.flags.writeable
    with pytest.raises(ValueError):
        x[0] = 1.0
    assert got.sha256() == Payload(got.buffers, got.tensors).sha256() == Payload.from_tensors({"x": arr}).sha256()
