"""Devices that come back, and the way out through a proxy (issue 25, items 2 and 4), in this process: the
service's application under aiohttp's test server, the stand-in Mender server in a thread, a real PKI and
registry made by the CLI, and (for the proxy) a forward proxy of a few lines on the test's own event loop.

Item 2: a warm edge skips preauthorization for a device it has seen accepted; when Mender refuses the
forwarded request (the device was decommissioned there, its key rotated, another edge left it pending), the
edge drops the entry, reads what Mender holds and retries once. A key that someone rejected in Mender stays
rejected (``checks.Readmission``). Two edges give the same answers whichever one the device reaches.

Item 4: ``HTTPS_PROXY``/``HTTP_PROXY`` carry every call to the Mender server, the device's forwarded
request and the management API's alike, unless ``NO_PROXY`` lists it. The server is named
``mender.invalid`` (RFC 6761: it resolves nowhere), which only the proxy maps to the stand-in: a device
accepted there proves that no call went around the proxy.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import re
import sqlite3
import ssl
from collections.abc import Awaitable, Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from yarl import URL

from imageprov.edge import http as edge_http
from imageprov.edge.checks import Readmission, readmission
from imageprov.edge.config import Flags, ServeSettings
from imageprov.edge.http import cut_off_revoked, make_app
from imageprov.edge.mender_client import AuthSet, MenderDevice, bypassed, proxy_for
from imageprov.errors import UsageError
from tests.conftest import imageprov_pki
from tests.edge_support import (
    AUTH_PATH,
    PASSWORD,
    USER,
    Device,
    escaped,
    make_device,
    post,
    public_pem,
    running_standin,
    signed_request,
)
from tests.standin_mender import StandinMender

Client = TestClient[Any, Any]
PROXY_VARIABLES = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")
NOWHERE = "mender.invalid"


@pytest.fixture(scope="module")
def standin() -> Iterator[StandinMender]:
    with running_standin() as server:
        yield server


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("comeback") / "pki"
    imageprov_pki("ca", "init", path, "--cn", "Comeback CA", "--org", "imageprov tests")
    return path


@pytest.fixture(autouse=True)
def no_ambient_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # The tests say which proxy the edge has; none from the machine running them.
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    # The service's own cut-off loop would race the tests' rounds.
    monkeypatch.setattr(edge_http, "CUT_INTERVAL", 3600.0)


def settings(tmp_path: Path, pki: Path, upstream: str, **flags: Any) -> ServeSettings:
    password = tmp_path / "password"
    password.write_text(PASSWORD)
    given = Flags(pki=pki, upstream=upstream, username=USER, password_file=password, timeout=15, **flags)
    return ServeSettings.from_sources(given, {})


def serve(configs: list[ServeSettings], steps: Callable[..., Awaitable[Any]]) -> Any:
    """Run ``steps`` with one test client per configuration: edges started side by side, one stand-in."""

    async def run() -> Any:
        clients = [TestClient(TestServer(make_app(config))) for config in configs]
        for client in clients:
            await client.start_server()
        try:
            return await steps(*clients)
        finally:
            for client in clients:
                await client.close()

    return asyncio.run(run())


async def auth(client: Client, device: Device, identity: dict[str, Any]) -> int:
    signed = signed_request(device.key, identity)
    headers = {**signed.headers, "X-SSL-Client-Cert": escaped(device.cert)}
    async with client.post(AUTH_PATH, data=signed.body, headers=headers) as answer:
        await answer.read()
        return answer.status


async def readmitted(client: Client) -> dict[str, float]:
    """``imageprov_edge_readmitted_total`` by outcome, as /metrics shows it."""
    async with client.get("/metrics") as answer:
        text = (await answer.read()).decode()
    found = re.findall(r'^imageprov_edge_readmitted_total\{outcome="([a-z]+)"\} ([0-9.]+)$', text, re.MULTILINE)
    return {outcome: float(value) for outcome, value in found}


def forced(standin: StandinMender, identity: dict[str, Any], since: int = 0) -> list[bool]:
    """Whether each preauthorization of ``identity`` (from the ``since``-th on) carried ``force``."""
    mine = [p for p in standin.preauthorized if p["identity_data"] == identity]
    return [bool(p.get("force")) for p in mine[since:]]


def auth_sets(standin: StandinMender, identity: dict[str, Any]) -> dict[str, str]:
    """Mender's auth sets of the identity's device: public key PEM (stripped) -> status."""
    device = standin.device(identity)
    assert device is not None
    with standin.lock:
        return {a.pubkey.strip(): a.status for a in device.auth_sets}


def status_of(standin: StandinMender, identity: dict[str, Any]) -> str | None:
    device = standin.device(identity)
    return None if device is None else device.status


def pinned_mender_device(pki: Path, serial: str) -> str | None:
    with closing(sqlite3.connect(pki / "registry.sqlite")) as db:
        row = db.execute("SELECT mender_device_id FROM pins WHERE serial = ?", (serial,)).fetchone()
    return None if row is None else row[0]


# -- item 2: devices that come back --------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["pin", "attribute:device_id", "none"])
def test_a_decommissioned_device_is_accepted_again_through_a_warm_edge(
    tmp_path: Path, pki: Path, standin: StandinMender, policy: str
) -> None:
    name = f"BACK-{policy[:4]}"
    device, identity = make_device(pki, name), {"device_id": name}

    async def steps(edge: Client) -> list[Any]:
        seen: list[Any] = [await auth(edge, device, identity), await auth(edge, device, identity)]
        before = standin.device(identity)
        assert before is not None
        await asyncio.to_thread(standin.decommission_device, identity)
        # The edge skips preauthorization (cached); Mender, which forgot the device, makes it anew, pending,
        # and refuses: the edge reads that and preauthorizes the key with force, then retries once.
        seen.append(await auth(edge, device, identity))
        after = standin.device(identity)
        assert after is not None and after.id != before.id
        seen += [after.status, await readmitted(edge)]
        if policy == "pin":
            # The registry follows the device to its new id in Mender, or a revocation could not cut it off.
            seen.append(pinned_mender_device(pki, device.serial) == after.id)
            imageprov_pki("revoke", "--pki", pki, name)
            seen += [await cut_off_revoked(edge.server.app), after.status, await auth(edge, device, identity)]
        return seen

    decided = serve([settings(tmp_path, pki, standin.url, identity=policy)], steps)
    assert decided[:5] == [200, 200, 200, "accepted", {"force": 1.0}]
    assert forced(standin, identity) == [False, False, True]  # first contact; after the refusal; forced
    if policy == "pin":
        # Cut off in Mender, refused here, and never forced back: the revocation is checked before anything.
        assert decided[5:] == [True, 1, "rejected", 401]
        assert forced(standin, identity) == [False, False, True]


@pytest.mark.parametrize("first", ["warm", "cold", "stranded"])
def test_the_answer_does_not_depend_on_which_edge_answers(
    tmp_path: Path, pki: Path, standin: StandinMender, first: str
) -> None:
    """Two edges on one registry and one Mender: the warm one has accepted the device, the cold one never
    saw it. After a decommission, whichever the device reaches first accepts it, and so does the other;
    also when something reached Mender first and left the device pending there (a device that bypassed the
    edge, or an edge of the old kind that forwarded without preauthorizing)."""
    name = f"TWO-{first}"
    device, identity = make_device(pki, name), {"device_id": name}

    async def steps(warm: Client, cold: Client) -> list[int]:
        assert await auth(warm, device, identity) == 200
        await asyncio.to_thread(standin.decommission_device, identity)
        if first == "stranded":
            signed = signed_request(device.key, identity)
            assert (await asyncio.to_thread(post, standin.url + AUTH_PATH, signed.body, signed.headers))[0] == 401
            assert status_of(standin, identity) == "pending"
        order = [warm, cold] if first == "warm" else [cold, warm]
        return [await auth(edge, device, identity) for edge in order]

    config = settings(tmp_path, pki, standin.url)
    assert serve([config, config], steps) == [200, 200]
    assert status_of(standin, identity) == "accepted"


def test_a_device_rejected_in_mender_stays_rejected_until_an_operator_accepts_it(
    tmp_path: Path, pki: Path, standin: StandinMender
) -> None:
    """Someone rejected the device in Mender while its certificate is good: both edges, warm, ask Mender
    again, see the rejection, and leave it (no force); once an operator accepts it there, both pass it."""
    device, identity = make_device(pki, "REJ-1"), {"device_id": "REJ-1"}

    async def steps(a: Client, b: Client) -> list[Any]:
        seen: list[Any] = [await auth(a, device, identity), await auth(b, device, identity)]
        seen.append(await asyncio.to_thread(standin.set_auth_status, identity, "rejected"))
        # a and b skip preauthorization (cached), are refused, and read Mender: rejected. a again: cold now.
        seen += [await auth(a, device, identity), await auth(b, device, identity), await auth(a, device, identity)]
        seen += [await readmitted(a), await readmitted(b), forced(standin, identity)]
        seen.append(await asyncio.to_thread(standin.set_auth_status, identity, "accepted"))
        return [*seen, await auth(a, device, identity), await auth(b, device, identity)]

    config = settings(tmp_path, pki, standin.url)
    assert serve([config, config], steps) == [
        200, 200, 204,
        401, 401, 401,
        {"rejected": 2.0}, {"rejected": 1.0}, [False] * 5,
        204, 200, 200,
    ]  # fmt: skip
    assert set(auth_sets(standin, identity).values()) == {"accepted"}


@pytest.mark.parametrize("policy", ["pin", "attribute:device_id"])
@pytest.mark.parametrize("rejected_first", [False, True], ids=["accepted", "rejected"])
def test_a_reissued_certificate_takes_its_identity_over_with_force(
    tmp_path: Path, pki: Path, standin: StandinMender, policy: str, rejected_first: bool
) -> None:
    """Key rotation: a reissued certificate (same device id, a new key) is accepted on its first request,
    its key preauthorized with force, the old key rejected in Mender. Also after an operator rejected the
    old key there: a new certificate is the PKI's deliberate act, which brings the device back."""
    name = f"ROT-{policy[:4]}-{int(rejected_first)}"
    identity = {"device_id": name}
    old = make_device(pki, name)
    config = settings(tmp_path, pki, standin.url, identity=policy)
    assert serve([config], lambda edge: auth(edge, old, identity)) == 200
    if rejected_first:
        assert standin.set_auth_status(identity, "rejected") == 204
    new = make_device(pki, name, "--reissue")

    async def steps(edge: Client) -> list[int]:
        return [await auth(edge, new, identity), await auth(edge, new, identity), await auth(edge, old, identity)]

    assert serve([config], steps) == [200, 200, 401]  # the old certificate was superseded: revoked
    sets = auth_sets(standin, identity)
    assert sets == {public_pem(old.key).strip(): "rejected", public_pem(new.key).strip(): "accepted"}
    # pin knows the identity moved (the registry's repin) and forces at once; attribute learns it from Mender.
    assert forced(standin, identity, since=1) == ([True] if policy == "pin" else [False, True])


