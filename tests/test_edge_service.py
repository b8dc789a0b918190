"""``imageprov edge serve`` as users run it, against the stand-in Mender server, with requests made as nginx
passes them on (the verified certificate in X-SSL-Client-Cert). Through real nginx and TLS: test_edge_e2e.py.
"""

from __future__ import annotations

import http.client
import json
import socket
import stat
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from tests.conftest import IMAGEPROV_ARGV, imageprov, imageprov_pki
from tests.edge_support import (
    AUTH_PATH,
    PASSWORD,
    USER,
    FleetCA,
    auth_body,
    decisions,
    edge_service,
    escaped,
    free_port,
    post,
    public_pem,
    running_standin,
    sign,
    signed_request,
    wait_for,
)

# A CA with no registry: nothing to pin identities in, nothing to revoke from.
UNBOUND = ("--no-revocation", "--identity", "none")
TOKEN = ["--ca", "CA", "--upstream", "http://x", "--token-file", "TOKEN", *UNBOUND]


@pytest.fixture(scope="module")
def standin() -> Iterator[Any]:
    with running_standin() as server:
        yield server


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> tuple[FleetCA, Path]:
    ca = FleetCA()
    path = tmp_path_factory.mktemp("fleet") / "ca-cert.pem"
    path.write_bytes(ca.cert_pem())
    return ca, path


@pytest.fixture(scope="module")
def password_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secrets") / "password"
    path.write_text(PASSWORD + "\n")
    return path


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, standin: Any, fleet: tuple[FleetCA, Path], password_file: Path
) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("service")
    # The service's mechanics, with a CA of the test's own and no registry: identity binding
    # and revocation have their own tests (test_edge_binding.py, and below).
    with edge_service(tmp, "--ca", fleet[1], "--upstream", standin.url, "--username", USER,
                      "--password-file", password_file, *UNBOUND) as running:  # fmt: skip
        yield running


def _send(service: dict[str, Any], cert: Any, body: bytes, signature: str | None) -> tuple[int, dict[str, str], bytes]:
    headers = {"Content-Type": "application/json"}
    if signature is not None:
        headers["X-MEN-Signature"] = signature
    if cert is not None:
        headers["X-SSL-Client-Cert"] = escaped(cert)
    return post(service["url"] + AUTH_PATH, body, headers)


def _preauthorized(standin: Any, identity: dict[str, Any]) -> bool:
    return any(p["identity_data"] == identity for p in standin.preauthorized)


@pytest.mark.parametrize(
    "make_key",
    [lambda: ec.generate_private_key(ec.SECP256R1()), lambda: rsa.generate_private_key(65537, 2048),
     ed25519.Ed25519PrivateKey.generate],
    ids=["ecdsa-p256", "rsa-2048", "ed25519"],
)  # fmt: skip
def test_good_device_is_preauthorized_once_and_accepted(
    service: dict[str, Any], standin: Any, fleet: tuple[FleetCA, Path], make_key: Any
) -> None:
    key = make_key()
    identity = {"mac": "02:00:00:00:10:01", "key": type(key).__name__}
    cert, _ = fleet[0].issue("dev-good", key)
    request = signed_request(key, identity)
    status, headers, body = _send(service, cert, request.body, request.signature)
    assert status == 200, body
    assert headers["Content-Type"].startswith("application/jwt") and body.count(b".") == 2
    device = standin.device(identity)
    assert device.status == "accepted" and device.tokens_issued == 1
    assert [a.status for a in device.auth_sets] == ["accepted"]
    assert device.auth_sets[0].pubkey.strip() == public_pem(key).strip()
    assert [p["identity_data"] for p in standin.preauthorized].count(identity) == 1
    # Again: accepted from the cache, without a second preauthorization.
    status, _, body = _send(service, cert, request.body, request.signature)
    assert status == 200 and device.tokens_issued == 2
    assert [p["identity_data"] for p in standin.preauthorized].count(identity) == 1
    lines = [d for d in decisions(service["log"]) if d["cn"] == "dev-good" and d["decision"] == "accepted"]
    assert [d["preauthorized"] for d in lines[-2:]] == [True, False]
    assert set(lines[-1]) >= {"time", "cn", "serial", "identity", "decision", "reason", "upstream_status", "ms"}
    assert lines[-1]["serial"] == f"{cert.serial_number:x}" and lines[-1]["upstream_status"] == 200


def _expired(ca: FleetCA, key: Any) -> Any:
    return ca.issue("dev-old", key, start_days=-400, days=365)[0]


