"""The CA, server and device certificates: every extension and its criticality, checked against openssl."""

from __future__ import annotations

import datetime as dt
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from imageprov.errors import PkiError, UsageError
from imageprov.pki.ca import CertificateAuthority, Curve, Subject, load_ca, load_cert
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


def _key_usage(**allowed: bool) -> x509.KeyUsage:
    names = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
             "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")  # fmt: skip
    return x509.KeyUsage(**{name: allowed.get(name, False) for name in names})


def _make_ca(tmp_path: Path, extensions: list[tuple[x509.ExtensionType, bool]], *, expired: bool = False) -> Path:
    """A CA certificate with exactly ``extensions``, its unencrypted key beside it (ca.pem, ca.key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Odd CA")])
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=400 if expired else 1)
    builder = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=365))
    )  # fmt: skip
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    (tmp_path / "ca.pem").write_bytes(builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    (tmp_path / "ca.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return tmp_path / "ca.pem"


def _make_leaf(tmp_path: Path, usage: x509.KeyUsage | None = None) -> Path:
    """A client certificate signed by tmp_path's ca.pem/ca.key, whatever that CA may be."""
    ca_cert = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((tmp_path / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "leaf")]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )  # fmt: skip
    if usage is not None:
        builder = builder.add_extension(usage, critical=True)
    path = tmp_path / "leaf.pem"
    path.write_bytes(builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    return path


CA_BASIC = (x509.BasicConstraints(ca=True, path_length=0), True)
SIGNS = (_key_usage(key_cert_sign=True, crl_sign=True), True)
# (what the CA has, the leaf's keyUsage, what imageprov says is wrong: None when OpenSSL accepts the chain)
CHAINS: dict[str, tuple[list[tuple[x509.ExtensionType, bool]], x509.KeyUsage | None, str | None]] = {
    "imageprov's own": ([CA_BASIC, SIGNS], _key_usage(digital_signature=True), None),
    "no keyUsage at all": ([CA_BASIC], None, None),
    "keyUsage without keyCertSign": ([CA_BASIC, (_key_usage(crl_sign=True, digital_signature=True), True)], None,
                                     "keyUsage does not allow keyCertSign"),
    "CA:FALSE": ([(x509.BasicConstraints(ca=False, path_length=None), True), SIGNS], None, "CA:FALSE"),
    "no basicConstraints": ([SIGNS], None, "no basicConstraints"),
    "extendedKeyUsage serverAuth only": (
        [CA_BASIC, SIGNS, (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)], None,
        "extendedKeyUsage does not allow TLS clients"),
    "extendedKeyUsage with clientAuth": (
        [CA_BASIC, SIGNS, (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)], None, None),
    "leaf keyUsage keyEncipherment only": ([CA_BASIC, SIGNS], _key_usage(key_encipherment=True),
                                           "neither digitalSignature nor keyAgreement"),
}  # fmt: skip


@pytest.mark.parametrize("variant", list(CHAINS))
def test_chain_checks_are_openssls(variant: str, tmp_path: Path) -> None:
    """imageprov's chain checks refuse what `openssl verify -purpose sslclient` (and so nginx) refuses."""
    from imageprov.pki.chain import leaf_problems

    extensions, leaf_usage, problem = CHAINS[variant]
    ca_path = _make_ca(tmp_path, extensions)
    leaf_path = _make_leaf(tmp_path, leaf_usage)
    found = leaf_problems(x509.load_pem_x509_certificate(leaf_path.read_bytes()), load_cert(ca_path))
    openssl = tool("openssl", "verify", "-CAfile", ca_path, "-purpose", "sslclient", leaf_path, check=False)
    if problem is None:
        assert found == [] and openssl.returncode == 0, (found, openssl.stdout + openssl.stderr)
    else:
        assert problem in "; ".join(found)
        # OpenSSL takes a v3 certificate without basicConstraints as a CA by its keyUsage; imageprov does not.
        assert (openssl.returncode != 0) == (variant != "no basicConstraints"), openssl.stdout + openssl.stderr


@pytest.mark.parametrize("variant", [v for v, (_, usage, problem) in CHAINS.items() if problem and usage is None])
def test_import_refuses_a_ca_that_may_not_issue_client_certificates(variant: str, tmp_path: Path) -> None:
    ca_path = _make_ca(tmp_path, CHAINS[variant][0])
    proc = cli("ca", "import", tmp_path / "pki", "--cert", ca_path, "--key", tmp_path / "ca.key")
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert "cannot be the fleet's CA" in proc.stderr and str(CHAINS[variant][2]) in proc.stderr
    assert not (tmp_path / "pki").exists()


def test_import_refuses_an_expired_ca(tmp_path: Path) -> None:
    ca_path = _make_ca(tmp_path, [CA_BASIC, SIGNS], expired=True)
    proc = cli("ca", "import", tmp_path / "pki", "--cert", ca_path, "--key", tmp_path / "ca.key")
    assert proc.returncode == 1 and "expired" in proc.stderr


def test_verify_refuses_what_nginx_refuses(make_golden: Callable[..., Path], tmp_path: Path) -> None:
    """An image stamped by a CA is checked against a certificate of that CA key that may not sign certificates."""
    from imageprov.disk.golden import Scheme
    from tests.conftest import debugfs, imageprov, roles

    pki = tmp_path / "pki"
    assert cli("ca", "init", pki, "--cn", "CA", "--no-passphrase", passphrase=None).returncode == 0
    golden = make_golden(Scheme.MBR)
    assert cli("stamp", golden, "--pki", pki, "--out", tmp_path / "out", "--device-id", "v-1").returncode == 0
    image = tmp_path / "out" / "v-1.sdimg"
    good = load_ca(pki, None)
    # The same name and key, but a keyUsage that forbids signing certificates.
    bad = (
        x509.CertificateBuilder().subject_name(good.cert.subject).issuer_name(good.cert.subject)
        .public_key(good.key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(good.cert.not_valid_before_utc).not_valid_after(good.cert.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(crl_sign=True), critical=True)
        .sign(good.key, hashes.SHA256())
    )  # fmt: skip
    bad_path = tmp_path / "bad-ca.pem"
    bad_path.write_bytes(bad.public_bytes(serialization.Encoding.PEM))
    cert = tmp_path / "device.pem"
    cert.write_text(debugfs(image, roles(image)["data"], "cat /mender/mender-cert.pem"))
    assert tool("openssl", "verify", "-CAfile", pki / "ca-cert.pem", "-purpose", "sslclient", cert).returncode == 0
    assert tool("openssl", "verify", "-CAfile", bad_path, "-purpose", "sslclient", cert, check=False).returncode != 0
    assert imageprov("verify", image, "--ca", pki / "ca-cert.pem").returncode == 0
    proc = imageprov("verify", image, "--ca", bad_path, check=False)
    assert proc.returncode == 1
    assert "FAIL  chain passes OpenSSL's checks  (the CA: its keyUsage does not allow keyCertSign" in proc.stdout
    assert "ok    certificate signed by the CA" in proc.stdout  # the signature alone is right


def test_key_passphrase_file_missing_or_a_directory(tmp_path: Path) -> None:
    ca = CertificateAuthority.create(Subject("CA"))
    (tmp_path / "ca.pem").write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "ca.key").write_bytes(
        ca.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.BestAvailableEncryption(b"old secret"))
    )  # fmt: skip
    (tmp_path / "a-dir").mkdir()
    for secret, message in (
        (tmp_path / "missing", f"cannot read --key-passphrase-file {tmp_path}/missing: No such file or directory"),
        (tmp_path / "a-dir", f"cannot read --key-passphrase-file {tmp_path}/a-dir: Is a directory"),
    ):
        proc = cli("ca", "import", tmp_path / "pki", "--cert", tmp_path / "ca.pem", "--key", tmp_path / "ca.key",
                   "--key-passphrase-file", secret)  # fmt: skip
        assert proc.returncode == 2 and proc.stderr.strip() == f"imageprov: error: {message}"
    (tmp_path / "old").write_text("old secret\n")
    proc = cli("ca", "import", tmp_path / "pki", "--cert", tmp_path / "ca.pem", "--key", tmp_path / "ca.key",
               "--key-passphrase-file", tmp_path / "old")  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def test_empty_passphrase_file_says_so(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    assert cli("ca", "init", pki, "--cn", "CA").returncode == 0
    empty = tmp_path / "empty"
    empty.write_text("")
    proc = cli("device-cert", "--pki", pki, "--device-id", "d", "--out", tmp_path / "d", "--passphrase-file", empty,
               passphrase=None)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"imageprov: error: --passphrase-file {empty} is empty (write the secret")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_ca_key_open_to_others_is_refused(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    assert cli("ca", "init", pki, "--cn", "CA").returncode == 0
    key = pki / "ca-private.key"
    for mode in (0o666, 0o644, 0o640, 0o604):
        key.chmod(mode)
        proc = cli("device-cert", "--pki", pki, "--device-id", "d", "--out", tmp_path / "d")
        assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
        assert f"{key} is open to others (mode 0{mode:o})" in proc.stderr and f"chmod 600 {key}" in proc.stderr
        assert not (tmp_path / "d").exists()
    key.chmod(0o600)
    assert cli("device-cert", "--pki", pki, "--device-id", "d", "--out", tmp_path / "d").returncode == 0


def test_ca_without_crl_sign_makes_no_crl_nginx_would_refuse(tmp_path: Path) -> None:
    from imageprov.pki.revocation import build_crl, crl_bytes

    ca_path = _make_ca(tmp_path, [CA_BASIC, (_key_usage(key_cert_sign=True), True)])
    proc = cli("ca", "import", tmp_path / "pki", "--cert", ca_path, "--key", tmp_path / "ca.key")
    assert proc.returncode == 0 and "note: nginx would refuse this CA's CRLs" in proc.stderr, proc.stderr
    assert cli("device-cert", "--pki", tmp_path / "pki", "--device-id", "d", "--out", tmp_path / "d").returncode == 0
    proc = cli("crl", "--pki", tmp_path / "pki", "--out", tmp_path / "crl.pem")
    assert proc.returncode == 1 and "cRLSign" in proc.stderr and "denylist" in proc.stderr
    assert not (tmp_path / "crl.pem").exists()
    # What imageprov refuses to make, openssl refuses to use.
    ca_key = serialization.load_pem_private_key((tmp_path / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    odd = CertificateAuthority(load_cert(ca_path), ca_key)
    with pytest.raises(PkiError, match="cRLSign"):
        build_crl(odd, [], number=1)
    crl = (
        x509.CertificateRevocationListBuilder().issuer_name(odd.cert.subject)
        .last_update(dt.datetime.now(dt.UTC)).next_update(dt.datetime.now(dt.UTC) + dt.timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    (tmp_path / "crl.pem").write_bytes(crl_bytes(crl))
    proc = tool("openssl", "verify", "-CAfile", ca_path, "-CRLfile", tmp_path / "crl.pem", "-crl_check",
                tmp_path / "d/mender-cert.pem", check=False)  # fmt: skip
    assert proc.returncode != 0 and b"CRL signing" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_server_certificate_needs_a_ca_that_may_issue_them(tmp_path: Path) -> None:
    """A CA limited to clientAuth would sign server certificates no TLS client accepts: refused."""
    ca_path = _make_ca(tmp_path, [CA_BASIC, SIGNS, (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)])
    ca_key = serialization.load_pem_private_key((tmp_path / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    odd = CertificateAuthority(load_cert(ca_path), ca_key)
    with pytest.raises(PkiError, match="extendedKeyUsage does not allow TLS servers"):
        odd.issue_server(["edge.local"])
    leaf = tmp_path / "client.pem"
    leaf.write_bytes(odd.issue_device("d").cert_pem())  # client certificates it may issue
    assert tool("openssl", "verify", "-CAfile", ca_path, "-purpose", "sslclient", leaf).returncode == 0
