"""An edge you can put on the internet: the identity bound to the certificate, revocation that cuts a device off
everywhere, and no decision without its sources (``edge serve`` against the stand-in Mender server, with
requests as nginx passes them; through real nginx: test_edge_e2e.py).

Devices are made by the real CLI (``imageprov device-cert``) in a real PKI with its registry, SQLite or
PostgreSQL; what the registry holds is read back with sqlite3 or psycopg, not through imageprov.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from imageprov.pki.ca import load_ca
from tests.conftest import PASSPHRASE, imageprov, imageprov_pki
from tests.edge_support import (
    AUTH_PATH,
    PASSWORD,
    USER,
    Device,
    decisions,
    edge_service,
    escaped,
    get,
    log_lines,
    make_device,
    post,
    public_pem,
    running_standin,
    signed_request,
    wait_for,
)
from tests.pg import Db, Postgres, running_postgres

CHECK = "/_imageprov/check"


def auth(running: dict[str, Any], device: Device, identity: dict[str, Any]) -> tuple[int, bytes]:
    """One auth request from ``device``'s certificate and key, claiming ``identity``."""
    signed = signed_request(device.key, identity)
    headers = {"Content-Type": "application/json", "X-MEN-Signature": signed.signature,
               "X-SSL-Client-Cert": escaped(device.cert)}  # fmt: skip
    status, _, body = post(running["url"] + AUTH_PATH, signed.body, headers)
    return status, body


def route_check(running: dict[str, Any], device: Device) -> int:
    """What nginx's auth_request asks before a device route."""
    return get(running["url"] + CHECK, {"X-SSL-Client-Cert": escaped(device.cert)})[0]


def last_reason(running: dict[str, Any], cn: str) -> str | None:
    lines = [d for d in decisions(running["log"]) if d.get("cn") == cn]
    return lines[-1]["reason"] if lines else None


def preauthorized(standin: Any, identity: dict[str, Any]) -> int:
    return sum(p["identity_data"] == identity for p in standin.preauthorized)


@pytest.fixture(scope="module")
def standin() -> Iterator[Any]:
    with running_standin() as server:
        yield server


@pytest.fixture
def password(tmp_path: Path) -> Path:
    path = tmp_path / "password"
    path.write_text(PASSWORD)
    return path


@contextmanager
def edge(tmp_path: Path, pki: Path, standin: Any, password: Path, *extra: str) -> Iterator[dict[str, Any]]:
    with edge_service(tmp_path, "--pki", pki, "--upstream", standin.url, "--username", USER,
                      "--password-file", password, *extra) as running:  # fmt: skip
        yield running


# -- identity bound to the certificate ---------------------------------------------------------------------------


def test_pin_refuses_a_takeover_and_the_real_device_is_still_accepted(
    tmp_path: Path, pki: Path, standin: Any, password: Path
) -> None:
    dev_a, dev_b, dev_c = (make_device(pki, name) for name in ("PIN-A", "PIN-B", "PIN-C"))
    a, b = {"device_id": "PIN-A"}, {"device_id": "PIN-B"}
    with edge(tmp_path, pki, standin, password) as running:
        assert auth(running, dev_a, a)[0] == 200
        # DEV-A's key, pulled off its card, claims DEV-B, then an invented MAC: refused, never preauthorized.
        assert auth(running, dev_a, b)[0] == 401
        assert last_reason(running, "PIN-A") == "identity-pinned-elsewhere"
        assert auth(running, dev_a, {"mac": "02:de:ad:be:ef:00"})[0] == 401
        assert preauthorized(standin, b) == 0 and preauthorized(standin, {"mac": "02:de:ad:be:ef:00"}) == 0
        # The real DEV-B is accepted afterwards, with no 409 in its way.
        assert auth(running, dev_b, b)[0] == 200
        assert standin.device(b).status == "accepted"
        # And DEV-A's identity may be presented by no other certificate.
        assert auth(running, dev_c, a)[0] == 401
        assert last_reason(running, "PIN-C") == "identity-taken"
        # DEV-A itself goes on as before (from the cache, and again after it is forgotten).
        assert auth(running, dev_a, a)[0] == 200
    with edge(tmp_path, pki, standin, password, "--cache-size", "0") as running:
        assert auth(running, dev_a, a)[0] == 200 and auth(running, dev_a, b)[0] == 401
    # The pin is in the registry, where every edge instance finds it.
    with closing(sqlite3.connect(f"file:{pki / 'registry.sqlite'}?mode=ro", uri=True)) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        pins = [t for t in tables if "pin" in t]
        assert pins, tables
        text = json.dumps([list(row) for t in pins for row in db.execute(f"SELECT * FROM {t}")])
    assert dev_a.serial in text and '{\\"device_id\\":\\"PIN-A\\"}' in text


