"""CKKS key lifecycle: one generator makes the key of an epoch, wraps the secret key to each key holder,
and publishes a public-only context (no secret key, no relinearization or Galois keys).

Key transport. NodeIdentity holds an Ed25519 signing key, which `cryptography` cannot use for key
agreement, so every key holder has a separate X25519 *transport key*, bound to its identity by an
Ed25519 signature over ``TRANSPORT_LABEL | holder | x25519_public`` (a `TransportCert`). To wrap, the
generator draws an ephemeral X25519 key, computes the shared secret with the holder's transport key,
derives a 256-bit key with HKDF-SHA256 (salt = ephemeral public || holder public, info = WRAP_LABEL |
holder | key_id) and seals the secret context with AES-256-GCM (random 96-bit nonce, AAD = the same
header). The generator signs ``EPOCH_LABEL | epoch | key_id | SHA-256(public context)``; members,
aggregator and holders verify that signature before using the context.

key_id = first 16 bytes (hex) of SHA-256 of the serialized public context: every release records it.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import tenseal as ts
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from worldlm_secure.errors import SecAggError
from worldlm_secure.identity import NodeIdentity, verify_signature
from worldlm_secure.secagg.ckks_params import CkksParams

TRANSPORT_LABEL = b"worldlm-secure/ckks/transport-key/v1"
WRAP_LABEL = b"worldlm-secure/ckks/wrap/v1"
EPOCH_LABEL = b"worldlm-secure/ckks/epoch/v1"


def _raw(pub: X25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id_of(public_context: bytes) -> str:
    """The key id of an epoch: hex of the first 16 bytes of SHA-256 over the serialized public context."""
    return hashlib.sha256(public_context).digest()[:16].hex()


@dataclass(frozen=True)
class TransportCert:
    """A key holder's X25519 public key (32 bytes), signed by its Ed25519 identity."""

    holder: str
    public: bytes
    signature: bytes

    def message(self) -> bytes:
        return TRANSPORT_LABEL + b"|" + self.holder.encode() + b"|" + self.public

    def verify(self, identity_public: bytes) -> bool:
        return len(self.public) == 32 and verify_signature(identity_public, self.signature, self.message())


class TransportKey:
    """A key holder's X25519 private key for receiving wrapped secret keys."""

    def __init__(self, identity: NodeIdentity) -> None:
        self.holder = identity.name
        self._key = X25519PrivateKey.generate()
        pub = _raw(self._key.public_key())
        msg = TransportCert(self.holder, pub, b"").message()
        self.cert = TransportCert(self.holder, pub, identity.sign(msg))

    def shared(self, peer_public: bytes) -> bytes:
        return self._key.exchange(X25519PublicKey.from_public_bytes(peer_public))


@dataclass(frozen=True)
class WrappedSecretKey:
    """The secret context of one epoch sealed to one holder."""

    holder: str
    key_id: str
    ephemeral_public: bytes
    nonce: bytes
    ciphertext: bytes


@dataclass(frozen=True)
class EpochKeys:
    """What the generator publishes for an epoch: the public context, its signature, the wrapped keys."""

    epoch: int
    key_id: str
    public_context: bytes
    generator: str
    signature: bytes
    wrapped: Mapping[str, WrappedSecretKey]


def _epoch_message(epoch: int, key_id: str, public_context: bytes) -> bytes:
    digest = hashlib.sha256(public_context).digest()
    return EPOCH_LABEL + b"|" + struct.pack(">Q", epoch) + key_id.encode() + digest


def _wrap_key(holder: str, key_id: str, eph_pub: bytes, holder_pub: bytes, shared: bytes) -> tuple[bytes, bytes]:
    header = WRAP_LABEL + b"|" + holder.encode() + b"|" + key_id.encode()
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=eph_pub + holder_pub, info=header).derive(shared)
    return key, header


