"""What the edge's tests share: devices that sign auth requests, and the real service and nginx, started and
stopped by the tests."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.conftest import IMAGEPROV_ARGV, SBIN, imageprov_pki, need

AUTH_PATH = "/api/devices/v1/authentication/auth_requests"
USER, PASSWORD = "edge@example.com", "edge-password-1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def public_pem(key: Any) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def sign(key: Any, body: bytes) -> str:
    """X-MEN-Signature as the Mender client makes it."""
    if isinstance(key, rsa.RSAPrivateKey):
        raw = key.sign(body, padding.PKCS1v15(), hashes.SHA256())
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        raw = key.sign(body, ec.ECDSA(hashes.SHA256()))
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.sign(body)
    else:
        raise TypeError(type(key))
    return base64.b64encode(raw).decode()


def auth_body(identity: dict[str, Any], pubkey_pem: str, tenant_token: str | None = None) -> bytes:
    value: dict[str, Any] = {"id_data": json.dumps(identity), "pubkey": pubkey_pem}
    if tenant_token is not None:
        value["tenant_token"] = tenant_token
    return json.dumps(value).encode()


@dataclass
class Signed:
    body: bytes
    signature: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Content-Type": "application/json", "X-MEN-Signature": self.signature}


def signed_request(key: Any, identity: dict[str, Any], *, pubkey_of: Any = None) -> Signed:
    """An auth request naming ``pubkey_of``'s key (default: ``key``'s), signed with ``key``."""
    body = auth_body(identity, public_pem(pubkey_of if pubkey_of is not None else key))
    return Signed(body, sign(key, body))


def wait_for(condition: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@contextmanager
def edge_service(tmp_path: Path, *args: str | Path, env: dict[str, str] | None = None) -> Iterator[dict[str, Any]]:
    """``imageprov edge serve`` as a user runs it; yields its URL and log file; stops it after."""
    port = free_port()
    log = tmp_path / f"edge-{port}.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("MTLS_", "UPSTREAM_", "IMAGEPROV_EDGE"))}
    full_env.update(env or {})
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(
            [*IMAGEPROV_ARGV, "edge", "serve", "--listen", f"127.0.0.1:{port}", *map(str, args)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, env=full_env,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:

        def healthy() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"edge serve exited {proc.returncode}: {log.read_text()}")
            try:
                # Alive: readiness (/healthz) also needs the registry and the Mender server, which some tests stop.
                with urllib.request.urlopen(url + "/livez", timeout=1) as answer:
                    return bool(answer.status == 200)
            except OSError:
                return False

        wait_for(healthy, "edge serve to answer /livez")
        yield {"url": url, "log": log, "proc": proc, "port": port}
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def log_lines(log: Path) -> list[dict[str, Any]]:
    """Every line the service logged (every line must be JSON)."""
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def decisions(log: Path) -> list[dict[str, Any]]:
    """The service's decision lines."""
    return [line for line in log_lines(log) if "decision" in line]


@contextmanager
def nginx(tmp_path: Path, conf_text: str, port: int) -> Iterator[subprocess.Popen[bytes]]:
    need("nginx")
    prefix = tmp_path / f"nginx-{port}"
    prefix.mkdir()
    conf = prefix / "nginx.conf"
    conf.write_text(conf_text)
    env = {**os.environ, "PATH": os.environ.get("PATH", "") + os.pathsep + SBIN}
    proc = subprocess.Popen(
        ["nginx", "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    try:

        def listening() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"nginx exited: {proc.stderr.read().decode() if proc.stderr else ''}")
            return _port_open(port)

        wait_for(listening, "nginx to listen")
        yield proc
    finally:
        proc.terminate()
        proc.wait(15)


class FleetCA:
    """A fleet CA built here with cryptography alone, independent of imageprov's PKI code."""

    def __init__(self, name: str = "Edge Test CA") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.name).issuer_name(self.name).public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(self.key, hashes.SHA256())
        )  # fmt: skip

    def issue(
        self, cn: str, key: Any = None, *, client_auth: bool = True, days: int = 365, start_days: int = -1
    ) -> Any:
        """A device certificate for ``key`` (a new EC P-256 key if None): returns (cert, key)."""
        key = key if key is not None else ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client_auth else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])).issuer_name(self.name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now + dt.timedelta(days=start_days))
            .not_valid_after(now + dt.timedelta(days=start_days + days))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )  # fmt: skip
        return builder.sign(self.key, hashes.SHA256()), key

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write_edge(self, directory: Path) -> tuple[Path, Path]:
        """What ``imageprov edge nginx`` reads: PKI/ca-cert.pem, and a server certificate for localhost."""
        import ipaddress

        pki, server = directory / "pki", directory / "server"
        pki.mkdir(parents=True)
        server.mkdir()
        (pki / "ca-cert.pem").write_bytes(self.cert_pem())
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])).issuer_name(self.name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self.key, hashes.SHA256())
        )  # fmt: skip
        (server / "server-cert.pem").write_text(pem(cert))
        (server / "server-private.key").write_bytes(key_pem(key))
        return pki, server


def pem(cert: Any) -> str:
    return str(cert.public_bytes(serialization.Encoding.PEM).decode())


def key_pem(key: Any) -> bytes:
    return bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


@contextmanager
def running_standin(**kwargs: Any) -> Iterator[Any]:
    """A stand-in Mender server; the test fails if any request or answer deviated from the spec."""
    from tests.standin_mender import StandinMender

    server = StandinMender(**kwargs).start()
    try:
        yield server
    finally:
        server.stop()
    assert server.deviations == [], "\n".join(server.deviations[:20])


def post(url: str, body: bytes, headers: dict[str, str], timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    """POST and return (status, headers, body) whatever the status."""
    import urllib.error

    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def get(url: str, headers: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    """GET and return (status, headers, body) whatever the status."""
    import urllib.error

    request = urllib.request.Request(url, headers=headers or {}, method="GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def escaped(cert: Any) -> str:
    """The certificate as nginx's $ssl_client_escaped_cert puts it in a header."""
    from urllib.parse import quote

    return quote(pem(cert), safe="")


@dataclass(frozen=True)
class Device:
    """A device certificate and key made by the real CLI (``imageprov device-cert``), in the PKI's registry."""

    name: str
    cert: Any
    key: Any

    @property
    def serial(self) -> str:
        return f"{self.cert.serial_number:x}"


def make_device(pki: Path, name: str, *extra: str) -> Device:
    out = pki.parent / "devices" / f"{name}-{uuid.uuid4().hex[:8]}"
    imageprov_pki("device-cert", "--pki", pki, "--device-id", name, "--out", out, *extra)
    cert = x509.load_pem_x509_certificate((out / "mender-cert.pem").read_bytes())
    key = serialization.load_pem_private_key((out / "mender-cert-private.pem").read_bytes(), None)
    return Device(name, cert, key)
