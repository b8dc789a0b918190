"""Artifacts through the edge: a deployment's storage link is pointed at the edge, and the download is served by
it, only to the device it was given to, from an allowlisted storage host, with Range, and from one upstream fetch
when the cache is on.

Real nginx, a real ``edge serve`` process and device certificates made by the CLI; the devices are TLS clients
(http.client) with their certificate, as the Mender client is. Mender is the stand-in (tests/standin_mender.py),
storage a stand-in S3 that counts its fetches.
"""

from __future__ import annotations

import base64
import datetime as dt
import http.client
import json
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.conftest import imageprov_pki, need
from tests.edge_support import (
    AUTH_PATH,
    PASSWORD,
    USER,
    edge_service,
    free_port,
    get,
    nginx,
    running_standin,
    signed_request,
)
from tests.netns import device_namespace
from tests.standin_mender import StandinStorage

NEXT = "/api/devices/v1/deployments/device/deployments/next?artifact_name=release-1&device_type=raspberrypi4"
ARTIFACT = bytes(range(256)) * 4096 * 3  # 3 MiB, every byte position distinct modulo 256
OBJECT = "/mender-artifacts/tenant/0f3c-release-2.mender"


# Run inside the device's network namespace: one HTTPS request with the device's certificate, its answer as JSON
# (``cut``: read that many bytes of the body, then drop the connection, as a download cut halfway).
_CLIENT = r"""
import base64, http.client, json, ssl, sys
args = json.loads(sys.argv[1])
context = ssl.create_default_context(cafile=args["ca"])
context.load_cert_chain(args["cert"], args["key"])
connection = http.client.HTTPSConnection(args["host"], args["port"], context=context, timeout=60)
body = base64.b64decode(args["body"]) if args["body"] is not None else None
connection.request(args["method"], args["path"], body, args["headers"])
answer = connection.getresponse()
data = answer.read(args["cut"]) if args["cut"] else answer.read()
connection.close()
print(json.dumps({"status": answer.status, "headers": dict(answer.getheaders()),
                  "body": base64.b64encode(data).decode()}))
"""


