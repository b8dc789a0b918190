"""The CA, server and device certificates: every extension and its criticality, checked against openssl."""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from imageprov.errors import PkiError, UsageError
from imageprov.pki.ca import CertificateAuthority, Curve, Subject, load_ca
from tests.conftest import PASSPHRASE as TEST_PASSPHRASE
from tests.conftest import imageprov_pki, tool

PASSPHRASE = TEST_PASSPHRASE.encode()
FIXTURES = Path(__file__).parent.parent / "fixtures"


def cli(*args: str | Path, passphrase: str | None = PASSPHRASE.decode()) -> subprocess.CompletedProcess[str]:
    return imageprov_pki(*args, check=False, passphrase=passphrase)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create(Subject("Fleet CA", "ACME", "Line 1", country="NO"))


def _ext(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.Extension[x509.ExtensionType]:
    return cert.extensions.get_extension_for_class(kind)


def test_ca_extensions(ca: CertificateAuthority) -> None:
    cert = ca.cert
    assert cert.version is x509.Version.v3
    assert cert.issuer == cert.subject
    basic = _ext(cert, x509.BasicConstraints)
    assert basic.critical and basic.value == x509.BasicConstraints(ca=True, path_length=0)
    usage = _ext(cert, x509.KeyUsage)
    assert usage.critical
    assert usage.value.key_cert_sign and usage.value.crl_sign and not usage.value.digital_signature
    ski = _ext(cert, x509.SubjectKeyIdentifier)
    assert not ski.critical
    assert ski.value == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())  # type: ignore[arg-type]
    assert {e.oid._name for e in cert.extensions} == {"basicConstraints", "keyUsage", "subjectKeyIdentifier"}
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(days=3650)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]


