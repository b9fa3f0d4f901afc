"""`worldlm-secure keys`: CA creation and node issuance through the CLI, checked with `cryptography`."""

from __future__ import annotations

import datetime as dt
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from worldlm_secure.cli import main
from worldlm_secure.identity import NodeIdentity, verify_signature
from worldlm_secure.transport import keys


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_init_ca_and_issue_write_valid_chained_certificates(tmp_path, capsys):
    ca, node = tmp_path / "ca", tmp_path / "site-a"
    assert main(["keys", "init-ca", "--name", "fed-eu", "--out", str(ca), "--days", "30"]) == 0
    assert main(["keys", "issue", "--ca", str(ca), "--node", "site-a", "--out", str(node), "--days", "7"]) == 0
    out = capsys.readouterr().out

    ca_cert = x509.load_pem_x509_certificate((ca / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((node / "tls.crt").read_bytes())
    cert.verify_directly_issued_by(ca_cert)  # raises if the chain is broken
    assert ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "site-a"
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == ["site-a"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(eku)
    now = dt.datetime.now(dt.timezone.utc)
    assert cert.not_valid_before_utc <= now
    assert dt.timedelta(days=6, hours=23) < cert.not_valid_after_utc - now <= dt.timedelta(days=7)
    assert dt.timedelta(days=29) < ca_cert.not_valid_after_utc - now <= dt.timedelta(days=30)

    # The Ed25519 signing key written next to the certificate is the one the CA bound into it.
    ident = NodeIdentity.load("site-a", node / "signing.key")
    assert keys.signing_key_of(cert) == ident.public_bytes
    assert verify_signature(ident.public_bytes, ident.sign(b"m"), b"m")

    for secret in (ca / "ca.key", node / "tls.key", node / "signing.key"):
        assert mode(secret) == 0o600, secret
    assert mode(node / "tls.crt") == 0o644
    # Private keys are never printed; fingerprints and public keys are.
    assert "PRIVATE" not in out and cert.fingerprint(hashes.SHA256()).hex()[:16] in out
    for secret in (ca / "ca.key", node / "tls.key", node / "signing.key"):
        body = "".join(secret.read_text().splitlines()[1:-1])
        assert body[:24] not in out.replace("\n", "")


def test_refuses_to_overwrite_without_force(tmp_path, capsys):
    ca = tmp_path / "ca"
    assert main(["keys", "init-ca", "--name", "fed", "--out", str(ca)]) == 0
    before = (ca / "ca.key").read_bytes()
    assert main(["keys", "init-ca", "--name", "fed", "--out", str(ca)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err and "Traceback" not in err
    assert (ca / "ca.key").read_bytes() == before
    assert main(["keys", "init-ca", "--name", "fed", "--out", str(ca), "--force"]) == 0
    assert (ca / "ca.key").read_bytes() != before and mode(ca / "ca.key") == 0o600


@pytest.mark.parametrize("name", ["Site_A", "site a", "-site", "", "a" * 64, "site..a", "sité"])
def test_bad_node_names_are_one_line_errors(tmp_path, capsys, name):
    assert main(["keys", "init-ca", "--name", "fed", "--out", str(tmp_path / "ca")]) == 0
    capsys.readouterr()
    assert main(["keys", "issue", "--ca", str(tmp_path / "ca"), "--node", name, "--out", str(tmp_path / "n")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "lowercase DNS name" in err and len(err.splitlines()) <= 2
    assert not (tmp_path / "n" / "tls.key").exists()


def test_issue_with_a_missing_or_group_readable_ca_key_fails_cleanly(tmp_path, capsys):
    assert main(["keys", "issue", "--ca", str(tmp_path / "nope"), "--node", "a", "--out", str(tmp_path / "n")]) == 2
    assert "ca.crt" in capsys.readouterr().err
    assert main(["keys", "init-ca", "--name", "fed", "--out", str(tmp_path / "ca")]) == 0
    os.chmod(tmp_path / "ca" / "ca.key", 0o640)
    capsys.readouterr()
    assert main(["keys", "issue", "--ca", str(tmp_path / "ca"), "--node", "a", "--out", str(tmp_path / "n")]) == 2
    assert "chmod 600" in capsys.readouterr().err


def test_days_must_be_positive_and_show_prints_a_summary(tmp_path, capsys):
    assert main(["keys", "init-ca", "--name", "fed", "--out", str(tmp_path / "ca"), "--days", "0"]) == 2
    assert "--days" in capsys.readouterr().err
    assert main(["keys", "init-ca", "--name", "fed", "--out", str(tmp_path / "ca")]) == 0
    assert main(["keys", "issue", "--ca", str(tmp_path / "ca"), "--node", "site-b", "--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    assert main(["keys", "show", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "site-b" in out and "signing key" in out


def test_library_validity_override_makes_expired_certificates(tmp_path):
    keys.init_ca("fed", tmp_path / "ca")
    now = dt.datetime.now(dt.timezone.utc)
    issued = keys.issue_node(
        tmp_path / "ca", "old", tmp_path / "old", not_before=now - dt.timedelta(days=3), not_after=now - dt.timedelta(days=1)
    )
    cert = keys.load_certificate(issued.cert)
    assert cert.not_valid_after_utc < now
    with pytest.raises(Exception, match="must be after"):
        keys.issue_node(tmp_path / "ca", "bad", tmp_path / "bad", not_before=now, not_after=now - dt.timedelta(days=1))


def test_a_federation_keeps_one_signing_key_across_its_two_certificates(tmp_path, capsys):
    """fed-eu serves its sites (own CA) and is a member of the root (root's CA): one Ed25519 identity."""
    assert main(["keys", "init-ca", "--name", "root", "--out", str(tmp_path / "ca-root")]) == 0
    assert main(["keys", "init-ca", "--name", "fed-eu", "--out", str(tmp_path / "ca-eu")]) == 0
    assert main(["keys", "issue", "--ca", str(tmp_path / "ca-eu"), "--node", "fed-eu", "--out", str(tmp_path / "down")]) == 0
    signing = tmp_path / "down" / "signing.key"
    assert main(["keys", "issue", "--ca", str(tmp_path / "ca-root"), "--node", "fed-eu", "--out", str(tmp_path / "up"),
                 "--signing-key", str(signing)]) == 0
    down = keys.load_certificate(tmp_path / "down" / "tls.crt")
    up = keys.load_certificate(tmp_path / "up" / "tls.crt")
    assert keys.signing_key_of(down) == keys.signing_key_of(up) == NodeIdentity.load("fed-eu", signing).public_bytes
    assert not (tmp_path / "up" / "signing.key").exists()  # the private key is not duplicated
    assert down.issuer != up.issuer
