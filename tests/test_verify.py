"""verify: accepts what stamp produced and rejects each tampered variant, naming the failed check."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from imageprov.disk.golden import Scheme
from imageprov.pki.ca import CertificateAuthority, Subject, load_ca
from tests.conftest import PASSPHRASE, imageprov, imageprov_pki, offset_of, roles, tool


@pytest.fixture
def stamped(make_golden: Callable[..., Path], pki: Path, tmp_path: Path) -> Path:
    golden = make_golden(Scheme.MBR_EXTENDED)
    imageprov_pki("stamp", golden, "--pki", pki, "--out", tmp_path / "out", "--device-id", "v-1",
                  "--conf-target", "rootfs")  # fmt: skip
    return tmp_path / "out" / "v-1.sdimg"


def _debugfs_write(image: Path, role: str, commands: str, tmp_path: Path) -> None:
    script = tmp_path / "tamper"
    script.write_text(commands)
    number = roles(image)[role]
    proc = tool("debugfs", "-w", "-f", script, f"{image}?offset={offset_of(image, number)}")
    assert b"error" not in proc.stderr.lower() and b"failed" not in proc.stderr.lower(), proc.stderr


def _replace(image: Path, role: str, path: str, content: bytes, tmp_path: Path, mode: str = "0100644") -> None:
    source = tmp_path / "replacement"
    source.write_bytes(content)
    _debugfs_write(image, role, f"rm {path}\nwrite {source} {path}\nsif {path} mode {mode}\n", tmp_path)


def _verify(image: Path, pki: Path, *extra: str | Path) -> tuple[int, dict[str, bool]]:
    proc = imageprov("verify", image, "--ca", pki / "ca-cert.pem", "--json", *extra, check=False)
    report = json.loads(proc.stdout)
    assert report["ok"] == (proc.returncode == 0)
    return proc.returncode, {c["name"]: c["ok"] for c in report["checks"]}


def _failed(image: Path, pki: Path, *extra: str | Path) -> set[str]:
    code, checks = _verify(image, pki, *extra)
    assert code == 1
    return {name for name, ok in checks.items() if not ok}


def test_stamped_image_passes(stamped: Path, pki: Path) -> None:
    code, checks = _verify(stamped, pki, "--device-id", "v-1")
    assert code == 0 and all(checks.values())
    assert len(checks) >= 15  # every check ran
    text = imageprov("verify", stamped, "--ca", pki / "ca-cert.pem", "--device-id", "v-1").stdout
    # The block is in the rootfs only here (--conf-target rootfs): warned about, not failed.
    assert text.count("ok  ") + text.count("warn  ") == len(checks) and "FAIL" not in text


def test_key_swapped(stamped: Path, pki: Path, tmp_path: Path) -> None:
    other = CertificateAuthority.create(Subject("x")).issue_device("v-1")
    _replace(stamped, "data", "/mender/mender-cert-private.pem", other.key_pem(), tmp_path, "0100600")
    assert _failed(stamped, pki) == {"key matches the certificate"}


def test_certificate_from_another_ca(stamped: Path, pki: Path, tmp_path: Path) -> None:
    other = CertificateAuthority.create(Subject("Test Fleet CA")).issue_device("v-1")
    _replace(stamped, "data", "/mender/mender-cert.pem", other.cert_pem(), tmp_path)
    _replace(stamped, "data", "/mender/mender-cert-private.pem", other.key_pem(), tmp_path, "0100600")
    assert _failed(stamped, pki) == {"certificate signed by the CA"}


def test_mode_changed(stamped: Path, pki: Path, tmp_path: Path) -> None:
    _debugfs_write(stamped, "data", "sif /mender/mender-cert-private.pem mode 0100644\n", tmp_path)
    assert _failed(stamped, pki) == {"/data/mender/mender-cert-private.pem is 0600 root:root"}


def test_owner_changed(stamped: Path, pki: Path, tmp_path: Path) -> None:
    _debugfs_write(stamped, "data", "sif /mender/mender-cert.pem uid 1000\n", tmp_path)
    assert _failed(stamped, pki) == {"/data/mender/mender-cert.pem is 0644 root:root"}


def test_key_missing(stamped: Path, pki: Path, tmp_path: Path) -> None:
    _debugfs_write(stamped, "data", "rm /mender/mender-cert-private.pem\n", tmp_path)
    assert _failed(stamped, pki) == {"/data/mender/mender-cert-private.pem present"}


def test_recipe_snippet_key_pointing_at_the_certificate(stamped: Path, pki: Path, tmp_path: Path) -> None:
    conf = {"ServerURL": "https://x", "HttpsClient": {"Certificate": "/data/mender/mender-cert.pem",
                                                      "Key": "/data/mender/mender-cert.pem"},
            "Security": {"AuthPrivateKey": "/data/mender/mender-cert-private.pem"}}  # fmt: skip
    for role in ("rootfs-a", "rootfs-b"):
        _replace(stamped, role, "/etc/mender/mender.conf", json.dumps(conf).encode(), tmp_path)
    proc = imageprov("verify", stamped, "--ca", pki / "ca-cert.pem", check=False)
    assert proc.returncode == 1 and "points at the certificate, not the key" in proc.stdout
    assert _failed(stamped, pki) == {"mender.conf on rootfs-a", "mender.conf on rootfs-b"}


NO_HTTPS_CLIENT = b'{"ServerURL": "https://x", "Security": {"AuthPrivateKey": "/data/mender/mender-cert-private.pem"}}'


def test_https_client_missing(stamped: Path, pki: Path, tmp_path: Path) -> None:
    for role in ("rootfs-a", "rootfs-b"):
        _replace(stamped, role, "/etc/mender/mender.conf", NO_HTTPS_CLIENT, tmp_path)
    assert _failed(stamped, pki) == {"mender.conf on rootfs-a", "mender.conf on rootfs-b"}


def test_one_rootfs_not_patched(stamped: Path, pki: Path, tmp_path: Path) -> None:
    _replace(stamped, "rootfs-b", "/etc/mender/mender.conf", NO_HTTPS_CLIENT, tmp_path)
    assert _failed(stamped, pki) == {"mender.conf on rootfs-b"}


def test_mender_conf_not_json(stamped: Path, pki: Path, tmp_path: Path) -> None:
    _replace(stamped, "rootfs-a", "/etc/mender/mender.conf", b"{ not json", tmp_path)
    assert _failed(stamped, pki) == {"mender.conf on rootfs-a"}


def test_revoked_certificate(stamped: Path, pki: Path, tmp_path: Path) -> None:
    imageprov_pki("revoke", "--pki", pki, "v-1")
    imageprov_pki("crl", "--pki", pki, "--out", tmp_path / "crl.der", "--der")
    assert _failed(stamped, pki, "--crl", tmp_path / "crl.der") == {"certificate not revoked"}
    assert _verify(stamped, pki)[0] == 0  # without the CRL nothing says it is revoked


def test_wrong_device_id(stamped: Path, pki: Path) -> None:
    assert _failed(stamped, pki, "--device-id", "v-2") == {"certificate CN is the device id"}


def test_filesystem_damage_is_found(stamped: Path, pki: Path, tmp_path: Path) -> None:
    # Mark a used block free in the data partition's bitmap: e2fsck -fn must complain.
    _debugfs_write(stamped, "data", "freeb 1\n", tmp_path)
    assert "e2fsck -fn on data" in _failed(stamped, pki)


def test_not_an_image(pki: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk.sdimg"
    junk.write_bytes(b"\0" * 4096)
    code, checks = _verify(junk, pki)
    assert code == 1 and checks == {"partition table and layout": False}
    missing = imageprov("verify", tmp_path / "absent.sdimg", "--ca", pki / "ca-cert.pem", check=False)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1


def test_verify_leaves_the_image_unchanged(stamped: Path, pki: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.sdimg"
    shutil.copyfile(stamped, copy)
    _verify(stamped, pki)
    assert copy.read_bytes() == stamped.read_bytes()


def _device_cert(pki: Path, key: ec.EllipticCurvePrivateKey, usage: list[x509.ObjectIdentifier] | None) -> bytes:
    """A certificate for v-1 signed by the PKI's CA, with ``usage`` as its extendedKeyUsage (None: none at all)."""
    ca = load_ca(pki, PASSPHRASE.encode())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "v-1")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=30))
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    return builder.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize(
    ("curve", "usage", "failed"),
    [
        # RFC 5280: no extendedKeyUsage restricts nothing; nginx and the edge take it.
        (ec.SECP256R1(), None, set()),
        # OpenSSL (and so nginx) refuses anyExtendedKeyUsage alone for a TLS client.
        (ec.SECP256R1(), [ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE],
         {"chain passes OpenSSL's checks", "certificate allows TLS client use"}),
        (ec.SECP256R1(), [ExtendedKeyUsageOID.SERVER_AUTH],
         {"chain passes OpenSSL's checks", "certificate allows TLS client use"}),
        # OpenSSL takes secp256k1; Mender's deviceauth cannot parse it as an auth key.
        (ec.SECP256K1(), [ExtendedKeyUsageOID.CLIENT_AUTH], {"certificate key is one Mender takes"}),
    ],
)  # fmt: skip
def test_verify_passes_what_the_edge_and_mender_take(
    stamped: Path, pki: Path, tmp_path: Path, curve: ec.EllipticCurve, usage: list[x509.ObjectIdentifier] | None,
    failed: set[str],
) -> None:  # fmt: skip
    key = ec.generate_private_key(curve)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    _replace(stamped, "data", "/mender/mender-cert.pem", _device_cert(pki, key, usage), tmp_path)
    _replace(stamped, "data", "/mender/mender-cert-private.pem", pem, tmp_path, "0100600")
    code, checks = _verify(stamped, pki, "--device-id", "v-1")
    assert {name for name, ok in checks.items() if not ok} == failed and code == (1 if failed else 0)


def test_the_report_says_what_the_client_uses_and_from_which_file(stamped: Path, pki: Path) -> None:
    proc = imageprov("verify", stamped, "--ca", pki / "ca-cert.pem", "--json")
    client = json.loads(proc.stdout)["client"]
    rootfs = "/etc/mender/mender.conf"  # --conf-target rootfs: the block is there
    for role in ("rootfs-a", "rootfs-b"):
        assert client[role] == {
            "ServerURL": {"value": "https://mender.example.com", "from": rootfs},
            "HttpsClient.Certificate": {"value": "/data/mender/mender-cert.pem", "from": rootfs},
            "HttpsClient.Key": {"value": "/data/mender/mender-cert-private.pem", "from": rootfs},
            "Security.AuthPrivateKey": {"value": "/data/mender/mender-cert-private.pem", "from": rootfs},
        }
    text = imageprov("verify", stamped, "--ca", pki / "ca-cert.pem").stdout
    assert (f'ok    configuration the client uses (rootfs-b)  (ServerURL "https://mender.example.com" from {rootfs}; '
            f'HttpsClient.Certificate "/data/mender/mender-cert.pem" from {rootfs}; ') in text  # fmt: skip
