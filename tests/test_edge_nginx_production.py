"""``imageprov edge nginx`` as production needs it (issue 25, items 3 and 5), run by real nginx: the Mender
server's name resolved at request time (a DNS stand-in the test controls), a private CA for an on-premises
server (``--upstream-ca``), connections to the server kept alive, a health port without client certificates,
``X-Forwarded-Host``/``-Proto``, and the Mender Gateway variable ``UPSTREAM_SERVER_URL``."""

from __future__ import annotations

import asyncio
import datetime as dt
import http.client
import ipaddress
import json
import os
import shutil
import socket
import ssl
import struct
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from imageprov.edge.nginx import AUTH_REQUESTS, CHECK, DEVICECONNECT, EdgeConfig, render_nginx
from imageprov.errors import UsageError
from tests.conftest import IMAGEPROV_ARGV, SBIN, imageprov, need
from tests.edge_support import (
    PASSWORD,
    USER,
    FleetCA,
    edge_service,
    free_port,
    key_pem,
    nginx,
    pem,
    running_standin,
    signed_request,
    wait_for,
)

# A name no public DNS server knows (RFC 6761): only the test's DNS stand-in answers for it.
NAME = "mender.imageprov-test.invalid"
INVENTORY = "/api/devices/v1/inventory/device/attributes"
NEXT = "/api/devices/v1/deployments/device/deployments/next"


@dataclass(frozen=True)
class Edge:
    pki: Path
    server: Path
    device_cert: Path
    device_key: Path


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Edge:
    """A fleet CA, the edge's server certificate for localhost, and one device's certificate and key."""
    base = tmp_path_factory.mktemp("edge-production")
    ca = FleetCA()
    pki, server = ca.write_edge(base)
    cert, key = ca.issue("device-1")
    cert_path, key_path = base / "device-cert.pem", base / "device-key.pem"
    cert_path.write_text(pem(cert))
    key_path.write_bytes(key_pem(key))
    return Edge(pki, server, cert_path, key_path)


def _config(edge: Edge, upstream: str, **kwargs: Any) -> EdgeConfig:
    files = (edge.pki / "ca-cert.pem", edge.server / "server-cert.pem", edge.server / "server-private.key")
    return EdgeConfig(*files, upstream, listen=kwargs.pop("listen", "127.0.0.1:8443"), **kwargs)


def _edge_nginx(edge: Edge, port: int, *args: str | Path, env: dict[str, str] | None = None) -> str:
    """What ``imageprov edge nginx`` prints, run as a user runs it (the environment as given)."""
    argv = [*IMAGEPROV_ARGV, "edge", "nginx", "--pki", str(edge.pki), "--server-cert",
            str(edge.server), "--listen", f"127.0.0.1:{port}", *map(str, args)]  # fmt: skip
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MTLS_", "UPSTREAM_"))}
    result = subprocess.run(argv, capture_output=True, text=True, env={**base, **(env or {})}, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _nginx_t(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    """``nginx -t`` on ``text``; with a timeout, as a name nginx resolves itself may wait for DNS."""
    need("nginx")
    prefix = Path(tempfile.mkdtemp(prefix="nginx-t-", dir=tmp_path))
    conf = prefix / "nginx.conf"
    conf.write_text(text)
    env = {**os.environ, "PATH": os.environ.get("PATH", "") + os.pathsep + SBIN}
    argv = ["nginx", "-t", "-p", str(prefix), "-c", str(conf)]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)


def _device_context(edge: Edge) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(edge.pki / "ca-cert.pem"))
    context.load_cert_chain(edge.device_cert, edge.device_key)
    return context


def _request(
    edge: Edge, port: int, method: str, path: str, headers: dict[str, str] | None = None, body: bytes | None = None
) -> tuple[int, bytes]:
    """One request as the device makes it, on a connection of its own: (status, body)."""
    connection = http.client.HTTPSConnection("localhost", port, context=_device_context(edge), timeout=30)
    try:
        connection.request(method, path, body, headers or {})
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


