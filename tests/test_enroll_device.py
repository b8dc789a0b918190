"""Keys that never leave the device, end to end.

``stamp --enroll`` writes an image; what it holds for the device (enroll.conf,
the bootstrap credential, the fleet CA, the edge's CA, mender.conf) is read
out with ``imageprov cp`` into a device root, device paths mapped under it.
Then the layer's ``imageprov-enroll`` (POSIX shell, run by dash) makes the
device's key in a TPM (swtpm behind tpm2-abrmd, through the tpm2-pkcs11
module) and enrolls through real nginx and ``edge serve --est``; Debian's
Mender client 3.4 authenticates through the edge with that key (libp11's
pkcs11 engine, SSLEngine "pkcs11") and is accepted with no click by the
stand-in Mender server. No file anywhere holds the key; a copy of the
bootstrap credential (a cloned card) and a revoked one are refused; the
certificate renews over TLS with the TPM's key.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from imageprov.disk.golden import Scheme
from tests.conftest import PASSPHRASE, imageprov, imageprov_pki, need, tool
from tests.edge_support import PASSWORD, USER, edge_service, free_port, log_lines, nginx, running_standin
from tests.netns import device_namespace
from tests.oracle import registry_rows
from tests.test_edge_e2e import _list, identity_runner  # noqa: F401 - identity_runner: a fixture
from tests.test_edge_e2e import _spki as _spki_pem
from tests.test_enroll_line import with_program
from tests.tpm import Tpm, running_tpm

REPO = Path(__file__).resolve().parent.parent
PROGRAM = REPO / "yocto" / "meta-imageprov" / "files" / "imageprov-enroll"
ENROLL_FILES = ("enroll.conf", "bootstrap-key.pem", "bootstrap-cert.pem", "fleet-ca.pem")


@pytest.fixture
def tpm(tmp_path: Path) -> Iterator[Tpm]:
    with running_tpm(tmp_path / "tpm") as running:
        yield running


def _device_root(tmp_path: Path, image: Path, name: str) -> Path:
    """What the device finds in ``image`` for enrollment and for the Mender client, under ``tmp_path/name``."""
    root = tmp_path / name
    paths = [f"/data/imageprov/enroll/{f}" for f in ENROLL_FILES]
    paths += ["/data/mender/mender.conf", "/etc/mender/mender.conf", "/data/mender/server.crt"]
    for device_path in paths:
        (root / device_path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        imageprov("cp", f"{image}:{device_path}", root / device_path.lstrip("/"))
    conf = root / "data/imageprov/enroll/enroll.conf"
    # Device paths (values, and the PIN file in the key's URI) moved under the root.
    conf.write_text(re.sub(r"(=|file:)/data/", rf"\g<1>{root}/data/", conf.read_text()))
    return root


def _in(namespace: int, argv: list[str]) -> list[str]:
    """``argv`` run in the device's network namespace (tests/netns.py): it reaches the edge and nothing else."""
    return ["nsenter", "-t", str(namespace), "-n", *argv]


