"""End to end: stamped images, a real nginx mTLS edge from `imageprov edge nginx`, and the real Mender client.

The client runs with the mender.conf, key and certificate read out of each
stamped image with debugfs (not imageprov's own reader); the device paths in mender.conf
(/data/mender/...) are mapped into a temporary root, and ServerURL points at
the edge, which proxies to a small local upstream that records what reaches it.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from imageprov.disk.golden import Scheme
from tests.conftest import debugfs, imageprov_pki, need, roles, tool

IDENTITY = Path("/usr/share/mender/identity/mender-device-identity")


def _free_port() -> int:
    """A free port below the kernel's ephemeral range, where no test's bind to port 0 can take it meanwhile.

    nginx binds it later than we look; a port from the ephemeral range could go
    to another xdist worker's client or server in between.
    """
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.Random(os.getpid()).sample(range(max(1024, low - 12000), low), 200):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below the ephemeral range")


class _Recorder(BaseHTTPRequestHandler):
    seen: ClassVar[list[dict[str, str | None]]] = []

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        _Recorder.seen.append(
            {
                "path": self.path,
                "dn": self.headers.get("X-SSL-Client-S-DN"),
                "verify": self.headers.get("X-SSL-Client-Verify"),
                "serial": self.headers.get("X-SSL-Client-Serial"),
                "sha1": self.headers.get("X-SSL-Client-SHA1"),
            }
        )
        # An accepted device gets a token, as the Mender server would answer.
        body = b"eyJhbGciOiJub25lIn0.eyJzdWIiOiJ0ZXN0In0."
        self.send_response(200)
        self.send_header("Content-Type", "application/jwt")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def upstream() -> Iterator[tuple[str, list[dict[str, str | None]]]]:
    _Recorder.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Recorder.seen
    server.shutdown()
    server.server_close()


@pytest.fixture
def identity_script() -> None:
    """The client runs the identity script at a fixed path; install one where the package has none.

    It stays installed: tests on two xdist workers may run the client at once,
    and one must not remove the script from under the other.
    """
    if IDENTITY.exists():
        return
    if not os.access(IDENTITY.parent, os.W_OK):
        pytest.fail(f"cannot write {IDENTITY}: the end-to-end test needs root (CI runs as root)")
    staged = IDENTITY.with_name(f".{IDENTITY.name}.{os.getpid()}")
    staged.write_text("#!/bin/sh\necho mac=02:00:00:00:00:01\n")
    staged.chmod(0o755)
    staged.replace(IDENTITY)  # atomic: a client never sees half a script


@pytest.fixture
def edge(tmp_path: Path, pki: Path, upstream: tuple[str, list[dict[str, str | None]]]) -> Iterator[dict[str, object]]:
    need("nginx")
    port = _free_port()
    server = tmp_path / "edge"
    imageprov_pki("server-cert", "--pki", pki, "--host", "localhost", "--ip", "127.0.0.1", "--out", server)
    yield {"port": port, "server": server, "upstream": upstream}


def _start_nginx(tmp_path: Path, conf_text: str) -> subprocess.Popen[bytes]:
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    conf = tmp_path / "nginx.conf"
    conf.write_text(conf_text)
    proc = subprocess.Popen(
        ["nginx", "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    return proc


# Upper bounds on waits for a condition, generous for a loaded machine: a wait ends as soon as the condition holds.
BOUND = 300


def _wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + BOUND
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"nginx exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("nginx did not start listening")


def _run_client(tmp_path: Path, image: Path, name: str, ca_cert: Path) -> subprocess.CompletedProcess[str]:
    """Run `mender bootstrap` with what the image holds, its device paths mapped under a temporary root."""
    root = tmp_path / f"device-{name}"
    (root / "var-lib-mender").mkdir(parents=True)
    layout = roles(image)
    conf = json.loads(debugfs(image, layout["rootfs-a"], "cat /etc/mender/mender.conf"))
    client = conf["HttpsClient"]
    assert client == {"Certificate": "/data/mender/mender-cert.pem", "Key": "/data/mender/mender-cert-private.pem"}
    for key in ("Certificate", "Key"):
        device_path = client[key]
        local = root / device_path.lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(debugfs(image, layout["data"], f"cat {device_path.removeprefix('/data')}"))
        client[key] = str(local)
    # The client signs its auth requests with the certificate's key (Security.AuthPrivateKey).
    assert conf["Security"]["AuthPrivateKey"] == "/data/mender/mender-cert-private.pem"
    conf["Security"]["AuthPrivateKey"] = client["Key"]
    conf["ServerCertificate"] = str(ca_cert)  # the edge's certificate is signed by the fleet CA
    (root / "mender.conf").write_text(json.dumps(conf))
    need("mender")
    return subprocess.run(
        ["mender", "--config", str(root / "mender.conf"), "--fallback-config", str(root / "fallback.conf"),
         "--data", str(root / "var-lib-mender"), "--no-syslog", "--log-level", "info", "bootstrap"],
        capture_output=True, text=True, timeout=BOUND, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def test_good_device_accepted_revoked_and_foreign_refused(
    tmp_path: Path,
    make_golden: object,
    pki: Path,
    edge: dict[str, object],
    identity_script: None,
) -> None:
    need("nginx", "mender")
    golden = make_golden(Scheme.MBR)  # type: ignore[operator]
    port = edge["port"]
    url = f"https://localhost:{port}"
    out = tmp_path / "out"
    imageprov_pki("stamp", golden, "--pki", pki, "--out", out, "--device-id", "good-1", "--device-id", "bad-1",
                  "--server-url", url, "--conf-target", "rootfs")  # fmt: skip
    imageprov_pki("revoke", "--pki", pki, "bad-1", "--reason", "key-compromise")
    imageprov_pki("crl", "--pki", pki, "--out", tmp_path / "crl.pem")
    # A device of another fleet, with a CA of the same name.
    other = tmp_path / "other-pki"
    imageprov_pki("ca", "init", other, "--cn", "Test Fleet CA", "--org", "imageprov tests", "--country", "NO")
    imageprov_pki("stamp", golden, "--pki", other, "--out", out, "--device-id", "alien-1", "--server-url", url,
                  "--conf-target", "rootfs")  # fmt: skip

    upstream_url, seen = edge["upstream"]  # type: ignore[misc]
    conf = imageprov_pki("edge", "nginx", "--pki", pki, "--server-cert", edge["server"], "--upstream", upstream_url,
                         "--listen", f"127.0.0.1:{port}", "--crl", tmp_path / "crl.pem").stdout  # fmt: skip
    nginx = _start_nginx(tmp_path, conf)
    try:
        _wait_port(int(str(port)), nginx)
        good = _run_client(tmp_path, out / "good-1.sdimg", "good", pki / "ca-cert.pem")
        assert good.returncode == 0, good.stderr
        assert [s["dn"] for s in seen] == ["CN=good-1,O=imageprov tests,C=NO"]
        assert seen[0]["verify"] == "SUCCESS" and seen[0]["path"] == "/api/devices/v1/authentication/auth_requests"
        # The edge names the certificate it accepted: serial and SHA-1 fingerprint, as openssl reads them.
        cert = tmp_path / "device-good/data/mender/mender-cert.pem"
        serial = tool("openssl", "x509", "-in", cert, "-noout", "-serial").stdout.decode().strip()
        sha1 = tool("openssl", "x509", "-in", cert, "-noout", "-fingerprint", "-sha1").stdout.decode().strip()
        assert seen[0]["serial"] == serial.removeprefix("serial=")
        assert seen[0]["sha1"] == sha1.split("=", 1)[1].replace(":", "").lower()

        bad = _run_client(tmp_path, out / "bad-1.sdimg", "bad", pki / "ca-cert.pem")
        assert bad.returncode != 0 and "400" in bad.stderr
        alien = _run_client(tmp_path, out / "alien-1.sdimg", "alien", pki / "ca-cert.pem")
        assert alien.returncode != 0 and "400" in alien.stderr
        # Neither reached the Mender server.
        assert len(seen) == 1
    finally:
        nginx.terminate()
        nginx.wait(BOUND)
