"""``imageprov edge nginx``: the configuration it writes, checked by real nginx (``nginx -t``), and real nginx
running it in front of two stand-ins: an "upstream" Mender server that answers 200 to everything and records
what reaches it, and an accept service on a Unix socket whose answer to ``CHECK`` the test sets."""

from __future__ import annotations

import asyncio
import datetime as dt
import http.client
import json
import re
import shutil
import ssl
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from imageprov.edge.nginx import AUTH_REQUESTS, CHECK, DEVICECONNECT, DEVICES, EdgeConfig, masked, render_nginx
from imageprov.errors import UsageError
from tests.conftest import imageprov, tool
from tests.edge_support import FleetCA, escaped, free_port, key_pem, nginx, pem

NEXT = "/api/devices/v1/deployments/device/deployments/next"
DEVAUTH = "/api/management/v2/devauth/devices"
UPSTREAM = "http://127.0.0.1:8080"


@dataclass(frozen=True)
class Edge:
    ca: FleetCA
    pki: Path
    server: Path
    device_cert: x509.Certificate
    device_cert_path: Path
    device_key_path: Path


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Edge:
    """A fleet CA, the edge's server certificate, and one device's certificate and key."""
    base = tmp_path_factory.mktemp("edge-nginx")
    ca = FleetCA()
    pki, server = ca.write_edge(base)
    cert, key = ca.issue("device-1")
    cert_path, key_path = base / "device-cert.pem", base / "device-key.pem"
    cert_path.write_text(pem(cert))
    key_path.write_bytes(key_pem(key))
    return Edge(ca, pki, server, cert, cert_path, key_path)


def _config(edge: Edge, upstream: str = UPSTREAM, **kwargs: Any) -> EdgeConfig:
    files = (edge.pki / "ca-cert.pem", edge.server / "server-cert.pem", edge.server / "server-private.key")
    return EdgeConfig(*files, upstream, listen="127.0.0.1:8443", **kwargs)


def _locations(text: str) -> dict[str, list[str]]:
    """Each location's directives, comments dropped, by what it matches."""
    found: dict[str, list[str]] = {}
    current: list[str] | None = None
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if current is None:
            opened = re.fullmatch(r"location (.+) \{", line)
            if opened:
                assert opened[1] not in found, f"location {opened[1]} twice"
                current = found[opened[1]] = []
        elif line == "}":
            current = None
        elif line:
            current.append(line)
    return found


def _to_upstream(locations: dict[str, list[str]]) -> dict[str, list[str]]:
    # An address goes in the upstream block that keeps connections to the Mender server alive.
    return {match: body for match, body in locations.items() if "proxy_pass http://imageprov_mender;" in body}


# -- the configuration --


def test_only_the_device_api_is_passed(edge: Edge) -> None:
    locations = _locations(render_nginx(_config(edge)))
    assert locations["/"] == ["return 404;"]
    assert set(_to_upstream(locations)) == {DEVICES, f"= {DEVICECONNECT}"}
    assert set(locations) == {"/", DEVICES, f"= {DEVICECONNECT}"}
    # Only mender-connect's socket may upgrade, and only it may stay open without a frame for long.
    connect, devices = locations[f"= {DEVICECONNECT}"], locations[DEVICES]
    assert "proxy_set_header Upgrade $http_upgrade;" in connect and "proxy_read_timeout 1h;" in connect
    assert "proxy_set_header Connection $imageprov_connection;" in connect
    assert not [line for line in devices if "Upgrade" in line or "timeout" in line]
    # One Connection header each (two would both be sent): none on the device API, so that its
    # connection goes back to the pool; the websocket's asks to upgrade.
    assert [line for line in devices if "Connection" in line] == ['proxy_set_header Connection "";']
    assert [line for line in connect if "Connection" in line] == ["proxy_set_header Connection $imageprov_connection;"]
    # Without the accept service there is nothing to ask.
    assert not [line for body in locations.values() for line in body if "auth_request" in line]

    routed = _locations(render_nginx(_config(edge, routes=("/api/management/v1/useradm/", "/api/x", "/api/x"))))
    assert set(_to_upstream(routed)) == {DEVICES, f"= {DEVICECONNECT}", "/api/management/v1/useradm/", "/api/x"}
    assert routed["/api/management/v1/useradm/"] == routed["/api/x"] == routed[DEVICES]


