"""End to end: a stamped image's credentials, Debian's real Mender client, real nginx and ``imageprov edge serve``,
in front of the stand-in Mender server.

The client runs with what the image holds (mender.conf, key, certificate,
read out with ``imageprov cat``/``cp``), its device paths mapped under a
temporary root. Its identity script is its own: each client runs in a private
mount namespace with a directory bound over /usr/share/mender/identity, so no
file outside the test's temporary directory changes.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from imageprov.disk.golden import Scheme
from imageprov.mender.conf import CLIENT_KEY
from tests.conftest import IN_CI, imageprov, imageprov_pki, need
from tests.edge_support import (
    AUTH_PATH,
    PASSWORD,
    USER,
    FleetCA,
    decisions,
    edge_service,
    escaped,
    free_port,
    key_pem,
    nginx,
    running_standin,
    sign,
    signed_request,
    wait_for,
)

IDENTITY_DIR = Path("/usr/share/mender/identity")


def _private_namespaces() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, check=False)
    return probe.returncode == 0


@pytest.fixture
def identity_runner(tmp_path: Path) -> Iterator[Any]:
    """Run a command with an identity script saying ``mac=MAC``, private to that command where possible."""
    private = _private_namespaces()
    created = False
    if not private and not os.access(IDENTITY_DIR.parent, os.W_OK):
        message = "the end-to-end test needs root, for a mount namespace or to place the identity script"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)

    def run(argv: list[str], mac: str) -> subprocess.CompletedProcess[str]:
        nonlocal created
        scripts = tmp_path / f"identity-{mac.replace(':', '')}"
        scripts.mkdir(exist_ok=True)
        script = scripts / "mender-device-identity"
        script.write_text(f"#!/bin/sh\necho mac={mac}\n")
        script.chmod(0o755)
        if private:
            wrapped = ["unshare", "--mount", "--", "sh", "-c",
                       f'mount --bind "$0" {IDENTITY_DIR} && exec "$@"', str(scripts), *argv]  # fmt: skip
        else:
            IDENTITY_DIR.mkdir(parents=True, exist_ok=True)
            target = IDENTITY_DIR / script.name
            if not target.exists():
                shutil.copy2(script, target)
                created = True
            wrapped = argv
        return subprocess.run(wrapped, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)

    yield run
    if created:
        (IDENTITY_DIR / "mender-device-identity").unlink(missing_ok=True)


def _client_root(tmp_path: Path, image: Path, name: str, ca_cert: Path | None, server_url: str) -> Path:
    """The image's mender.conf and fallback conf, key and certificate, device paths mapped under a temporary
    root; ServerURL set to the edge, as the build would (MENDER_SERVER_URL).

    ``ca_cert``: the edge's trust, set as ServerCertificate by hand; None: the image's own (stamp --server-ca),
    the file its conf names read out of the image like the credentials."""
    extracted = tmp_path / f"extracted-{image.stem}"  # read out of each image once
    if not extracted.exists():
        staging = tmp_path / f"staging-{image.stem}"
        (staging / "data/mender").mkdir(parents=True)
        (staging / "mender.conf").write_text(imageprov("cat", f"{image}:/etc/mender/mender.conf").stdout)
        fallback = imageprov("cat", f"{image}:/data/mender/mender.conf", check=False)
        (staging / "fallback.conf").write_text(fallback.stdout if fallback.returncode == 0 else "{}")
        for device_path in ("/data/mender/mender-cert.pem", "/data/mender/mender-cert-private.pem"):
            imageprov("cp", f"{image}:{device_path}", staging / device_path.lstrip("/"))
        trusted = {
            json.loads((staging / f).read_text()).get("ServerCertificate") for f in ("mender.conf", "fallback.conf")
        }
        for device_path in trusted - {None}:
            imageprov("cp", f"{image}:{device_path}", staging / device_path.lstrip("/"))
        staging.rename(extracted)
    root = tmp_path / f"device-{name}"
    shutil.copytree(extracted, root)
    confs = {file: json.loads((root / file).read_text()) for file in ("mender.conf", "fallback.conf")}
    # What the client uses: the rootfs conf over the fallback, field by field inside each block.
    used = {block: {**(confs["fallback.conf"].get(block) or {}), **(confs["mender.conf"].get(block) or {})}
            for block in ("HttpsClient", "Security")}  # fmt: skip
    assert used["HttpsClient"] == {"Certificate": "/data/mender/mender-cert.pem", "Key": CLIENT_KEY}
    assert used["Security"]["AuthPrivateKey"] == CLIENT_KEY
    for conf in confs.values():
        for block, field in (("HttpsClient", "Certificate"), ("HttpsClient", "Key"), ("Security", "AuthPrivateKey")):
            if (conf.get(block) or {}).get(field):
                conf[block][field] = str(root / conf[block][field].lstrip("/"))
        if conf.get("ServerCertificate"):
            conf["ServerCertificate"] = str(root / conf["ServerCertificate"].lstrip("/"))
    if ca_cert is not None:
        confs["mender.conf"]["ServerCertificate"] = str(ca_cert)  # the edge's certificate is signed by the fleet CA
    confs["mender.conf"]["ServerURL"] = server_url
    for file, conf in confs.items():
        (root / file).write_text(json.dumps(conf))
    return root


def _bootstrap(run: Any, root: Path, mac: str) -> subprocess.CompletedProcess[str]:
    need("mender")
    return run(
        ["mender", "--config", str(root / "mender.conf"), "--fallback-config", str(root / "fallback.conf"),
         "--data", str(root / "data"), "--no-syslog", "--log-level", "info", "bootstrap"],
        mac,
    )  # fmt: skip


def _edge_conf(pki: Path, server: Path, upstream: str, port: int, accept: str | None = None) -> str:
    args = ["edge", "nginx", "--pki", pki, "--server-cert", server, "--upstream", upstream,
            "--listen", f"127.0.0.1:{port}"]  # fmt: skip
    return imageprov_pki(*args, *(["--accept", accept] if accept else [])).stdout


def _list(standin: Any, status: str) -> list[dict[str, Any]]:
    """The device list, asked of the stand-in's management API as a user would."""
    import base64
    import urllib.request

    login = urllib.request.Request(
        standin.url + "/api/management/v1/useradm/auth/login", method="POST", data=b"",
        headers={"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()},
    )  # fmt: skip
    with urllib.request.urlopen(login) as answer:
        token = answer.read().decode()
    query = urllib.request.Request(
        f"{standin.url}/api/management/v2/devauth/devices?status={status}&per_page=500",
        headers={"Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(query) as answer:
        found: list[dict[str, Any]] = json.loads(answer.read())
    return found


def _spki(pem: str | bytes) -> bytes:
    data = pem.encode() if isinstance(pem, str) else pem
    key = serialization.load_pem_public_key(data)
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_stamped_device_is_accepted_through_the_edge_and_pending_without_it(
    tmp_path: Path, make_golden: Any, pki: Path, identity_runner: Any
) -> None:
    need("nginx", "mender")
    golden = make_golden(Scheme.MBR)
    accept_port, plain_port = free_port(), free_port()
    accept_url = f"https://localhost:{accept_port}"
    out = tmp_path / "out"
    ca_cert = pki / "ca-cert.pem"
    # The default --conf-target: the credentials' settings in the data partition's fallback conf. The
    # devices trust the edge through the image alone: its certificate is signed by the fleet CA, which
    # --server-ca installs as /data/mender/server.crt and names in ServerCertificate.
    imageprov_pki("stamp", golden, "--pki", pki, "--out", out, "--device-id", "good-1", "--device-id", "rev-1",
                  "--server-ca", ca_cert)  # fmt: skip
    imageprov("verify", out / "good-1.sdimg", "--ca", ca_cert, "--server-ca", ca_cert)
    server = tmp_path / "edge"
    imageprov_pki("server-cert", "--pki", pki, "--host", "localhost", "--ip", "127.0.0.1", "--out", server)
    imageprov_pki("revoke", "--pki", pki, "rev-1", "--reason", "key-compromise")
    password = tmp_path / "password"
    password.write_text(PASSWORD)
    good_cert = x509.load_pem_x509_certificate(imageprov("cat", f"{out / 'good-1.sdimg'}:/data/mender/mender-cert.pem",
                                                         ).stdout.encode())  # fmt: skip

    with running_standin() as standin:
        with edge_service(tmp_path, "--pki", pki, "--upstream", standin.url, "--username", USER,
                          "--password-file", password) as service:  # fmt: skip
            conf = _edge_conf(pki, server, standin.url, accept_port, service["url"])
            with nginx(tmp_path, conf, accept_port):
                good_root = _client_root(tmp_path, out / "good-1.sdimg", "good", None, accept_url)
                assert json.loads((good_root / "fallback.conf").read_text())["ServerCertificate"] == str(
                    good_root / "data/mender/server.crt"
                )
                # Without the image's ServerCertificate the client does not trust the edge at all:
                # the trust above comes from --server-ca, nothing else.
                untrusting = _client_root(tmp_path, out / "good-1.sdimg", "untrusting", None, accept_url)
                (untrusting / "data/mender/server.crt").unlink()
                refused = _bootstrap(identity_runner, untrusting, "02:00:00:00:00:01")
                assert refused.returncode != 0
                assert "certificate signed by unknown authority" in refused.stderr, refused.stderr[-2000:]
                good = _bootstrap(identity_runner, good_root, "02:00:00:00:00:01")
                assert good.returncode == 0, good.stderr
                revoked_root = _client_root(tmp_path, out / "rev-1.sdimg", "rev", None, accept_url)
                revoked = _bootstrap(identity_runner, revoked_root, "02:00:00:00:00:02")
                assert revoked.returncode != 0
                # Signing with a key other than the certificate's: refused (what --auth-key device does
                # where the client generates its key).
                own = _client_root(tmp_path, out / "good-1.sdimg", "own-key", None, accept_url)
                conf = json.loads((own / "mender.conf").read_text())
                agent = own / "data" / "mender-agent.pem"
                agent.write_bytes(key_pem(ec.generate_private_key(ec.SECP256R1())))
                conf["Security"] = {**(conf.get("Security") or {}), "AuthPrivateKey": str(agent)}
                (own / "mender.conf").write_text(json.dumps(conf))
                assert _bootstrap(identity_runner, own, "02:00:00:00:00:03").returncode != 0
            lines = decisions(service["log"])
        accepted = _list(standin, "accepted")
        assert [d["identity_data"] for d in accepted] == [{"mac": "02:00:00:00:00:01"}]
        assert [a["status"] for a in accepted[0]["auth_sets"]] == ["accepted"]
        # The key the device authenticated with is its certificate's key.
        assert _spki(accepted[0]["auth_sets"][0]["pubkey"]) == good_cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        assert [p["identity_data"] for p in standin.preauthorized] == [{"mac": "02:00:00:00:00:01"}]
        # What reached the server: the client's request with nginx's headers, never the certificate header.
        seen = standin.auth_headers[0]
        assert "x-ssl-client-cert" not in seen and seen["x-ssl-client-verify"] == "SUCCESS"
        assert seen["x-ssl-client-s-dn"].startswith("CN=good-1") and seen["x-men-signature"]
        assert ("good-1", "accepted") in [(d["cn"], d["decision"]) for d in lines]
        assert ("rev-1", "revoked") in [(d["cn"], d["reason"]) for d in lines]
        assert ("good-1", "key-mismatch") in [(d["cn"], d["reason"]) for d in lines]

    # The same device through nginx alone: the Mender server holds it pending for a person to accept.
    with running_standin() as standin:
        with nginx(tmp_path, _edge_conf(pki, server, standin.url, plain_port), plain_port):
            root = _client_root(tmp_path, out / "good-1.sdimg", "plain", None, f"https://localhost:{plain_port}")
            pending = _bootstrap(identity_runner, root, "02:00:00:00:00:01")
        assert pending.returncode != 0
        assert [d["identity_data"] for d in _list(standin, "pending")] == [{"mac": "02:00:00:00:00:01"}]
        assert _list(standin, "accepted") == [] and standin.preauthorized == []


def _tls_post(
    port: int, ca_cert: Path, cert: Path, key: Path, body: bytes, signature: str, extra: dict[str, str] | None = None
) -> tuple[int, bytes]:
    context = ssl.create_default_context(cafile=str(ca_cert))
    context.load_cert_chain(cert, key)
    connection = http.client.HTTPSConnection("localhost", port, context=context, timeout=30)
    headers = {"Content-Type": "application/json", "X-MEN-Signature": signature, **(extra or {})}
    try:
        connection.request("POST", AUTH_PATH, body, headers)
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


def test_refused_through_nginx_and_never_preauthorized(tmp_path: Path, pki: Path) -> None:
    """Real TLS through nginx and the service; each of these is refused and never reaches preauthorization."""
    need("nginx")
    port = free_port()
    server = tmp_path / "edge"
    imageprov_pki("server-cert", "--pki", pki, "--host", "localhost", "--ip", "127.0.0.1", "--out", server)
    devices = tmp_path / "devices"
    for name in ("a-1", "b-1", "rev-1", "deny-1", "ok-1"):
        imageprov_pki("device-cert", "--pki", pki, "--device-id", name, "--out", devices / name)
    other = FleetCA("Test Fleet CA")
    alien_cert, alien_key = other.issue("alien-1")
    (devices / "alien-1").mkdir()
    (devices / "alien-1" / "mender-cert.pem").write_bytes(alien_cert.public_bytes(serialization.Encoding.PEM))
    (devices / "alien-1" / "mender-cert-private.pem").write_bytes(
        alien_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    )  # fmt: skip
    denylist = tmp_path / "denylist"
    records = json.loads(imageprov("devices", "--pki", pki, "--json").stdout)
    denylist.write_text(next(r["serial"] for r in records if r["device_id"] == "deny-1") + "\n")
    password = tmp_path / "password"
    password.write_text(PASSWORD)

    def files(name: str) -> tuple[Path, Path, Any]:
        cert, key = devices / name / "mender-cert.pem", devices / name / "mender-cert-private.pem"
        return cert, key, serialization.load_pem_private_key(key.read_bytes(), None)

    with running_standin() as standin:
        with edge_service(tmp_path, "--pki", pki, "--upstream", standin.url, "--username", USER,
                          "--password-file", password, "--denylist", denylist) as service:  # fmt: skip
            with nginx(tmp_path, _edge_conf(pki, server, standin.url, port, service["url"]), port):
                imageprov_pki("revoke", "--pki", pki, "rev-1")  # while everything runs
                outcomes: dict[str, int] = {}

                def send(case: str, name: str, body: bytes, signature: str, **extra: str) -> None:
                    cert, key, _ = files(name)
                    outcomes[case] = _tls_post(port, pki / "ca-cert.pem", cert, key, body, signature, extra)[0]

                _, _, a = files("a-1")
                _, _, b = files("b-1")
                request = signed_request(b, {"mac": "case:key-differs"})
                send("key differs", "a-1", request.body, request.signature)
                # b-1's certificate in the header nginx sets, sent by a-1: nginx overwrites it.
                request = signed_request(b, {"mac": "case:spoofed-header"})
                spoof = {"X-SSL-Client-Cert": escaped(x509.load_pem_x509_certificate(files("b-1")[0].read_bytes()))}
                send("spoofed header", "a-1", request.body, request.signature, **spoof)
                request = signed_request(a, {"mac": "case:bad-signature"})
                send("bad signature", "a-1", request.body, sign(b, request.body))
                request = signed_request(a, {"mac": "case:altered"})
                send("body altered", "a-1", request.body.replace(b"case:altered", b"case:alterex"), request.signature)
                for name in ("rev-1", "deny-1", "alien-1"):
                    request = signed_request(files(name)[2], {"mac": f"case:{name}"})
                    send(name, name, request.body, request.signature)
                request = signed_request(files("ok-1")[2], {"mac": "case:ok"})
                send("good", "ok-1", request.body, request.signature)
            reasons = [(d["cn"], d["reason"]) for d in decisions(service["log"]) if d["decision"] == "refused"]
        assert outcomes == {"key differs": 401, "spoofed header": 401, "bad signature": 401, "body altered": 401,
                            "rev-1": 401, "deny-1": 401, "alien-1": 400, "good": 200}  # fmt: skip
        # alien-1 never got past nginx; the others were refused by the service, each for its reason.
        assert reasons == [("a-1", "key-mismatch"), ("a-1", "key-mismatch"), ("a-1", "bad-signature"),
                           ("a-1", "bad-signature"),
                           ("rev-1", "revoked"), ("deny-1", "revoked")]  # fmt: skip
        assert [p["identity_data"] for p in standin.preauthorized] == [{"mac": "case:ok"}]
        assert [d["identity_data"] for d in _list(standin, "accepted")] == [{"mac": "case:ok"}]
        assert _list(standin, "pending") == []


def _tls_request(port: int, ca_cert: Path, device: Path, method: str, path: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None) -> tuple[int, bytes]:  # fmt: skip
    """One request through nginx with the device's certificate and key (``device``: its directory)."""
    context = ssl.create_default_context(cafile=str(ca_cert))
    context.load_cert_chain(device / "mender-cert.pem", device / "mender-cert-private.pem")
    connection = http.client.HTTPSConnection("localhost", port, context=context, timeout=30)
    try:
        connection.request(method, path, body, headers or {})
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


def test_through_nginx_identity_is_bound_revocation_cuts_off_and_only_device_routes_pass(
    tmp_path: Path, pki: Path
) -> None:
    """Real nginx and the service, as a fleet on the internet meets them: a stolen key cannot take another
    device's identity; a revoked device loses every route soon after `imageprov revoke` (the time printed), no reload;
    nothing but the device API is reachable."""
    need("nginx")
    port = free_port()
    server = tmp_path / "edge"
    imageprov_pki("server-cert", "--pki", pki, "--host", "localhost", "--ip", "127.0.0.1", "--out", server)
    devices = tmp_path / "devices"
    for name in ("pin-a", "pin-b", "cut-1"):
        imageprov_pki("device-cert", "--pki", pki, "--device-id", name, "--out", devices / name)
    password = tmp_path / "password"
    password.write_text(PASSWORD)
    ca = pki / "ca-cert.pem"
    next_update = "/api/devices/v1/deployments/device/deployments/next?artifact_name=a&device_type=b"

    def authenticate(name: str, identity: dict[str, Any]) -> tuple[int, bytes]:
        key = serialization.load_pem_private_key((devices / name / "mender-cert-private.pem").read_bytes(), None)
        signed = signed_request(key, identity)
        headers = {"Content-Type": "application/json", "X-MEN-Signature": signed.signature}
        return _tls_request(port, ca, devices / name, "POST", AUTH_PATH, signed.body, headers)

    with running_standin() as standin:
        with (
            edge_service(tmp_path, "--pki", pki, "--upstream", standin.url, "--username", USER,
                         "--password-file", password) as service,
            nginx(tmp_path, _edge_conf(pki, server, standin.url, port, service["url"]), port),
        ):  # fmt: skip
            # Identity pinned: pin-a's key cannot become pin-b, and pin-b is still accepted after.
            assert authenticate("pin-a", {"device_id": "pin-a"})[0] == 200
            assert authenticate("pin-a", {"device_id": "pin-b"})[0] == 401
            assert authenticate("pin-b", {"device_id": "pin-b"})[0] == 200
            # Only the device API: the UI and the management API are not there.
            for path in ("/", "/api/management/v2/devauth/devices", "/api/management/v1/useradm/auth/login"):
                assert _tls_request(port, ca, devices / "pin-a", "GET", path)[0] == 404, path
            # A revoked device is cut off on deployments/next with no reload; the time is printed (the bound, the
            # recheck window, is test_edge_decisions' test_the_recheck_window_..., which no load can stretch).
            status, token = authenticate("cut-1", {"device_id": "cut-1"})
            assert status == 200
            bearer = {"Authorization": f"Bearer {token.decode()}"}
            assert _tls_request(port, ca, devices / "cut-1", "GET", next_update, headers=bearer)[0] == 204
            imageprov_pki("revoke", "--pki", pki, "cut-1")
            revoked = time.monotonic()
            wait_for(lambda: _tls_request(port, ca, devices / "cut-1", "GET", next_update, headers=bearer)[0]
                     == 403, "deployments/next to refuse the revoked device", timeout=60)  # fmt: skip
            through_edge = time.monotonic() - revoked
            # ...and in Mender itself, where the edge is not in the way.
            wait_for(lambda: not standin.token_works(token.decode()), "Mender to reject it", timeout=60)
            in_mender = time.monotonic() - revoked
            assert authenticate("cut-1", {"device_id": "cut-1"})[0] == 401
            # The others go on.
            _, other = authenticate("pin-b", {"device_id": "pin-b"})
            other_bearer = {"Authorization": f"Bearer {other.decode()}"}
            assert _tls_request(port, ca, devices / "pin-b", "GET", next_update, headers=other_bearer)[0] == 204
        assert [p["identity_data"] for p in standin.preauthorized if p["identity_data"].get("device_id") == "pin-b"] \
            == [{"device_id": "pin-b"}]  # fmt: skip
    print(f"revoked device cut off: through the edge {through_edge:.1f} s, in Mender {in_mender:.1f} s")