def _plain(port: int, method: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """A plain-HTTP request without any certificate, as a load balancer's probe makes it."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, headers=headers or {})
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


# -- stand-ins: an upstream Mender server, the accept service, a DNS server --


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    peer: tuple[Any, ...]


@dataclass
class Upstream:
    """A stand-in Mender server: answers 200 (a websocket echo on deviceconnect) and records every request and
    the TCP connection it came on, and the SNI of each TLS handshake."""

    port: int
    seen: list[Seen] = field(default_factory=list)
    sni: list[str | None] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else ()
        self.seen.append(Seen(request.method, request.path_qs, dict(request.headers), tuple(peer)))
        await request.read()
        ws = web.WebSocketResponse()
        if not ws.can_prepare(request).ok:
            return web.json_response({"path": request.path})
        await ws.prepare(request)
        async for message in ws:
            if message.type is aiohttp.WSMsgType.TEXT:
                await ws.send_str(f"echo: {message.data}")
        return ws

    def peers(self) -> list[tuple[Any, ...]]:
        return [s.peer for s in self.seen]


@dataclass
class Service:
    """A stand-in for ``edge serve`` on a Unix socket: the check allows, probes answer as set."""

    socket: Path
    ready: bool = True
    seen: list[Seen] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(Seen(request.method, request.path_qs, dict(request.headers), ()))
        if request.path == CHECK:
            return web.Response(status=204)
        if request.path == "/healthz":
            if self.ready:
                return web.json_response({"status": "ready"})
            return web.json_response({"status": "not-ready", "problems": {"upstream": "down"}}, status=503)
        if request.path == "/livez":
            return web.json_response({"status": "alive"})
        return web.json_response({"from": "service"})


class Servers:
    """aiohttp servers on one event loop in a thread, stopped when the test ends."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.runners: list[web.AppRunner] = []
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="edge-production-standins")
        self.thread.start()

    def serve(
        self, handler: Any, *, host: str | None = None, port: int = 0, path: Path | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:  # fmt: skip
        async def start() -> None:
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", handler)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            self.runners.append(runner)
            if path is not None:
                await web.UnixSite(runner, str(path)).start()
            else:
                await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()

        asyncio.run_coroutine_threadsafe(start(), self.loop).result(30)

    def close(self) -> None:
        for runner in self.runners:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


@pytest.fixture
def servers() -> Iterator[Servers]:
    running = Servers()
    try:
        yield running
    finally:
        running.close()


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # A short path (sun_path is 108 bytes) that nginx's worker user, not root, can reach.
    path = Path(tempfile.mkdtemp(prefix="imageprov-edge-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _service(servers: Servers, socket_dir: Path) -> Service:
    service = Service(socket_dir / "service.sock")
    servers.serve(service.handle, path=service.socket)
    service.socket.chmod(0o666)  # nginx's workers connect as another user
    return service


def _upstream(servers: Servers, host: str = "127.0.0.1", port: int | None = None, cert: Any = None) -> Upstream:
    upstream = Upstream(port or free_port())
    context = None
    if cert is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*cert)
        context.sni_callback = lambda _socket, name, _context: upstream.sni.append(name)
    servers.serve(upstream.handle, host=host, port=upstream.port, ssl_context=context)
    return upstream


class Dns:
    """A DNS server on 127.0.0.1 (UDP) for one name: silent (DNS not up yet) until ``address`` is set, then an A
    record with a TTL of 1 s; NXDOMAIN for any other name. Records every query."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.address: str | None = None
        self.queries: list[tuple[str, int]] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True, name="edge-production-dns")
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                data, client = self.sock.recvfrom(512)
            except TimeoutError:
                continue
            answer = self._answer(data)
            if answer is not None:
                self.sock.sendto(answer, client)

    def _answer(self, data: bytes) -> bytes | None:
        ident = data[:2]
        labels, at = [], 12
        while data[at]:
            labels.append(data[at + 1 : at + 1 + data[at]].decode())
            at += 1 + data[at]
        qtype = struct.unpack("!H", data[at + 1 : at + 3])[0]
        question = data[12 : at + 5]
        name = ".".join(labels).lower()
        self.queries.append((name, qtype))
        if name == self.name and self.address is None:
            return None  # not up yet: the question goes unanswered
        records = b""
        if name == self.name and qtype == 1 and self.address is not None:
            records = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 1, 4) + socket.inet_aton(self.address)
        rcode = 0 if name == self.name else 3  # NOERROR (an AAAA question: no record), NXDOMAIN
        header = ident + struct.pack("!HHHHH", 0x8180 | rcode, 1, 1 if records else 0, 0, 0)
        return header + question + records

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(30)
        self.sock.close()


@pytest.fixture
def dns() -> Iterator[Dns]:
    server = Dns(NAME)
    try:
        yield server
    finally:
        server.close()


def _private_ca(directory: Path, *names: str) -> tuple[Path, tuple[Path, Path]]:
    """An on-premises Mender's private CA (not in any system bundle), and a server certificate it signed for
    ``names`` (DNS names, or IP addresses): (CA file, (certificate chain, key))."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "On-premises Mender private CA")])
    now = dt.datetime.now(dt.UTC)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])).issuer_name(ca_name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    ca_path, cert_path, key_path = directory / "private-ca.pem", directory / "mender.pem", directory / "mender.key"
    ca_path.write_text(pem(ca_cert))
    cert_path.write_text(pem(cert))
    key_path.write_bytes(key_pem(key))
    return ca_path, (cert_path, key_path)


# -- resolver: the name is resolved at request time --


def test_a_name_that_does_not_resolve_yet_passes_nginx_t_starts_and_is_resolved_per_request(
    tmp_path: Path, edge: Edge, servers: Servers, dns: Dns
) -> None:
    port = free_port()
    first = _upstream(servers, "127.0.0.1")
    text = _edge_nginx(edge, port, "--upstream", f"http://{NAME}:{first.port}", "--resolver", f"127.0.0.1:{dns.port}")
    assert f"    resolver 127.0.0.1:{dns.port};" in text.splitlines()
    # Resolved when nginx loads its configuration (as before, and with --resolve-at-start), the name fails
    # nginx -t while DNS does not know it; resolved per request, nginx -t passes and nginx starts.
    once = render_nginx(_config(edge, f"http://{NAME}:{first.port}", resolve_at_start=True))
    failed = _nginx_t(tmp_path, once)
    assert failed.returncode != 0 and "host not found" in failed.stderr, failed.stderr
    checked = _nginx_t(tmp_path, text)
    assert checked.returncode == 0, checked.stderr
    with nginx(tmp_path, text, port):
        assert dns.queries == [], "nginx asked DNS before any request needed it"
        dns.address = "127.0.0.1"
        assert _request(edge, port, "GET", NEXT) == (200, b'{"path": "' + NEXT.encode() + b'"}')
        assert (NAME, 1) in dns.queries and [s.path for s in first.seen] == [NEXT]
        assert first.seen[0].headers["Host"] == f"{NAME}:{first.port}"

        # The server moves: once the answer's TTL (1 s) has passed, requests follow it, with no reload.
        moved = _upstream(servers, "127.0.0.2", first.port)
        dns.address = "127.0.0.2"

        def followed() -> bool:
            assert _request(edge, port, "GET", NEXT)[0] == 200
            return bool(moved.seen)

        wait_for(followed, "nginx to follow the name to its new address")


def test_the_resolver_comes_from_resolv_conf_or_the_option(edge: Edge, tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(
        "# written by a DHCP client\nsearch example.com\nnameserver 10.0.0.2\nnameserver fd00::53  # v6\n"
        "nameserver fe80::1%eth0\noptions ndots:5\nnameserver not-an-address\n"
    )
    upstream = "https://hosted.mender.io"

    def resolver_line(**kwargs: Any) -> list[str]:
        text = render_nginx(_config(edge, upstream, resolv_conf=resolv, **kwargs))
        return [line.strip() for line in text.splitlines() if line.strip().startswith("resolver ")]

    # A scoped address names an interface nginx cannot take; a line glibc would skip is skipped.
    assert resolver_line() == ["resolver 10.0.0.2 [fd00::53];"]
    given = ("127.0.0.53", "10.1.1.1:5353", "::1", "[fd00::1]:53")
    assert resolver_line(resolvers=given) == ["resolver 127.0.0.53 10.1.1.1:5353 [::1] [fd00::1]:53;"]
    # An address, or localhost (in /etc/hosts, which nginx's resolver never reads), needs no resolver, and
    # goes in an upstream block that keeps connections alive.
    for address in ("http://127.0.0.1:8080", "https://[::1]:8443", "http://localhost:8080"):
        text = render_nginx(_config(edge, address, resolv_conf=tmp_path / "missing"))
        assert "resolver " not in text and "        keepalive 32;" in text.splitlines(), address
    block = render_nginx(_config(edge, "https://[::1]:8443"))
    assert "        server [::1]:8443;  # resolved when nginx starts or reloads" in block.splitlines()
    assert "proxy_pass https://imageprov_mender;" in block and "proxy_set_header Host [::1]:8443;" in block

    resolv.write_text("search example.com\n")
    with pytest.raises(UsageError, match="names no DNS server"):
        resolver_line()
    with pytest.raises(UsageError, match="cannot read"):
        render_nginx(_config(edge, upstream, resolv_conf=tmp_path / "missing"))
    for bad in ("dns.example.com", "10.0.0.2:x", "10.0.0.2:0", "[::1", "[::1]x", "10.0.0.2 valid=1s", "1.2.3.4;"):
        with pytest.raises(UsageError, match="--resolver"):
            resolver_line(resolvers=(bad,))
    with pytest.raises(UsageError, match="give one of them"):
        resolver_line(resolvers=("10.0.0.2",), resolve_at_start=True)


# -- --upstream-ca: an on-premises Mender with a private CA --


def test_upstream_ca_verifies_an_on_premises_server_with_a_private_ca(
    tmp_path: Path, edge: Edge, servers: Servers, dns: Dns
) -> None:
    ca, cert = _private_ca(tmp_path / "mender", NAME, "localhost")
    by_name = _upstream(servers, "127.0.0.1", cert=cert)
    dns.address = "127.0.0.1"
    resolver = ("--resolver", f"127.0.0.1:{dns.port}")
    url = f"https://{NAME}:{by_name.port}"

    # Without the option, Debian's bundle is the trust: the private CA is not in it, nothing passes.
    port = free_port()
    with nginx(tmp_path, _edge_nginx(edge, port, "--upstream", url, *resolver), port):
        assert _request(edge, port, "GET", NEXT)[0] == 502
    assert by_name.seen == [] and set(by_name.sni) == {NAME}  # nginx shook hands, and refused the certificate
    by_name.sni.clear()

    port = free_port()
    text = _edge_nginx(edge, port, "--upstream", url, *resolver, "--upstream-ca", ca)
    assert f"proxy_ssl_trusted_certificate {ca.resolve()};" in text and "proxy_ssl_verify on;" in text
    with nginx(tmp_path, text, port):
        assert _request(edge, port, "GET", NEXT)[0] == 200
    # SNI and the Host header name the server, as its certificate does.
    assert by_name.sni == [NAME] and by_name.seen[-1].headers["Host"] == f"{NAME}:{by_name.port}"

    # Resolved at start, in the upstream block that keeps connections alive: SNI and the name checked are
    # still the server's, never the block's (imageprov_mender).
    at_start = _upstream(servers, "localhost", cert=cert)
    port = free_port()
    text = _edge_nginx(edge, port, "--upstream", f"https://localhost:{at_start.port}", "--upstream-ca", ca)
    with nginx(tmp_path, text, port):
        for _ in range(3):
            assert _request(edge, port, "GET", NEXT)[0] == 200
    assert set(at_start.sni) == {"localhost"} and len(at_start.seen) == 3


def test_upstream_ca_is_checked(edge: Edge, tmp_path: Path) -> None:
    ca, (cert, key) = _private_ca(tmp_path / "mender", NAME)
    assert "proxy_ssl_trusted_certificate /etc/ssl/certs/ca-certificates.crt;" in render_nginx(
        _config(edge, "https://127.0.0.1:8443")
    )
    with pytest.raises(UsageError, match="is for an https Mender server"):
        render_nginx(_config(edge, "http://127.0.0.1:8080", upstream_ca=ca))
    for bad in (key, tmp_path / "missing.pem"):
        with pytest.raises(UsageError, match="--upstream-ca"):
            render_nginx(_config(edge, "https://127.0.0.1:8443", upstream_ca=bad))
    with pytest.raises(UsageError, match="holds no CA certificate"):
        render_nginx(_config(edge, "https://127.0.0.1:8443", upstream_ca=cert))


# -- keepalive: a pool of connections to the Mender server --


def test_connections_to_the_mender_server_are_kept_alive(
    tmp_path: Path, edge: Edge, servers: Servers, socket_dir: Path
) -> None:
    upstream, service = _upstream(servers), _service(servers, socket_dir)
    port = free_port()
    text = _edge_nginx(edge, port, "--upstream", f"http://127.0.0.1:{upstream.port}", "--accept",
                       f"unix:{service.socket}")  # fmt: skip
    with nginx(tmp_path, text, port):
        # One device connection (one worker): ten requests, GETs and PATCHes with a body, over one upstream
        # connection.
        device = http.client.HTTPSConnection("localhost", port, context=_device_context(edge), timeout=30)
        try:
            for i in range(10):
                body = b"[]" if i % 2 else None
                device.request("PATCH" if body else "GET", INVENTORY if body else NEXT, body)
                answer = device.getresponse()
                assert answer.status == 200, answer.read()
                answer.read()
            assert len(upstream.seen) == 10
            assert len(set(upstream.peers())) == 1, upstream.peers()
            assert not [s for s in upstream.seen if "Connection" in s.headers]

            # The websocket still upgrades (a connection of its own, never put back in the pool) ...
            async def talk() -> str:
                url = f"wss://localhost:{port}{DEVICECONNECT}"
                async with aiohttp.ClientSession() as session, session.ws_connect(url, ssl=_device_context(edge)) as ws:
                    await ws.send_str("hello")
                    return str((await ws.receive(timeout=30)).data)

            assert asyncio.run(talk()) == "echo: hello"
            socket_peer = upstream.seen[-1].peer
            assert upstream.seen[-1].headers["Upgrade"].lower() == "websocket"
            assert upstream.seen[-1].headers["Connection"].lower() == "upgrade"
            # ... and a plain request to the socket's path, and every later one, go on over the pool.
            for path in (DEVICECONNECT, NEXT, NEXT):
                device.request("GET", path)
                answer = device.getresponse()
                assert answer.status == 200
                answer.read()
            assert "Connection" not in upstream.seen[-3].headers
            assert {s.peer for s in upstream.seen[-3:]} == {upstream.seen[0].peer} != {socket_peer}
        finally:
            device.close()


# -- the health listener --


def test_the_health_port_answers_readiness_without_a_certificate_and_nothing_else(
    tmp_path: Path, edge: Edge, servers: Servers, socket_dir: Path
) -> None:
    upstream, service = _upstream(servers), _service(servers, socket_dir)
    port, health = free_port(), free_port()
    text = _edge_nginx(edge, port, "--upstream", f"http://127.0.0.1:{upstream.port}", "--accept",
                       f"unix:{service.socket}", "--health-listen", f"127.0.0.1:{health}",
                       "--route", "/api/management/v2/devauth/")  # fmt: skip
    with nginx(tmp_path, text, port):
        # No TLS, no certificate: the service's own answer, whatever header the prober sends.
        assert _plain(health, "GET", "/healthz", {"X-SSL-Client-Cert": "spoofed"}) == (200, b'{"status": "ready"}')
        assert service.seen[-1].path == "/healthz" and "X-SSL-Client-Cert" not in service.seen[-1].headers
        service.ready = False
        status, body = _plain(health, "GET", "/healthz")
        assert status == 503 and json.loads(body)["status"] == "not-ready"
        assert _plain(health, "HEAD", "/healthz")[0] == 503
        assert _plain(health, "GET", "/livez") == (200, b'{"status": "alive"}')
        probes = len(service.seen)

        # No device route, no management route, not the check, not the metrics: 404 from nginx itself.
        for method, path in [("GET", NEXT), ("POST", AUTH_REQUESTS), ("GET", DEVICECONNECT), ("GET", CHECK),
                             ("GET", "/api/management/v2/devauth/devices"), ("GET", "/metrics"), ("GET", "/"),
                             ("GET", "/healthz/x"), ("GET", "/api/devices/../healthz/x")]:  # fmt: skip
            assert _plain(health, method, path)[0] == 404, path
        assert _plain(health, "POST", "/healthz")[0] == 403
        assert len(service.seen) == probes and upstream.seen == []

        # The device port still wants a client certificate.
        bare = ssl.create_default_context(cafile=str(edge.pki / "ca-cert.pem"))
        connection = http.client.HTTPSConnection("localhost", port, context=bare, timeout=30)
        connection.request("GET", "/healthz")
        assert connection.getresponse().status == 400  # "No required SSL certificate was sent"
        connection.close()


def test_behind_real_edge_serve_the_health_port_and_forwarded_host(tmp_path: Path, edge: Edge) -> None:
    """The real ``edge serve``: its readiness on the health port, and 502 once the service is gone (503 when it
    is not ready passes through: the stand-in's test above); an auth request it forwards to the Mender server
    still carries X-Forwarded-Host and -Proto from nginx."""
    password = tmp_path / "password"
    password.write_text(PASSWORD + "\n")
    port, health = free_port(), free_port()
    with running_standin() as standin:
        serve = ["--ca", edge.pki / "ca-cert.pem", "--upstream", standin.url, "--username", USER,
                 "--password-file", password, "--no-revocation", "--identity", "none"]  # fmt: skip
        with edge_service(tmp_path, *serve) as service:
            text = _edge_nginx(edge, port, "--upstream", standin.url, "--accept", service["url"],
                               "--health-listen", f"127.0.0.1:{health}")  # fmt: skip
            with nginx(tmp_path, text, port):
                wait_for(lambda: _plain(health, "GET", "/healthz")[0] == 200, "edge serve to be ready")
                assert json.loads(_plain(health, "GET", "/healthz")[1]) == {"status": "ready"}
                assert json.loads(_plain(health, "GET", "/livez")[1]) == {"status": "alive"}

                key = serialization.load_pem_private_key(edge.device_key.read_bytes(), None)
                signed = signed_request(key, {"mac": "02:00:00:00:00:01"})
                assert _request(edge, port, "POST", AUTH_REQUESTS, signed.headers, signed.body)[0] == 200
                forwarded = standin.auth_headers[-1]
                assert (forwarded["x-forwarded-host"], forwarded["x-forwarded-proto"]) == (f"localhost:{port}", "https")

                service["proc"].terminate()
                service["proc"].wait(15)
                assert _plain(health, "GET", "/healthz")[0] == 502
                assert _plain(health, "GET", "/livez")[0] == 502


def test_health_listen_is_checked(edge: Edge) -> None:
    upstream, accept = "http://127.0.0.1:8080", "unix:/run/imageprov/edge.sock"
    with pytest.raises(UsageError, match="there is no --accept"):
        render_nginx(_config(edge, upstream, health_listen="127.0.0.1:8081"))
    with pytest.raises(UsageError, match="share a port"):
        render_nginx(_config(edge, upstream, accept=accept, listen="0.0.0.0:8443", health_listen="127.0.0.1:8443"))
    for bad in ("8081", "health:8081", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:80;"):
        with pytest.raises(UsageError, match="--health-listen"):
            render_nginx(_config(edge, upstream, accept=accept, health_listen=bad))


# -- X-Forwarded-Host and -Proto --


def test_forwarded_host_and_proto_reach_the_mender_server_and_the_service(
    tmp_path: Path, edge: Edge, servers: Servers, socket_dir: Path
) -> None:
    upstream, service = _upstream(servers), _service(servers, socket_dir)
    port = free_port()
    text = _edge_nginx(edge, port, "--upstream", f"http://127.0.0.1:{upstream.port}", "--accept",
                       f"unix:{service.socket}")  # fmt: skip
    spoofed = {"X-Forwarded-Host": "attacker.example.com", "X-Forwarded-Proto": "http"}
    with nginx(tmp_path, text, port):
        assert _request(edge, port, "GET", NEXT, spoofed)[0] == 200
        assert _request(edge, port, "POST", AUTH_REQUESTS, {**spoofed, "Content-Type": "application/json"}, b"{}")[0]
        # The edge as the device reached it (its name and port), and https: what Mender builds links from.
        expected = {"X-Forwarded-Host": f"localhost:{port}", "X-Forwarded-Proto": "https"}
        check, auth = service.seen[0], service.seen[-1]
        assert (check.path, auth.path) == (CHECK, AUTH_REQUESTS)
        for seen in (upstream.seen[0], check, auth):
            assert {name: seen.headers.get(name) for name in expected} == expected, seen.path
        assert upstream.seen[0].headers["Host"] == f"127.0.0.1:{upstream.port}"


# -- UPSTREAM_SERVER_URL, as Mender Gateway reads it --


def test_upstream_server_url_is_read_and_the_option_wins(tmp_path: Path, edge: Edge, servers: Servers) -> None:
    upstream, other = _upstream(servers), _upstream(servers)
    port = free_port()
    from_env = _edge_nginx(edge, port, env={"UPSTREAM_SERVER_URL": f"http://127.0.0.1:{upstream.port}"})
    assert f"        server 127.0.0.1:{upstream.port};  # resolved when nginx starts or reloads" in from_env
    with nginx(tmp_path, from_env, port):
        assert _request(edge, port, "GET", NEXT)[0] == 200
    assert [s.path for s in upstream.seen] == [NEXT]
    # mtls-ambassador's name, when Gateway's is not set; the option over either.
    ambassador = _edge_nginx(edge, port, env={"MTLS_MENDER_BACKEND": f"http://127.0.0.1:{other.port}"})
    assert f"server 127.0.0.1:{other.port};" in ambassador
    both = {"UPSTREAM_SERVER_URL": f"http://127.0.0.1:{upstream.port}", "MTLS_MENDER_BACKEND": "http://10.9.9.9"}
    assert f"server 127.0.0.1:{upstream.port};" in _edge_nginx(edge, port, env=both)
    option = _edge_nginx(edge, port, "--upstream", f"http://127.0.0.1:{other.port}", env=both)
    assert f"server 127.0.0.1:{other.port};" in option and f"127.0.0.1:{upstream.port}" not in option
    assert _nginx_t(tmp_path, option).returncode == 0

    result = imageprov("edge", "nginx", "--pki", edge.pki, "--server-cert", edge.server, check=False)
    if "UPSTREAM_SERVER_URL" not in os.environ and "MTLS_MENDER_BACKEND" not in os.environ:
        assert result.returncode == 2 and "no Mender server" in result.stderr
        assert "UPSTREAM_SERVER_URL" in result.stderr


# -- every shape, checked by nginx --


def test_real_nginx_takes_every_new_shape(edge: Edge, tmp_path: Path) -> None:
    ca, _ = _private_ca(tmp_path / "mender", NAME)
    accept = "unix:/run/imageprov/edge.sock"
    shapes: dict[str, dict[str, Any]] = {
        "name-per-request": {"upstream": f"https://{NAME}", "resolvers": ("127.0.0.1:5353",), "upstream_ca": ca},
        "name-http": {"upstream": f"http://{NAME}:8080", "resolvers": ("[::1]",)},
        "address-https": {"upstream": "https://127.0.0.1:8443", "upstream_ca": ca},
        "address-v6": {"upstream": "http://[::1]:8080"},
        "localhost": {"upstream": "https://localhost:8443", "resolve_at_start": True},
        "health": {"upstream": f"https://{NAME}", "resolvers": ("127.0.0.1",), "accept": accept,
                   "health_listen": "0.0.0.0:8081", "routes": ("/api/management/v1/useradm/",)},
    }  # fmt: skip
    for name, kwargs in shapes.items():
        checked = _nginx_t(tmp_path, render_nginx(_config(edge, **kwargs)))
        assert checked.returncode == 0, f"{name}: {checked.stderr}"
