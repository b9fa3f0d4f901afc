"""The SecAgg+ wire messages: frozen dataclasses with a byte encoding (spec: protocols/secagg-plus.md).

Every message starts with the header ``b"WSA1" | tag (1 byte) | round_id (u64 big-endian)``, then its
fields in order: str = u16 length + UTF-8, bytes = u32 length + data, list = u32 count + items, small
ints = u32. Nested messages are carried as bytes fields holding their own full encoding. Decoding
refuses anything malformed (wrong magic or tag, truncation, trailing bytes) with `SecAggError`.
Bytes-sent figures in `ProtectionStats` are the lengths of these encodings.
"""

from __future__ import annotations

import builtins
import dataclasses
import struct
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np

from worldlm_secure.errors import SecAggError

MAGIC = b"WSA1"
_HEADER = struct.Struct(">4sBQ")


class _Writer:
    def __init__(self, tag: int, round_id: int) -> None:
        self.parts: list[bytes] = [_HEADER.pack(MAGIC, tag, round_id)]

    def str(self, s: str) -> None:
        raw = s.encode()
        if len(raw) >= 2**16:
            raise ValueError("member names are limited to 65535 bytes")
        self.parts += [struct.pack(">H", len(raw)), raw]

    def bytes(self, b: bytes) -> None:
        self.parts += [struct.pack(">I", len(b)), b]

    def u32(self, v: int) -> None:
        self.parts.append(struct.pack(">I", v))

    def strs(self, items: tuple[builtins.str, ...]) -> None:
        self.u32(len(items))
        for s in items:
            self.str(s)

    def blobs(self, items: tuple[builtins.bytes, ...]) -> None:
        self.u32(len(items))
        for b in items:
            self.bytes(b)

    def pairs(self, items: tuple[tuple[builtins.str, builtins.bytes], ...]) -> None:
        self.u32(len(items))
        for s, b in items:
            self.str(s)
            self.bytes(b)

    def done(self) -> builtins.bytes:
        return b"".join(self.parts)


class _Reader:
    def __init__(self, data: bytes, tag: int, kind: str) -> None:
        self.data = memoryview(bytes(data))
        self.kind = kind
        self.pos = 0
        magic, got_tag, self.round_id = _HEADER.unpack(self._take(_HEADER.size))
        if magic != MAGIC or got_tag != tag:
            raise SecAggError(f"not a {kind} message (magic {bytes(magic)!r}, tag {got_tag}); refused")

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise SecAggError(f"malformed {self.kind} message: truncated at byte {self.pos}; refused")
        out = self.data[self.pos : self.pos + n].tobytes()
        self.pos += n
        return out

    def str(self) -> str:
        (n,) = struct.unpack(">H", self._take(2))
        try:
            return self._take(n).decode()
        except UnicodeDecodeError:
            raise SecAggError(f"malformed {self.kind} message: a name is not UTF-8; refused") from None

    def bytes(self) -> bytes:
        (n,) = struct.unpack(">I", self._take(4))
        return self._take(n)

    def u32(self) -> int:
        (v,) = struct.unpack(">I", self._take(4))
        return v

    def _count(self) -> int:
        n = self.u32()
        if n > len(self.data) - self.pos:  # every item takes at least one byte
            raise SecAggError(f"malformed {self.kind} message: list of {n} items cannot fit; refused")
        return n

    def strs(self) -> tuple[builtins.str, ...]:
        return tuple(self.str() for _ in range(self._count()))

    def blobs(self) -> tuple[builtins.bytes, ...]:
        return tuple(self.bytes() for _ in range(self._count()))

    def pairs(self) -> tuple[tuple[builtins.str, builtins.bytes], ...]:
        return tuple((self.str(), self.bytes()) for _ in range(self._count()))

    def end(self) -> None:
        if self.pos != len(self.data):
            raise SecAggError(f"malformed {self.kind} message: {len(self.data) - self.pos} trailing bytes; refused")


M = TypeVar("M", bound="Message")