def test_attribute_binds_the_identity_to_the_common_name(
    tmp_path: Path, pki: Path, standin: Any, password: Path
) -> None:
    dev_a, dev_b = make_device(pki, "ATTR-A"), make_device(pki, "ATTR-B")
    with edge(tmp_path, pki, standin, password, "--identity", "attribute:device_id") as running:
        # Even as its very first request, DEV-A's key cannot claim DEV-B.
        assert auth(running, dev_a, {"device_id": "ATTR-B"})[0] == 401
        assert last_reason(running, "ATTR-A") == "identity-mismatch"
        assert auth(running, dev_a, {"device_id": "attr-a"})[0] == 401  # the same id in another case is another id
        assert auth(running, dev_a, {"mac": "02:00:00:00:00:01"})[0] == 401
        assert preauthorized(standin, {"device_id": "ATTR-B"}) == 0
        assert auth(running, dev_b, {"device_id": "ATTR-B", "mac": "02:00:00:00:00:02"})[0] == 200
        assert auth(running, dev_a, {"device_id": "ATTR-A"})[0] == 200


def test_a_reissued_device_repins_and_is_preauthorized_with_force(
    tmp_path: Path, pki: Path, standin: Any, password: Path
) -> None:
    identity = {"device_id": "RE-1"}
    old = make_device(pki, "RE-1")
    with edge(tmp_path, pki, standin, password) as running:
        assert auth(running, old, identity)[0] == 200
        new = make_device(pki, "RE-1", "--reissue")
        assert auth(running, new, identity)[0] == 200
        assert auth(running, old, identity)[0] == 401 and last_reason(running, "RE-1") == "revoked"
    forced = [p for p in standin.preauthorized if p["identity_data"] == identity]
    assert [p.get("force", False) for p in forced] == [False, True]
    keys = {a.pubkey.strip() for a in standin.device(identity).auth_sets if a.status == "accepted"}
    assert public_pem(new.key).strip() in keys


# -- the registry's word: delivered, pending, unknown ------------------------------------------------------------


def test_a_pending_or_unknown_certificate_is_refused(tmp_path: Path, pki: Path, standin: Any, password: Path) -> None:
    pending = make_device(pki, "PEND-1")
    # A station killed after writing the card, before confirming it: the certificate is still pending.
    with closing(sqlite3.connect(pki / "registry.sqlite")) as db, db:
        db.execute("UPDATE certificates SET status = 'pending' WHERE serial = ?", (pending.serial,))
    unknown = make_device(pki, "GONE-1")
    with closing(sqlite3.connect(pki / "registry.sqlite")) as db, db:
        db.execute("DELETE FROM certificates WHERE serial = ?", (unknown.serial,))
    with edge(tmp_path, pki, standin, password) as running:
        assert auth(running, pending, {"device_id": "PEND-1"})[0] == 401
        assert last_reason(running, "PEND-1") == "not-delivered"
        assert auth(running, unknown, {"device_id": "GONE-1"})[0] == 401
        assert last_reason(running, "GONE-1") == "unknown-certificate"
        assert route_check(running, pending) == 403
    assert preauthorized(standin, {"device_id": "PEND-1"}) == 0 and preauthorized(standin, {"device_id": "GONE-1"}) == 0


# -- revocation that cuts a device off ---------------------------------------------------------------------------