def test_with_accept_every_proxied_route_asks_the_service_first(edge: Edge) -> None:
    text = render_nginx(_config(edge, accept="unix:/run/imageprov/edge.sock", routes=("/api/management/",)))
    assert "server unix:/run/imageprov/edge.sock;" in text.splitlines()[text.splitlines().index(
        "    upstream imageprov_accept {") + 1]  # fmt: skip
    locations = _locations(text)
    proxied = _to_upstream(locations)
    assert set(proxied) == {DEVICES, f"= {DEVICECONNECT}", "/api/management/"}
    for match, body in proxied.items():
        assert f"auth_request {CHECK};" in body, match
        assert "error_page 500 = @imageprov_unavailable;" in body, match
    # The auth request goes to the service, which checks it itself.
    auth = locations[f"= {AUTH_REQUESTS}"]
    assert "proxy_pass http://imageprov_accept;" in auth and not [line for line in auth if "auth_request" in line]
    assert locations[f"= {CHECK}"][:2] == ["internal;", f"proxy_pass http://imageprov_accept{CHECK};"]
    for line in ("proxy_pass_request_body off;", 'proxy_set_header Content-Length "";',
                 "proxy_set_header X-SSL-Client-Cert $ssl_client_escaped_cert;",
                 "proxy_set_header X-Original-URI $request_uri;",
                 "proxy_set_header X-Original-Method $request_method;"):  # fmt: skip
        assert line in locations[f"= {CHECK}"]
    unavailable = locations["@imageprov_unavailable"]
    assert "add_header Retry-After 5 always;" in unavailable
    assert "default_type application/json;" in unavailable
    answer = next(line for line in unavailable if line.startswith("return 503 '"))
    assert set(json.loads(answer.removeprefix("return 503 '").removesuffix("';"))) == {"error"}
    # Why the check, and not ssl_crl alone, cuts a revoked device off.
    assert re.search(r"ssl_crl is read only\s+# when nginx starts or reloads", text)


def test_only_nginx_sets_the_certificate_header(edge: Edge) -> None:
    """Every location that proxies anywhere sets X-SSL-Client-Cert: from what nginx verified for the service,
    empty for the Mender server, so that a client's own never passes."""
    text = render_nginx(_config(edge, accept="http://127.0.0.1:9080", routes=("/api/management/",)))
    proxying = {match: body for match, body in _locations(text).items() if any("proxy_pass" in x for x in body)}
    assert len(proxying) == 5
    for match, body in proxying.items():
        headers = [line for line in body if line.startswith("proxy_set_header X-SSL-Client-Cert ")]
        to_service = any("imageprov_accept" in line for line in body if line.startswith("proxy_pass "))
        expected = "$ssl_client_escaped_cert;" if to_service else '"";'
        assert headers == [f"proxy_set_header X-SSL-Client-Cert {expected}"], match


@pytest.mark.parametrize(
    ("accept", "server"),
    [
        ("unix:/run/imageprov/edge.sock", "unix:/run/imageprov/edge.sock"),
        ("http://127.0.0.1:9080", "127.0.0.1:9080"),
        ("http://[::1]:9080/", "[::1]:9080"),
    ],
)
def test_accept_takes_a_unix_socket_or_an_address(edge: Edge, accept: str, server: str) -> None:
    assert f"        server {server};" in render_nginx(_config(edge, accept=accept)).splitlines()


@pytest.mark.parametrize(
    "accept",
    ["unix:run/edge.sock", "unix:/run/a b.sock", "unix:/run/x;y", "unix:/run/$x", "unix:", "unix:/" + "a" * 107,
     "http://127.0.0.1:9080/x", "https://127.0.0.1:9080", "127.0.0.1:9080", "http://h:port"],
)  # fmt: skip
def test_a_bad_accept_address_is_refused(edge: Edge, accept: str) -> None:
    with pytest.raises(UsageError):
        render_nginx(_config(edge, accept=accept))


@pytest.mark.parametrize(
    "route", ["api/x/", "/", "/api/devices/", "/api/devices/v2/", "/_imageprov/", "/a b", "/a;", "/a/../b", "//a",
              "/a%20", "/$x", "/a{"],
)  # fmt: skip
def test_a_bad_route_is_refused(edge: Edge, route: str) -> None:
    with pytest.raises(UsageError):
        render_nginx(_config(edge, routes=(route,)))


