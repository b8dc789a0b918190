"""imageprov-enroll's own decisions on what an edge answers: each refusal, with the case that only it catches.

The device takes nothing on the edge's word: a certificate that does not
chain to the fleet CA, names another device, is for another key than the
TPM's, or comes with another, is refused (exit 2), nothing is written and the
bootstrap key is kept; an edge that is down or busy (5xx, 202, no answer) is
tried again later (exit 1). A stand-in EST server answers each case over TLS
(it takes only the bootstrap certificate, as nginx does); the program runs by
dash against a swtpm TPM, as in tests/test_enroll_device.py.
"""

from __future__ import annotations

import base64
import datetime as dt
import os
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from imageprov.mender.enroll import Enrollment
from tests.conftest import need, tool
from tests.edge_support import FleetCA, key_pem, pem
from tests.tpm import Tpm, running_tpm

REPO = Path(__file__).resolve().parent.parent
PROGRAM = REPO / "yocto" / "meta-imageprov" / "files" / "imageprov-enroll"
DEVICE = "PRG-1"
OTHER_CA = FleetCA("Another CA")


@dataclass
class Edge:
    """The stand-in: ``answer(csr)`` gives (status, body) for each request; what it was asked is kept."""

    answer: Callable[[x509.CertificateSigningRequest], tuple[int, bytes]] = lambda csr: (500, b"not set")
    # What cacerts answers: the fleet CA unless a test says otherwise.
    cacerts: Callable[[], tuple[int, bytes]] | None = None
    asked: list[str] = field(default_factory=list)


def _certs_only(*certs: x509.Certificate) -> bytes:
    return base64.encodebytes(pkcs7.serialize_certificates(list(certs), serialization.Encoding.DER))


def _certify(ca: FleetCA, cn: str, public_key: Any) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])).issuer_name(ca.name)
        .public_key(public_key).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )  # fmt: skip


@pytest.fixture(scope="module")
def fleet() -> FleetCA:
    return FleetCA("Program Test CA")


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory, fleet: FleetCA) -> Iterator[tuple[Edge, int, Path]]:
    """The stand-in EST server on TLS, taking client certificates of the fleet CA only: (its state, port, PKI)."""
    directory = tmp_path_factory.mktemp("edge")
    pki, server = fleet.write_edge(directory)
    state = Edge()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.asked.append(self.path)
            status, answer = state.cacerts() if state.cacerts is not None else (200, _certs_only(fleet.cert))
            self.send_response(status)
            self.send_header("Content-Type", "application/pkcs7-mime")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            state.asked.append(self.path)
            csr = x509.load_der_x509_csr(base64.b64decode(b"".join(body.split())))
            status, answer = state.answer(csr)
            self.send_response(status)
            self.send_header("Content-Type", "application/pkcs7-mime; smime-type=certs-only")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: Any) -> None:
            pass

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca-cert.pem"))
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(server / "server-cert.pem", server / "server-private.key")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield state, httpd.server_address[1], pki
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def tpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tpm]:
    with running_tpm(tmp_path_factory.mktemp("tpm")) as running:
        yield running


@pytest.fixture
def device(tmp_path: Path, fleet: FleetCA, edge: tuple[Edge, int, Path]) -> Path:
    """A device root as ``stamp --enroll`` leaves it (enroll.conf written by imageprov's own code)."""
    _, port, pki = edge
    root = tmp_path / "device"
    enroll = root / "data/imageprov/enroll"
    enroll.mkdir(parents=True)
    cert, key = fleet.issue(DEVICE)
    (enroll / "bootstrap-cert.pem").write_text(pem(cert))
    (enroll / "bootstrap-key.pem").write_bytes(key_pem(key))
    (enroll / "fleet-ca.pem").write_bytes(fleet.cert_pem())
    conf = Enrollment(f"https://127.0.0.1:{port}/.well-known/est").conf(DEVICE, "/data/server-ca.pem").decode()
    (root / "data/server-ca.pem").write_bytes((pki / "ca-cert.pem").read_bytes())
    (enroll / "enroll.conf").write_text(
        conf.replace("=/data/", f"={root}/data/").replace("file:/data/", f"file:{root}/data/")
    )
    return root