def test_a_revoked_device_is_cut_off_on_every_route_and_in_mender(
    tmp_path: Path, pki: Path, standin: Any, password: Path
) -> None:
    device, other = make_device(pki, "CUT-1"), make_device(pki, "CUT-2")
    with edge(tmp_path, pki, standin, password) as running:
        status, token = auth(running, device, {"device_id": "CUT-1"})
        assert status == 200 and standin.token_works(token.decode())
        assert auth(running, other, {"device_id": "CUT-2"})[0] == 200
        assert route_check(running, device) == 204
        imageprov_pki("revoke", "--pki", pki, "CUT-1")
        revoked_at = time.monotonic()
        # With no reload: every device route refuses, and Mender no longer honours its token (the time is
        # printed; the recheck window's bound is test_edge_decisions' test_the_recheck_window_...).
        wait_for(lambda: route_check(running, device) == 403, "the route check to refuse", timeout=60)
        wait_for(lambda: not standin.token_works(token.decode()), "Mender to reject the auth set", timeout=60)
        took = time.monotonic() - revoked_at
        assert standin.device({"device_id": "CUT-1"}).status == "rejected"
        assert route_check(running, other) == 204 and standin.device({"device_id": "CUT-2"}).status == "accepted"
        cut = [line for line in log_lines(running["log"]) if line.get("event") == "cut-off"]
        assert [d["serial"] for d in cut] == [device.serial] and cut[0]["auth_sets_rejected"] == 1
        metrics = get(running["url"] + "/metrics")[2].decode()
    assert "imageprov_edge_cut_off_total 1.0" in metrics
    print(f"revoked device cut off everywhere {took:.1f} s after 'imageprov revoke'")


def _crl_revoking(pki: Path, serial: int) -> bytes:
    """A CRL the fleet CA signs, revoking ``serial``, made outside the registry (as another tool would)."""
    ca = load_ca(pki, PASSPHRASE.encode())
    now = dt.datetime.now(dt.UTC)
    entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now - dt.timedelta(minutes=5))
    builder = (
        x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject).add_revoked_certificate(entry.build())
    )
    builder = builder.last_update(now - dt.timedelta(minutes=5)).next_update(now + dt.timedelta(days=1))
    return builder.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize("kind", ["denylist", "crl"])
def test_a_device_revoked_in_a_file_is_cut_off_in_mender_too(
    tmp_path: Path, pki: Path, standin: Any, password: Path, kind: str
) -> None:
    """A serial added to the denylist or CRL the edge reads (the registry not told): soon after, its routes are
    refused and its auth set is rejected in Mender, found through the identity it pinned."""
    device, other = make_device(pki, f"FILE-{kind}-1"), make_device(pki, f"FILE-{kind}-2")
    path = tmp_path / kind
    empty = b"# nothing revoked\n" if kind == "denylist" else _crl_revoking(pki, 1)
    path.write_bytes(empty)
    with edge(tmp_path, pki, standin, password, f"--{kind}", str(path)) as running:
        status, token = auth(running, device, {"device_id": device.name})
        assert status == 200 and auth(running, other, {"device_id": other.name})[0] == 200
        revoked = f"{device.serial}\n".encode() if kind == "denylist" else _crl_revoking(pki, device.cert.serial_number)
        new = path.with_name("new")
        new.write_bytes(revoked)
        os.replace(new, path)
        wait_for(lambda: route_check(running, device) == 403, "the route check to refuse", timeout=60)
        wait_for(lambda: not standin.token_works(token.decode()), "Mender to reject the auth set", timeout=60)
        assert standin.device({"device_id": other.name}).status == "accepted" and route_check(running, other) == 204
        cut = [line for line in log_lines(running["log"]) if line.get("event") == "cut-off"]
        assert [(d["serial"], d["source"]) for d in cut] == [(device.serial, kind)]


# -- failing closed ----------------------------------------------------------------------------------------------


def test_no_registry_where_one_is_named_stops_the_start(tmp_path: Path, pki: Path, password: Path) -> None:
    only_ca = tmp_path / "only-ca"
    only_ca.mkdir()
    (only_ca / "ca-cert.pem").write_bytes((pki / "ca-cert.pem").read_bytes())
    typo = tmp_path / "typo"
    typo.mkdir()
    (typo / "ca-cert.pem").write_bytes((pki / "ca-cert.pem").read_bytes())
    (typo / "imageprov.toml").write_text(f'[registry]\nurl = "sqlite://{pki / "registry.sqlit"}"\n')
    for folder in (only_ca, typo):
        proc = imageprov("edge", "serve", "--pki", folder, "--upstream", "http://127.0.0.1:9", "--username", USER,
                         "--password-file", password, check=False)  # fmt: skip
        lines = [line for line in proc.stderr.splitlines() if not line.startswith("{")]
        assert proc.returncode == 1 and len(lines) == 1 and "registry" in lines[0], proc.stderr
        assert not (folder / "registry.sqlite").exists() and not (pki / "registry.sqlit").exists()


