"""A federation's certificate authority and the node credentials it issues (x509 via `cryptography`).

Layout on disk (file names are fixed so that a node directory is self-describing):

    CA dir    ca.crt (public), ca.key (0600, keep offline), ca.json (summary, no secrets)
    node dir  ca.crt (the CA to trust), tls.crt, tls.key (0600), signing.key (Ed25519, 0600),
              identity.json (summary, no secrets)

Keys are ECDSA P-256 with SHA-256 signatures (supported by every gRPC TLS stack). A node
certificate names the node in both the subject CN and a SAN dNSName, allows both serverAuth and
clientAuth (a federation serves its children and is a client of its parent), and carries the
node's Ed25519 signing public key in a private extension, so the CA vouches for the binding
between a name and the key that signs its ledger and secure-aggregation messages.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from worldlm_secure.errors import ConfigError
from worldlm_secure.identity import NodeIdentity

CA_CERT, CA_KEY, CA_INFO = "ca.crt", "ca.key", "ca.json"
NODE_CA, NODE_CERT, NODE_KEY, NODE_SIGNING_KEY, NODE_INFO = (
    "ca.crt",
    "tls.crt",
    "tls.key",
    "signing.key",
    "identity.json",
)

# A UUID-derived OID (ITU-T X.667 arc 2.25): needs no registration, cannot collide.
SIGNING_KEY_OID = x509.ObjectIdentifier("2.25.223601417853391846915796325906296364614")

_NAME_RE = re.compile(r"^(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")
_CLOCK_SKEW = dt.timedelta(minutes=5)  # not_before is back-dated this much so fresh certs work on skewed peers


@dataclass(frozen=True)
class CertSummary:
    """What `keys` reports about a certificate (never key material). Times are UTC ISO-8601."""

    name: str
    path: str
    fingerprint_sha256: str  # hex SHA-256 of the DER certificate
    not_before: str
    not_after: str
    signing_public_key: str = ""  # hex of the raw 32-byte Ed25519 key, node certificates only


@dataclass(frozen=True)
class IssuedNode:
    """Paths of one issued node's credentials, and its certificate summary."""

    dir: Path
    ca_cert: Path
    cert: Path
    key: Path
    signing_key: Path
    summary: CertSummary


def check_node_name(name: str) -> str:
    """Return ``name`` if it can be a certificate DNS name (lowercase labels of a-z, 0-9, '-')."""
    if not _NAME_RE.match(name):
        raise ConfigError(
            f"node name {name!r}: must be a lowercase DNS name (labels of a-z, 0-9 and '-', dot-separated); "
            "rename the node, e.g. 'site-a' instead of 'Site_A'"
        )
    return name


def init_ca(name: str, out_dir: Path, *, days: int = 3650, force: bool = False) -> CertSummary:
    """Create a self-signed federation CA in ``out_dir`` valid for ``days`` days."""
    check_node_name(name)
    _check_days(days)
    out_dir = Path(out_dir)
    _refuse_overwrite([out_dir / CA_CERT, out_dir / CA_KEY], force)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # new CA directories are private
    write_private(out_dir / CA_KEY, _key_pem(key))
    write_public(out_dir / CA_CERT, cert.public_bytes(serialization.Encoding.PEM))
    summary = summarize(cert, out_dir / CA_CERT)
    write_public(out_dir / CA_INFO, (json.dumps(asdict(summary), indent=2) + "\n").encode())
    return summary