def test_an_identity_is_never_forced_from_another_key_without_a_binding(
    tmp_path: Path, pki: Path, standin: StandinMender
) -> None:
    """``--identity none``: any certificate of the fleet may claim any identity. Claiming one that another
    key holds in Mender gets 401, and the edge never uses force for it: the holder stays accepted."""
    holder, claimant = make_device(pki, "HELD-1"), make_device(pki, "HELD-2")
    identity = {"device_id": "HELD-1"}

    async def steps(edge: Client) -> list[Any]:
        return [await auth(edge, holder, identity), await auth(edge, claimant, identity),
                await auth(edge, claimant, identity), await readmitted(edge)]  # fmt: skip

    config = settings(tmp_path, pki, standin.url, identity="none")
    assert serve([config], steps) == [200, 401, 401, {"contested": 2.0}]
    assert forced(standin, identity) == [False, False, False]
    assert auth_sets(standin, identity) == {
        public_pem(holder.key).strip(): "accepted",
        public_pem(claimant.key).strip(): "pending",
    }


_OURS, _THEIRS = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())


def _mender(*sets: tuple[Any, str], decommissioning: bool = False) -> MenderDevice:
    auth = tuple(AuthSet(f"a{i}", status, public_pem(key)) for i, (key, status) in enumerate(sets))
    return MenderDevice("d", "any", decommissioning, auth)


