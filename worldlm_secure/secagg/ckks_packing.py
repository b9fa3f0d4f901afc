"""Quantize a float vector and pack several integers into each CKKS slot (pure numpy, no keys).

Encoding of one member's vector x (float64, length L), with clip range c and p = value_bits:
- clip to [-c, c] (the clipped fraction is reported, never silent), u = rint(x * S) with
  S = (2^p - 1) / c, so |u| <= 2^p - 1 and |x - u/S| <= c / (2^(p+1) - 2);
- offset to unsigned v = u + (2^p - 1), a (p+1)-bit integer.
Packing (a `Layout`): every slot holds `slot_bits` bits. A value is cut into "pieces" (bit ranges)
laid out greedily over a block of slots; each piece of d bits occupies a field of d + h bits, where
h = ceil(log2(cohort)) is the headroom that keeps the sum of up to 2^h members from carrying into the
next field. A value may straddle two slots (its pieces are summed separately and re-joined after
decryption). The block pattern repeats over the whole stream, so tensors of any size pack alike.
Each member subtracts 2^(slot_bits-1-h) from every slot (centering, halving the magnitude the CKKS
decoder sees); the decoder adds back that offset times the number of contributors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MAX_BLOCK_SLOTS = 32
# A decrypted slot farther than this from an integer means the sum is not what members packed. CKKS noise
# has standard deviation at most 0.5/12 (ckks_params), so an honest sum exceeds 0.45 with p < 1e-26 per slot,
# while a sum with a foreign-key ciphertext has uniform fractions and trips this on ~10% of slots.
INTEGER_SLACK = 0.45


@dataclass(frozen=True)
class Piece:
    """Bits [shift, shift+width) of value `value` sit in slot `slot` of a block at bit `offset`."""

    value: int
    shift: int
    width: int
    slot: int
    offset: int


@dataclass(frozen=True)
class Layout:
    """How (p+1)-bit values are packed into slots of `slot_bits` bits with `headroom` carry bits per field."""

    slot_bits: int
    value_bits: int  # p: |u| <= 2^p - 1, the unsigned value has p+1 bits
    headroom: int
    block_slots: int
    block_values: int
    pieces: tuple[Piece, ...]

    @property
    def values_per_slot(self) -> float:
        return self.block_values / self.block_slots

    @property
    def center(self) -> int:
        """Offset each member subtracts from every slot."""
        return 1 << (self.slot_bits - 1 - self.headroom)

    def slots_for(self, n_values: int) -> int:
        """Slots needed for `n_values` values (whole blocks)."""
        return math.ceil(n_values / self.block_values) * self.block_slots


def headroom_for(cohort: int) -> int:
    """Carry bits so that the sum of `cohort` members fits: ceil(log2(cohort))."""
    return max(0, math.ceil(math.log2(max(cohort, 1))))


def _greedy_block(slot_bits: int, width: int, headroom: int, n_slots: int) -> tuple[int, list[Piece]]:
    pieces: list[Piece] = []
    slot, used, done = 0, 0, 0
    while True:
        rem, shift, trial = width, 0, []
        s, u = slot, used
        while rem > 0:
            free = slot_bits - u - headroom
            if free < 1:
                s, u = s + 1, 0
                if s >= n_slots:
                    return done, pieces
                continue
            d = min(rem, free)
            trial.append(Piece(done, shift, d, s, u))
            u += d + headroom
            shift += d
            rem -= d
        pieces.extend(trial)
        done += 1
        slot, used = s, u


def plan_layout(slot_bits: int, value_bits: int, headroom: int) -> Layout:
    """The densest greedy block of up to MAX_BLOCK_SLOTS slots (ties go to the smaller block)."""
    if slot_bits < headroom + 2:
        raise ValueError(f"slot of {slot_bits} bits cannot hold a field with {headroom} headroom bits")
    width = value_bits + 1
    best: tuple[float, int, int, list[Piece]] | None = None
    for n_slots in range(1, MAX_BLOCK_SLOTS + 1):
        k, pieces = _greedy_block(slot_bits, width, headroom, n_slots)
        if k == 0:
            continue
        used = max(p.slot for p in pieces) + 1
        density = k / used
        if best is None or density > best[0] + 1e-12:
            best = (density, used, k, pieces)
    assert best is not None
    _, used, k, pieces = best
    return Layout(slot_bits, value_bits, headroom, used, k, tuple(pieces))


def quantize(x: np.ndarray, clip_range: float, value_bits: int) -> tuple[np.ndarray, int]:
    """Unsigned (p+1)-bit integers v = rint(clip(x) * S) + 2^p - 1, and how many entries were clipped."""
    x = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError("vector contains NaN or infinity")
    top = (1 << value_bits) - 1
    clipped = int(np.count_nonzero(np.abs(x) > clip_range))
    u = np.rint(np.clip(x, -clip_range, clip_range) * (top / clip_range)).astype(np.int64)
    np.clip(u, -top, top, out=u)
    return u + top, clipped


def dequantize_sum(vsum: np.ndarray, contributors: int, clip_range: float, value_bits: int) -> np.ndarray:
    """The float64 sum from the sum of unsigned values of `contributors` members."""
    top = (1 << value_bits) - 1
    return (vsum - contributors * top).astype(np.float64) * (clip_range / top)


def pack(v: np.ndarray, layout: Layout) -> np.ndarray:
    """Centered slot values (float64, exact integers) for unsigned values `v`; length = slots_for(len(v))."""
    k = layout.block_values
    blocks = math.ceil(v.size / k)
    vals: np.ndarray = np.zeros(blocks * k, dtype=np.int64)  # reshaped to 2-d below
    vals[: v.size] = v
    vals = vals.reshape(blocks, k)
    slots = np.full((blocks, layout.block_slots), -layout.center, dtype=np.int64)
    for p in layout.pieces:
        part = vals[:, p.value] >> p.shift if p.shift else vals[:, p.value].copy()
        part &= (1 << p.width) - 1
        if p.offset:
            part <<= p.offset
        slots[:, p.slot] += part
    return slots.reshape(-1).astype(np.float64)


class PackingError(ValueError):
    """The decrypted slots are not the sum of well-formed packed vectors (wrong key, tampering, overflow)."""


def unpack_sum(slots: np.ndarray, n_values: int, contributors: int, layout: Layout) -> np.ndarray:
    """Sum of unsigned values from the decrypted sum of `contributors` packed vectors.

    Raises PackingError when a slot is not within 0.45 of an integer or outside [0, 2^slot_bits)
    after removing the centering offsets: the CKKS error would have been far below that.
    """
    need = layout.slots_for(n_values)
    if slots.size < need:
        raise PackingError(f"{slots.size} slots decrypted, {need} expected")
    raw = np.asarray(slots[:need], dtype=np.float64)
    ints = np.rint(raw)
    worst = float(np.max(np.abs(raw - ints))) if raw.size else 0.0
    if not worst <= INTEGER_SLACK:
        raise PackingError(f"decrypted slot off an integer by {worst:.3g} (> {INTEGER_SLACK}): wrong key or corrupted sum")
    s = ints.astype(np.int64) + contributors * layout.center
    if s.size and (s.min() < 0 or s.max() >= (1 << layout.slot_bits)):
        raise PackingError("decrypted slot outside the packed range: wrong key, tampering or too many members")
    s = s.reshape(-1, layout.block_slots)
    out = np.zeros((s.shape[0], layout.block_values), dtype=np.int64)
    for p in layout.pieces:
        field = s[:, p.slot] >> p.offset if p.offset else s[:, p.slot].copy()
        field &= (1 << (p.width + layout.headroom)) - 1
        if p.shift:
            field <<= p.shift
        out[:, p.value] += field
    out = out.reshape(-1)[:n_values]
    limit = contributors * ((1 << (layout.value_bits + 1)) - 2)
    if out.size and (out.min() < 0 or out.max() > limit):
        raise PackingError("decrypted value outside the range of the quantizer: wrong key or tampering")
    return out
