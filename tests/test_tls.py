"""Real TLS handshakes on loopback with Python's ssl: what the edge will accept and refuse."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from imageprov.pki.ca import CertificateAuthority, Issued, Subject
from imageprov.pki.registry import Reason, Registry, Status
from imageprov.pki.revocation import build_crl, crl_bytes


def _files(tmp: Path, name: str, issued: Issued) -> tuple[Path, Path]:
    return issued.write_to(tmp / name, "cert.pem", "key.pem")


def _handshake(
    tmp: Path,
    ca: CertificateAuthority,
    server: Issued,
    client: Issued | None,
    *,
    hostname: str = "edge.test",
    crl: bytes | None = None,
) -> dict[str, str] | None:
    """Run one handshake; return None on success, else the server's and the client's errors by side."""
    tmp.mkdir(parents=True, exist_ok=True)
    ca_file = tmp / "ca.pem"
    ca_file.write_bytes(ca.cert.public_bytes(Encoding.PEM))
    server_cert, server_key = _files(tmp, "server", server)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(server_cert, server_key)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.load_verify_locations(ca_file)
    if crl is not None:
        crl_file = tmp / "crl.pem"
        crl_file.write_bytes(crl)
        server_ctx.load_verify_locations(crl_file)
        server_ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF

    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname on: the SAN must match
    client_ctx.load_verify_locations(ca_file)
    if client is not None:
        client_ctx.load_cert_chain(*_files(tmp, "client", client))

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    result: dict[str, str | None] = {}

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                peer = tls.getpeercert()
                subject = dict(x[0] for x in peer["subject"]) if peer else {}
                result["server"] = None
                tls.sendall(str(subject.get("commonName")).encode())
        except (ssl.SSLError, OSError) as exc:
            result["server"] = str(exc)
        finally:
            conn.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with (
            socket.create_connection(("127.0.0.1", port)) as raw,
            client_ctx.wrap_socket(raw, server_hostname=hostname) as tls,
        ):
            result["cn"] = tls.recv(100).decode()  # TLS 1.3 reports a refused client cert here
    except (ssl.SSLError, OSError) as exc:
        result["client"] = str(exc)
    thread.join(10)
    listener.close()
    errors = {side: error for side in ("server", "client") if (error := result.get(side))}
    return errors or None


@pytest.fixture
def ca() -> CertificateAuthority:
    return CertificateAuthority.create(Subject("Fleet CA", "ACME"))


def test_device_is_accepted(tmp_path: Path, ca: CertificateAuthority) -> None:
    server = ca.issue_server(["edge.test"], ips=["127.0.0.1"])
    assert _handshake(tmp_path, ca, server, ca.issue_device("dev-1")) is None


def test_device_of_another_ca_is_refused(tmp_path: Path, ca: CertificateAuthority) -> None:
    other = CertificateAuthority.create(Subject("Fleet CA", "ACME"))  # same name, other key
    server = ca.issue_server(["edge.test"])
    error = _handshake(tmp_path, ca, server, other.issue_device("dev-1"))
    # The server cannot chain it to the fleet CA and tells the device with an unknown_ca alert.
    assert error is not None and "unable to get local issuer certificate" in error["server"]
    assert "TLSV1_ALERT_UNKNOWN_CA" in error["client"], error


def test_device_without_certificate_is_refused(tmp_path: Path, ca: CertificateAuthority) -> None:
    error = _handshake(tmp_path, ca, ca.issue_server(["edge.test"]), None)
    assert error is not None and "PEER_DID_NOT_RETURN_A_CERTIFICATE" in error["server"]
    assert "TLSV13_ALERT_CERTIFICATE_REQUIRED" in error["client"], error


def test_revoked_device_is_refused_with_the_crl(tmp_path: Path, ca: CertificateAuthority) -> None:
    pki = tmp_path / "pki"
    ca.write_to(pki, None)
    good, bad = ca.issue_device("good"), ca.issue_device("bad")
    with Registry(pki, create=True) as registry:
        for issued in (good, bad):
            registry.record(issued, status=Status.ACTIVE)
        registry.revoke(device_id="bad", reason=Reason.KEY_COMPROMISE)
        crl = crl_bytes(build_crl(ca, registry.revoked(), number=registry.next_crl_number()))
    server = ca.issue_server(["edge.test"])
    assert _handshake(tmp_path / "1", ca, server, good, crl=crl) is None
    error = _handshake(tmp_path / "2", ca, server, bad, crl=crl)
    assert error is not None and "certificate revoked" in error["server"]
    assert "SSLV3_ALERT_CERTIFICATE_REVOKED" in error["client"], error
    # Without the CRL the revoked device would still get in: the CRL is what refuses it.
    assert _handshake(tmp_path / "3", ca, server, bad) is None


def test_hostname_is_checked_against_the_san(tmp_path: Path, ca: CertificateAuthority) -> None:
    server = ca.issue_server(["edge.test"], ips=["127.0.0.1"])
    device = ca.issue_device("dev-1")
    assert _handshake(tmp_path / "1", ca, server, device, hostname="127.0.0.1") is None
    error = _handshake(tmp_path / "2", ca, server, device, hostname="other.test")
    # This time the device refuses the edge, and says so to the server with a bad_certificate alert.
    assert error is not None and "Hostname mismatch" in error["client"]
    assert "SSLV3_ALERT_BAD_CERTIFICATE" in error["server"], error
