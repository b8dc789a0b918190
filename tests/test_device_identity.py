"""The device side of ``edge serve --identity attribute:NAME``: the id the line stamps, and the script that sends it.

``stamp`` and ``flash`` write the device id (the certificate's CN, and a
newline) to /data/mender/imageprov-device-id beside the key and certificate;
``verify`` wants it there. Read back here with debugfs and openssl, not
imageprov. The layer's identity script, as the class installs it
(tests/test_yocto.py's harness), runs under dash, then under Debian's real
Mender client 3.4, whose auth request a local recorder keeps: its id_data is
what the edge checks. The client runs the script at a fixed path: each run
gets a private mount namespace with the script's directory bound over
/usr/share/mender/identity, so no file outside the test's directory changes.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from imageprov.disk.golden import Scheme
from imageprov.edge.checks import Refused
from imageprov.edge.identity import check_attribute
from imageprov.mender.verify import DEVICE_ID_FILE
from tests.conftest import IN_CI, debugfs, imageprov, imageprov_pki, need, offset_of, roles, tool
from tests.flashdev import Loops, loop_devices
from tests.flashdev import debugfs as card_debugfs
from tests.oracle import check_device_image, stat
from tests.test_yocto import LAYER_IDENTITY_SCRIPT, installed_identity_script

# On the data partition, as debugfs names it.
ID_FILE = DEVICE_ID_FILE.removeprefix("/data")
IDENTITY_DIR = Path("/usr/share/mender/identity")
AUTH_PATH = "/api/devices/v1/authentication/auth_requests"
BOUND = 120  # seconds: an upper bound for one client run on a loaded machine


def _cn(pem: str) -> str:
    cert = x509.load_pem_x509_certificate(pem.encode())
    return str(cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value)


def _openssl_cn(image: Path, data: int, tmp_path: Path) -> str:
    cert = tmp_path / f"{image.name}.crt"
    cert.write_text(debugfs(image, data, "cat /mender/mender-cert.pem"))
    subject = tool("openssl", "x509", "-in", cert, "-noout", "-subject", "-nameopt", "multiline").stdout.decode()
    return subject.split("commonName", 1)[1].split("=", 1)[1].strip()


# -- what the line writes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["debugfs", "mender-artifact"])
def test_stamp_writes_the_device_id_beside_the_certificate(
    engine: str, make_golden: Callable[..., Path], pki: Path, tmp_path: Path
) -> None:
    if engine == "mender-artifact":
        need("mender-artifact")
    golden = make_golden(Scheme.MBR)
    out = tmp_path / "out"
    ids = ["SN-0001", "line.7:b_2"] if engine == "debugfs" else ["SN-0001"]
    imageprov_pki("stamp", golden, "--pki", pki, "--out", out, "--engine", engine,
                  *(a for i in ids for a in ("--device-id", i)))  # fmt: skip
    for device_id in ids:
        image = out / f"{device_id}.sdimg"
        check_device_image(image, device_id, pki, tmp_path)
        data = roles(image)["data"]
        assert stat(image, data, ID_FILE) == ("0644", "0", "0")
        assert debugfs(image, data, f"cat {ID_FILE}") == f"{device_id}\n"
        assert _openssl_cn(image, data, tmp_path) == device_id


@pytest.fixture
def loops(tmp_path: Path) -> Iterator[Loops]:
    yield from loop_devices(tmp_path)


def test_flash_writes_the_device_id_on_the_card(make_golden: Callable[..., Path], pki: Path, loops: Loops) -> None:
    golden = make_golden(Scheme.GPT, rootfs_mib=16, data_mib=16)
    card = loops.card(golden.stat().st_size)
    imageprov_pki("flash", golden, "--pki", pki, "--json", "--target", f"{card}=CARD-01")
    data = roles(golden)["data"]
    stat_text = card_debugfs(card, data, f"stat {ID_FILE}")
    assert "Mode:  0644" in stat_text and "User:     0   Group:     0" in stat_text, stat_text
    assert card_debugfs(card, data, f"cat {ID_FILE}") == "CARD-01\n"
    assert _cn(card_debugfs(card, data, "cat /mender/mender-cert.pem")) == "CARD-01"


# -- what verify wants ---------------------------------------------------------------------------------------------


def _tamper(image: Path, commands: str, tmp_path: Path) -> None:
    script = tmp_path / "tamper"
    script.write_text(commands)
    number = roles(image)["data"]
    proc = tool("debugfs", "-w", "-f", script, f"{image}?offset={offset_of(image, number)}")
    assert b"error" not in proc.stderr.lower() and b"failed" not in proc.stderr.lower(), proc.stderr


def _failed(image: Path, pki: Path) -> set[str]:
    proc = imageprov("verify", image, "--ca", pki / "ca-cert.pem", "--device-id", "v-1", "--json", check=False)
    report = json.loads(proc.stdout)
    assert report["ok"] == (proc.returncode == 0)
    return {c["name"] for c in report["checks"] if not c["ok"]}


def test_verify_wants_the_id_file_to_hold_the_certificates_cn(
    make_golden: Callable[..., Path], pki: Path, tmp_path: Path
) -> None:
    golden = make_golden(Scheme.MBR)
    imageprov_pki("stamp", golden, "--pki", pki, "--out", tmp_path / "out", "--device-id", "v-1")
    stamped = tmp_path / "out" / "v-1.sdimg"
    assert _failed(stamped, pki) == set()
    holds = f"{DEVICE_ID_FILE} holds the certificate's CN"
    replacement = tmp_path / "replacement"
    for content, mode, failed in [
        (b"v-2\n", "0100644", {holds}),  # another device's id: the edge would refuse this device
        (b"v-1", "0100644", {holds}),  # no newline: not what the line writes
        (b"v-1\nv-2\n", "0100644", {holds}),
        (b"v-1\n", "0100600", {f"{DEVICE_ID_FILE} is 0644 root:root"}),  # what the line writes, as the certificate
    ]:
        image = tmp_path / "tampered.sdimg"
        shutil.copyfile(stamped, image)
        replacement.write_bytes(content)
        _tamper(image, f"rm {ID_FILE}\nwrite {replacement} {ID_FILE}\nsif {ID_FILE} mode {mode}\n", tmp_path)
        assert _failed(image, pki) == failed, content
    image = tmp_path / "tampered.sdimg"
    shutil.copyfile(stamped, image)
    _tamper(image, f"rm {ID_FILE}\n", tmp_path)
    assert _failed(image, pki) == {f"{DEVICE_ID_FILE} present"}
    text = imageprov("verify", image, "--ca", pki / "ca-cert.pem", check=False)
    assert text.returncode == 1 and "imageprov-device-id" in text.stdout


# -- the identity script -------------------------------------------------------------------------------------------


def _run_script(script: Path) -> subprocess.CompletedProcess[bytes]:
    need("dash")
    return tool("dash", script, check=False)


@pytest.fixture
def rendered(tmp_path: Path) -> tuple[Path, Path]:
    """The script as the layer installs it with IMAGEPROV_IDENTITY_ATTRIBUTE = "device_id", and its id file."""
    id_file = tmp_path / "device" / "data" / "mender" / "imageprov-device-id"
    id_file.parent.mkdir(parents=True)
    return installed_identity_script(tmp_path / "build", "device_id", id_file), id_file


def test_the_identity_script_under_dash(rendered: tuple[Path, Path]) -> None:
    script, id_file = rendered
    for content in (b"SN-0001\n", b"SN-0001"):
        id_file.write_bytes(content)
        ran = _run_script(script)
        assert (ran.returncode, ran.stdout, ran.stderr) == (0, b"device_id=SN-0001\n", b"")
    for content in (b"", b"\n", b"SN-0001\nSN-0002\n", b"SN 0001\n", b"SN-0001\r\n", b"$(reboot)\n"):
        id_file.write_bytes(content)
        ran = _run_script(script)
        assert ran.returncode != 0 and ran.stdout == b"", content
        assert str(id_file).encode() in ran.stderr, ran.stderr
    id_file.unlink()
    ran = _run_script(script)
    assert ran.returncode != 0 and ran.stdout == b"" and b"is missing" in ran.stderr


def test_the_layers_own_script_fails_on_a_host_that_was_not_stamped() -> None:
    if Path(DEVICE_ID_FILE).exists():
        pytest.skip(f"this machine has {DEVICE_ID_FILE}")
    ran = _run_script(LAYER_IDENTITY_SCRIPT)
    assert ran.returncode == 1 and ran.stdout == b""
    assert ran.stderr.decode() == (f"mender-device-identity: {DEVICE_ID_FILE} is missing; "
                                   "stamp the device with imageprov (stamp or flash)\n")  # fmt: skip


# -- the real client -----------------------------------------------------------------------------------------------


class _Recorder(BaseHTTPRequestHandler):
    seen: ClassVar[list[tuple[str, bytes, str | None]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        _Recorder.seen.append((self.path, body, self.headers.get("X-MEN-Signature")))
        token = b"eyJhbGciOiJub25lIn0.eyJzdWIiOiJ0ZXN0In0."  # an accepted device gets a token
        self.send_response(200)
        self.send_header("Content-Type", "application/jwt")
        self.send_header("Content-Length", str(len(token)))
        self.end_headers()
        self.wfile.write(token)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[tuple[str, list[tuple[str, bytes, str | None]]]]:
    """A stand-in server on loopback (plain HTTP) that keeps every request the client sends."""
    _Recorder.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Recorder.seen
    server.shutdown()
    server.server_close()


def _private_identity(script: Path, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` with ``script``'s directory bound over the client's identity directory, for it alone."""
    wrapped = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
               f'mount --bind "$0" {IDENTITY_DIR} && exec "$@"', str(script.parent), *argv]  # fmt: skip
    return subprocess.run(wrapped, capture_output=True, text=True, timeout=BOUND, stdin=subprocess.DEVNULL)