def _family(pid: int) -> list[int]:
    """A process and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


@contextmanager
def stopped(server: Postgres) -> Iterator[None]:
    """The whole cluster stopped with SIGSTOP: connections stay open, nothing answers."""
    postmaster = int((server.data / "postmaster.pid").read_text().split()[0])
    family = _family(postmaster)
    for pid in family:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in family:
            os.kill(pid, signal.SIGCONT)


def test_a_registry_that_stops_answering_gives_503_within_its_deadline_and_not_ready(
    tmp_path: Path, pki: Path, standin: Any, password: Path
) -> None:
    with running_postgres() as server:
        db = Db.make("postgresql", server)
        imageprov_pki("registry", "migrate", "--pki", pki, "--to", db.url(pki))
        db.configure(pki)
        device = make_device(pki, "STOP-1")
        with edge(tmp_path, pki, standin, password, "--upstream-timeout", "2", "--recheck", "0") as running:
            assert auth(running, device, {"device_id": "STOP-1"})[0] == 200
            assert get(running["url"] + "/healthz")[0] == 200
            with stopped(server):
                started = time.monotonic()
                status, body = auth(running, device, {"device_id": "STOP-1"})
                auth_took = time.monotonic() - started
                check_status = route_check(running, device)
                ready_status, _, ready = get(running["url"] + "/healthz")
            assert (status, check_status, ready_status) == (503, 503, 503), body
            assert "registry" in json.loads(ready)["problems"]
            # Within its deadline (2 s), with room for a loaded machine; a hang would be 30 s and more.
            assert auth_took < 15, auth_took
            assert last_reason(running, "STOP-1") == "revocation-unknown"
            # Answering again, the edge is ready again and the device gets in.
            wait_for(lambda: get(running["url"] + "/healthz")[0] == 200, "readiness after SIGCONT", timeout=30)
            wait_for(lambda: auth(running, device, {"device_id": "STOP-1"})[0] == 200, "the device again", timeout=30)
    print(f"stopped registry: 503 after {auth_took:.1f} s (deadline 2 s)")


def test_readiness_says_when_the_mender_server_is_down(tmp_path: Path, pki: Path, password: Path) -> None:
    from tests.edge_support import free_port

    down = f"http://127.0.0.1:{free_port()}"
    with edge_service(tmp_path, "--pki", pki, "--upstream", down, "--username", USER, "--password-file", password,
                      "--upstream-timeout", "2") as running:  # fmt: skip
        status, _, body = get(running["url"] + "/healthz")
    assert status == 503 and "upstream" in json.loads(body)["problems"]


# -- bad input ---------------------------------------------------------------------------------------------------

MALFORMED = {
    "20,000 nested [": b"[" * 20_000 + b"]" * 20_000,
    "nested [ in id_data": json.dumps({"id_data": "[" * 20_000, "pubkey": "x"}).encode(),
    "a 5,000-digit integer": json.dumps({"id_data": '{"n": ' + "9" * 5000 + "}", "pubkey": "x"}).encode(),
    "a 5,000-digit integer in the body": b'{"id_data": "{}", "pubkey": "x", "n": ' + b"9" * 5000 + b"}",
    "a lone surrogate": b'{"id_data": "{\\"mac\\": \\"\\\\ud800\\"}", "pubkey": "x"}',
    "a lone surrogate in the body": b'{"id_data": "\\ud800", "pubkey": "x"}',
    "not UTF-8": b'{"id_data": "\xff\xfe", "pubkey": "x"}',
    "id_data not JSON": json.dumps({"id_data": "{mac", "pubkey": "x"}).encode(),
    "empty id_data": json.dumps({"id_data": "{}", "pubkey": "x"}).encode(),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_every_malformed_body_is_400_with_a_json_error(tmp_path: Path, pki: Path, standin: Any, password: Path,
                                                       case: str) -> None:  # fmt: skip
    device = make_device(pki, "BAD-1")
    with edge(tmp_path, pki, standin, password) as running:
        headers = {"Content-Type": "application/json", "X-MEN-Signature": "AAAA",
                   "X-SSL-Client-Cert": escaped(device.cert)}  # fmt: skip
        status, answer_headers, body = post(running["url"] + AUTH_PATH, MALFORMED[case], headers)
        log = running["log"].read_text()
    assert status == 400 and answer_headers["Content-Type"].startswith("application/json"), body
    assert json.loads(body)["error"] and "Traceback" not in log and "internal-error" not in log