class Message:
    """Base of all SecAgg+ messages: ``to_bytes`` / ``from_bytes`` and the round they belong to."""

    TAG: ClassVar[int]
    round_id: int
    # Every concrete message is a frozen dataclass; declared here (annotation only) so that
    # `dataclasses.replace` type-checks on the base classes and their type variables.
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    def _write(self, w: _Writer) -> None:
        raise NotImplementedError

    @classmethod
    def _read(cls: type[M], r: _Reader) -> M:
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        w = _Writer(self.TAG, self.round_id)
        self._write(w)
        return w.done()

    @classmethod
    def from_bytes(cls: type[M], data: bytes) -> M:
        r = _Reader(data, cls.TAG, cls.__name__)
        try:
            msg = cls._read(r)
        except struct.error:
            raise SecAggError(f"malformed {cls.__name__} message; refused") from None
        r.end()
        return msg


AGGREGATOR_LABEL = b"worldlm-secagg+/aggregator/v1"


class AggregatorMessage(Message):
    """An aggregator -> member message. It carries the aggregator's Ed25519 signature over its encoding
    (with an empty signature field), so a member can tell it from anything another member forged."""

    signature: bytes

    def signed_payload(self) -> bytes:
        return AGGREGATOR_LABEL + dataclasses.replace(self, signature=b"").to_bytes()


def _nested(cls: type[M], blobs: tuple[bytes, ...], round_id: int) -> tuple[M, ...]:
    items = tuple(cls.from_bytes(b) for b in blobs)
    for it in items:
        if it.round_id != round_id:
            raise SecAggError(f"{cls.__name__} for round {it.round_id} nested in a round {round_id} message; refused")
    return items


@dataclass(frozen=True)
class KeyAdvert(Message):
    """Round 0, member -> aggregator: fresh X25519 public keys, signed with the member's Ed25519 identity."""

    TAG: ClassVar[int] = 1
    round_id: int
    member: str
    enc_public: bytes  # X25519, encrypts the shares this member sends and receives
    mask_public: bytes  # X25519, agrees the pairwise mask seeds
    self_mask_commitment: bytes  # SHA-256 commitment to the self-mask seed (checked after reconstruction)
    signature: bytes  # Ed25519 over signed_payload()

    def signed_payload(self) -> bytes:
        w = _Writer(self.TAG, self.round_id)
        w.str(self.member)
        w.bytes(self.enc_public)
        w.bytes(self.mask_public)
        w.bytes(self.self_mask_commitment)
        return b"worldlm-secagg+/advert/v1" + w.done()

    def _write(self, w: _Writer) -> None:
        w.str(self.member)
        w.bytes(self.enc_public)
        w.bytes(self.mask_public)
        w.bytes(self.self_mask_commitment)
        w.bytes(self.signature)

    @classmethod
    def _read(cls, r: _Reader) -> "KeyAdvert":
        return cls(r.round_id, r.str(), r.bytes(), r.bytes(), r.bytes(), r.bytes())


@dataclass(frozen=True)
class NeighbourKeys(AggregatorMessage):
    """Round 0 reply, aggregator -> member: who advertised keys, and the signed adverts of its neighbours."""

    TAG: ClassVar[int] = 2
    round_id: int
    recipient: str
    advertised: tuple[str, ...]
    adverts: tuple[KeyAdvert, ...]
    signature: bytes = b""

    def _write(self, w: _Writer) -> None:
        w.str(self.recipient)
        w.strs(self.advertised)
        w.blobs(tuple(a.to_bytes() for a in self.adverts))
        w.bytes(self.signature)

    @classmethod
    def _read(cls, r: _Reader) -> "NeighbourKeys":
        return cls(r.round_id, r.str(), r.strs(), _nested(KeyAdvert, r.blobs(), r.round_id), r.bytes())


@dataclass(frozen=True)
class EncryptedShare(Message):
    """AES-GCM ciphertext of the sender's two Shamir shares for one recipient (only it can open it)."""

    TAG: ClassVar[int] = 3
    round_id: int
    sender: str
    recipient: str
    nonce: bytes
    ciphertext: bytes

    def _write(self, w: _Writer) -> None:
        w.str(self.sender)
        w.str(self.recipient)
        w.bytes(self.nonce)
        w.bytes(self.ciphertext)

    @classmethod
    def _read(cls, r: _Reader) -> "EncryptedShare":
        return cls(r.round_id, r.str(), r.str(), r.bytes(), r.bytes())