def test_an_upstream_with_a_path_is_refused(edge: Edge) -> None:
    # proxy_pass with a path would put it in place of each location's prefix.
    with pytest.raises(UsageError, match="has a path"):
        render_nginx(_config(edge, upstream="https://mender.example.com/mender"))
    text = render_nginx(_config(edge, upstream="https://mender.example.com/", resolvers=("127.0.0.1",)))
    assert 'set $imageprov_mender "https://mender.example.com";' in text and "proxy_pass $imageprov_mender;" in text


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://user:pw@host", "http://user:***@host"),
        ("https://user:p:w@host:8443/x?y", "https://user:***@host:8443/x?y"),
        ("https://token@host", "https://***@host"),
        ("user:pw@127.0.0.1:9080", "user:***@127.0.0.1:9080"),
        ("http://u:pa[ss]@host", "http://u:***@host"),
        ("http://host/a@b", "http://host/a@b"),
        ("https://[::1", "https://[::1"),
    ],
)
def test_masked(url: str, shown: str) -> None:
    assert masked(url) == shown


@pytest.mark.parametrize(
    ("option", "url", "secret", "shown"),
    [
        ("--upstream", "http://user:s3cret-pw@mender.example.com", "s3cret-pw", "http://user:***@mender.example.com"),
        ("--upstream", "https://t0ken-secret@hosted.mender.io", "t0ken-secret", "https://***@hosted.mender.io"),
        ("--accept", "http://edge:s3cret-pw@127.0.0.1:9080", "s3cret-pw", "http://edge:***@127.0.0.1:9080"),
        ("--accept", "edge:s3cret-pw@127.0.0.1:9080", "s3cret-pw", "edge:***@127.0.0.1:9080"),
        # urlsplit raises on these; its own message would quote 'ss99', part of the password.
        ("--upstream", "http://u:pa[ss99]@mender.example.com", "ss99", "http://u:***@mender.example.com"),
        ("--upstream", "https://u:s3cret-pw@[::1", "s3cret-pw", "https://u:***@[::1"),
        ("--upstream", "https://[::1", None, "https://[::1"),
        ("--upstream", "http://[x", None, "http://[x"),
        ("--accept", "http://[x", None, "http://[x"),
    ],
)
@pytest.mark.parametrize("debug", [False, True], ids=["plain", "debug"])
def test_a_bad_url_is_one_line_that_never_shows_a_password(
    edge: Edge, option: str, url: str, secret: str | None, shown: str, debug: bool
) -> None:
    upstream = url if option == "--upstream" else UPSTREAM
    args: list[str | Path] = ["edge", "nginx", "--pki", edge.pki, "--server-cert", edge.server, "--upstream", upstream]
    args += ["--accept", url] if option == "--accept" else []
    result = imageprov(*(["--debug"] if debug else []), *args, check=False)
    assert result.returncode == 2 and result.stdout == ""
    if secret is not None:
        assert secret not in result.stderr
    if debug:
        # --debug shows the traceback of our error, never the ValueError under it.
        assert "ValueError" not in result.stderr
    else:
        assert len(result.stderr.splitlines()) == 1, result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"imageprov: error: {option} {shown}"), last


def _crl(ca: FleetCA) -> bytes:
    now = dt.datetime.now(dt.UTC)
    builder = x509.CertificateRevocationListBuilder().issuer_name(ca.name)
    builder = builder.last_update(now - dt.timedelta(hours=1)).next_update(now + dt.timedelta(days=1))
    return builder.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_real_nginx_takes_every_shape(edge: Edge, tmp_path: Path) -> None:
    crl = tmp_path / "crl.pem"
    crl.write_bytes(_crl(edge.ca))
    shapes: dict[str, dict[str, Any]] = {
        "plain": {},
        "https-upstream": {"upstream": "https://127.0.0.1:8443", "upstream_ca": edge.pki / "ca-cert.pem"},
        "accept-tcp": {"accept": "http://127.0.0.1:9080", "crl": crl},
        "accept-unix": {"accept": "unix:/run/imageprov/edge.sock", "routes": ("/api/management/v1/useradm/",)},
        "routes-no-accept": {"routes": ("/api/management/v1/useradm/", "/api/management/v2/devauth/")},
    }
    for name, kwargs in shapes.items():
        conf = tmp_path / f"{name}.conf"
        conf.write_text(render_nginx(_config(edge, **kwargs)))
        checked = tool("nginx", "-t", "-p", tmp_path, "-c", conf, check=False)
        assert checked.returncode == 0, f"{name}: {checked.stderr.decode()}"