def _need_private_namespace() -> None:
    need("mender", "unshare", "dash")
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, check=False)
    if probe.returncode != 0 or not IDENTITY_DIR.is_dir():
        message = f"the real client test needs a mount namespace (root) and {IDENTITY_DIR} (mender-client)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


def _device_root(image: Path, root: Path, server_url: str) -> tuple[Path, Path]:
    """The image's two mender.conf files, key, certificate and id, read with debugfs, device paths under ``root``."""
    layout = roles(image)
    data = root / "data"
    for name in ("mender-cert.pem", "mender-cert-private.pem", "imageprov-device-id", "mender.conf"):
        (data / "mender" / name).write_text(debugfs(image, layout["data"], f"cat /mender/{name}"))
    main = json.loads(debugfs(image, layout["rootfs-a"], "cat /etc/mender/mender.conf"))
    fallback = json.loads((data / "mender" / "mender.conf").read_text())
    for conf in (main, fallback):
        for block, field in (("HttpsClient", "Certificate"), ("HttpsClient", "Key"), ("Security", "AuthPrivateKey")):
            if (conf.get(block) or {}).get(field):
                conf[block][field] = str(root / conf[block][field].lstrip("/"))
    main["ServerURL"] = server_url  # as the build sets it (MENDER_SERVER_URL)
    (root / "mender.conf").write_text(json.dumps(main))
    (root / "fallback.conf").write_text(json.dumps(fallback))
    (root / "state").mkdir()
    return root / "mender.conf", root / "fallback.conf"