def _leaf_common(ca: CertificateAuthority, cert: x509.Certificate) -> None:
    assert cert.issuer == ca.cert.subject
    basic = _ext(cert, x509.BasicConstraints)
    assert basic.critical and basic.value.ca is False
    usage = _ext(cert, x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature
    assert not (usage.value.key_cert_sign or usage.value.crl_sign or usage.value.key_encipherment)
    aki = _ext(cert, x509.AuthorityKeyIdentifier)
    assert not aki.critical
    assert aki.value.key_identifier == _ext(ca.cert, x509.SubjectKeyIdentifier).value.digest  # type: ignore[attr-defined]
    assert not _ext(cert, x509.SubjectKeyIdentifier).critical
    assert cert.serial_number > 0 and cert.serial_number.bit_length() > 64


def test_device_certificate(ca: CertificateAuthority) -> None:
    issued = ca.issue_device("SN-0042")
    cert = issued.cert
    _leaf_common(ca, cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "SN-0042"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "ACME"
    eku = _ext(cert, x509.ExtendedKeyUsage)
    assert not eku.critical and list(eku.value) == [ExtendedKeyUsageOID.CLIENT_AUTH]  # type: ignore[call-overload]
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert cert.public_key() == issued.key.public_key()
    # The key is fresh for every device.
    assert ca.issue_device("SN-0043").key.public_key() != issued.key.public_key()
    assert dt.timedelta(days=3649) < cert.not_valid_after_utc - cert.not_valid_before_utc <= dt.timedelta(days=3651)
    assert issued.key_pem().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_server_certificate_has_san(ca: CertificateAuthority) -> None:
    cert = ca.issue_server(["Edge.Example.com", "mender.local"], ips=["127.0.0.1", "::1"]).cert
    _leaf_common(ca, cert)
    san = _ext(cert, x509.SubjectAlternativeName)
    assert not san.critical
    assert san.value.get_values_for_type(x509.DNSName) == ["edge.example.com", "mender.local"]  # type: ignore[attr-defined]
    assert [str(a) for a in san.value.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]  # type: ignore[attr-defined]
    eku = _ext(cert, x509.ExtendedKeyUsage)
    assert list(eku.value) == [ExtendedKeyUsageOID.SERVER_AUTH]  # type: ignore[call-overload]


@pytest.mark.parametrize("curve", list(Curve))
def test_curves_and_their_hashes(curve: Curve) -> None:
    ca = CertificateAuthority.create(Subject("CA"), curve=curve, days=30)
    leaf = ca.issue_device("d", curve=curve)
    assert leaf.key.curve.name == {"P-256": "secp256r1", "P-384": "secp384r1", "P-521": "secp521r1"}[curve.value]
    assert leaf.cert.signature_hash_algorithm.name == curve.hash.name  # type: ignore[union-attr]
    # A leaf never outlives its CA.
    assert leaf.cert.not_valid_after_utc == ca.cert.not_valid_after_utc


@pytest.mark.parametrize("hosts", [["bad host"], ["-"], ["a..b"], [""]])
def test_bad_host_names(ca: CertificateAuthority, hosts: list[str]) -> None:
    with pytest.raises(UsageError):
        ca.issue_server(hosts)


def test_openssl_verifies_what_the_cli_issues(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    assert cli("ca", "init", pki, "--cn", "Fleet CA", "--org", "ACME", "--country", "NO").returncode == 0
    assert (
        cli(
            "server-cert", "--pki", pki, "--host", "edge.local", "--ip", "127.0.0.1", "--out", tmp_path / "srv"
        ).returncode
        == 0
    )
    assert cli("device-cert", "--pki", pki, "--device-id", "dev-1", "--out", tmp_path / "dev").returncode == 0
    ca_file = pki / "ca-cert.pem"
    out = tool("openssl", "verify", "-CAfile", ca_file, "-purpose", "sslclient", tmp_path / "dev/mender-cert.pem")
    assert b": OK" in out.stdout
    out = tool(
        "openssl",
        "verify",
        "-CAfile",
        ca_file,
        "-purpose",
        "sslserver",
        "-verify_hostname",
        "edge.local",
        tmp_path / "srv/server-cert.pem",
    )
    assert b": OK" in out.stdout
    # The device certificate is not a server certificate, and the reverse.
    wrong = tool(
        "openssl", "verify", "-CAfile", ca_file, "-purpose", "sslserver", tmp_path / "dev/mender-cert.pem", check=False
    )
    assert wrong.returncode != 0
    # The keys match their certificates, as openssl sees them.
    for cert, key in (
        ("dev/mender-cert.pem", "dev/mender-cert-private.pem"),
        ("srv/server-cert.pem", "srv/server-private.key"),
    ):
        pub_cert = tool("openssl", "x509", "-in", tmp_path / cert, "-noout", "-pubkey").stdout
        pub_key = tool("openssl", "pkey", "-in", tmp_path / key, "-pubout").stdout
        assert pub_cert == pub_key
        assert (tmp_path / key).stat().st_mode & 0o777 == 0o600


def test_ca_key_is_encrypted_and_private(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    assert cli("ca", "init", pki, "--cn", "CA").returncode == 0
    key = pki / "ca-private.key"
    assert key.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert key.stat().st_mode & 0o777 == 0o600 and pki.stat().st_mode & 0o077 == 0
    with pytest.raises(TypeError):
        serialization.load_pem_private_key(key.read_bytes(), None)
    # openssl, too, needs the passphrase.
    assert tool("openssl", "pkey", "-in", key, "-passin", "pass:", check=False).returncode != 0
    assert tool("openssl", "pkey", "-in", key, "-passin", f"pass:{PASSPHRASE.decode()}").returncode == 0
    with pytest.raises(PkiError, match="wrong passphrase"):
        load_ca(pki, b"not the passphrase")
    with pytest.raises(PkiError, match="no passphrase"):
        load_ca(pki, None)
    assert load_ca(pki, PASSPHRASE).cert.subject.rfc4514_string() == "CN=CA"


def test_wrong_passphrase_is_one_line(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    cli("ca", "init", pki, "--cn", "CA")
    proc = cli("device-cert", "--pki", pki, "--device-id", "d", "--out", tmp_path / "d", passphrase="wrong one")
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"imageprov: error: wrong passphrase for {pki}/ca-private.key"
    assert not (tmp_path / "d").exists()
    proc = cli("device-cert", "--pki", pki, "--device-id", "d", "--out", tmp_path / "d", passphrase=None)
    assert proc.returncode == 1 and "IMAGEPROV_CA_PASSPHRASE" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_unencrypted_ca_needs_no_passphrase(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    assert cli("ca", "init", pki, "--cn", "CA", passphrase=None).returncode == 2  # refused: no passphrase given
    assert not (pki / "ca-private.key").exists()
    assert cli("ca", "init", pki, "--cn", "CA", "--no-passphrase", passphrase=None).returncode == 0
    assert (pki / "ca-private.key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    proc = cli("device-cert", "--pki", pki, "--device-id", "d", "--out", tmp_path / "d", passphrase=None)
    assert proc.returncode == 0, proc.stderr


def test_ca_is_never_overwritten(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    cli("ca", "init", pki, "--cn", "CA")
    before = (pki / "ca-private.key").read_bytes()
    proc = cli("ca", "init", pki, "--cn", "Other")
    assert proc.returncode == 2 and "already holds a CA" in proc.stderr
    assert (pki / "ca-private.key").read_bytes() == before


def test_passphrase_file(tmp_path: Path) -> None:
    secret = tmp_path / "pass"
    secret.write_text("from a file, 1234\n")
    pki = tmp_path / "pki"
    assert cli("ca", "init", pki, "--cn", "CA", "--passphrase-file", secret, passphrase=None).returncode == 0
    assert load_ca(pki, b"from a file, 1234").cert
    proc = cli(
        "device-cert",
        "--pki",
        pki,
        "--device-id",
        "d",
        "--out",
        tmp_path / "d",
        "--passphrase-file",
        secret,
        passphrase=None,
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.datafiles(FIXTURES / "ca-cert.conf")
def test_subject_file_from_the_manual_recipe(datafiles: Path, tmp_path: Path) -> None:
    conf = datafiles / "ca-cert.conf"
    subject = Subject.from_req_config(conf)
    assert subject == Subject("My CA", "My Organization", "My Unit", "myusername@example.com", "NO", "Oslo", "Oslo")
    pki = tmp_path / "pki"
    assert cli("ca", "init", pki, "--subject-file", conf).returncode == 0
    text = tool("openssl", "x509", "-in", pki / "ca-cert.pem", "-noout", "-subject", "-nameopt", "sep_multiline")
    for part in ("CN=My CA", "O=My Organization", "OU=My Unit", "C=NO", "L=Oslo", "ST=Oslo"):
        assert part in text.stdout.decode()


@pytest.mark.datafiles(FIXTURES / "ca-cert.conf")
def test_import_ca_made_with_the_manual_recipe(datafiles: Path, tmp_path: Path) -> None:
    recipe = datafiles
    # The recipe's exact commands.
    subprocess.run(
        ["openssl", "ecparam", "-genkey", "-name", "P-256", "-noout", "-out", "ca-private.key"], cwd=recipe, check=True
    )
    subprocess.run(
        [
            "openssl",
            "req",
            "-new",
            "-x509",
            "-key",
            "ca-private.key",
            "-out",
            "ca-cert.pem",
            "-config",
            "ca-cert.conf",
            "-days",
            str(365 * 10),
        ],
        cwd=recipe,
        check=True,
    )
    pki = tmp_path / "pki"
    proc = cli("ca", "import", pki, "--cert", recipe / "ca-cert.pem", "--key", recipe / "ca-private.key")
    assert proc.returncode == 0, proc.stderr
    assert (pki / "ca-private.key").read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert (pki / "ca-cert.pem").read_bytes() == (recipe / "ca-cert.pem").read_bytes()
    assert cli("device-cert", "--pki", pki, "--device-id", "d1", "--out", tmp_path / "d1").returncode == 0
    out = tool("openssl", "verify", "-CAfile", recipe / "ca-cert.pem", tmp_path / "d1/mender-cert.pem")
    assert b": OK" in out.stdout


def test_import_refuses_a_key_that_does_not_match(tmp_path: Path) -> None:
    ca = CertificateAuthority.create(Subject("CA"))
    other = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "ca.pem").write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "other.key").write_bytes(
        other.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    proc = cli("ca", "import", tmp_path / "pki", "--cert", tmp_path / "ca.pem", "--key", tmp_path / "other.key")
    assert proc.returncode == 1 and "does not match" in proc.stderr
    assert not (tmp_path / "pki" / "ca-private.key").exists()


def test_import_refuses_a_leaf(tmp_path: Path) -> None:
    ca = CertificateAuthority.create(Subject("CA"))
    leaf = ca.issue_device("d")
    (tmp_path / "leaf.pem").write_bytes(leaf.cert_pem())
    (tmp_path / "leaf.key").write_bytes(leaf.key_pem())
    proc = cli("ca", "import", tmp_path / "pki", "--cert", tmp_path / "leaf.pem", "--key", tmp_path / "leaf.key")
    assert proc.returncode == 1 and "not a CA" in proc.stderr


def test_expired_ca_issues_nothing() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Old CA")])
    past = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(past)
        .not_valid_after(past + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(PkiError, match="expired"):
        CertificateAuthority(cert, key).issue_device("d")