# -- real nginx in front of the stand-ins --


@dataclass
class Standins:
    """What the stand-ins saw, and what the service's check answers (set by the test)."""

    socket: Path
    upstream_port: int = field(default_factory=free_port)
    check_status: int = 204
    upstream_seen: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    service_seen: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)

    @property
    def upstream_url(self) -> str:
        return f"http://127.0.0.1:{self.upstream_port}"

    async def upstream(self, request: web.Request) -> web.StreamResponse:
        self.upstream_seen.append((request.method, request.path_qs, dict(request.headers)))
        ws = web.WebSocketResponse()
        if not ws.can_prepare(request).ok:
            return web.json_response({"path": request.path})
        await ws.prepare(request)
        async for message in ws:
            if message.type is aiohttp.WSMsgType.TEXT:
                await ws.send_str(f"echo: {message.data}")
        return ws

    async def service(self, request: web.Request) -> web.Response:
        self.service_seen.append((request.method, request.path_qs, dict(request.headers), await request.read()))
        if request.path == CHECK:
            return web.Response(status=self.check_status)
        return web.json_response({"from": "service"})

    def upstream_paths(self) -> list[str]:
        return [path for _, path, _ in self.upstream_seen]


@contextmanager
def _standins() -> Iterator[Standins]:
    # A short path (sun_path is 108 bytes) that nginx's worker user, not root, can reach: as in production,
    # the service's socket must be writable by it.
    socket_dir = Path(tempfile.mkdtemp(prefix="imageprov-edge-"))
    socket_dir.chmod(0o755)
    state = Standins(socket_dir / "service.sock")
    loop = asyncio.new_event_loop()
    runners: list[web.AppRunner] = []
    ready = threading.Event()

    async def start() -> None:
        upstream, service = web.Application(), web.Application()
        upstream.router.add_route("*", "/{tail:.*}", state.upstream)
        service.router.add_route("*", "/{tail:.*}", state.service)
        for app in (upstream, service):
            runners.append(web.AppRunner(app, access_log=None))
            await runners[-1].setup()
        await web.TCPSite(runners[0], "127.0.0.1", state.upstream_port).start()
        await web.UnixSite(runners[1], str(state.socket)).start()
        state.socket.chmod(0o666)

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True, name="edge-nginx-standins")
    thread.start()
    try:
        assert ready.wait(30), "the stand-ins did not start"
        yield state
    finally:
        for runner in runners:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()
        shutil.rmtree(socket_dir, ignore_errors=True)


@pytest.fixture
def standins() -> Iterator[Standins]:
    with _standins() as state:
        yield state


@contextmanager
def _running_edge(tmp_path: Path, edge: Edge, standins: Standins, *routes: str) -> Iterator[int]:
    """Real nginx with the configuration ``imageprov edge nginx`` prints; yields its port."""
    port = free_port()
    args: list[str | Path] = ["edge", "nginx", "--pki", edge.pki, "--server-cert", edge.server]
    args += [
        "--upstream",
        standins.upstream_url,
        "--listen",
        f"127.0.0.1:{port}",
        "--accept",
        f"unix:{standins.socket}",
    ]
    for route in routes:
        args += ["--route", route]
    with nginx(tmp_path, imageprov(*args).stdout, port):
        yield port


def _context(edge: Edge) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(edge.pki / "ca-cert.pem"))
    context.load_cert_chain(edge.device_cert_path, edge.device_key_path)
    return context