def test_the_real_client_sends_the_stamped_id_as_the_edge_checks_it(
    make_golden: Callable[..., Path],
    pki: Path,
    tmp_path: Path,
    rendered: tuple[Path, Path],
    recorder: tuple[str, list[tuple[str, bytes, str | None]]],
) -> None:
    _need_private_namespace()
    script, id_file = rendered
    root = id_file.parent.parent.parent  # the rendered script reads ROOT/data/mender/imageprov-device-id
    golden = make_golden(Scheme.MBR)
    imageprov_pki("stamp", golden, "--pki", pki, "--out", tmp_path / "out", "--device-id", "SN-0042")
    url, seen = recorder
    main, fallback = _device_root(tmp_path / "out" / "SN-0042.sdimg", root, url)
    assert id_file.read_text() == "SN-0042\n"
    argv = ["mender", "--config", str(main), "--fallback-config", str(fallback), "--data", str(root / "state"),
            "--no-syslog", "--log-level", "info", "bootstrap"]  # fmt: skip

    ran = _private_identity(script, argv)
    assert ran.returncode == 0, ran.stderr
    [(path, body, signature)] = seen
    assert path == AUTH_PATH
    request = json.loads(body)
    identity = json.loads(request["id_data"])
    assert identity == {"device_id": "SN-0042"}
    # The edge's own rule, on what the client sent, against the certificate the image holds.
    cert = x509.load_pem_x509_certificate((root / "data/mender/mender-cert.pem").read_bytes())
    cn = _cn((root / "data/mender/mender-cert.pem").read_text())
    check_attribute(identity, "device_id", cn)
    with pytest.raises(Refused):
        check_attribute(identity, "device_id", "SN-0043")
    # Signed with the certificate's key, as the edge also checks: this id comes with this certificate.
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey) and signature is not None
    public.verify(base64.b64decode(signature), body, ec.ECDSA(hashes.SHA256()))

    # A device that was not stamped: the script fails, and the client sends no identity at all.
    id_file.unlink()
    ran = _private_identity(script, argv)
    assert ran.returncode != 0 and len(seen) == 1
    assert f"{id_file} is missing" in ran.stderr, ran.stderr[-2000:]
    id_file.write_text("")
    ran = _private_identity(script, argv)
    assert ran.returncode != 0 and len(seen) == 1