def _enroll(namespace: int, root: Path, tpm: Tpm, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The layer's program as the device's service runs it, by dash, with the TPM's environment."""
    need("dash")
    full = {**os.environ, **tpm.env, "IMAGEPROV_ENROLL_CONF": str(root / "data/imageprov/enroll/enroll.conf"), **env}
    return subprocess.run(_in(namespace, ["dash", str(PROGRAM), *args]), env=full, capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)  # fmt: skip


def _token_public_key(root: Path, tpm: Tpm) -> bytes:
    """The token's public key, DER, as pkcs11-tool reads it: the key the TPM holds."""
    out = root / "token-public.der"
    env = {**os.environ, **tpm.env, "TPM2_PKCS11_STORE": str(root / "data/imageprov/token")}
    subprocess.run(["pkcs11-tool", "--module", tpm.env["PKCS11_MODULE_PATH"], "--token-label", "imageprov",
                    "--read-object", "--type", "pubkey", "--label", "mender", "-o", str(out)],
                   env=env, check=True, capture_output=True)  # fmt: skip
    return out.read_bytes()


def _spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _client_confs(root: Path, server_url: str) -> tuple[Path, Path]:
    """mender.conf and the fallback conf from the image, device paths under the root, ServerURL the edge."""
    paths = []
    for name, device_path in (("mender.conf", "etc/mender/mender.conf"), ("fallback.conf", "data/mender/mender.conf")):
        text = (root / device_path).read_text()
        text = re.sub(r'(": "|file:)/data/', rf"\g<1>{root}/data/", text)
        conf = json.loads(text)
        if name == "mender.conf":
            conf["ServerURL"] = server_url
        path = root / name
        path.write_text(json.dumps(conf))
        paths.append(path)
    return paths[0], paths[1]


def _private_keys_in(directory: Path) -> list[tuple[Path, Any]]:
    """Every PEM private key in every file under ``directory`` (disk images included), loaded."""
    found = []
    block = re.compile(rb"-----BEGIN ([A-Z ]*)PRIVATE KEY-----.*?-----END \1PRIVATE KEY-----", re.S)
    for path in directory.rglob("*"):
        if not path.is_file() or path.is_symlink():
            continue
        data = path.read_bytes()
        for match in block.finditer(data):
            try:
                found.append((path, serialization.load_pem_private_key(match.group(0), None)))
            except (ValueError, TypeError):
                found.append((path, None))  # encrypted (the CA's), or a TPM's wrapped key (TSS2): no key in clear
    return found


def test_a_key_made_in_the_tpm_enrolls_and_the_mender_client_is_accepted_with_it(
    tmp_path: Path,
    make_golden: Callable[..., Path],
    pki: Path,
    tpm: Tpm,
    identity_runner: Any,  # noqa: F811
) -> None:
    need("nginx", "mender")
    with device_namespace() as (namespace, address):
        _enroll_and_authenticate(tmp_path, make_golden, pki, tpm, identity_runner, namespace, address)


def _enroll_and_authenticate(
    tmp_path: Path,
    make_golden: Callable[..., Path],
    pki: Path,
    tpm: Tpm,
    identity_runner: Any,  # noqa: F811
    namespace: int,
    address: str,
) -> None:
    golden = with_program(make_golden(Scheme.MBR))
    port = free_port()
    edge_url = f"https://{address}:{port}"
    ca_cert = pki / "ca-cert.pem"
    out = tmp_path / "out"
    imageprov_pki("stamp", golden, "--pki", pki, "--out", out, "--device-id", "TPM-1", "--device-id", "TPM-2",
                  "--enroll", f"{edge_url}/.well-known/est", "--server-ca", ca_cert)  # fmt: skip
    server = tmp_path / "edge"
    imageprov_pki("server-cert", "--pki", pki, "--host", "localhost", "--ip", address, "--out", server)
    passphrase, password = tmp_path / "passphrase", tmp_path / "password"
    passphrase.write_text(PASSPHRASE)
    password.write_text(PASSWORD)
    device = _device_root(tmp_path, out / "TPM-1.sdimg", "device")
    # A card copied before its first boot: the same bootstrap credential, another device (another TPM token).
    clone = tmp_path / "clone"
    shutil.copytree(device, clone)
    conf = clone / "data/imageprov/enroll/enroll.conf"
    conf.write_text(conf.read_text().replace(str(device), str(clone)))
    revoked = _device_root(tmp_path, out / "TPM-2.sdimg", "revoked")
    imageprov_pki("revoke", "--pki", pki, "TPM-2", "--reason", "key-compromise")

    with running_standin() as standin:
        with edge_service(tmp_path, "--pki", pki, "--upstream", standin.url, "--username", USER,
                          "--password-file", password, "--est", "--passphrase-file", passphrase,
                          "--est-days", "30") as service:  # fmt: skip
            conf_text = imageprov_pki("edge", "nginx", "--pki", pki, "--server-cert", server, "--upstream",
                                      standin.url, "--listen", f"0.0.0.0:{port}", "--accept", service["url"],
                                      "--est").stdout  # fmt: skip
            with nginx(tmp_path, conf_text, port):
                # From the device's namespace the Mender server is out of reach: everything goes through the edge.
                reach = subprocess.run(_in(namespace, ["curl", "-sS", "--max-time", "3", standin.url]),
                                       capture_output=True, text=True, check=False)  # fmt: skip
                assert reach.returncode == 7, reach.stderr  # curl: failed to connect
                # As the boot service runs it (--boot: the first enrollment, tried until it succeeds).
                first = _enroll(namespace, device, tpm, "--boot")
                assert first.returncode == 0, first.stderr
                cert_file = device / "data/mender/mender-cert.pem"
                verified = tool("openssl", "verify", "-CAfile", ca_cert, "-purpose", "sslclient", cert_file)
                assert verified.stdout.decode().strip() == f"{cert_file}: OK"
                cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
                assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "TPM-1"
                # The certificate is for the key the TPM holds; the bootstrap key is gone.
                assert _spki(cert) == _token_public_key(device, tpm)
                assert not (device / "data/imageprov/enroll/bootstrap-key.pem").exists()
                assert (cert_file.stat().st_mode & 0o777) == 0o644
                # Nothing to do while it is valid for more than RENEW_DAYS (--est-days 30 here).
                at_boot = _enroll(namespace, device, tpm, "--boot", IMAGEPROV_RENEW_DAYS="100000")
                assert at_boot.returncode == 0 and "renewal is the timer's" in at_boot.stderr, at_boot.stderr
                again = _enroll(namespace, device, tpm, IMAGEPROV_RENEW_DAYS="7")
                assert again.returncode == 0, again.stderr
                assert again.stderr.strip().endswith("is valid for more than 7 days"), again.stderr

                # The real client, with the TPM's key through the pkcs11 engine: accepted, no click.
                main, fallback = _client_confs(device, edge_url)
                env = [f"{k}={v}" for k, v in tpm.env.items()]
                env.append(f"TPM2_PKCS11_STORE={device / 'data/imageprov/token'}")
                argv = ["env", *env, "mender", "--config", str(main), "--fallback-config", str(fallback), "--data",
                        str(device / "data/mender"), "--no-syslog", "--log-level", "info", "bootstrap"]  # fmt: skip
                booted = identity_runner(_in(namespace, argv), "02:00:00:00:27:01")
                assert booted.returncode == 0, booted.stderr[-3000:]
                assert "loaded private key: 'pkcs11:...' from 'pkcs11'" in booted.stderr

                cloned = _enroll(namespace, clone, tpm, "--boot")
                assert cloned.returncode == 2, cloned.stderr
                assert "refused (403)" in cloned.stderr and "used to enroll already" in cloned.stderr
                assert not (clone / "data/mender/mender-cert.pem").exists()
                refused = _enroll(namespace, revoked, tpm)
                assert refused.returncode == 2 and "refused (403)" in refused.stderr, refused.stderr

                # Renewal: due once it expires within RENEW_DAYS; over TLS with the TPM's key and the certificate.
                renewed = _enroll(namespace, device, tpm, IMAGEPROV_RENEW_DAYS="60")
                assert renewed.returncode == 0 and "renewed:" in renewed.stderr, renewed.stderr
                new = x509.load_pem_x509_certificate(cert_file.read_bytes())
                assert new.serial_number != cert.serial_number and _spki(new) == _spki(cert)
            est = [line for line in log_lines(service["log"]) if line.get("event") == "est"]

        accepted = _list(standin, "accepted")
        assert [d["identity_data"] for d in accepted] == [{"mac": "02:00:00:00:27:01"}]
        assert [_spki_pem(a["pubkey"]) for a in accepted[0]["auth_sets"]] == [_spki(cert)]
        assert standin.auth_headers[-1]["x-ssl-client-s-dn"].startswith("CN=TPM-1")
    assert [(e["operation"], e["cn"], e["decision"], e["reason"]) for e in est] == [
        ("simpleenroll", "TPM-1", "enrolled", None),
        ("simpleenroll", "TPM-1", "refused", "credential-used"),
        ("simpleenroll", "TPM-2", "refused", "revoked"),
        ("simplereenroll", "TPM-1", "enrolled", None),
    ]  # fmt: skip
    assert est[1]["possible_clone"] is True
    rows = {r["serial"]: r for r in registry_rows(pki)}
    assert (
        rows[f"{cert.serial_number:x}"]["status"] == "revoked" and rows[f"{new.serial_number:x}"]["status"] == "active"
    )
    # No file anywhere holds the device's key: the device root, its token store, the PKI, the images.
    keys = _private_keys_in(tmp_path)
    assert keys, "the scan finds the keys that are in files (the bootstrap keys in the images)"
    assert all(key is None or _spki_of(key) != _spki(cert) for _, key in keys)
    # What the token's store holds is the key wrapped by this TPM: the store and the PIN copied to another TPM
    # sign nothing, where on this one they do.
    assert _signs(device / "data/imageprov/token", tpm, tmp_path / "here").returncode == 0
    copied = tmp_path / "copied-token"
    shutil.copytree(device / "data/imageprov/token", copied)
    with running_tpm(tmp_path / "another-tpm") as another:
        elsewhere = _signs(copied, another, tmp_path / "elsewhere")
    assert elsewhere.returncode != 0 and not (tmp_path / "elsewhere.pem").exists(), elsewhere.stderr


def _signs(store: Path, tpm: Tpm, out: Path) -> subprocess.CompletedProcess[str]:
    """A certificate request signed by the token's key in ``store`` (PIN from its file), as imageprov-enroll makes
    one; written to ``out``.pem."""
    template = out.with_suffix(".template")
    template.write_text('cn = "TPM-1"\n')
    env = {**os.environ, **tpm.env, "TPM2_PKCS11_STORE": str(store), "GNUTLS_PIN": (store / "pin").read_text()}
    return subprocess.run(
        ["certtool", "--provider", tpm.env["PKCS11_MODULE_PATH"], "--generate-request", "--load-privkey",
         "pkcs11:token=imageprov;object=mender;type=private", "--template", str(template),
         "--outfile", str(out.with_suffix(".pem"))],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def _spki_of(key: Any) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER,  # type: ignore[no-any-return]
                                         serialization.PublicFormat.SubjectPublicKeyInfo)  # fmt: skip