def _request(
    edge: Edge, port: int, method: str, path: str, headers: dict[str, str] | None = None, body: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One request as the device makes it, over TLS with its certificate: (status, headers, body)."""
    connection = http.client.HTTPSConnection("localhost", port, context=_context(edge), timeout=30)
    try:
        connection.request(method, path, body, headers or {})
        answer = connection.getresponse()
        return answer.status, dict(answer.headers), answer.read()
    finally:
        connection.close()


def test_the_check_decides_what_reaches_the_upstream(tmp_path: Path, edge: Edge, standins: Standins) -> None:
    query = f"{NEXT}?artifact_name=a&device_type=b"
    with _running_edge(tmp_path, edge, standins) as port:
        # Allowed: passed on, and the check saw what nginx verified, not what the client claimed.
        spoofed = {"X-SSL-Client-Cert": "spoofed", "Authorization": "Bearer device-token"}
        assert _request(edge, port, "GET", query, spoofed)[0] == 200
        assert standins.upstream_paths() == [query]
        upstream_headers = {k.lower(): v for k, v in standins.upstream_seen[0][2].items()}
        assert "x-ssl-client-cert" not in upstream_headers and upstream_headers["x-ssl-client-verify"] == "SUCCESS"
        method, path, seen, body = standins.service_seen[-1]
        assert (method, path, body) == ("GET", CHECK, b"")
        assert seen["X-SSL-Client-Cert"] == escaped(edge.device_cert)
        assert (seen["X-Original-URI"], seen["X-Original-Method"]) == (query, "GET")
        assert seen["Authorization"] == "Bearer device-token"

        # A request with a body: the check gets neither the body nor its length.
        status, _, _ = _request(edge, port, "PATCH", "/api/devices/v1/inventory/device/attributes", body=b"[]")
        assert status == 200 and standins.upstream_seen[-1][0] == "PATCH"
        method, _, seen, body = standins.service_seen[-1]
        assert (method, body, seen["X-Original-Method"]) == ("GET", b"", "PATCH") and "Content-Length" not in seen

        reached = len(standins.upstream_seen)
        for refusal in (403, 401):
            standins.check_status = refusal
            assert _request(edge, port, "GET", NEXT)[0] == refusal
        # The check cannot decide (500, 503) or gives nonsense (200 is allowed, 302 is not): the device
        # gets 503, JSON, and when to retry.
        for failure in (500, 503, 302):
            standins.check_status = failure
            status, headers, body = _request(edge, port, "GET", NEXT)
            assert status == 503 and headers["Retry-After"] == "5", failure
            assert headers["Content-Type"] == "application/json" and set(json.loads(body)) == {"error"}
        assert len(standins.upstream_seen) == reached

        # The auth request goes to the service (which makes its own checks), never through the check.
        checks = len(standins.service_seen)
        assert _request(edge, port, "POST", AUTH_REQUESTS, {"Content-Type": "application/json"}, b"{}")[0] == 200
        assert [s[1] for s in standins.service_seen[checks:]] == [AUTH_REQUESTS]
        assert len(standins.upstream_seen) == reached


def test_other_paths_are_404_unless_routed(tmp_path: Path, edge: Edge, standins: Standins) -> None:
    with _running_edge(tmp_path, edge, standins) as port:
        for path in (DEVAUTH, "/", "/ui/", "/api/management/v1/useradm/auth/login", CHECK, "/api/devicesx"):
            assert _request(edge, port, "GET", path)[0] == 404, path
        assert standins.upstream_seen == [] and standins.service_seen == []

    with _running_edge(tmp_path, edge, standins, "/api/management/v2/devauth/") as port:
        assert _request(edge, port, "GET", DEVAUTH)[0] == 200
        assert standins.upstream_paths() == [DEVAUTH]
        assert [s[2]["X-Original-URI"] for s in standins.service_seen] == [DEVAUTH]
        standins.check_status = 403
        assert _request(edge, port, "GET", DEVAUTH)[0] == 403
        # Only the route named: the rest of the management API and the UI stay closed.
        assert _request(edge, port, "GET", "/api/management/v1/useradm/users")[0] == 404
        assert _request(edge, port, "GET", "/")[0] == 404
        assert standins.upstream_paths() == [DEVAUTH]


def test_deviceconnect_websocket_is_passed(tmp_path: Path, edge: Edge, standins: Standins) -> None:
    async def talk(port: int, path: str) -> str:
        url = f"wss://localhost:{port}{path}"
        async with aiohttp.ClientSession() as session, session.ws_connect(url, ssl=_context(edge)) as ws:
            await ws.send_str("hello")
            message = await ws.receive(timeout=30)
            return str(message.data)

    with _running_edge(tmp_path, edge, standins) as port:
        assert asyncio.run(talk(port, DEVICECONNECT)) == "echo: hello"
        assert standins.upstream_seen[-1][2]["Upgrade"].lower() == "websocket"
        assert standins.service_seen[-1][2]["X-Original-URI"] == DEVICECONNECT
        # No other device route upgrades: the upstream sees a plain request and answers it as one.
        with pytest.raises(aiohttp.WSServerHandshakeError):
            asyncio.run(talk(port, "/api/devices/v1/other/connect"))
        assert "Upgrade" not in standins.upstream_seen[-1][2]
        # A revoked device's socket is refused before it opens.
        standins.check_status = 403
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            asyncio.run(talk(port, DEVICECONNECT))
        assert refused.value.status == 403
