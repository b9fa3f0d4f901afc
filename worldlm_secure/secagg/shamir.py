"""Shamir secret sharing of 32-byte secrets over the prime field GF(2^521 - 1).

Any ``threshold`` shares recover the secret; fewer reveal nothing about it (information-theoretically).
The field is the Mersenne prime 2^521 - 1, so every 256-bit secret is a field element and a share's y
fits in 66 bytes. Polynomial coefficients are uniform field elements drawn from ``secrets`` (or from an
explicit ``entropy`` callable, used only to reproduce the published test vectors).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from worldlm_secure.errors import SecAggError

PRIME = 2**521 - 1
SECRET_BYTES = 32
_Y_BYTES = 66  # ceil(521 / 8)
SHARE_BYTES = 2 + _Y_BYTES
_COEFF_BYTES = 80  # 640 random bits reduced mod p: bias < 2^-119


@dataclass(frozen=True)
class Share:
    """One point (x, y) of the sharing polynomial; x is the holder's 1-based roster index."""

    x: int
    y: int

    def to_bytes(self) -> bytes:
        return struct.pack(">H", self.x) + self.y.to_bytes(_Y_BYTES, "big")

    @classmethod
    def from_bytes(cls, data: bytes) -> "Share":
        if len(data) != SHARE_BYTES:
            raise SecAggError(f"Shamir share must be {SHARE_BYTES} bytes (got {len(data)}); the message is malformed")
        (x,) = struct.unpack(">H", data[:2])
        y = int.from_bytes(data[2:], "big")
        if x == 0 or y >= PRIME:
            raise SecAggError("Shamir share is outside the field (x = 0 or y >= p); the message is malformed")
        return cls(x, y)


def random_coefficient(entropy: Callable[[int], bytes] = os.urandom) -> int:
    """A uniform field element (up to a 2^-119 bias) from ``entropy`` bytes."""
    return int.from_bytes(entropy(_COEFF_BYTES), "big") % PRIME


def split(
    secret: bytes,
    xs: Sequence[int],
    threshold: int,
    *,
    entropy: Callable[[int], bytes] = os.urandom,
) -> list[Share]:
    """Shares of the 32-byte ``secret`` at the points ``xs`` (distinct, 1..65535), recoverable from ``threshold``."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secret must be {SECRET_BYTES} bytes (got {len(secret)})")
    if len(set(xs)) != len(xs) or any(not 0 < x < 2**16 for x in xs):
        raise ValueError("share points must be distinct integers in 1..65535")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold must be in 1..{len(xs)} (got {threshold})")
    coeffs = [int.from_bytes(secret, "big")] + [random_coefficient(entropy) for _ in range(threshold - 1)]
    shares = []
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        shares.append(Share(x, y))
    return shares


def combine(shares: Sequence[Share], threshold: int) -> bytes:
    """Recover the 32-byte secret from at least ``threshold`` shares.

    All shares are interpolated (not just ``threshold`` of them), so a single inconsistent share changes
    the result, which the caller's commitment check then catches. Raises SecAggError when there are too few or duplicate shares, or when the result is not a 32-byte
    secret (a sign of tampered or mismatched shares).
    """
    points: dict[int, int] = {}
    for s in shares:
        if s.x in points and points[s.x] != s.y:
            raise SecAggError(f"two different Shamir shares for point x={s.x}; shares were tampered with")
        points[s.x] = s.y
    if len(points) < threshold:
        raise SecAggError(f"only {len(points)} distinct Shamir shares, {threshold} needed to reconstruct")
    used = sorted(points.items())
    secret = 0
    for i, (xi, yi) in enumerate(used):
        num, den = 1, 1
        for j, (xj, _) in enumerate(used):
            if i != j:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 2 ** (8 * SECRET_BYTES):
        raise SecAggError("Shamir reconstruction gave a value outside 256 bits; shares are tampered or mismatched")
    return secret.to_bytes(SECRET_BYTES, "big")