def _run(root: Path, tpm: Tpm, **extra: str) -> subprocess.CompletedProcess[str]:
    """The program, by dash; the device's system CAs (OpenSSL's default store) hold another CA: the fleet's
    trust must not reach it."""
    need("dash")
    system = root / "system-certs"  # as /etc/ssl/certs: hashed names (openssl rehash), which -CAfile still reads
    if not system.exists():
        system.mkdir()
        (system / "other.pem").write_bytes(OTHER_CA.cert_pem())
        tool("openssl", "rehash", system)
    env = {**os.environ, **tpm.env, "IMAGEPROV_ENROLL_CONF": str(root / "data/imageprov/enroll/enroll.conf"),
           "SSL_CERT_DIR": str(system), **extra}  # fmt: skip
    return subprocess.run(["dash", str(PROGRAM)], env=env, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)  # fmt: skip


# What the stand-in answers, and what the program must say; each answer is wrong in one way only.
ANSWERS: dict[str, tuple[Callable[[FleetCA, x509.CertificateSigningRequest], tuple[int, bytes]], int, str]] = {
    "another CA's certificate": (
        lambda ca, csr: (200, _certs_only(_certify(OTHER_CA, DEVICE, csr.public_key()))), 2,
        "does not chain to the fleet CA"),
    "another device's certificate": (
        lambda ca, csr: (200, _certs_only(_certify(ca, "PRG-2", csr.public_key()))), 2, "names PRG-2, not PRG-1"),
    "a certificate for another key": (
        lambda ca, csr: (200, _certs_only(_certify(ca, DEVICE, ec.generate_private_key(ec.SECP256R1()).public_key()))),
        2, "is not for the token's key"),
    "two certificates": (
        lambda ca, csr: (200, _certs_only(_certify(ca, DEVICE, csr.public_key()), ca.cert)), 2, "not one certificate"),
    "not PKCS#7": (lambda ca, csr: (200, base64.encodebytes(b"not a pkcs7")), 2, "is not a certs-only PKCS#7"),
    "refused": (lambda ca, csr: (403, b"the bootstrap certificate was used to enroll already"), 2,
                "the edge refused (403): the bootstrap certificate was used"),
    "the edge's registry is down": (lambda ca, csr: (503, b"the edge cannot enroll now"), 1, "answered 503"),
    "accepted, not yet issued": (lambda ca, csr: (202, b""), 1, "answered 202"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(ANSWERS))
def test_a_wrong_answer_writes_nothing_and_keeps_the_bootstrap_key(
    case: str, device: Path, tpm: Tpm, fleet: FleetCA, edge: tuple[Edge, int, Path]
) -> None:
    answer, code, said = ANSWERS[case]
    edge[0].answer, edge[0].cacerts = (lambda csr: answer(fleet, csr)), None
    ran = _run(device, tpm)
    assert ran.returncode == code, ran.stderr
    assert said in ran.stderr, ran.stderr
    assert not (device / "data/mender/mender-cert.pem").exists()
    assert (device / "data/imageprov/enroll/bootstrap-key.pem").exists()


@pytest.mark.parametrize(
    ("cacerts", "code", "said"),
    [
        (lambda: (200, _certs_only(OTHER_CA.cert)), 2, "the edge's CA is not the fleet CA"),
        (lambda: (200, base64.encodebytes(b"no")), 2, "cacerts: the answer is not a certs-only PKCS#7"),
        (lambda: (404, b"no EST here"), 2, "cacerts: the edge answered 404"),
        (lambda: (503, b""), 1, "cacerts: the edge answered 503"),
    ],
    ids=["another fleet's CA", "not PKCS#7", "no EST", "down"],
)
def test_an_edge_of_another_fleet_is_never_sent_a_request(
    cacerts: Callable[[], tuple[int, bytes]], code: int, said: str, device: Path, tpm: Tpm, fleet: FleetCA,
    edge: tuple[Edge, int, Path],
) -> None:  # fmt: skip
    """cacerts first (RFC 7030, 4.1): the edge's CA must be the fleet CA the image names, or nothing is asked."""
    state = edge[0]
    state.answer, state.cacerts = (lambda csr: (200, _certs_only(_certify(fleet, DEVICE, csr.public_key())))), cacerts
    before = len(state.asked)
    ran = _run(device, tpm)
    assert ran.returncode == code and said in ran.stderr, ran.stderr
    assert state.asked[before:] == ["/.well-known/est/cacerts"]
    assert not (device / "data/mender/mender-cert.pem").exists()
    assert (device / "data/imageprov/enroll/bootstrap-key.pem").exists()


def test_the_right_answer_is_written_and_the_bootstrap_key_deleted(
    device: Path, tpm: Tpm, fleet: FleetCA, edge: tuple[Edge, int, Path]
) -> None:
    """The control: the stand-in's good answers pass every check above."""
    state = edge[0]
    state.answer, state.cacerts = (lambda csr: (200, _certs_only(_certify(fleet, DEVICE, csr.public_key())))), None
    before = len(state.asked)
    ran = _run(device, tpm)
    assert ran.returncode == 0, ran.stderr
    assert state.asked[before:] == ["/.well-known/est/cacerts", "/.well-known/est/simpleenroll"]
    cert = x509.load_pem_x509_certificate((device / "data/mender/mender-cert.pem").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == DEVICE
    assert not (device / "data/imageprov/enroll/bootstrap-key.pem").exists()
    # The PINs it made are the device's own: 0600, as the rest of its token directory.
    for name in ("pin", "so-pin"):
        assert (device / "data/imageprov/token" / name).stat().st_mode & 0o777 == 0o600
    # A power cut between the certificate and the bootstrap key's removal: the next run removes it.
    bootstrap_key = device / "data/imageprov/enroll/bootstrap-key.pem"
    bootstrap_key.write_text("left by a power cut\n")
    assert _run(device, tpm).returncode == 0 and not bootstrap_key.exists()
    # A renewal whose answer is wrong keeps the certificate the device has.
    good = (device / "data/mender/mender-cert.pem").read_bytes()
    for wrong in ("a certificate for another key", "another CA's certificate", "refused"):
        state.answer = lambda csr, wrong=wrong: ANSWERS[wrong][0](fleet, csr)  # type: ignore[misc]
        renewal = _run(device, tpm, IMAGEPROV_RENEW_DAYS="100000")
        assert renewal.returncode == 2 and "simplereenroll" in renewal.stderr, renewal.stderr
        assert (device / "data/mender/mender-cert.pem").read_bytes() == good
    assert state.asked[-1] == "/.well-known/est/simplereenroll"


def test_a_bad_enroll_conf_is_refused_before_the_tpm_is_touched(device: Path, tpm: Tpm) -> None:
    conf = device / "data/imageprov/enroll/enroll.conf"
    for text, said in (
        (conf.read_text().replace("EST_URL=https://", "EST_URL=http://"), "is not https"),
        ("".join(line + "\n" for line in conf.read_text().splitlines() if not line.startswith("DEVICE_ID=")),
         "names no DEVICE_ID"),
        (conf.read_text() + "not a setting\n", "not NAME=value"),
    ):  # fmt: skip
        conf.write_text(text)
        ran = _run(device, tpm)
        assert ran.returncode == 2 and said in ran.stderr, ran.stderr
    assert not (device / "data/imageprov/token").exists()


def test_another_fleets_edge_is_refused_even_where_the_system_trusts_the_fleet_ca(
    device: Path, tpm: Tpm, fleet: FleetCA, edge: tuple[Edge, int, Path], tmp_path: Path
) -> None:
    """The fleet CA in the device's system store (a common build) must not stand in for the edge's cacerts."""
    system = tmp_path / "system-with-fleet"
    system.mkdir()
    (system / "fleet.pem").write_bytes(fleet.cert_pem())
    tool("openssl", "rehash", system)
    state = edge[0]
    state.answer, state.cacerts = (lambda csr: (200, _certs_only(_certify(fleet, DEVICE, csr.public_key())))), (
        lambda: (200, _certs_only(OTHER_CA.cert)))  # fmt: skip
    ran = _run(device, tpm, SSL_CERT_DIR=str(system))
    assert ran.returncode == 2 and "the edge's CA is not the fleet CA" in ran.stderr, ran.stderr
    assert not (device / "data/mender/mender-cert.pem").exists()
