"""Chunked transfers: split a payload into `TransferPart` messages and reassemble it with checks.

A transfer is one `TransferHeader` (layout, total bytes, chunk count, SHA-256) followed by
`total_chunks` data chunks in index order. Every gRPC message stays small (default 1 MiB of data),
so payload size is bounded only by `TransferLimits.max_total_bytes`, never by gRPC's message
limit; the cost is linear in size and nothing here depends on it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from worldlm_secure.transport import federation_pb2 as pb
from worldlm_secure.transport.federation_pb2 import RefusalReason as R
from worldlm_secure.transport.refusal import Refused

DEFAULT_CHUNK_BYTES = 1 << 20  # 1 MiB: large enough for throughput, far below gRPC's 4 MiB default

# dtypes a tensor may declare: fixed-size numeric types, so the byte count is shape * itemsize.
_ALLOWED_DTYPES = frozenset(
    np.dtype(t).str for t in ("<f2", "<f4", "<f8", "<i1", "<i2", "<i4", "<i8", "<u1", "<u2", "<u4", "<u8", "|b1")
)


@dataclass(frozen=True)
class TransferLimits:
    """What a receiver accepts. Bytes are payload bytes (not counting protobuf framing)."""

    max_chunk_bytes: int = 4 << 20
    max_total_bytes: int = 4 << 30  # a 124M-parameter float32 model is about 0.5 GiB
    max_tensors: int = 100_000

    @property
    def grpc_message_bytes(self) -> int:
        """The gRPC receive limit to configure: one chunk plus generous framing headroom."""
        return self.max_chunk_bytes + (64 << 10)


@dataclass(frozen=True)
class TensorLayout:
    """One named tensor inside a payload: numpy dtype string (e.g. ``<f4``) and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class Payload:
    """Bytes to move, as one or more buffers, optionally described as named tensors in order.

    A received payload is read-only (its arrays too: copy before changing them) and carries the
    SHA-256 it was verified against, so `sha256()` costs nothing.
    """

    buffers: tuple[memoryview, ...]
    tensors: tuple[TensorLayout, ...] = ()
    verified_sha256: bytes | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> "Payload":
        """An opaque payload (e.g. a serialized secure-aggregation message)."""
        return cls((memoryview(data).cast("B"),))

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, np.ndarray]) -> "Payload":
        """Named arrays, sent in mapping order without concatenating (C-contiguous views)."""
        layouts, bufs = [], []
        for name, arr in tensors.items():
            arr = np.asarray(arr)
            arr = arr.astype(arr.dtype.newbyteorder("<"), order="C", copy=False)  # keeps 0-d shapes
            layout = TensorLayout(name, arr.dtype.str, tuple(int(s) for s in arr.shape))
            _check_layout(layout)
            layouts.append(layout)
            bufs.append(arr.reshape(-1).view(np.uint8).data)  # .data: the same memoryview, typed
        return cls(tuple(bufs), tuple(layouts))

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)

    def sha256(self) -> bytes:
        if self.verified_sha256 is not None:
            return self.verified_sha256
        h = hashlib.sha256()
        for b in self.buffers:
            h.update(b)
        return h.digest()

    def to_bytes(self) -> bytes:
        return b"".join(self.buffers)

    def as_tensors(self) -> dict[str, np.ndarray]:
        """The payload as named arrays (views, no copy, when the layout allows)."""
        views: Sequence[memoryview]
        if len(self.buffers) == len(self.tensors):
            views = self.buffers
        else:
            whole = self.buffers[0] if len(self.buffers) == 1 else memoryview(self.to_bytes())
            cut: list[memoryview] = []
            offset = 0
            for t in self.tensors:
                cut.append(whole[offset : offset + t.nbytes])
                offset += t.nbytes
            views = cut
        return {t.name: np.frombuffer(v, dtype=t.dtype).reshape(t.shape) for t, v in zip(self.tensors, views)}


def iter_parts(
    header: pb.TransferHeader, payload: Payload, chunk_bytes: int = DEFAULT_CHUNK_BYTES, *, sha256: bytes | None = None
) -> Iterator[pb.TransferPart]:
    """Yield the header (layout, sizes and SHA-256 filled in) then the data in ``chunk_bytes`` chunks.

    ``header`` supplies envelope, kind, secagg_kind and recipient; it is copied, not modified.
    ``sha256`` may pass a digest already computed for ``payload`` (saves a pass over the data).
    """
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be positive (got {chunk_bytes})")
    full = pb.TransferHeader()
    full.CopyFrom(header)
    del full.tensors[:]
    for t in payload.tensors:
        full.tensors.add(name=t.name, dtype=t.dtype, shape=list(t.shape))
    total = payload.nbytes
    full.total_bytes = total
    full.total_chunks = math.ceil(total / chunk_bytes)
    full.sha256 = sha256 if sha256 is not None else payload.sha256()
    yield pb.TransferPart(header=full)
    for index, data in enumerate(_rechunk(payload.buffers, chunk_bytes)):
        yield pb.TransferPart(chunk=pb.ChunkData(index=index, data=data))


