"""Cipher-based PRG: expands a 32-byte seed into masks in Z_2^32, written straight into uint32 buffers.

Construction (spec: protocols/secagg-plus.md, "PRG"):
    key || iv = HKDF-SHA256(ikm=seed, salt=None, info=b"worldlm-secagg+/prg/aes128-ctr/v1", length=32)
    mask      = AES-128-CTR(key[:16], iv[16:]) keystream, read as little-endian uint32 words.

Why AES-128 with an HKDF-derived key and IV rather than AES-256 keyed by the seed: the seeds come out of
X25519 (about 128-bit security), so AES-256 buys nothing, and AES-128 is ~15% faster here. All 256 bits of
the seed go through HKDF, so (unlike a 32-bit fold) no seed bit is thrown away before the cipher.

Speed: the keystream is produced with `update_into` into a small preallocated block that stays in L2 and is
added/subtracted into the target in place; numpy's uint32 arithmetic wraps mod 2^32 for free. All masks of
one vector are applied chunk by chunk (chunk outer, masks inner) so the target chunk is read once from memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SEED_BYTES = 32
_INFO = b"worldlm-secagg+/prg/aes128-ctr/v1"
_CHUNK_BYTES = 1 << 17  # 128 KiB of keystream per call: stays in L2, amortizes the per-call overhead
_ZEROS = bytes(_CHUNK_BYTES)


def keystream(seed: bytes) -> CipherContext:
    """The AES-128-CTR encryptor whose output on zero bytes is PRG(seed)."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"PRG seed must be {SEED_BYTES} bytes (got {len(seed)})")
    okm = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(seed)
    return Cipher(algorithms.AES(okm[:16]), modes.CTR(okm[16:])).encryptor()


def apply_masks(out: np.ndarray, masks: Sequence[tuple[bytes, int]]) -> None:
    """Add (sign +1) or subtract (sign -1) PRG(seed) to ``out``, in place, mod 2^32 (uint32) or 2^64 (uint64).

    ``masks`` is a sequence of (32-byte seed, sign). Word i of a mask is keystream bytes [w*i, w*(i+1)) read
    little-endian, w = 4 or 8 the word size.
    """
    if out.dtype not in (np.uint32, np.uint64) or out.ndim != 1 or not out.flags.c_contiguous:
        raise ValueError("apply_masks needs a contiguous 1-D uint32 or uint64 vector")
    streams = [(keystream(seed), sign) for seed, sign in masks]
    if any(sign not in (1, -1) for _, sign in streams):
        raise ValueError("mask signs must be +1 or -1")
    # update_into wants room for one extra block beyond the input length.
    size = out.dtype.itemsize
    chunk = _CHUNK_BYTES // size
    block = np.empty(_CHUNK_BYTES + 16, dtype=np.uint8)
    words = block[:_CHUNK_BYTES].view(out.dtype.newbyteorder("<"))
    zeros = memoryview(_ZEROS)
    n = out.size
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        count = stop - start
        target = out[start:stop]
        src = zeros[: size * count]
        ks = words[:count]
        for stream, sign in streams:
            stream.update_into(src, block.data)
            if sign > 0:
                np.add(target, ks, out=target)
            else:
                np.subtract(target, ks, out=target)


def expand(seed: bytes, n_words: int, dtype: type[np.unsignedinteger] = np.uint32) -> np.ndarray:
    """PRG(seed) as a fresh vector of ``n_words`` uint32 (or uint64) words (tests, vectors, rounding noise)."""
    out = np.zeros(n_words, dtype=dtype)
    apply_masks(out, [(seed, 1)])
    return out


def uniform01(seed: bytes, n: int) -> np.ndarray:
    """``n`` float64 values uniform on [0, 1) with 32-bit resolution, from PRG(seed)."""
    return expand(seed, n) * (1.0 / 2**32)
