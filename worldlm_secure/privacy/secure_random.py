"""Secret randomness for DP noise: an AES-256-CTR keystream and the samplers built on it.

DP noise is as secret as a key: whoever can predict it can subtract it. So every
sample here comes from AES-256-CTR under a fresh 32-byte key from `os.urandom`
(the keystream of a block cipher in counter mode is a standard CSPRNG), never
from `random`, numpy's generators or torch's global generator.

Samplers (all vectorised, numpy on top of keystream bits):
- `uniform`: floats in the open interval (0, 1) with 53 random bits each.
- `standard_normal`: Box–Muller, then the 2n-sum hardening of Holohan & Braghin
  (arXiv 2107.10138, n = 2) against floating-point precision attacks.
- `discrete_laplace`, `discrete_gaussian`: Canonne, Kamath & Steinke 2020
  (Algorithm 3) by rejection; the acceptance test uses float64 `exp`.
- `poisson` (multiplication method below λ = 10, Hörmann's PTRS above), `skellam`.

Limitation (documented in protocols/dp.md): the discrete samplers use float64
arithmetic for the geometric and acceptance steps, not exact rationals; the
error is below 2^-50 per sample probability and does not depend on the data.
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from scipy.special import gammaln

_TWO_POW_M53 = 2.0**-53


class SecureRandom:
    """A CSPRNG: AES-256-CTR keystream. `key` is for reproducible test vectors ONLY; leave it None."""

    def __init__(self, key: bytes | None = None) -> None:
        if key is None:
            key = os.urandom(32)
        if len(key) != 32:
            raise ValueError("SecureRandom key must be 32 bytes")
        # A fresh random key per instance, so a zero nonce is never reused with the same key
        # (a fixed test key gives a fixed, reproducible stream by design).
        self._enc = Cipher(algorithms.AES(key), modes.CTR(b"\x00" * 16)).encryptor()

    # ---- raw bits -------------------------------------------------------------------------
    def random_bytes(self, n: int) -> bytes:
        """`n` keystream bytes."""
        buf = bytearray(n + 15)
        k = self._enc.update_into(bytes(n), buf)
        return bytes(buf[:k])

    def uint64(self, n: int) -> np.ndarray:
        """`n` uniform 64-bit unsigned integers."""
        return np.frombuffer(self.random_bytes(8 * n), dtype="<u8").astype(np.uint64, copy=False)

    def uniform(self, n: int) -> np.ndarray:
        """`n` float64 uniform on (0, 1) (never exactly 0 or 1): (k + 0.5) / 2^53, k of 53 bits."""
        k = (self.uint64(n) >> np.uint64(11)).astype(np.float64)
        return (k + 0.5) * _TWO_POW_M53

    # ---- continuous -----------------------------------------------------------------------
    def _box_muller(self, n: int) -> np.ndarray:
        half = (n + 1) // 2
        u1, u2 = self.uniform(half), self.uniform(half)
        r = np.sqrt(-2.0 * np.log(u1))
        z = np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)])
        return z[:n]

    def standard_normal(self, shape: int | tuple[int, ...]) -> np.ndarray:
        """N(0, 1) float64 samples, each the sum of four Box–Muller normals divided by 2."""
        n = int(np.prod(shape))
        z = self._box_muller(4 * n).reshape(4, n).sum(axis=0) / 2.0
        return z.reshape(shape)

    # ---- discrete -------------------------------------------------------------------------
    def geometric(self, scale: float, n: int) -> np.ndarray:
        """int64 samples G >= 0 with P(G = k) ∝ exp(-k / scale)."""
        return np.floor(-scale * np.log(self.uniform(n))).astype(np.int64)

    def discrete_laplace(self, scale: float, n: int) -> np.ndarray:
        """int64 samples Y with P(Y = y) ∝ exp(-|y| / scale) (difference of two geometrics)."""
        return self.geometric(scale, n) - self.geometric(scale, n)

    def discrete_gaussian(self, sigma: float, shape: int | tuple[int, ...]) -> np.ndarray:
        """int64 samples with P(Y = y) ∝ exp(-y² / (2σ²)) (CKS20 Alg. 3, vectorised rejection)."""
        if sigma <= 0:
            raise ValueError("discrete_gaussian needs sigma > 0")
        n = int(np.prod(shape))
        out = np.empty(n, dtype=np.int64)
        todo = np.arange(n)
        t = float(np.floor(sigma) + 1.0)
        s2 = sigma * sigma
        while todo.size:
            m = todo.size
            y = self.discrete_laplace(t, m)
            accept_p = np.exp(-((np.abs(y) - s2 / t) ** 2) / (2.0 * s2))
            ok = self.uniform(m) < accept_p
            out[todo[ok]] = y[ok]
            todo = todo[~ok]
        return out.reshape(shape)

    def poisson(self, lam: float, shape: int | tuple[int, ...]) -> np.ndarray:
        """int64 Poisson(λ) samples: multiplication method for λ < 10, PTRS (Hörmann 1993) above."""
        if lam < 0:
            raise ValueError("poisson needs lam >= 0")
        n = int(np.prod(shape))
        if lam == 0:
            return np.zeros(shape, dtype=np.int64)
        out = np.empty(n, dtype=np.int64)
        todo = np.arange(n)
        if lam < 10:
            limit = np.exp(-lam)
            prod = np.ones(n)
            count = np.zeros(n, dtype=np.int64)
            while todo.size:
                prod[todo] *= self.uniform(todo.size)
                done = prod[todo] <= limit
                out[todo[done]] = count[todo[done]]
                count[todo[~done]] += 1
                todo = todo[~done]
            return out.reshape(shape)
        slam, loglam = np.sqrt(lam), np.log(lam)
        b = 0.931 + 2.53 * slam
        a = -0.059 + 0.02483 * b
        invalpha = 1.1239 + 1.1328 / (b - 3.4)
        vr = 0.9277 - 3.6224 / (b - 2)
        while todo.size:
            m = todo.size
            u = self.uniform(m) - 0.5
            v = self.uniform(m)
            us = 0.5 - np.abs(u)
            k = np.floor((2 * a / us + b) * u + lam + 0.43)
            fast = (us >= 0.07) & (v <= vr)
            bad = (k < 0) | ((us < 0.013) & (v > us))
            kk = np.maximum(k, 0.0)
            slow = (~fast) & (~bad)
            slow_ok = slow & (
                np.log(v) + np.log(invalpha) - np.log(a / (us * us) + b) <= -lam + kk * loglam - gammaln(kk + 1)
            )
            ok = fast | slow_ok
            out[todo[ok]] = k[ok].astype(np.int64)
            todo = todo[~ok]
        return out.reshape(shape)

    def skellam(self, mu: float, shape: int | tuple[int, ...]) -> np.ndarray:
        """int64 Skellam(μ, μ) samples: Poisson(μ) − Poisson(μ); variance 2μ."""
        return self.poisson(mu, shape) - self.poisson(mu, shape)
