"""A node's long-term identity: the Ed25519 key that signs its ledger and its secure-aggregation keys.

Key material never leaves this module except through `sign` and the public key bytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from worldlm_secure.errors import ConfigError


@dataclass(frozen=True)
class NodeIdentity:
    """A node name bound to an Ed25519 signing key."""

    name: str
    _key: Ed25519PrivateKey

    @classmethod
    def generate(cls, name: str) -> "NodeIdentity":
        return cls(name, Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, name: str, path: Path) -> "NodeIdentity":
        """Load a PEM (PKCS8, unencrypted) Ed25519 private key."""
        try:
            key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: cannot read the Ed25519 signing key for {name!r} ({exc})") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{path}: signing key for {name!r} must be Ed25519")
        return cls(name, key)

    def save(self, path: Path) -> None:
        """Write the private key as PEM with 0600 permissions (created, never widened)."""
        pem = self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._key.public_key()

    @property
    def public_bytes(self) -> bytes:
        """The raw 32-byte public key."""
        return self.public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def sign(self, message: bytes) -> bytes:
        """A 64-byte Ed25519 signature over ``message``."""
        return self._key.sign(message)


def verify_signature(public_bytes: bytes, signature: bytes, message: bytes) -> bool:
    """True when ``signature`` is a valid Ed25519 signature of ``message`` under the raw public key."""
    try:
        Ed25519PublicKey.from_public_bytes(public_bytes).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def is_canonical_hex(text: str) -> bool:
    """True when ``text`` is hex exactly as `bytes.hex` writes it: lowercase, even length, nothing else."""
    return len(text) % 2 == 0 and all(c in "0123456789abcdef" for c in text)


def verify_hex_signature(public_hex: str, signature_hex: str, message: bytes) -> bool:
    """`verify_signature` for a key and signature stored as hex (ledgers, receipts); False unless both are
    canonical hex. Why: `bytes.fromhex` also takes "AB" and spaces, so a stored signature with one letter's
    case flipped would still verify, and a byte of a signed file could change without anyone noticing."""
    if not (signature_hex and is_canonical_hex(public_hex) and is_canonical_hex(signature_hex)):
        return False
    return verify_signature(bytes.fromhex(public_hex), bytes.fromhex(signature_hex), message)