@dataclass(frozen=True)
class Stack:
    port: int
    pki: Path
    devices: Path
    standin: Any
    storage: StandinStorage
    service: dict[str, Any]
    host: str = "localhost"
    # The pid of a process in the network namespace the devices run in (None: this one).
    netns: int | None = None

    def request(self, device: str, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None, cut: int = 0) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
        """One request through nginx with ``device``'s certificate and key, as the device makes it."""
        directory = self.devices / device
        ca, cert, key = self.pki / "ca-cert.pem", directory / "mender-cert.pem", directory / "mender-cert-private.pem"
        args = {"ca": str(ca), "cert": str(cert), "key": str(key), "host": self.host, "port": self.port,
                "method": method, "path": path, "headers": headers or {}, "cut": cut,
                "body": base64.b64encode(body).decode() if body is not None else None}  # fmt: skip
        if self.netns is None:
            context = ssl.create_default_context(cafile=str(ca))
            context.load_cert_chain(cert, key)
            connection = http.client.HTTPSConnection(self.host, self.port, context=context, timeout=60)
            try:
                connection.request(method, path, body, headers or {})
                answer = connection.getresponse()
                data = answer.read(cut) if cut else answer.read()
                return answer.status, dict(answer.getheaders()), data
            finally:
                connection.close()
        ran = subprocess.run(
            ["nsenter", "-t", str(self.netns), "-n", sys.executable, "-c", _CLIENT, json.dumps(args)],
            capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        found = json.loads(ran.stdout)
        return found["status"], found["headers"], base64.b64decode(found["body"])

    def token(self, device: str) -> str:
        """The device's JWT: its auth request through the edge, accepted at once."""
        from cryptography.hazmat.primitives import serialization

        key = serialization.load_pem_private_key((self.devices / device / "mender-cert-private.pem").read_bytes(), None)
        signed = signed_request(key, {"device_id": device})
        status, _, body = self.request(device, "POST", AUTH_PATH, signed.body, signed.headers)
        assert status == 200, body
        return body.decode()

    def next_link(self, device: str) -> tuple[int, dict[str, Any]]:
        """deployments/next as the device gets it; its status and instructions."""
        status, _, body = self.request(device, "GET", NEXT, headers={"Authorization": f"Bearer {self.token(device)}"})
        return status, (json.loads(body) if body else {})


def _expire(seconds: float) -> str:
    # Go's RFC 3339 with nanoseconds, as Mender writes it.
    when = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%f") + "123Z"


def _presigned(storage: StandinStorage, name: str = OBJECT, host: str | None = None) -> str:
    base = storage.url if host is None else f"http://{host}"
    return f"{base}{name}?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Expires=3600&X-Amz-Signature=abc123"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("artifacts") / "pki"
    imageprov_pki("ca", "init", path, "--cn", "Artifacts CA", "--org", "imageprov tests")
    imageprov_pki("server-cert", "--pki", path, "--host", "localhost", "--ip", "127.0.0.1",
                  "--out", path.parent / "server")  # fmt: skip
    for name in ("dev-a", "dev-b", *(f"fleet-{i}" for i in range(20))):
        imageprov_pki("device-cert", "--pki", path, "--device-id", name, "--out", path.parent / "devices" / name)
    return path


@contextmanager
def _stack(tmp_path: Path, pki: Path, *serve: str, pace: float = 0.0, listen: str = "127.0.0.1",
           server: Path | None = None, netns: tuple[int, str] | None = None) -> Iterator[Stack]:  # fmt: skip
    """Mender, storage, edge serve and nginx; with ``netns`` (a process in the devices' network namespace, and
    the edge's address there), devices reach nginx from that namespace at that address."""
    need("nginx")
    with ExitStack() as stack:
        standin = stack.enter_context(running_standin())
        storage = StandinStorage({OBJECT: ARTIFACT}, pace=pace).start()
        stack.callback(storage.stop)
        password = tmp_path / "password"
        password.write_text(PASSWORD)
        host = urlsplit(storage.url).netloc
        service = stack.enter_context(edge_service(
            tmp_path, "--pki", pki, "--upstream", standin.url, "--username", USER, "--password-file", password,
            "--artifact-host", host, "--artifact-key-file", tmp_path / "artifact-key", *serve))  # fmt: skip
        port = free_port()
        conf = imageprov_pki("edge", "nginx", "--pki", pki, "--server-cert", server or pki.parent / "server",
                             "--upstream", standin.url, "--listen", f"{listen}:{port}", "--accept", service["url"],
                             "--artifacts").stdout  # fmt: skip
        stack.enter_context(nginx(tmp_path, conf, port))
        host = "localhost" if netns is None else netns[1]
        pid = None if netns is None else netns[0]
        yield Stack(port, pki, pki.parent / "devices", standin, storage, service, host, pid)


@pytest.fixture(scope="module")
def direct(tmp_path_factory: pytest.TempPathFactory, pki: Path) -> Iterator[Stack]:
    """The edge streaming from storage (no cache)."""
    with _stack(tmp_path_factory.mktemp("direct"), pki) as stack:
        yield stack


def _artifact_path(link: str) -> str:
    parts = urlsplit(link)
    return parts.path


def test_the_link_points_at_the_edge_and_the_artifact_downloads_through_it(direct: Stack) -> None:
    direct.standin.deploy(_presigned(direct.storage), _expire(900))
    status, instructions = direct.next_link("dev-a")
    assert status == 200
    link = instructions["artifact"]["source"]["uri"]
    parts = urlsplit(link)
    # The host and port the device reached, and a path of the edge's; the storage link nowhere in sight.
    assert (parts.scheme, parts.netloc) == ("https", f"localhost:{direct.port}")
    assert parts.path.startswith("/imageprov/artifacts/") and direct.storage.url not in link
    # The link expires no later than the storage link did.
    expire = dt.datetime.fromisoformat(instructions["artifact"]["source"]["expire"])
    assert expire <= dt.datetime.now(dt.UTC) + dt.timedelta(seconds=901)
    status, headers, body = direct.request("dev-a", "GET", parts.path)
    assert status == 200 and body == ARTIFACT, (status, len(body))
    assert headers["Content-Length"] == str(len(ARTIFACT))
    metrics = _metrics(direct)
    assert metrics['imageprov_edge_artifact_links_total{result="rewritten"}'] >= 1
    assert metrics['imageprov_edge_artifact_bytes_total{source="storage"}'] >= len(ARTIFACT)


def test_a_cut_download_resumes_with_range(direct: Stack) -> None:
    direct.standin.deploy(_presigned(direct.storage), _expire(900))
    path = _artifact_path(direct.next_link("dev-a")[1]["artifact"]["source"]["uri"])
    # The device reads half, and the connection goes.
    status, _, first = direct.request("dev-a", "GET", path, cut=len(ARTIFACT) // 2)
    assert status == 200 and len(first) == len(ARTIFACT) // 2
    status, headers, rest = direct.request("dev-a", "GET", path, headers={"Range": f"bytes={len(first)}-"})
    assert status == 206
    assert headers["Content-Range"] == f"bytes {len(first)}-{len(ARTIFACT) - 1}/{len(ARTIFACT)}"
    assert first + rest == ARTIFACT


def test_a_link_to_a_host_off_the_allowlist_is_refused(direct: Stack) -> None:
    # The same storage under another name: not on --artifact-host.
    port = urlsplit(direct.storage.url).port
    direct.standin.deploy(_presigned(direct.storage, host=f"localhost:{port}"), _expire(900))
    status, answer = direct.next_link("dev-a")
    assert status == 502 and "storage host" in answer["error"]
    assert direct.storage.url not in json.dumps(answer) and f"localhost:{port}" not in json.dumps(answer)


def test_another_device_cannot_use_the_link(direct: Stack) -> None:
    direct.standin.deploy(_presigned(direct.storage), _expire(900))
    path = _artifact_path(direct.next_link("dev-a")[1]["artifact"]["source"]["uri"])
    fetched = direct.storage.fetches.get(OBJECT, 0)
    status, _, body = direct.request("dev-b", "GET", path)
    assert status == 403, body
    # A token altered by a byte is no token either.
    token = path.rsplit("/", 1)[1]
    forged = path[: -len(token)] + token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    assert direct.request("dev-a", "GET", forged)[0] == 403
    assert direct.storage.fetches.get(OBJECT, 0) == fetched  # storage never asked
    assert direct.request("dev-a", "GET", path)[0] == 200  # its own device still can


def test_an_expired_link_is_refused(direct: Stack) -> None:
    direct.standin.deploy(_presigned(direct.storage), _expire(-60))
    status, instructions = direct.next_link("dev-a")
    assert status == 200
    path = _artifact_path(instructions["artifact"]["source"]["uri"])
    fetched = direct.storage.fetches.get(OBJECT, 0)
    status, _, body = direct.request("dev-a", "GET", path)
    assert status == 403 and b"expired" in body
    assert direct.storage.fetches.get(OBJECT, 0) == fetched


def test_with_the_cache_twenty_devices_cause_one_storage_fetch(
    tmp_path_factory: pytest.TempPathFactory, pki: Path
) -> None:
    tmp_path = tmp_path_factory.mktemp("cached")
    cache = tmp_path / "cache"
    # Storage paced (about 1.5 s for the artifact) so that the twenty downloads overlap the one fetch.
    with _stack(tmp_path, pki, "--artifact-cache", str(cache), "--artifact-cache-size",
                str(64 * 1024 * 1024), pace=0.03) as stack:  # fmt: skip
        names = [f"fleet-{i}" for i in range(20)]
        stack.standin.deploy(_presigned(stack.storage), _expire(900))
        # Each device's own link (its own token, and Mender's presigned query could differ per device too).
        paths = {name: _artifact_path(stack.next_link(name)[1]["artifact"]["source"]["uri"]) for name in names}
        results: dict[str, tuple[int, bytes]] = {}
        start = threading.Barrier(len(names))

        def fetch(name: str) -> None:
            start.wait()
            status, _, body = stack.request(name, "GET", paths[name])
            results[name] = (status, body)

        threads = [threading.Thread(target=fetch, args=(name,)) for name in names]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert {name: (status, body == ARTIFACT) for name, (status, body) in results.items()} == {
            name: (200, True) for name in names
        }
        assert stack.storage.fetches == {OBJECT: 1}
        # A resumed download from the cache: Range served from the file, still no fetch.
        status, _, rest = stack.request("fleet-0", "GET", paths["fleet-0"], headers={"Range": "bytes=1000-"})
        assert status == 206 and rest == ARTIFACT[1000:]
        assert stack.storage.fetches == {OBJECT: 1}
        metrics = _metrics(stack)
        assert metrics['imageprov_edge_artifact_downloads_total{result="cache"}'] == 21
        assert metrics["imageprov_edge_artifact_storage_fetches_total"] == 1
        assert metrics['imageprov_edge_artifact_bytes_total{source="cache"}'] == 20 * len(ARTIFACT) + len(rest)


def _metrics(stack: Stack) -> dict[str, float]:
    """The service's Prometheus samples, by name and labels."""
    _, _, text = get(stack.service["url"] + "/metrics")
    samples = {}
    for line in text.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def test_the_key_file_is_made_private_shared_and_never_short(tmp_path: Path) -> None:
    from imageprov.edge.artifacts import load_key
    from imageprov.errors import UsageError

    path = tmp_path / "artifact-key"
    key = load_key(path)
    assert len(key) >= 32 and path.stat().st_mode & 0o777 == 0o600
    assert load_key(path) == key  # a second instance reads the same key
    short = tmp_path / "short"
    short.write_text("0123456789")
    with pytest.raises(UsageError) as refused:
        load_key(short)
    assert "0123456789" not in str(refused.value)


def test_nginx_sends_artifacts_to_the_service_only_with_accept(pki: Path) -> None:
    args: list[str | Path] = [
        "edge",
        "nginx",
        "--pki",
        pki,
        "--server-cert",
        pki.parent / "server",
        "--upstream",
        "http://127.0.0.1:1",
    ]
    refused = imageprov_pki(*args, "--artifacts", check=False)
    assert refused.returncode != 0 and "--accept" in refused.stderr
    conf = imageprov_pki(*args, "--artifacts", "--accept", "unix:/run/imageprov/edge.sock").stdout
    assert "location ^~ /imageprov/artifacts/ {" in conf
    assert "location = /api/devices/v1/deployments/device/deployments/next {" in conf


def test_in_a_namespace_that_reaches_only_the_edge_a_device_updates(
    tmp_path_factory: pytest.TempPathFactory, pki: Path
) -> None:
    tmp_path = tmp_path_factory.mktemp("netns")
    with device_namespace() as (pid, address):
        server = tmp_path / "server"
        imageprov_pki("server-cert", "--pki", pki, "--host", "localhost", "--ip", address, "--out", server)
        with _stack(tmp_path, pki, listen="0.0.0.0", server=server, netns=(pid, address)) as stack:
            storage_port = urlsplit(stack.storage.url).port
            stack.standin.deploy(_presigned(stack.storage), _expire(900))
            # Storage, as the device's namespace sees it: nothing answers (its 127.0.0.1 is its own).
            reach = subprocess.run(
                ["nsenter", "-t", str(pid), "-n", sys.executable, "-c",
                 f"import socket; socket.create_connection(('127.0.0.1', {storage_port}), timeout=3)"],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            assert reach.returncode != 0 and "ConnectionRefused" in reach.stderr
            status, instructions = stack.next_link("dev-a")
            assert status == 200
            link = urlsplit(instructions["artifact"]["source"]["uri"])
            assert link.netloc == f"{address}:{stack.port}"
            # Half, cut; then the rest with Range: the whole is the storage's artifact.
            status, _, first = stack.request("dev-a", "GET", link.path, cut=len(ARTIFACT) // 2)
            assert status == 200 and len(first) == len(ARTIFACT) // 2
            status, _, rest = stack.request("dev-a", "GET", link.path, headers={"Range": f"bytes={len(first)}-"})
            assert status == 206 and first + rest == ARTIFACT
            # Off the allowlist: refused there too.
            stack.standin.deploy(_presigned(stack.storage, host=f"localhost:{storage_port}"), _expire(900))
            assert stack.next_link("dev-a")[0] == 502