def generate_epoch_keys(
    generator: NodeIdentity,
    params: CkksParams,
    epoch: int,
    certs: Mapping[str, TransportCert],
    identity_keys: Mapping[str, bytes],
) -> EpochKeys:
    """Make a fresh CKKS key for `epoch`; wrap the secret context to every holder in `certs`.

    Raises SecAggError naming the holder whose transport certificate does not verify.
    """
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS, params.poly_modulus_degree, coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes)
    )
    ctx.global_scale = 2.0**params.scale_bits
    public = ctx.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False)
    secret = ctx.serialize(save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=False)
    key_id = key_id_of(public)
    wrapped: dict[str, WrappedSecretKey] = {}
    for holder, cert in sorted(certs.items()):
        if cert.holder != holder or holder not in identity_keys or not cert.verify(identity_keys[holder]):
            raise SecAggError(
                f"key holder {holder!r}: transport key is not signed by its identity; re-issue its transport key"
            )
        eph = X25519PrivateKey.generate()
        eph_pub = _raw(eph.public_key())
        key, header = _wrap_key(holder, key_id, eph_pub, cert.public, eph.exchange(X25519PublicKey.from_public_bytes(cert.public)))
        nonce = os.urandom(12)
        wrapped[holder] = WrappedSecretKey(holder, key_id, eph_pub, nonce, AESGCM(key).encrypt(nonce, secret, header))
    del secret, ctx
    sig = generator.sign(_epoch_message(epoch, key_id, public))
    return EpochKeys(epoch, key_id, public, generator.name, sig, wrapped)


def verify_epoch(keys: EpochKeys, generator_public: bytes) -> None:
    """Raise SecAggError unless the epoch's public context is signed by the generator and matches key_id."""
    if key_id_of(keys.public_context) != keys.key_id or not verify_signature(
        generator_public, keys.signature, _epoch_message(keys.epoch, keys.key_id, keys.public_context)
    ):
        raise SecAggError(
            f"ckks epoch {keys.epoch}: public context is not signed by generator {keys.generator!r}; "
            "discard it and re-run the key ceremony"
        )


def load_public_context(keys: EpochKeys, generator_public: bytes) -> ts.Context:
    """The verified public-only context (what members and the aggregator hold)."""
    verify_epoch(keys, generator_public)
    try:
        ctx = ts.context_from(keys.public_context)
        private = ctx.has_secret_key() or ctx.has_galois_keys() or ctx.has_relin_keys()
        if not private:
            ts.ckks_vector(ctx, [0.0])  # a CKKS context with a usable public key
    except Exception as exc:  # TenSEAL raises ValueError/RuntimeError/TypeError on bad streams
        raise SecAggError(
            f"ckks epoch {keys.epoch}: published context from {keys.generator!r} does not load as a CKKS public "
            f"context ({type(exc).__name__}); refused"
        ) from None
    if private:
        raise SecAggError(f"ckks epoch {keys.epoch}: published context carries private or evaluation keys; refused")
    return ctx


def unwrap_secret_context(keys: EpochKeys, transport: TransportKey, generator_public: bytes) -> ts.Context:
    """The holder's secret context for the epoch, after checking signature, AEAD tag and key id."""
    verify_epoch(keys, generator_public)
    w = keys.wrapped.get(transport.holder)
    if w is None:
        raise SecAggError(f"key holder {transport.holder!r}: no wrapped key for epoch {keys.epoch}")
    try:
        key, header = _wrap_key(transport.holder, keys.key_id, w.ephemeral_public, transport.cert.public,
                                transport.shared(w.ephemeral_public))
        secret = AESGCM(key).decrypt(w.nonce, w.ciphertext, header)
    except (InvalidTag, ValueError, TypeError):  # bad tag, or an ephemeral key / nonce of the wrong size
        raise SecAggError(
            f"key holder {transport.holder!r}: wrapped key for epoch {keys.epoch} failed authentication; "
            "request it again from the generator"
        ) from None
    try:
        ctx = ts.context_from(secret)
        public = ctx.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False)
    except Exception as exc:  # authenticated by the generator, but not a TenSEAL context
        raise SecAggError(f"key holder {transport.holder!r}: unwrapped key of epoch {keys.epoch} does not load ({type(exc).__name__})") from None
    if key_id_of(public) != keys.key_id:
        raise SecAggError(f"key holder {transport.holder!r}: unwrapped key does not match key id {keys.key_id}")
    return ctx