def _rechunk(buffers: Iterable[memoryview], size: int) -> Iterator[bytes]:
    """Fixed-size chunks across buffer boundaries; the last may be shorter."""
    pending: list[memoryview] = []
    pending_len = 0
    for buf in buffers:
        pos = 0
        while pos < buf.nbytes:
            take = min(size - pending_len, buf.nbytes - pos)
            pending.append(buf[pos : pos + take])
            pending_len += take
            pos += take
            if pending_len == size:
                yield b"".join(pending)
                pending, pending_len = [], 0
    if pending_len:
        yield b"".join(pending)


class Assembler:
    """Receives one transfer: validate the header, then each chunk, then the totals and hash."""

    def __init__(self, header: pb.TransferHeader, limits: TransferLimits) -> None:
        self.header = header
        self.limits = limits
        self.tensors = check_header(header, limits)
        self._buf = bytearray()
        self._hash = hashlib.sha256()
        self._next = 0

    @property
    def complete(self) -> bool:
        return self._next == self.header.total_chunks

    def feed(self, chunk: pb.ChunkData) -> None:
        n = len(chunk.data)
        if self.complete:
            raise Refused(R.REFUSAL_OVERSIZED, f"chunk {chunk.index} after the declared {self.header.total_chunks} chunks")
        if chunk.index != self._next:
            raise Refused(R.REFUSAL_INTEGRITY, f"chunk {chunk.index} arrived where chunk {self._next} was expected")
        if n == 0:
            raise Refused(R.REFUSAL_MALFORMED, f"chunk {chunk.index} is empty")
        if n > self.limits.max_chunk_bytes:
            raise Refused(R.REFUSAL_OVERSIZED, f"chunk {chunk.index} has {n} bytes; limit {self.limits.max_chunk_bytes}")
        if len(self._buf) + n > self.header.total_bytes:
            raise Refused(R.REFUSAL_OVERSIZED, f"chunks exceed the declared {self.header.total_bytes} bytes")
        self._buf += chunk.data
        self._hash.update(chunk.data)
        self._next += 1

    def finish(self) -> Payload:
        """The payload, once every chunk arrived and the SHA-256 matches."""
        if not self.complete or len(self._buf) != self.header.total_bytes:
            raise Refused(
                R.REFUSAL_TRUNCATED,
                f"stream ended after {self._next}/{self.header.total_chunks} chunks, "
                f"{len(self._buf)}/{self.header.total_bytes} bytes",
            )
        if self._hash.digest() != self.header.sha256:
            raise Refused(R.REFUSAL_INTEGRITY, "SHA-256 of the received data does not match the header")
        return Payload((memoryview(self._buf).toreadonly(),), self.tensors, self.header.sha256)


def check_header(header: pb.TransferHeader, limits: TransferLimits) -> tuple[TensorLayout, ...]:
    """Validate a header's sizes and layout before accepting any data; return the tensor layouts."""
    if header.total_bytes > limits.max_total_bytes:
        raise Refused(R.REFUSAL_OVERSIZED, f"transfer declares {header.total_bytes} bytes; limit {limits.max_total_bytes}")
    if len(header.sha256) != 32:
        raise Refused(R.REFUSAL_MALFORMED, f"header sha256 must be 32 bytes (got {len(header.sha256)})")
    min_chunks = math.ceil(header.total_bytes / limits.max_chunk_bytes)
    if not (min_chunks <= header.total_chunks <= header.total_bytes):
        raise Refused(
            R.REFUSAL_MALFORMED,
            f"{header.total_chunks} chunks cannot carry {header.total_bytes} bytes within {limits.max_chunk_bytes}-byte chunks",
        )
    if len(header.tensors) > limits.max_tensors:
        raise Refused(R.REFUSAL_OVERSIZED, f"{len(header.tensors)} tensors; limit {limits.max_tensors}")
    layouts = tuple(TensorLayout(t.name, t.dtype, tuple(t.shape)) for t in header.tensors)
    for layout in layouts:
        _check_layout(layout)
    if len({t.name for t in layouts}) != len(layouts):
        raise Refused(R.REFUSAL_MALFORMED, "tensor names in the header are not unique")
    if layouts and sum(t.nbytes for t in layouts) != header.total_bytes:
        raise Refused(R.REFUSAL_MALFORMED, f"tensor layout sums to {sum(t.nbytes for t in layouts)} bytes, header says {header.total_bytes}")
    return layouts


def _check_layout(t: TensorLayout) -> None:
    if not t.name or len(t.name) > 1024:
        raise Refused(R.REFUSAL_MALFORMED, "tensor name must be 1..1024 characters")
    if t.dtype not in _ALLOWED_DTYPES:
        raise Refused(R.REFUSAL_MALFORMED, f"tensor {t.name[:80]!r}: dtype {t.dtype[:16]!r} not allowed")
    # numpy refuses a shape whose dimensions, zeros aside, multiply past its index range (even when
    # another dimension is 0, so the tensor holds no bytes): bound that product, not each dimension.
    if len(t.shape) > 32 or math.prod(max(s, 1) for s in t.shape) > (1 << 40):
        raise Refused(R.REFUSAL_MALFORMED, f"tensor {t.name[:80]!r}: shape out of range")
