"""Mutual-TLS material for gRPC, and admission of a peer by certificate and roster.

gRPC's TLS handshake already refuses a peer whose certificate does not chain to our CA or is
outside its validity period; `verify_peer` repeats those checks on the certificate the handshake
accepted (defence in depth, and it gives a logged reason) and then applies the roster.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from worldlm_secure.errors import ConfigError
from worldlm_secure.transport import keys
from worldlm_secure.transport.federation_pb2 import RefusalReason as R
from worldlm_secure.transport.refusal import Refused


@dataclass(frozen=True)
class NodeCredentials:
    """A node's TLS material as PEM bytes. The private key is kept out of ``repr``."""

    name: str
    ca_pem: bytes = field(repr=False)
    cert_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)

    @classmethod
    def load(cls, node_dir: Path) -> "NodeCredentials":
        """Load ``ca.crt``, ``tls.crt`` and ``tls.key`` from a directory made by `keys issue`."""
        node_dir = Path(node_dir)
        ca = keys.load_certificate(node_dir / keys.NODE_CA)
        cert = keys.load_certificate(node_dir / keys.NODE_CERT)
        key = keys.load_private_key(node_dir / keys.NODE_KEY)
        if key.public_key() != cert.public_key():
            raise ConfigError(f"{node_dir / keys.NODE_KEY}: does not match {node_dir / keys.NODE_CERT}; re-issue the node")
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise ConfigError(
                f"{node_dir / keys.NODE_CERT}: not issued by {node_dir / keys.NODE_CA}; re-issue with the federation CA"
            ) from exc
        return cls(
            name=cert_name(cert),
            ca_pem=ca.public_bytes(serialization.Encoding.PEM),
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            key_pem=(node_dir / keys.NODE_KEY).read_bytes(),
        )

    @property
    def ca_certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.ca_pem)

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)

    @property
    def fingerprint(self) -> bytes:
        """SHA-256 of our DER certificate (32 bytes)."""
        return self.certificate.fingerprint(hashes.SHA256())

    def server_credentials(self) -> grpc.ServerCredentials:
        """Server side: present our certificate, and require a client certificate issued by our CA."""
        return grpc.ssl_server_credentials(
            [(self.key_pem, self.cert_pem)], root_certificates=self.ca_pem, require_client_auth=True
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Client side: trust only our CA, and present our certificate."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_pem, private_key=self.key_pem, certificate_chain=self.cert_pem
        )


@dataclass(frozen=True)
class Roster:
    """The node names a federation admits. Membership is exact string equality."""

    names: frozenset[str]

    @classmethod
    def of(cls, names: Iterable[str]) -> "Roster":
        return cls(frozenset(keys.check_node_name(n) for n in names))

    @classmethod
    def load(cls, path: Path) -> "Roster":
        """One node name per line; blank lines and ``#`` comments are ignored."""
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the roster ({exc.strerror}); check the path") from exc
        names = [ln.split("#", 1)[0].strip() for ln in lines]
        return cls.of(n for n in names if n)

    def __contains__(self, name: object) -> bool:
        return name in self.names


@dataclass(frozen=True)
class PeerCertificate:
    """An admitted peer: its name, the CA-bound Ed25519 signing key, and its certificate fingerprint."""

    name: str
    signing_public_key: bytes | None
    fingerprint: bytes  # SHA-256 of the DER certificate (32 bytes)
    der: bytes = field(default=b"", repr=False)  # the certificate itself (DER), e.g. to show it to other members


def cert_name(cert: x509.Certificate) -> str:
    """The node name a certificate carries: its SAN dNSName, which must equal its subject CN."""
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(cns[0].value) if len(cns) == 1 else ""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName
        )
    except x509.ExtensionNotFound:
        sans = []
    if len(sans) != 1 or sans[0] != cn or not cn:
        raise Refused(R.REFUSAL_UNTRUSTED_CERTIFICATE, f"certificate must name one node in SAN dNSName and CN (CN={cn!r}, SAN={sans!r})")
    return cn


def verify_certificate(
    cert: bytes | x509.Certificate, ca: x509.Certificate, *, name: str | None = None, now: dt.datetime | None = None
) -> PeerCertificate:
    """Check a node certificate (PEM, DER or parsed): issued by ``ca``, not a CA itself, inside its
    validity period, naming one node (SAN dNSName = CN) and, if given, exactly ``name``.

    Both sides use it: the server on the certificate a TLS handshake accepted (`verify_peer`), a
    member on the certificates an announcement carries (`SiteClient.verify_announcement`)."""
    if not isinstance(cert, x509.Certificate):
        try:
            pem = cert.lstrip().startswith(b"-----")
            cert = x509.load_pem_x509_certificate(cert) if pem else x509.load_der_x509_certificate(cert)
        except ValueError as exc:
            raise Refused(R.REFUSAL_UNTRUSTED_CERTIFICATE, "certificate does not parse") from exc
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise Refused(R.REFUSAL_UNTRUSTED_CERTIFICATE, f"certificate of {cert.subject.rfc4514_string()!r} is not issued by the federation CA") from exc
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if is_ca:
        raise Refused(R.REFUSAL_UNTRUSTED_CERTIFICATE, f"certificate of {cert.subject.rfc4514_string()!r} is a CA certificate, not a node's")
    now = now or dt.datetime.now(dt.timezone.utc)
    if not (cert.not_valid_before_utc <= now <= cert.not_valid_after_utc):
        raise Refused(
            R.REFUSAL_CERTIFICATE_EXPIRED,
            f"certificate valid {cert.not_valid_before_utc.isoformat()}..{cert.not_valid_after_utc.isoformat()}, now {now.isoformat()}",
        )
    got = cert_name(cert)
    if name is not None and got != name:
        raise Refused(R.REFUSAL_UNTRUSTED_CERTIFICATE, f"certificate names {got!r}, expected {name!r}")
    der = cert.public_bytes(serialization.Encoding.DER)
    return PeerCertificate(got, keys.signing_key_of(cert), cert.fingerprint(hashes.SHA256()), der)


def verify_peer(
    cert_pem: bytes, ca: x509.Certificate, roster: Roster, now: dt.datetime | None = None
) -> PeerCertificate:
    """Admit a peer certificate: `verify_certificate`, then its name must be on ``roster``."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise Refused(R.REFUSAL_UNAUTHENTICATED, "peer certificate does not parse") from exc
    peer = verify_certificate(cert, ca, now=now)
    if peer.name not in roster:
        raise Refused(R.REFUSAL_NOT_IN_ROSTER, f"node {peer.name!r} is not on this federation's roster")
    return peer


def peer_certificate_pem(context: grpc.ServicerContext) -> bytes:
    """The PEM certificate the peer presented in the TLS handshake (refuses if there is none)."""
    auth = context.auth_context() or {}
    pems = auth.get("x509_pem_cert") or []
    if not pems:
        raise Refused(R.REFUSAL_UNAUTHENTICATED, "no client certificate on this connection")
    pem = pems[0]
    return pem if isinstance(pem, bytes) else str(pem).encode()