@pytest.mark.parametrize(
    ("device", "bound", "expected"),
    [
        (None, True, Readmission.GONE),
        (_mender((_OURS, "pending"), decommissioning=True), True, Readmission.DECOMMISSIONING),
        (_mender((_OURS, "rejected")), True, Readmission.REJECTED),
        (_mender((_OURS, "rejected"), (_THEIRS, "accepted")), True, Readmission.REJECTED),
        (_mender((_OURS, "accepted")), False, Readmission.RETRY),
        (_mender((_OURS, "preauthorized")), False, Readmission.RETRY),
        (_mender((_OURS, "pending")), False, Readmission.FORCE),  # decommissioned, then made anew by the request
        (_mender(), False, Readmission.FORCE),
        (_mender((_OURS, "pending"), (_THEIRS, "rejected")), False, Readmission.FORCE),
        (_mender((_OURS, "pending"), (_THEIRS, "pending")), False, Readmission.FORCE),
        (_mender((_OURS, "pending"), (_THEIRS, "accepted")), True, Readmission.FORCE),  # a reissued certificate
        (_mender((_OURS, "pending"), (_THEIRS, "accepted")), False, Readmission.CONTESTED),
        (_mender((_THEIRS, "preauthorized")), False, Readmission.CONTESTED),
    ],
)
def test_what_mender_holds_decides_the_readmission(device: MenderDevice | None, bound: bool, expected: Any) -> None:
    assert readmission(device, _OURS.public_key(), bound=bound) is expected