def issue_node(
    ca_dir: Path,
    node: str,
    out_dir: Path,
    *,
    days: int = 365,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    force: bool = False,
    signing_key: Path | None = None,
) -> IssuedNode:
    """Issue ``node`` a TLS certificate + key and an Ed25519 signing key, signed by the CA in ``ca_dir``.

    ``signing_key`` binds an existing Ed25519 key instead of generating one (a federation that is
    also a member of its parent keeps ONE signing identity across both certificates); it is then
    not copied into ``out_dir``. ``not_before``/``not_after`` override the validity window (UTC);
    tests use them to make expired or not-yet-valid certificates. By default the certificate is
    valid for ``days`` days.
    """
    check_node_name(node)
    _check_days(days)
    ca_cert, ca_key = load_ca(ca_dir)
    out_dir = Path(out_dir)
    paths = [out_dir / n for n in (NODE_CERT, NODE_KEY)] + ([] if signing_key else [out_dir / NODE_SIGNING_KEY])
    _refuse_overwrite(paths, force)
    if signing_key is not None:
        signing_path = Path(signing_key)
        check_private_permissions(signing_path)
        identity = NodeIdentity.load(node, signing_path)
    else:
        signing_path = out_dir / NODE_SIGNING_KEY
        identity = NodeIdentity.generate(node)
    now = _now()
    start = not_before or (now - _CLOCK_SKEW)
    end = not_after or (now + dt.timedelta(days=days))
    if end <= start:
        raise ConfigError(f"certificate for {node!r}: not_after ({end}) must be after not_before ({start})")
    key = ec.generate_private_key(ec.SECP256R1())
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(node)]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .add_extension(x509.UnrecognizedExtension(SIGNING_KEY_OID, _der_octets(identity.public_bytes)), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    write_private(out_dir / NODE_KEY, _key_pem(key))
    if signing_key is None:
        signing_path.unlink(missing_ok=True)  # so save() creates it fresh at 0600
        identity.save(signing_path)
    write_public(out_dir / NODE_CERT, cert.public_bytes(serialization.Encoding.PEM))
    write_public(out_dir / NODE_CA, ca_cert.public_bytes(serialization.Encoding.PEM))
    summary = summarize(cert, out_dir / NODE_CERT)
    write_public(out_dir / NODE_INFO, (json.dumps(asdict(summary), indent=2) + "\n").encode())
    return IssuedNode(out_dir, out_dir / NODE_CA, out_dir / NODE_CERT, out_dir / NODE_KEY, signing_path, summary)


def load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Load the CA certificate and private key from ``ca_dir`` (made by `init_ca`)."""
    ca_dir = Path(ca_dir)
    cert = load_certificate(ca_dir / CA_CERT)
    key = load_private_key(ca_dir / CA_KEY)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise ConfigError(f"{ca_dir / CA_KEY}: does not match {ca_dir / CA_CERT}; re-run `keys init-ca` or fix --ca")
    return cert, key


def load_certificate(path: Path) -> x509.Certificate:
    """Load one PEM certificate."""
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read the PEM certificate ({type(exc).__name__}); check the path") from exc


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Load an unencrypted PEM private key, refusing files that others can read (like ssh does)."""
    path = Path(path)
    check_private_permissions(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        # Never echo the exception text: parsers may quote key bytes.
        raise ConfigError(f"{path}: cannot read the PEM private key ({type(exc).__name__}); check the path") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{path}: expected an ECDSA private key; re-issue with `worldlm-secure keys`")
    return key


def check_private_permissions(path: Path) -> None:
    """Refuse a private key file readable or writable by group or others."""
    try:
        mode = Path(path).stat().st_mode
    except OSError as exc:
        raise ConfigError(f"{path}: private key not found ({exc.strerror}); check the path") from exc
    if os.name == "posix" and mode & 0o077:
        raise ConfigError(f"{path}: private key is accessible by other users (mode {mode & 0o777:o}); run chmod 600 {path}")


def signing_key_of(cert: x509.Certificate) -> bytes | None:
    """The raw Ed25519 signing public key the CA bound into a node certificate, or None."""
    try:
        ext = cert.extensions.get_extension_for_oid(SIGNING_KEY_OID).value
    except x509.ExtensionNotFound:
        return None
    raw = ext.value if isinstance(ext, x509.UnrecognizedExtension) else b""
    if len(raw) == 34 and raw[:2] == b"\x04\x20":
        return raw[2:]
    return None


def summarize(cert: x509.Certificate, path: Path) -> CertSummary:
    """A printable summary of a certificate."""
    name_attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    sk = signing_key_of(cert)
    return CertSummary(
        name=str(name_attrs[0].value) if name_attrs else "",
        path=str(path),
        fingerprint_sha256=cert.fingerprint(hashes.SHA256()).hex(),
        not_before=cert.not_valid_before_utc.isoformat(),
        not_after=cert.not_valid_after_utc.isoformat(),
        signing_public_key=sk.hex() if sk else "",
    )


def write_private(path: Path, data: bytes) -> None:
    """Write secret bytes with 0600 permissions (set at creation, so never briefly readable)."""
    path = Path(path)
    if path.exists():
        path.unlink()  # O_CREAT keeps an existing file's mode: start fresh so 0600 applies
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def write_public(path: Path, data: bytes) -> None:
    """Write non-secret bytes (certificates, summaries) with 0644 permissions."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _der_octets(raw: bytes) -> bytes:
    """DER OCTET STRING of up to 127 bytes (the extension value carrying the 32-byte key)."""
    return bytes([0x04, len(raw)]) + raw


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def _check_days(days: int) -> None:
    if days < 1:
        raise ConfigError(f"--days: must be at least 1 (got {days})")


def _refuse_overwrite(paths: list[Path], force: bool) -> None:
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        raise ConfigError(f"{existing[0]}: already exists; choose another --out directory or pass --force")