# name, how the request is made -> the status and the reason the service must log
CASES: dict[str, Any] = {
    "other CA": (lambda ca, key, other: other.issue("dev-x", key)[0], None, 401, "untrusted-issuer"),
    "expired": (lambda ca, key, other: _expired(ca, key), None, 401, "expired"),
    "not yet valid": (lambda ca, key, other: ca.issue("dev-x", key, start_days=2)[0], None, 401, "not-yet-valid"),
    "no clientAuth": (lambda ca, key, other: ca.issue("dev-x", key, client_auth=False)[0], None, 401,
                      "no-client-auth"),
    "key differs": (lambda ca, key, other: ca.issue("dev-x")[0], None, 401, "key-mismatch"),
    "bad signature": (None, lambda body, sig: (body, sig[:-8] + "AAAAAAA="), 401, "bad-signature"),
    "body altered after signing": (None, lambda body, sig: (body.replace(b"10:", b"11:"), sig), 401, "bad-signature"),
    "no signature": (None, lambda body, sig: (body, ""), 401, "bad-signature"),
    "signature not base64": (None, lambda body, sig: (body, "!!"), 401, "bad-signature"),
    "no certificate": (lambda ca, key, other: None, None, 400, "no-certificate"),
    "not JSON": (None, lambda body, sig: (b"{id_data", sig), 400, "bad-request"),
    "id_data not a string": (None, lambda body, sig: (json.dumps({**json.loads(body), "id_data": {"a": 1}}).encode(),
                                                      sig), 400, "bad-request"),
    "id_data not an object": (None, lambda body, sig: (json.dumps({**json.loads(body), "id_data": "[1]"}).encode(),
                                                       sig), 400, "bad-request"),
    "pubkey missing": (None, lambda body, sig: (json.dumps({"id_data": json.loads(body)["id_data"]}).encode(), sig),
                       400, "bad-request"),
    "pubkey not PEM": (None, lambda body, sig: (json.dumps({**json.loads(body), "pubkey": "x"}).encode(), sig),
                       400, "bad-request"),
    "tenant_token not a string": (None, lambda body, sig: (json.dumps({**json.loads(body), "tenant_token": 1}).encode(),
                                                           sig), 400, "bad-request"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_refused_and_never_preauthorized(
    service: dict[str, Any], standin: Any, fleet: tuple[FleetCA, Path], case: str
) -> None:
    make_cert, tamper, status, reason = CASES[case]
    ca = fleet[0]
    key = ec.generate_private_key(ec.SECP256R1())
    identity = {"mac": "02:00:00:00:10:02", "case": case}
    cert = make_cert(ca, key, FleetCA("Edge Test CA")) if make_cert else ca.issue("dev-x", key)[0]
    request = signed_request(key, identity)
    body, signature = tamper(request.body, request.signature) if tamper else (request.body, request.signature)
    got, headers, answer = _send(service, cert, body, signature)
    assert (got, headers["Content-Type"].split(";")[0]) == (status, "application/json"), answer
    assert json.loads(answer)["error"]
    assert not _preauthorized(standin, identity) and standin.device(identity) is None
    refused = [d for d in decisions(service["log"]) if d["decision"] == "refused"]
    assert refused[-1]["reason"] == reason


def test_body_over_64_kib_is_refused(service: dict[str, Any], fleet: tuple[FleetCA, Path]) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert, _ = fleet[0].issue("dev-big", key)
    body = auth_body({"mac": "x", "pad": "p" * 70_000}, public_pem(key))
    status, _, answer = _send(service, cert, body, sign(key, body))
    assert status == 413 and json.loads(answer)["error"]


def test_health_and_metrics(service: dict[str, Any], fleet: tuple[FleetCA, Path]) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert, _ = fleet[0].issue("dev-metrics", key)
    request = signed_request(key, {"mac": "02:00:00:00:10:03"})
    assert _send(service, cert, request.body, request.signature)[0] == 200
    _send(service, cert, request.body, "")
    with urllib.request.urlopen(service["url"] + "/healthz") as answer:
        assert json.loads(answer.read()) == {"status": "ready"}
    with urllib.request.urlopen(service["url"] + "/metrics") as answer:
        text = answer.read().decode()
    assert 'imageprov_edge_refused_total{reason="bad-signature"}' in text
    assert "imageprov_edge_accepted_total" in text and "imageprov_edge_request_seconds_bucket" in text


def test_secrets_never_reach_the_log_or_argv(service: dict[str, Any]) -> None:
    assert PASSWORD not in service["log"].read_text()
    assert PASSWORD not in " ".join(service["proc"].args)


def _one_device(service: dict[str, Any], ca: FleetCA, mac: str) -> tuple[int, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert, _ = ca.issue(f"dev-{mac}", key)
    request = signed_request(key, {"mac": mac})
    status, _, body = _send(service, cert, request.body, request.signature)
    return status, body


def test_login_is_renewed_on_401(service: dict[str, Any], standin: Any, fleet: tuple[FleetCA, Path]) -> None:
    assert _one_device(service, fleet[0], "02:00:00:00:20:01")[0] == 200
    logins = standin.calls["login"]
    standin.expire_logins()
    assert _one_device(service, fleet[0], "02:00:00:00:20:02")[0] == 200
    assert standin.calls["login"] == logins + 1


def _create_personal_token(standin: Any) -> str:
    """Log in and create a personal access token through the management API, as a user would."""
    import base64

    basic = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    status, _, jwt = post(
        standin.url + "/api/management/v1/useradm/auth/login", b"", {"Authorization": f"Basic {basic}"}
    )
    assert status == 200
    status, _, token = post(
        standin.url + "/api/management/v1/useradm/settings/tokens",
        json.dumps({"name": "imageprov-edge", "expires_in": 3600}).encode(),
        {"Authorization": f"Bearer {jwt.decode()}", "Content-Type": "application/json"},
    )
    assert status == 200
    return str(json.loads(token))


def test_personal_access_token(tmp_path: Path, standin: Any, fleet: tuple[FleetCA, Path]) -> None:
    token = tmp_path / "token"
    token.write_text(_create_personal_token(standin))
    logins = standin.calls["login"]
    standin.expire_logins()  # the token is not a login: it outlives them
    with edge_service(tmp_path, "--ca", fleet[1], "--upstream", standin.url, "--token-file", token,
                      *UNBOUND) as running:  # fmt: skip
        assert _one_device(running, fleet[0], "02:00:00:00:30:01")[0] == 200
        assert token.read_text() not in running["log"].read_text()
    assert standin.calls["login"] == logins


def test_wrong_password_gives_503_and_never_accepts(tmp_path: Path, standin: Any, fleet: tuple[FleetCA, Path]) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password")
    with edge_service(tmp_path, "--ca", fleet[1], "--upstream", standin.url, "--username", USER,
                      "--password-file", wrong, *UNBOUND) as running:  # fmt: skip
        status, _ = _one_device(running, fleet[0], "02:00:00:00:40:01")
        log = running["log"].read_text()
    assert status == 503 and standin.device({"mac": "02:00:00:00:40:01"}) is None
    assert "refused" in log and "not-the-password" not in log


def test_mender_down_gives_503_with_retry_after(
    tmp_path: Path, fleet: tuple[FleetCA, Path], password_file: Path
) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    with edge_service(tmp_path, "--ca", fleet[1], "--upstream", down, "--username", USER,
                      "--password-file", password_file, "--retry-after", "7", *UNBOUND) as running:  # fmt: skip
        key = ec.generate_private_key(ec.SECP256R1())
        cert, _ = fleet[0].issue("dev-down", key)
        request = signed_request(key, {"mac": "02:00:00:00:50:01"})
        status, headers, body = _send(running, cert, request.body, request.signature)
        lines = decisions(running["log"])
    assert status == 503 and headers["Retry-After"] == "7" and json.loads(body)["error"]
    assert lines[-1]["decision"] == "unavailable" and lines[-1]["reason"] == "upstream-unavailable"


def test_revocation_from_registry_crl_and_denylist(tmp_path: Path, pki: Path, standin: Any) -> None:
    """Registry: revoked while the service runs; denylist: rewritten while it runs; a CRL beside them."""
    devices = tmp_path / "devices"
    for name in ("reg-1", "deny-1", "fine-1"):
        imageprov_pki("device-cert", "--pki", pki, "--device-id", name, "--out", devices / name)
    imageprov_pki("crl", "--pki", pki, "--out", tmp_path / "crl.pem")
    denylist = tmp_path / "denylist"
    denylist.write_text("# revoked serials\n")
    password = tmp_path / "password"
    password.write_text(PASSWORD)
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    def attempt(running: dict[str, Any], name: str) -> int:
        cert = x509.load_pem_x509_certificate((devices / name / "mender-cert.pem").read_bytes())
        key = serialization.load_pem_private_key((devices / name / "mender-cert-private.pem").read_bytes(), None)
        request = signed_request(key, {"mac": name})
        return _send(running, cert, request.body, request.signature)[0]

    with edge_service(tmp_path, "--pki", pki, "--upstream", standin.url, "--username", USER, "--password-file",
                      password, "--crl", tmp_path / "crl.pem", "--denylist", denylist) as running:  # fmt: skip
        imageprov_pki("revoke", "--pki", pki, "reg-1")
        assert attempt(running, "reg-1") == 401
        serial = json.loads(imageprov("devices", "--pki", pki, "--json").stdout)
        deny_serial = next(r["serial"] for r in serial if r["device_id"] == "deny-1")
        denylist.write_text(f"# revoked serials\n{deny_serial.upper()}\n")
        assert attempt(running, "deny-1") == 401
        assert attempt(running, "fine-1") == 200
        reasons = [(d["cn"], d["reason"]) for d in decisions(running["log"])]
    assert ("reg-1", "revoked") in reasons and ("deny-1", "revoked") in reasons
    for name in ("reg-1", "deny-1"):
        assert not _preauthorized(standin, {"mac": name})


def test_crl_alone_and_denylist_alone(tmp_path: Path, pki: Path, standin: Any) -> None:
    """Without the registry (--no-registry), the CRL and the denylist each refuse on their own."""
    devices = tmp_path / "devices"
    for name in ("c-1", "d-1"):
        imageprov_pki("device-cert", "--pki", pki, "--device-id", name, "--out", devices / name)
    imageprov_pki("revoke", "--pki", pki, "c-1")
    imageprov_pki("crl", "--pki", pki, "--out", tmp_path / "crl.der", "--der")
    records = json.loads(imageprov("devices", "--pki", pki, "--json").stdout)
    denylist = tmp_path / "denylist"
    denylist.write_text(next(r["serial"] for r in records if r["device_id"] == "d-1") + "\n")
    password = tmp_path / "password"
    password.write_text(PASSWORD)
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    def attempt(running: dict[str, Any], name: str) -> int:
        cert = x509.load_pem_x509_certificate((devices / name / "mender-cert.pem").read_bytes())
        key = serialization.load_pem_private_key((devices / name / "mender-cert-private.pem").read_bytes(), None)
        request = signed_request(key, {"mac": name})
        return _send(running, cert, request.body, request.signature)[0]

    common = ["--pki", pki, "--no-registry", "--identity", "none", "--upstream", standin.url, "--username", USER,
              "--password-file", password]  # fmt: skip
    with edge_service(tmp_path, *common, "--crl", tmp_path / "crl.der") as running:
        assert (attempt(running, "c-1"), attempt(running, "d-1")) == (401, 200)
    with edge_service(tmp_path, *common, "--denylist", denylist) as running:
        assert (attempt(running, "c-1"), attempt(running, "d-1")) == (200, 401)
        # A denylist that cannot be read: nobody gets in until it can.
        denylist.unlink()
        assert attempt(running, "c-1") == 503
        assert decisions(running["log"])[-1]["reason"] == "revocation-unknown"


def test_mender_gateway_environment(tmp_path: Path, standin: Any, fleet: tuple[FleetCA, Path]) -> None:
    ca = fleet[0]
    key = ec.generate_private_key(ec.SECP256R1())
    cert, _ = ca.issue("dev-gw", key)
    denylist = tmp_path / "blacklist"
    denylist.write_text(f"{cert.serial_number:x}\n")
    env = {"UPSTREAM_SERVER_URL": standin.url, "MTLS_CA_CERTIFICATE": str(fleet[1]), "MTLS_MENDER_USERNAME": USER,
           "MTLS_MENDER_PASSWORD": PASSWORD, "MTLS_BLACKLIST_PATH": str(denylist)}  # fmt: skip
    with edge_service(tmp_path, "--identity", "none", env=env) as running:
        request = signed_request(key, {"mac": "02:00:00:00:60:01"})
        assert _send(running, cert, request.body, request.signature)[0] == 401
        assert _one_device(running, ca, "02:00:00:00:60:02")[0] == 200
        assert PASSWORD not in running["log"].read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--upstream", "http://x"], "no fleet CA"),
        (["--ca", "CA"], "no Mender server"),
        (["--ca", "CA", "--upstream", "http://x"], "no Mender credentials"),
        (["--ca", "CA", "--upstream", "http://x", "--username", "u"], "no password for u"),
        (["--ca", "CA", "--upstream", "ftp://x", "--token-file", "CA"], "not an http(s) URL"),
        (["--ca", "CA", "--upstream", "http://x", "--token-file", "CA", "--listen", "9080"], "not ADDR:PORT"),
        ([*TOKEN, "--listen", "0.0.0.0:9080"], "anyone who can reach this address"),
        ([*TOKEN, "--listen", "999.0.0.1:9999"], "is not an IP address"),
        ([*TOKEN, "--listen", "unix:relative.sock"], "needs an absolute path"),
        (["--ca", "CA", "--upstream", "https://[::1", "--token-file", "CA"], "is not a valid URL"),
        (["--ca", "CA", "--upstream", "http://edge:SECRET-PW@x", "--token-file", "CA"], "does not belong in this URL"),
        ([*TOKEN, "--upstream-ca", "TOKEN"], "is not a PEM certificate bundle"),
        (["--ca", "CA", "--upstream", "http://x", "--token-file", "CA"], "no revocation source"),
        (["--ca", "CA", "--upstream", "http://x", "--token-file", "CA", "--no-revocation"], "--identity pin keeps"),
        ([*TOKEN, "--identity", "bogus"], "is not pin, attribute:NAME or none"),
        ([*TOKEN, "--identity", "attribute:"], "is not pin, attribute:NAME or none"),
        (["--ca", "LEAF", "--upstream", "http://x", "--token-file", "CA", *UNBOUND], "cannot vouch for device"),
    ],
)
def test_bad_settings_are_one_line_and_exit_2(tmp_path: Path, fleet: tuple[FleetCA, Path], args: list[str],
                                              message: str) -> None:  # fmt: skip
    token = tmp_path / "token"
    token.write_text("SECRET-TOKEN\n")
    leaf = tmp_path / "leaf.pem"  # a device's certificate where the CA's belongs: it is not a CA
    leaf.write_bytes(fleet[0].issue("dev-ca", ec.generate_private_key(ec.SECP256R1()))[0].public_bytes(Encoding.PEM))
    named = {"CA": str(fleet[1]), "TOKEN": str(token), "LEAF": str(leaf)}
    argv = [named.get(a, a) for a in args]
    proc = imageprov("edge", "serve", *argv, check=False)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "SECRET" not in proc.stderr + proc.stdout


def test_a_port_in_use_is_one_line_and_exit_1(tmp_path: Path, fleet: tuple[FleetCA, Path]) -> None:
    import socket

    token = tmp_path / "token"
    token.write_text("SECRET-TOKEN\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = imageprov("edge", "serve", "--ca", fleet[1], "--upstream", "http://x", "--token-file", token,
                         *UNBOUND, "--listen", f"127.0.0.1:{port}", check=False)  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("{")]  # the JSON log lines aside
    assert proc.returncode == 1 and len(lines) == 1 and "cannot listen on" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over a Unix socket, as nginx reaches the service with --accept unix:PATH."""

    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=10)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(self.path))


def _over_socket(path: Path, method: str, url: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None) -> int:  # fmt: skip
    connection = _UnixConnection(path)
    try:
        connection.request(method, url, body=body, headers=headers or {})
        return connection.getresponse().status
    finally:
        connection.close()


def test_a_unix_socket_replaces_a_stale_one_serves_and_is_removed(
    tmp_path: Path, standin: Any, fleet: tuple[FleetCA, Path]
) -> None:
    path = tmp_path / "run" / "edge.sock"
    path.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # what a killed service leaves behind: nobody listens
    stale.close()
    password = tmp_path / "password"
    password.write_text(PASSWORD)
    argv = [*IMAGEPROV_ARGV, "edge", "serve", "--listen", f"unix:{path}", "--ca", str(fleet[1]), "--upstream",
            standin.url, "--username", USER, "--password-file", str(password), *UNBOUND]  # fmt: skip
    log = tmp_path / "edge.log"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
    try:

        def alive() -> bool:
            assert proc.poll() is None, log.read_text()
            try:
                return _over_socket(path, "GET", "/livez") == 200
            except OSError:
                return False

        wait_for(alive, "edge serve to answer on its socket")
        assert stat.S_IMODE(path.stat().st_mode) == 0o666  # nginx's worker user must be able to connect
        key = ec.generate_private_key(ec.SECP256R1())
        cert, _ = fleet[0].issue("dev-sock", key)
        request = signed_request(key, {"mac": "02:00:00:00:70:01"})
        headers = {**request.headers, "X-SSL-Client-Cert": escaped(cert)}
        assert _over_socket(path, "POST", AUTH_PATH, request.body, headers) == 200
    finally:
        proc.terminate()
        proc.wait(15)
    assert not path.exists(), "the socket is removed when the service stops"