# -- item 4: the way out through a proxy --------------------------------------------------------------------


class ForwardProxy:
    """An HTTP forward proxy: CONNECT tunnels and absolute-form requests, piped as they are. It records the
    first request of each connection (method, target, Proxy-Authorization) and maps ``hosts`` (a name that
    resolves nowhere) to an address."""

    def __init__(self, hosts: dict[str, str]) -> None:
        self.hosts = hosts
        self.seen: list[tuple[str, str, str | None]] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> ForwardProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            line, *fields = head.decode("latin-1").removesuffix("\r\n\r\n").split("\r\n")
            method, target, _ = line.split(" ")
            own = [f for f in fields if f.lower().startswith("proxy-authorization:")]
            auth = own[0].split(":", 1)[1].strip() if own else None
            self.seen.append((method, target, auth))
            where = URL(f"//{target}") if method == "CONNECT" else URL(target)
            host = where.host or ""
            up_reader, up_writer = await asyncio.open_connection(self.hosts.get(host, host), where.port or 80)
            if method == "CONNECT":
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:  # the server takes the absolute form (RFC 9112, 3.2.2); the proxy's own header stays here
                kept = [f for f in fields if f not in own]
                up_writer.write("\r\n".join([line, *kept, "", ""]).encode("latin-1"))
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    except ConnectionError:
        pass
    finally:
        sink.close()