@dataclass(frozen=True)
class ShareKeys(Message):
    """Round 1, member -> aggregator: one EncryptedShare per neighbour that advertised keys."""

    TAG: ClassVar[int] = 4
    round_id: int
    sender: str
    shares: tuple[EncryptedShare, ...]

    def _write(self, w: _Writer) -> None:
        w.str(self.sender)
        w.blobs(tuple(s.to_bytes() for s in self.shares))

    @classmethod
    def _read(cls, r: _Reader) -> "ShareKeys":
        return cls(r.round_id, r.str(), _nested(EncryptedShare, r.blobs(), r.round_id))


@dataclass(frozen=True)
class ShareDelivery(AggregatorMessage):
    """Round 1 reply, aggregator -> member: the EncryptedShares addressed to it (their senders are U2)."""

    TAG: ClassVar[int] = 5
    round_id: int
    recipient: str
    shares: tuple[EncryptedShare, ...]
    signature: bytes = b""

    def _write(self, w: _Writer) -> None:
        w.str(self.recipient)
        w.blobs(tuple(s.to_bytes() for s in self.shares))
        w.bytes(self.signature)

    @classmethod
    def _read(cls, r: _Reader) -> "ShareDelivery":
        return cls(r.round_id, r.str(), _nested(EncryptedShare, r.blobs(), r.round_id), r.bytes())


@dataclass(frozen=True)
class MaskedInput(Message):
    """Round 2, member -> aggregator: the masked quantized vector, low ``bits`` of each word, little-endian."""

    TAG: ClassVar[int] = 6
    round_id: int
    member: str
    bits: int
    length: int
    payload: bytes

    def _write(self, w: _Writer) -> None:
        w.str(self.member)
        w.u32(self.bits)
        w.u32(self.length)
        w.bytes(self.payload)

    @classmethod
    def _read(cls, r: _Reader) -> "MaskedInput":
        return cls(r.round_id, r.str(), r.u32(), r.u32(), r.bytes())

    def words(self) -> np.ndarray:
        """The payload as words (refuses a payload whose size does not match bits and length)."""
        return unpack_words(self.payload, self.bits, self.length, who=self.member)


@dataclass(frozen=True)
class SurvivorList(AggregatorMessage):
    """Round 3 (consistency check), aggregator -> member: the members whose masked input arrived (U3)."""

    TAG: ClassVar[int] = 9
    round_id: int
    recipient: str
    survivors: tuple[str, ...]
    signature: bytes = b""

    def _write(self, w: _Writer) -> None:
        w.str(self.recipient)
        w.strs(self.survivors)
        w.bytes(self.signature)

    @classmethod
    def _read(cls, r: _Reader) -> "SurvivorList":
        return cls(r.round_id, r.str(), r.strs(), r.bytes())


@dataclass(frozen=True)
class SurvivorSignature(Message):
    """Round 3 reply, member -> aggregator: the member's Ed25519 signature over its view of the round
    (`masking.view_statement`: roster, advertised members U1, survivors U3)."""

    TAG: ClassVar[int] = 10
    round_id: int
    sender: str
    signature: bytes

    def _write(self, w: _Writer) -> None:
        w.str(self.sender)
        w.bytes(self.signature)

    @classmethod
    def _read(cls, r: _Reader) -> "SurvivorSignature":
        return cls(r.round_id, r.str(), r.bytes())


@dataclass(frozen=True)
class UnmaskRequest(AggregatorMessage):
    """Round 4, aggregator -> member: the survivors (U3) and the members' signatures over that same view,
    which the member checks before it reveals any share (the consistency check of Bonawitz et al. 2017)."""

    TAG: ClassVar[int] = 7
    round_id: int
    recipient: str
    survivors: tuple[str, ...]
    confirmations: tuple[tuple[str, bytes], ...] = ()  # (signer, its SurvivorSignature.signature)
    signature: bytes = b""

    def _write(self, w: _Writer) -> None:
        w.str(self.recipient)
        w.strs(self.survivors)
        w.pairs(self.confirmations)
        w.bytes(self.signature)

    @classmethod
    def _read(cls, r: _Reader) -> "UnmaskRequest":
        return cls(r.round_id, r.str(), r.strs(), r.pairs(), r.bytes())


