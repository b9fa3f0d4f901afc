"""Stochastic fixed-point quantization of float vectors into Z_2^b, sized so that n members' sum cannot wrap.

A value x is clipped to [-clip_range, clip_range], scaled by ``scale`` and rounded stochastically:
q = floor(x * scale + u), u ~ U[0, 1), so E[q / scale] = x (unbiased) and |q / scale - x| < 1 / scale.
q is stored as a two's-complement residue mod 2^b in a machine word (uint32 for b <= 32, uint64 up to
b = 62; the wire keeps the low b bits).
``scale = (2^(b-1) - 1 - n) / (n * clip_range)`` keeps |sum of n members| <= 2^(b-1) - 1, so the signed
sum decodes exactly. When members add integer DP noise after quantizing (distributed DP), the spec also
reserves ``reserve_units + reserve_per_scale * scale`` units for the noise and may cap the scale:
``scale = min(max_scale, (2^(b-1) - 1 - n - reserve_units) / (n * clip_range + reserve_per_scale))``. The sum of n members is therefore within n / scale of the clipped plaintext sum
(`sum_error_bound`, which also covers float64 rounding), with standard deviation at most sqrt(n) / (2 * scale).

Values outside the range are saturated, counted and reported (`Quantized.clipped_fraction`), never
silently. The rounding noise u comes from the AES-CTR PRG (`prg.uniform01`) under a fresh 32-byte seed
from os.urandom: it is not a secret the protocol depends on, but a cipher-based generator costs nothing
extra here and keeps non-cryptographic generators out of secagg/ entirely.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from worldlm_secure.errors import ConfigError
from worldlm_secure.secagg import prg


@dataclass(frozen=True)
class QuantizationSpec:
    """Public quantization parameters of one round: ``bits`` per value, range, and the member count n."""

    bits: int
    clip_range: float
    n_members: int
    reserve_units: float = 0.0  # integer units per coordinate kept free for noise added after quantizing
    reserve_per_scale: float = 0.0  # more reserved units per unit of scale (noise that grows with the scale)
    max_scale: float = math.inf

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 62:
            raise ConfigError(f"secure_aggregation.masking.bits: must be in 2..62 (got {self.bits})")
        if not (math.isfinite(self.clip_range) and self.clip_range > 0):
            raise ConfigError(
                f"secure_aggregation.masking.clip_range: must be a positive number (got {self.clip_range})"
            )
        if self.n_members < 1 or 2 ** (self.bits - 1) - 1 - self.n_members - self.reserve_units <= 0:
            noise = " plus the distributed DP noise" if self.reserve_units else ""
            raise ConfigError(
                f"secure_aggregation.masking.bits: {self.bits} bits cannot hold the sum of {self.n_members} "
                f"members{noise}; raise bits"
            )
        if min(self.reserve_units, self.reserve_per_scale) < 0 or not self.max_scale > 0:
            raise ConfigError("quantization: noise reserves must be >= 0 and max_scale > 0")

    @property
    def scale(self) -> float:
        """Quantization steps per unit of the input (1 / scale is the step size)."""
        room = 2 ** (self.bits - 1) - 1 - self.n_members - self.reserve_units
        scale = room / (self.n_members * self.clip_range + self.reserve_per_scale)
        if self.bits > 52:
            # Above 2^53 float64 cannot hold the room exactly: c * scale may round up past 2^(b-1), the one-unit
            # margins vanish, and a value at the clip wrapped to the other sign (found by hypothesis: bits 62,
            # x = 1 decoded as -1). Give up 2^-50 of the range instead; below 53 bits nothing changes.
            scale *= 1.0 - 2.0**-50
        return min(self.max_scale, scale)

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        """The machine word the residues live in: numpy add/subtract wrap mod 2^32 or 2^64 for free."""
        return np.uint32 if self.bits <= 32 else np.uint64

    @property
    def wire_bytes(self) -> int:
        """Bytes per value on the wire: the low ``bits`` of each word, rounded up to whole bytes."""
        return (self.bits + 7) // 8

    def sum_error_bound(self, n_contributors: int) -> float:
        """Hard bound on |decoded sum - clipped plaintext sum| per coordinate, in input units.

        One step (1 / scale) per member from rounding, plus float64 rounding of x * scale, of the
        stochastic offset and of the decoded sum (a few ulps of clip_range; matters only above ~50 bits).
        """
        return n_contributors * (1.0 / self.scale + 3.0 * self.clip_range * 2.0**-52)

    @property
    def clip_units(self) -> int:
        """Fixed-point units per member for reporting the clipped fraction inside the masked vector."""
        return (2 ** (self.bits - 1) - 1) // self.n_members


@dataclass(frozen=True)
class Quantized:
    values: np.ndarray  # residues in spec.dtype (only the low `bits` matter)
    clipped: int  # values saturated at +-clip_range
    clipped_fraction: float


_CHUNK = 1 << 15  # values per pass: keeps the float64 temporaries in L2


def quantize(x: np.ndarray, spec: QuantizationSpec, *, rounding_seed: bytes | None = None) -> Quantized:
    """Clip, scale and stochastically round the float vector ``x``; ``rounding_seed`` defaults to os.urandom(32).

    Equals ``floor(clip(x, -c, c) * scale + prg.uniform01(seed, n))`` as residues mod 2^32 (or 2^64),
    computed chunk by chunk so the float64 temporaries stay in cache (about 3x fewer memory passes).
    """
    x = np.ascontiguousarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError("quantize expects a 1-D vector")
    if not np.all(np.isfinite(x)):
        raise ValueError("vector holds NaN or infinite values")
    c, scale = spec.clip_range, spec.scale
    limit = c * scale
    stream = prg.keystream(rounding_seed if rounding_seed is not None else os.urandom(prg.SEED_BYTES))
    zeros = bytes(4 * _CHUNK)
    block = np.empty(4 * _CHUNK + 16, dtype=np.uint8)
    noise = block[: 4 * _CHUNK].view("<u4")
    y = np.empty(_CHUNK)
    tmp = np.empty(_CHUNK)
    over = np.empty(_CHUNK, dtype=bool)
    out = np.empty(x.size, dtype=spec.dtype)
    # |floor(y + u)| <= limit + 1 < 2^(b-1), so the signed word of the same width holds it exactly, and its
    # bits are the two's-complement residue: one float -> int conversion, written straight into `out`.
    signed = out.view(np.int32 if spec.dtype == np.uint32 else np.int64)
    clipped = 0
    for start in range(0, x.size, _CHUNK):
        m = min(_CHUNK, x.size - start)
        xs, ys, ts = x[start : start + m], y[:m], tmp[:m]
        np.multiply(xs, scale, out=ys)
        if xs.max() > c or xs.min() < -c:  # two read-only reductions skip the clip pass in the usual case
            np.abs(xs, out=ts)
            clipped += int(np.count_nonzero(np.greater(ts, c, out=over[:m])))
            np.clip(ys, -limit, limit, out=ys)
        stream.update_into(memoryview(zeros)[: 4 * m], block.data)
        np.multiply(noise[:m], 2.0**-32, out=ts)  # u ~ U[0, 1) with 32-bit resolution
        ys += ts
        np.floor(ys, out=ys)
        np.copyto(signed[start : start + m], ys, casting="unsafe")
    return Quantized(out, clipped, clipped / x.size if x.size else 0.0)


def dequantize(total: np.ndarray, spec: QuantizationSpec) -> np.ndarray:
    """Decode a sum of quantized vectors (residues in spec.dtype) back to float64 input units."""
    total = np.asarray(total, dtype=spec.dtype)
    if spec.bits == 32:
        signed = total.view(np.int32).astype(np.int64)
    else:
        low = (total & spec.dtype(2**spec.bits - 1)).astype(np.int64)
        signed = np.where(low >= 2 ** (spec.bits - 1), low - 2**spec.bits, low)
    return signed / spec.scale


def clip_report_units(clipped_fraction: float, spec: QuantizationSpec) -> int:
    """A member's clipped fraction as whole units (rounded up, so any clipping shows), summed under masking."""
    return math.ceil(clipped_fraction * spec.clip_units)


def clipped_fraction_from_units(units: int, n_contributors: int, spec: QuantizationSpec) -> float:
    """Mean clipped fraction over contributors from the masked sum of their units (over-estimates by < 1/units)."""
    return units / (spec.clip_units * n_contributors) if n_contributors else 0.0