def _tls_for(tmp_path: Path, host: str) -> tuple[ssl.SSLContext, Path]:
    """A CA and a server certificate for ``host``: the stand-in's TLS context, and the CA file for the edge."""
    now = dt.datetime.now(dt.UTC)

    def certificate(subject: str, key: Any, issuer: x509.Name, signer: Any, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])).issuer_name(issuer)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        )  # fmt: skip
        if ca:
            usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
            builder = builder.add_extension(usage, critical=True)
        else:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False
            )
        return builder.sign(signer, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Stand-in Mender CA")])
    ca = certificate("Stand-in Mender CA", ca_key, ca_name, ca_key, True)
    server = certificate(host, server_key, ca_name, ca_key, False)
    ca_file, chain, key_file = tmp_path / "upstream-ca.pem", tmp_path / "server.pem", tmp_path / "server.key"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    chain.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(chain, key_file)
    return context, ca_file


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_every_upstream_call_goes_through_the_proxy(
    tmp_path: Path, pki: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, scheme: str
) -> None:
    """Through the proxy only (the server's name resolves nowhere else): login, preauthorization, the
    forwarded auth request, the readiness probe, and the cut-off's reads and rejections. The proxy's
    credentials reach it as Proxy-Authorization and never a log line."""
    tls, upstream_ca = _tls_for(tmp_path, NOWHERE) if scheme == "https" else (None, None)
    device, other = make_device(pki, f"PROXY-{scheme}"), make_device(pki, f"PROXY-{scheme}-2")
    identity = {"device_id": device.name}
    with running_standin(tls=tls) as standin:
        port = URL(standin.url).port

        async def steps(edge: Client) -> list[Any]:
            seen: list[Any] = [await auth(edge, device, identity), await auth(edge, other, {"device_id": other.name})]
            async with edge.get("/healthz") as answer:
                seen.append(answer.status)
            imageprov_pki("revoke", "--pki", pki, device.name)
            return [*seen, await cut_off_revoked(edge.server.app)]

        async def through_proxy() -> tuple[list[Any], ForwardProxy]:
            async with ForwardProxy({NOWHERE: "127.0.0.1"}) as proxy:
                variable = "HTTPS_PROXY" if scheme == "https" else "HTTP_PROXY"
                monkeypatch.setenv(variable, f"http://edge:s3cret@127.0.0.1:{proxy.port}")
                config = settings(tmp_path, pki, f"{scheme}://{NOWHERE}:{port}", upstream_ca=upstream_ca)
                async with TestClient(TestServer(make_app(config))) as edge:
                    return await steps(edge), proxy

        with caplog.at_level("INFO", logger="imageprov.edge"):
            decided, proxy = asyncio.run(through_proxy())
        assert decided == [200, 200, 200, 1]
        assert status_of(standin, identity) == "rejected"
    credentials = "Basic " + base64.b64encode(b"edge:s3cret").decode()
    assert proxy.seen and all(auth == credentials for _, _, auth in proxy.seen)
    if scheme == "https":
        assert {(method, target) for method, target, _ in proxy.seen} == {("CONNECT", f"{NOWHERE}:{port}")}
    else:
        assert all(target.startswith(f"http://{NOWHERE}:{port}/api/") for _, target, _ in proxy.seen)
    assert f"through the proxy http://127.0.0.1:{proxy.port}" in caplog.text
    assert "s3cret" not in caplog.text


@pytest.mark.parametrize("no_proxy", [NOWHERE, ".invalid", f"example.com, {NOWHERE}:{{port}}", "*"])
def test_no_proxy_sends_the_calls_around_the_proxy(
    tmp_path: Path, pki: Path, standin: StandinMender, monkeypatch: pytest.MonkeyPatch, no_proxy: str
) -> None:
    """The same edge with the server in NO_PROXY: it connects directly, so the name that only the proxy
    knows does not resolve (503, try again), and the proxy sees nothing."""
    device = make_device(pki, f"DIRECT-{len(no_proxy)}")
    port = URL(standin.url).port

    async def run() -> tuple[int, list[Any]]:
        async with ForwardProxy({NOWHERE: "127.0.0.1"}) as proxy:
            monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
            monkeypatch.setenv("NO_PROXY", no_proxy.format(port=port))
            config = settings(tmp_path, pki, f"http://{NOWHERE}:{port}")
            async with TestClient(TestServer(make_app(config))) as edge:
                return await auth(edge, device, {"device_id": device.name}), proxy.seen

    assert asyncio.run(run()) == (503, [])


def test_a_server_on_loopback_is_never_proxied(
    tmp_path: Path, pki: Path, standin: StandinMender, monkeypatch: pytest.MonkeyPatch
) -> None:
    device = make_device(pki, "LOOP-1")

    async def run() -> tuple[int, list[Any]]:
        async with ForwardProxy({}) as proxy:
            monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
            async with TestClient(TestServer(make_app(settings(tmp_path, pki, standin.url)))) as edge:
                return await auth(edge, device, {"device_id": device.name}), proxy.seen

    assert asyncio.run(run()) == (200, [])


@pytest.mark.parametrize(
    ("host", "port", "no_proxy", "expected"),
    [
        ("mender.io", 443, "mender.io", True),
        ("hosted.mender.io", 443, "mender.io", True),
        ("hosted.mender.io", 443, ".mender.io", True),
        ("mender.io", 443, ".mender.io", False),  # a leading dot: subdomains only, as Go has it
        ("notmender.io", 443, "mender.io", False),
        ("hosted.mender.io", 443, "hosted.mender.io:8443", False),
        ("hosted.mender.io", 443, "hosted.mender.io:443", True),
        ("HOSTED.Mender.IO", 443, " other.io , mender.io ", True),
        ("10.1.2.3", 443, "10.0.0.0/8", True),
        ("10.1.2.3", 443, "10.1.2.4", False),
        ("::1", 443, "[::1]:443", True),
        ("anything", 443, "*", True),
        ("anything", 443, "", False),
    ],
)
def test_no_proxy_is_read_as_go_reads_it(host: str, port: int, no_proxy: str, expected: bool) -> None:
    assert bypassed(host, port, no_proxy) is expected


def test_the_proxy_variables() -> None:
    https = "https://hosted.mender.io"
    assert str(proxy_for(https, {"HTTPS_PROXY": "http://u:p%40ss@proxy:3128"})) == "http://proxy:3128"
    found = proxy_for(https, {"HTTPS_PROXY": "http://u:p%40ss@proxy:3128"})
    assert found is not None and (found.url.user, found.url.password) == ("u", "p@ss")
    assert str(proxy_for(https, {"https_proxy": "proxy:3128", "HTTPS_PROXY": "http://other:1"})) == "http://proxy:3128"
    assert proxy_for(https, {"HTTP_PROXY": "http://proxy:3128"}) is None  # the http one is for http servers
    assert str(proxy_for("http://mender.lan", {"HTTP_PROXY": "http://proxy:3128"})) == "http://proxy:3128"
    assert proxy_for(https, {"HTTPS_PROXY": "http://proxy:3128", "no_proxy": "mender.io"}) is None
    assert proxy_for("https://localhost:8443", {"HTTPS_PROXY": "http://proxy:3128"}) is None
    assert proxy_for("https://127.0.0.2", {"HTTPS_PROXY": "http://proxy:3128"}) is None
    assert "p%40ss" not in repr(proxy_for(https, {"HTTPS_PROXY": "http://u:p%40ss@proxy:3128"}))
    with pytest.raises(UsageError, match="socks5://proxy:1080 is not an http"):
        proxy_for(https, {"HTTPS_PROXY": "socks5://u:secret@proxy:1080"})
