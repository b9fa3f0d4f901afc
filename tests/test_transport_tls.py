"""Peer admission by certificate (chain, validity, name, roster) and credential loading."""

from __future__ import annotations

import datetime as dt
import os

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from worldlm_secure.errors import ConfigError
from worldlm_secure.transport import keys
from worldlm_secure.transport.refusal import Refused
from worldlm_secure.transport.testing import make_pki
from worldlm_secure.transport.tls import NodeCredentials, Roster, verify_peer


@pytest.fixture(scope="module")
def pkis(tmp_path_factory):
    root = tmp_path_factory.mktemp("tls")
    pki = make_pki(root, "fed", ["site-a", "stranger"])
    pki.issue("site-a", expired=True, label="site-a-old")
    now = dt.datetime.now(dt.timezone.utc)
    pki.issue("site-a", label="site-a-future", not_before=now + dt.timedelta(days=1), not_after=now + dt.timedelta(days=9))
    other = make_pki(root / "other", "other", ["site-a"])
    return pki, other


def reason(fn) -> str:
    with pytest.raises(Refused) as info:
        fn()
    return info.value.reason_name


def test_verify_peer_admits_and_refuses(pkis):
    pki, other = pkis
    ca = pki.credentials("site-a").ca_certificate
    roster = Roster.of(["site-a"])
    peer = verify_peer(pki.credentials("site-a").cert_pem, ca, roster)
    assert peer.name == "site-a" and peer.signing_public_key == pki.identity("site-a").public_bytes
    assert reason(lambda: verify_peer(other.credentials("site-a").cert_pem, ca, roster)) == "UNTRUSTED_CERTIFICATE"
    assert reason(lambda: verify_peer(pki.credentials("site-a-old").cert_pem, ca, roster)) == "CERTIFICATE_EXPIRED"
    assert reason(lambda: verify_peer(pki.credentials("site-a-future").cert_pem, ca, roster)) == "CERTIFICATE_EXPIRED"
    assert reason(lambda: verify_peer(pki.credentials("stranger").cert_pem, ca, roster)) == "NOT_IN_ROSTER"
    assert reason(lambda: verify_peer(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", ca, roster)) == "UNAUTHENTICATED"


def test_certificate_whose_san_and_cn_disagree_is_refused(pkis, tmp_path):
    """Even when signed by our CA: the name must be unambiguous."""
    pki, _ = pkis
    ca_cert, ca_key = keys.load_ca(pki.ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "site-a")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("site-a"), x509.DNSName("stranger")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    assert reason(lambda: verify_peer(pem, ca_cert, Roster.of(["site-a", "stranger"]))) == "UNTRUSTED_CERTIFICATE"


def test_credentials_load_checks_permissions_pairing_and_issuer(pkis, tmp_path):
    pki, other = pkis
    creds = NodeCredentials.load(pki.nodes["site-a"])
    assert creds.name == "site-a" and "PRIVATE" not in repr(creds)
    # A key that others can read is refused, like ssh does.
    node = pki.issue("site-a", label="perm-check")
    os.chmod(node / "tls.key", 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        NodeCredentials.load(node)
    os.chmod(node / "tls.key", 0o600)
    NodeCredentials.load(node)
    # Certificate from one issuance, key from another: refused.
    (node / "tls.key").unlink()
    keys.write_private(node / "tls.key", (pki.nodes["stranger"] / "tls.key").read_bytes())
    with pytest.raises(ConfigError, match="does not match"):
        NodeCredentials.load(node)
    # A node directory whose ca.crt is not the issuer.
    mixed = pki.issue("site-a", label="mixed-ca")
    keys.write_public(mixed / "ca.crt", (other.ca_dir / "ca.crt").read_bytes())
    with pytest.raises(ConfigError, match="not issued by"):
        NodeCredentials.load(mixed)


def test_roster_file(tmp_path):
    path = tmp_path / "roster.txt"
    path.write_text("# members of fed-eu\nsite-a\n\nsite-b  # hospital\n")
    roster = Roster.load(path)
    assert roster.names == frozenset({"site-a", "site-b"}) and "site-a" in roster and "site-c" not in roster
    path.write_text("Site_A\n")
    with pytest.raises(ConfigError, match="lowercase"):
        Roster.load(path)
    with pytest.raises(ConfigError, match="cannot read"):
        Roster.load(tmp_path / "missing.txt")