@dataclass(frozen=True)
class UnmaskResponse(Message):
    """Round 3 reply: self-mask shares of surviving neighbours, mask-key shares of dropped ones (never both)."""

    TAG: ClassVar[int] = 8
    round_id: int
    sender: str
    self_mask_shares: tuple[tuple[str, bytes], ...]  # (owner, Shamir share of owner's self-mask seed)
    mask_key_shares: tuple[tuple[str, bytes], ...]  # (owner, Shamir share of owner's X25519 mask key)

    def _write(self, w: _Writer) -> None:
        w.str(self.sender)
        w.pairs(self.self_mask_shares)
        w.pairs(self.mask_key_shares)

    @classmethod
    def _read(cls, r: _Reader) -> "UnmaskResponse":
        return cls(r.round_id, r.str(), r.pairs(), r.pairs())


_BY_TAG: dict[int, type[Message]] = {
    c.TAG: c
    for c in (
        KeyAdvert,
        NeighbourKeys,
        EncryptedShare,
        ShareKeys,
        ShareDelivery,
        MaskedInput,
        UnmaskRequest,
        UnmaskResponse,
        SurvivorList,
        SurvivorSignature,
    )
}


def decode(data: bytes) -> Message:
    """Decode any SecAgg+ message by its tag."""
    if len(data) < _HEADER.size or data[:4] != MAGIC or data[4] not in _BY_TAG:
        raise SecAggError("not a SecAgg+ message (bad magic or unknown tag); refused")
    return _BY_TAG[data[4]].from_bytes(data)


_WIRE_DTYPES: dict[int, str] = {1: "<u1", 2: "<u2", 4: "<u4", 8: "<u8"}


def word_dtype(bits: int) -> type[np.unsignedinteger]:
    """uint32 words for up to 32 bits, uint64 above (same rule as QuantizationSpec.dtype)."""
    return np.uint32 if bits <= 32 else np.uint64


def pack_words(words: np.ndarray, bits: int) -> bytes:
    """The low ``bits`` of each word, ceil(bits/8) little-endian bytes per word."""
    nbytes = (bits + 7) // 8
    dtype = word_dtype(bits)
    words = words.astype(dtype, copy=False)
    if bits not in (32, 64):
        words = words & dtype(2**bits - 1)
    if nbytes in _WIRE_DTYPES:
        return words.astype(_WIRE_DTYPES[nbytes], copy=False).tobytes()
    size = np.dtype(dtype).itemsize
    return words.astype(f"<u{size}").view(np.uint8).reshape(-1, size)[:, :nbytes].tobytes()


def unpack_words(payload: bytes, bits: int, length: int, *, who: str = "?") -> np.ndarray:
    """Inverse of `pack_words`: a vector of `word_dtype(bits)` (a read-only view of ``payload`` when the
    wire width equals the word width, so a 4-byte-per-value input is not copied)."""
    if not 2 <= bits <= 62:
        raise SecAggError(f"masked input from {who!r} declares {bits} bits (must be 2..62); refused")
    nbytes = (bits + 7) // 8
    if len(payload) != nbytes * length:
        raise SecAggError(
            f"masked input from {who!r} has {len(payload)} bytes, expected {nbytes * length} "
            f"({length} values x {nbytes} bytes); refused"
        )
    dtype = word_dtype(bits)
    if nbytes in _WIRE_DTYPES:
        return np.frombuffer(payload, dtype=_WIRE_DTYPES[nbytes]).astype(dtype, copy=False)
    size = np.dtype(dtype).itemsize
    raw = np.zeros((length, size), dtype=np.uint8)
    raw[:, :nbytes] = np.frombuffer(payload, dtype=np.uint8).reshape(length, nbytes)
    return raw.view(f"<u{size}").reshape(length).astype(dtype)
