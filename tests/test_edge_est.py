"""Enrollment at first boot: ``edge serve --est`` (RFC 7030) and the bootstrap certificate it takes.

In this process (aiohttp's test server, a PKI and registry made by the CLI,
certificate requests made by ``openssl req``): every decision of edge/est.py,
each with a case that passes only while that check is there (its reason is
asserted, and where another check would also refuse, the case is built so
that only this one can: a foreign CA's bootstrap certificate recorded in the
registry, a device certificate recorded as a bootstrap one...). The bootstrap
profile is linted by pkilint and refused on the device routes. Then the same
through real nginx and TLS: curl with the bootstrap certificate, the answer
read by ``openssl pkcs7 -print_certs`` and the new certificate checked by
``openssl verify``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import logging
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID, ObjectIdentifier

from imageprov.edge.config import Flags, ServeSettings
from imageprov.edge.est import EstSettings, install
from imageprov.edge.http import make_app
from imageprov.edge.nginx import EST_CACERTS, EST_SIMPLEENROLL, EST_SIMPLEREENROLL
from imageprov.pki import ca as ca_module
from imageprov.pki import registry_pg, registry_sqlite
from imageprov.pki.ca import BOOTSTRAP_POLICY, CertificateAuthority, Issued, Subject, load_ca
from imageprov.pki.registry import EnrollVerdict, Kind, PinVerdict, Reason, Registry, Status
from tests.conftest import IMAGEPROV_ARGV, IN_CI, PASSPHRASE, cli_env, imageprov_pki, need, tool
from tests.edge_support import (
    AUTH_PATH,
    PASSWORD,
    USER,
    edge_service,
    escaped,
    free_port,
    log_lines,
    make_device,
    nginx,
    signed_request,
)
from tests.pg import Db, Postgres, running_postgres

SUBJECT = ("--cn", "EST CA", "--org", "imageprov tests")
CHECK = "/_imageprov/check"
Steps = Callable[[TestClient[Any, Any]], Awaitable[Any]]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One PKI for the module: each test enrolls devices of its own in it."""
    path = tmp_path_factory.mktemp("est") / "pki"
    imageprov_pki("ca", "init", path, *SUBJECT)
    return path


@pytest.fixture(scope="module")
def ca(pki: Path) -> CertificateAuthority:
    return load_ca(pki, PASSPHRASE.encode())


def settings(tmp_path: Path, pki: Path, **flags: Any) -> ServeSettings:
    password = tmp_path / "password"
    password.write_text(PASSWORD)
    # No Mender server is asked: every request here is decided before one would be.
    given = Flags(pki=pki, upstream="http://127.0.0.1:9", username=USER, password_file=password, timeout=5, **flags)
    return ServeSettings.from_sources(given, {})


def serve(config: ServeSettings, ca: CertificateAuthority, steps: Steps, *, days: int = 365) -> Any:
    """Run ``steps`` against edge serve --est's application, started and stopped as the CLI does."""

    async def run() -> Any:
        app = make_app(config)
        install(app, EstSettings(ca=ca, days=days))
        async with TestClient(TestServer(app)) as client:
            return await steps(client)

    return asyncio.run(run())


@dataclass(frozen=True)
class Answer:
    status: int
    content_type: str
    body: bytes

    @property
    def mime(self) -> str:
        return self.content_type.split(";")[0]

    @property
    def certificates(self) -> list[x509.Certificate]:
        """The certs-only PKCS#7 of a 200, read by cryptography (through nginx: by openssl)."""
        assert self.status == 200, self.body
        return pkcs7.load_der_pkcs7_certificates(base64.b64decode(self.body))

    @property
    def issued(self) -> x509.Certificate:
        [cert] = self.certificates
        return cert


async def post(
    client: TestClient[Any, Any], path: str, cert: x509.Certificate | None, body: bytes, *, kind: str = "pkcs10"
) -> Answer:
    headers = {"Content-Type": f"application/{kind}"}
    if cert is not None:
        headers["X-SSL-Client-Cert"] = escaped(cert)
    async with client.post(path, data=body, headers=headers) as answer:
        return Answer(answer.status, answer.headers.get("Content-Type", ""), await answer.read())


def enroll(config: ServeSettings, ca: CertificateAuthority, cert: x509.Certificate | None, body: bytes) -> Answer:
    return serve(config, ca, lambda client: post(client, EST_SIMPLEENROLL, cert, body))  # type: ignore[no-any-return]


def reenroll(config: ServeSettings, ca: CertificateAuthority, cert: x509.Certificate, body: bytes) -> Answer:
    return serve(config, ca, lambda client: post(client, EST_SIMPLEREENROLL, cert, body))  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Request:
    """A certificate request made by ``openssl req``, and where its key is."""

    der: bytes
    key: Path

    @property
    def body(self) -> bytes:
        """As an EST client sends it: base64 of the DER, in lines (RFC 8951)."""
        return base64.encodebytes(self.der)

    @property
    def public_key(self) -> Any:
        return x509.load_der_x509_csr(self.der).public_key()


def openssl_csr(directory: Path, cn: str, *, key: str = "ec:P-256", key_file: Path | None = None,
                addext: tuple[str, ...] = ()) -> Request:  # fmt: skip
    """``openssl req`` makes a key (``ec:CURVE``, ``rsa:BITS``, ``ed25519``) or takes ``key_file``, and a request."""
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / f"{cn}-{len(list(directory.iterdir()))}.csr"
    argv: list[str | Path] = ["openssl", "req", "-new", "-subj", f"/CN={cn}", "-outform", "DER", "-out", out]
    if key_file is not None:
        argv += ["-key", key_file]
    else:
        key_file = out.with_suffix(".key")
        algorithm, _, size = key.partition(":")
        argv += ["-newkey", f"rsa:{size}" if algorithm == "rsa" else algorithm, "-nodes", "-keyout", key_file]
        if algorithm == "ec":
            argv += ["-pkeyopt", f"ec_paramgen_curve:{size}"]
    for extension in addext:
        argv += ["-addext", extension]
    tool(*argv)
    return Request(out.read_bytes(), key_file)


def record_bootstrap(pki: Path, issued: Issued, *, kind: str = "bootstrap", status: Status = Status.ACTIVE) -> None:
    with Registry(pki) as registry:
        registry.record(issued, kind=kind, status=status)


def bootstrap(pki: Path, ca: CertificateAuthority, device_id: str) -> Issued:
    """A bootstrap certificate as the line will make it: issued, and recorded as delivered."""
    issued = ca.issue_bootstrap(device_id)
    record_bootstrap(pki, issued)
    return issued


def crafted_bootstrap(
    ca: CertificateAuthority, device_id: str, *, start: dt.datetime, end: dt.datetime, policy: bool = True
) -> Issued:
    """A certificate of the bootstrap profile (the device profile, without ``policy``) with a validity of the
    test's choice, signed by ``ca``."""
    key = ec.generate_private_key(ec.SECP256R1())
    usage = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])).issuer_name(ca.cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )  # fmt: skip
    if policy:
        policies = x509.CertificatePolicies([x509.PolicyInformation(BOOTSTRAP_POLICY, None)])
        builder = builder.add_extension(policies, critical=True)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def cn_of(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def statuses(pki: Path) -> dict[str, Status]:
    with Registry(pki) as registry:
        return {r.serial: r.status for r in registry.all()}


def est_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The service's EST decision lines, as its JSON formatter writes them."""
    return [r.fields for r in caplog.records if getattr(r, "fields", {}).get("event") == "est"]  # type: ignore[attr-defined]


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="imageprov.edge")
    return caplog


def last_reason(caplog: pytest.LogCaptureFixture) -> str | None:
    return est_lines(caplog)[-1]["reason"]  # type: ignore[no-any-return]


# -- the bootstrap profile --------------------------------------------------------------------------------------


def _extensions(cert: x509.Certificate) -> dict[ObjectIdentifier, tuple[bool, Any]]:
    return {e.oid: (e.critical, e.value) for e in cert.extensions}


def test_the_bootstrap_profile_is_the_device_profile_and_a_critical_policy(ca: CertificateAuthority) -> None:
    device, boot = ca.issue_device("P-1").cert, ca.issue_bootstrap("P-1").cert
    shown, extra = _extensions(device), _extensions(boot)
    policies = extra.pop(ExtensionOID.CERTIFICATE_POLICIES)
    assert policies == (True, x509.CertificatePolicies([x509.PolicyInformation(BOOTSTRAP_POLICY, None)]))
    # Everything else is the device certificate's, extension for extension (key identifiers aside).
    for ski in (ExtensionOID.SUBJECT_KEY_IDENTIFIER,):
        shown.pop(ski), extra.pop(ski)
    assert extra == shown
    assert shown[ExtensionOID.EXTENDED_KEY_USAGE] == (False, x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]))
    assert shown[ExtensionOID.BASIC_CONSTRAINTS] == (True, x509.BasicConstraints(ca=False, path_length=None))
    assert boot.subject == device.subject
    assert ca_module.is_bootstrap(boot) and not ca_module.is_bootstrap(device)
    assert ca_module.bootstrap_problems(boot) == []
    assert ca_module.bootstrap_problems(device) == ["it has no certificate policies: it is no bootstrap certificate"]
    lifetime = boot.not_valid_after_utc - boot.not_valid_before_utc
    assert lifetime == dt.timedelta(days=ca_module.BOOTSTRAP_DAYS) + ca_module.BACKDATE


def test_openssl_takes_a_bootstrap_certificate_as_a_tls_client(
    tmp_path: Path, pki: Path, ca: CertificateAuthority
) -> None:
    """What nginx's handshake needs: OpenSSL verifies it for sslclient, its critical policy processed."""
    cert = tmp_path / "boot.pem"
    cert.write_bytes(ca.issue_bootstrap("P-2").cert_pem())
    for extra in ([], ["-policy_check"], ["-policy", BOOTSTRAP_POLICY.dotted_string, "-explicit_policy"]):
        proc = tool("openssl", "verify", "-CAfile", pki / "ca-cert.pem", "-purpose", "sslclient", *extra, cert)
        assert proc.stdout.decode().strip() == f"{cert}: OK"


def _pkilint(path: Path, *chain: Path) -> list[tuple[str, str, str]]:
    """pkilint's findings of NOTICE and above (RFC 5280 lints; the issuer/subject pair's with ``chain``)."""
    try:
        import pkilint  # noqa: F401
    except ImportError:
        message = "pkilint is not installed (pip install -e .[test])"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    linter = "lint_pkix_signer_signee_cert_chain" if chain else "lint_pkix_cert"
    proc = subprocess.run(
        [sys.executable, "-m", f"pkilint.bin.{linter}", "lint", "-s", "NOTICE", "-f", "JSON", *map(str, chain), path],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode in (0, 1), proc.stderr
    results = json.loads(proc.stdout)["results"] if proc.stdout.strip() else []
    return [(r["validator"], f["severity"], f["code"]) for r in results for f in r["finding_descriptions"]]


def test_pkilint_on_the_device_and_bootstrap_profiles(
    tmp_path: Path, pki: Path, ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The device profile and the bootstrap profile lint clean, but for the policy OID's 128-bit arc.

    pkilint's DER decoder takes no OID arc over 32 bits, and a UUID OID's (2.25, X.667) is 128 bits: it
    reports the certificatePolicies extension as undecodable (FATAL). Go before 1.22, wolfSSL and
    pyca/cryptography 38 to 42 could not parse such OIDs either; OpenSSL and cryptography 50 do (the edge's
    nginx and service). The same profile with an arc under 2.25 that fits 32 bits lints clean.
    """
    files = {}
    for name, issued in (("device", ca.issue_device("L-1")), ("bootstrap", ca.issue_bootstrap("L-1"))):
        files[name] = tmp_path / f"{name}.pem"
        files[name].write_bytes(issued.cert_pem())
    assert _pkilint(files["device"]) == []
    assert _pkilint(files["device"], pki / "ca-cert.pem") == []
    assert _pkilint(pki / "ca-cert.pem") == []
    assert _pkilint(files["bootstrap"]) == [("ExtensionsDecodingValidator", "FATAL", "itu.invalid_asn1_syntax")]
    monkeypatch.setattr(ca_module, "BOOTSTRAP_POLICY", ObjectIdentifier("2.25.27027"))
    short = tmp_path / "bootstrap-short-oid.pem"
    short.write_bytes(ca.issue_bootstrap("L-1").cert_pem())
    assert _pkilint(short) == []
    assert _pkilint(short, pki / "ca-cert.pem") == []


# -- the registry: bootstrap certificates beside device certificates ------------------------------------------


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    with running_postgres() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def db_pki(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    db = Db.make(request.param, request.getfixturevalue("postgres") if request.param == "postgresql" else None)
    path = tmp_path / "pki"
    path.mkdir()
    db.configure(path)
    imageprov_pki("ca", "init", path, *SUBJECT)
    return path


def test_a_device_holds_one_live_bootstrap_and_one_live_device_certificate(db_pki: Path) -> None:
    ca = load_ca(db_pki, PASSPHRASE.encode())
    with Registry(db_pki) as registry:
        boot = registry.record(ca.issue_bootstrap("R-1"), kind="bootstrap")
        device = registry.record(ca.issue_device("R-1"))
        assert registry.live("R-1").serial == device.serial  # type: ignore[union-attr]
        assert registry.live("R-1", kind=Kind.BOOTSTRAP).serial == boot.serial  # type: ignore[union-attr]
        assert registry.live_of(["R-1"])["R-1"].serial == device.serial
        with pytest.raises(Exception, match="already has a bootstrap certificate"):
            registry.record(ca.issue_bootstrap("R-1"), kind="bootstrap")
        again = registry.record(ca.issue_bootstrap("R-1"), kind="bootstrap", reissue=True)
        assert registry.record_of(boot.serial).reason is Reason.SUPERSEDED  # type: ignore[union-attr]
        assert registry.live("R-1").serial == device.serial  # type: ignore[union-attr]  # untouched
        state = registry.state_of_serial(again.serial)
        assert state is not None and (state.status, state.kind) == (Status.ACTIVE, Kind.BOOTSTRAP)
    report = json.loads(imageprov_pki("registry", "check", "--pki", db_pki, "--json").stdout)
    assert report["problems"] == []


_OLD_ROW = (
    "'a1', 'old-1', 'device', '" + "0" * 64 + "', 'pem', '2025-01-01T00:00:00+00:00', '2035-01-01T00:00:00+00:00', "
    "'2025-01-01T00:00:00+00:00', 'active'"
)
_OLD_COLUMNS = "serial, device_id, kind, fingerprint, public_key, not_before, not_after, issued_at, status"
_OLD_PIN = (
    "INSERT INTO pins (serial, identity, pinned_at) VALUES ('a1', '{\"mac\":\"1\"}', '2025-01-01T00:00:00+00:00')"
)


def test_a_schema_6_registry_with_a_fleet_is_brought_to_7(db_pki: Path, postgres: Postgres) -> None:
    """The certificates table is made anew in SQLite (a CHECK cannot be widened there): rows, row ids, pins and
    indexes come through, and a bootstrap certificate can be recorded after."""
    sqlite = "sqlite://" in (db_pki / "imageprov.toml").read_text()
    if sqlite:
        (db_pki / "registry.sqlite").unlink()
        with contextlib.closing(sqlite3.connect(db_pki / "registry.sqlite", isolation_level=None)) as old:
            for statement in (s for step in range(1, 7) for s in registry_sqlite._MIGRATIONS[step]):
                old.execute(statement)
            old.execute(f"INSERT INTO certificates (rowid, {_OLD_COLUMNS}) VALUES (41, {_OLD_ROW})")
            old.execute(_OLD_PIN)
            old.execute("PRAGMA user_version = 6")
    else:
        database = f"t_v6_{uuid.uuid4().hex[:12]}"
        url = postgres.create_database(database)
        steps = [s for step in range(1, 7) for s in registry_pg._MIGRATIONS[step]]
        postgres.query(database, "; ".join([*steps, f"INSERT INTO certificates ({_OLD_COLUMNS}) VALUES ({_OLD_ROW})",
                                            _OLD_PIN, "INSERT INTO meta VALUES ('schema_version', 6)"]))  # fmt: skip
        (db_pki / "imageprov.toml").write_text(f'[registry]\nurl = "{url}"\n')
    ca = load_ca(db_pki, PASSPHRASE.encode())
    with Registry(db_pki) as registry:
        assert registry.backend.schema_version() == 7
        [old] = registry.all()
        assert (old.serial, old.device_id, old.status) == ("a1", "old-1", Status.ACTIVE)
        assert registry.pin_of("a1") is not None
        boot = registry.record(ca.issue_bootstrap("old-1"), kind="bootstrap")
        assert registry.live("old-1", kind=Kind.BOOTSTRAP) == boot
    if sqlite:
        with contextlib.closing(sqlite3.connect(db_pki / "registry.sqlite")) as check:
            assert check.execute("SELECT rowid FROM certificates WHERE serial = 'a1'").fetchone() == (41,)
    report = json.loads(imageprov_pki("registry", "check", "--pki", db_pki, "--json").stdout)
    assert (report["schema_version"], report["problems"]) == (7, [])


def test_registry_migrate_and_check_know_the_enrollments(tmp_path: Path, postgres: Postgres) -> None:
    pki = tmp_path / "pki"
    imageprov_pki("ca", "init", pki, *SUBJECT)
    ca = load_ca(pki, PASSPHRASE.encode())
    boot = bootstrap(pki, ca, "M-1")
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    with Registry(pki) as registry:
        done = registry.enroll(boot.serial_hex, ca.certify_device("M-1", key), kind=Kind.BOOTSTRAP, where="EST")
    assert done.verdict is EnrollVerdict.ENROLLED and done.record is not None
    url = postgres.create_database(f"t_mig_{uuid.uuid4().hex[:12]}")
    report = json.loads(imageprov_pki("registry", "migrate", "--pki", pki, "--to", url, "--json").stdout)
    assert (report["enrollments_copied"], report["enrollments_verified"]) == (1, 1)
    with Registry(pki, url) as target:
        assert target.enrollment_of(boot.serial_hex) == done.record.serial
        assert target.live("M-1", kind=Kind.BOOTSTRAP) is None
    assert json.loads(imageprov_pki("registry", "check", "--pki", pki, "--registry", url, "--json").stdout)[
        "problems"] == []  # fmt: skip
    # A used bootstrap certificate made live again by hand: the check finds it.
    with contextlib.closing(sqlite3.connect(pki / "registry.sqlite")) as db, db:
        db.execute("UPDATE certificates SET status = 'active', revoked_at = NULL, reason = NULL WHERE serial = ?",
                   (boot.serial_hex,))  # fmt: skip
    found = imageprov_pki("registry", "check", "--pki", pki, "--json", check=False)
    assert f"certificate {boot.serial_hex} was used to enroll but is not a revoked" in found.stdout


# -- simpleenroll ---------------------------------------------------------------------------------------------------


def test_a_bootstrap_certificate_enrolls_once(
    tmp_path: Path, pki: Path, ca: CertificateAuthority, logs: pytest.LogCaptureFixture
) -> None:
    boot = bootstrap(pki, ca, "E-1")
    # What the request asks beyond its key is not taken: the CA sets the device profile.
    request = openssl_csr(tmp_path, "E-1", addext=("basicConstraints=critical,CA:TRUE", "subjectAltName=DNS:evil.test",
                                                   "extendedKeyUsage=serverAuth"))  # fmt: skip
    config = settings(tmp_path, pki)

    async def steps(client: TestClient[Any, Any]) -> tuple[Answer, str]:
        answer = await post(client, EST_SIMPLEENROLL, boot.cert, request.body)
        async with client.get("/metrics") as metrics:
            return answer, await metrics.text()

    answer, metrics = serve(config, ca, steps, days=90)
    assert answer.content_type == "application/pkcs7-mime; smime-type=certs-only"
    new = answer.issued
    assert new.subject == ca.issue_device("E-1").cert.subject and new.issuer == ca.cert.subject
    assert new.public_key() == request.public_key
    new.verify_directly_issued_by(ca.cert)
    assert _extensions(new)[ExtensionOID.BASIC_CONSTRAINTS] == (True, x509.BasicConstraints(False, None))
    assert _extensions(new)[ExtensionOID.EXTENDED_KEY_USAGE] == (
        False, x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]))  # fmt: skip
    assert set(_extensions(new)) == set(_extensions(ca.issue_device("E-1").cert))  # no SAN, no policy
    assert new.not_valid_after_utc - new.not_valid_before_utc == dt.timedelta(days=90) + ca_module.BACKDATE
    serial = f"{new.serial_number:x}"
    with Registry(pki) as registry:
        used = registry.record_of(boot.serial_hex)
        assert used is not None and (used.status, used.reason) == (Status.REVOKED, Reason.SUPERSEDED)
        live = registry.live("E-1")
        assert live is not None and (live.serial, live.kind, live.status) == (serial, "device", Status.ACTIVE)
        assert live.delivered_to == "EST simpleenroll" and registry.enrollment_of(boot.serial_hex) == serial
        assert registry.live("E-1", kind=Kind.BOOTSTRAP) is None
    [line] = est_lines(logs)
    assert (line["decision"], line["cn"], line["serial"], line["issued"]) == (
        "enrolled",
        "E-1",
        boot.serial_hex,
        serial,
    )
    assert 'imageprov_edge_enrollments_total{operation="simpleenroll",reason="",result="enrolled"} 1.0' in metrics

    # The same bootstrap certificate again, for another key: a second device holds it.
    clone = enroll(config, ca, boot.cert, openssl_csr(tmp_path, "E-1").body)
    assert clone.status == 403 and b"used to enroll already" in clone.body
    assert clone.mime == "text/plain"
    line = est_lines(logs)[-1]
    assert (line["reason"], line["possible_clone"], line["level"]) == ("credential-used", True, "warning")
    assert "possible clone" in line["message"]
    assert [r.levelname for r in logs.records if getattr(r, "fields", None) is line] == ["WARNING"]
    with Registry(pki) as registry:
        assert registry.live("E-1").serial == serial  # type: ignore[union-attr]  # the first device keeps its own

    # The first key again: its answer was lost on the way. It gets a certificate; the lost one is replaced.
    again = enroll(config, ca, boot.cert, request.body)
    assert again.issued.public_key() == request.public_key and again.issued.serial_number != new.serial_number
    with Registry(pki) as registry:
        assert registry.record_of(serial).reason is Reason.SUPERSEDED  # type: ignore[union-attr]
        assert registry.live("E-1").serial == f"{again.issued.serial_number:x}"  # type: ignore[union-attr]
    assert est_lines(logs)[-1]["repeated"] is True


@pytest.mark.parametrize(
    ("key", "status"), [("ec:P-384", 200), ("ec:P-521", 200), ("ed25519", 200), ("rsa:2048", 200),
                        ("rsa:1024", 400), ("ec:P-224", 400)],
)  # fmt: skip
def test_the_keys_mender_takes(tmp_path: Path, pki: Path, ca: CertificateAuthority, key: str, status: int,
                               logs: pytest.LogCaptureFixture) -> None:  # fmt: skip
    name = f"K-{key.replace(':', '-')}"
    boot = bootstrap(pki, ca, name)
    request = openssl_csr(tmp_path, name, key=key)
    answer = enroll(settings(tmp_path, pki), ca, boot.cert, request.body)
    assert answer.status == status, answer.body
    if status == 200:
        assert answer.issued.public_key() == request.public_key
    else:
        assert last_reason(logs) == "key-refused" and b"key" in answer.body
        with Registry(pki) as registry:  # refused: the bootstrap certificate stays good for the right key
            assert registry.live(name, kind=Kind.BOOTSTRAP) is not None and registry.live(name) is None


def _swap_key(request: Request) -> bytes:
    """The request, its key replaced by another of the same size: its signature no longer proves possession."""
    own = request.public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    theirs = other.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert request.der.count(own) == 1 and len(theirs) == len(own)
    return base64.encodebytes(request.der.replace(own, theirs))


# name -> how the request is made, from (tmp_path, pki, ca): (client certificate, body, settings' flags);
# the status and the reason logged. Each passes only while the one check named by its reason is there.
CASES: dict[str, Any] = {
    "no client certificate": (lambda t, p, ca: (None, openssl_csr(t, "C-0").body, {}), 401, "no-certificate"),
    "CN mismatch": (lambda t, p, ca: (bootstrap(p, ca, "C-1").cert, openssl_csr(t, "C-other").body, {}),
                    400, "cn-mismatch"),
    "bad CSR signature (no proof of possession)": (
        lambda t, p, ca: (bootstrap(p, ca, "C-2").cert, _swap_key(openssl_csr(t, "C-2")), {}), 400,
        "bad-csr-signature"),
    "the bootstrap certificate's own key": (lambda t, p, ca: _own_key(t, p, ca, "C-3"), 400, "key-reused"),
    "not base64": (lambda t, p, ca: (bootstrap(p, ca, "C-4").cert, b"-----BEGIN CERTIFICATE REQUEST-----", {}), 400,
                   "bad-csr"),
    "revoked bootstrap certificate": (lambda t, p, ca: _revoked(t, p, ca, "C-5"), 403, "revoked"),
    "revoked in the denylist": (lambda t, p, ca: _denied(t, p, ca, "C-6"), 403, "revoked"),
    "never delivered": (lambda t, p, ca: _pending(t, p, ca, "C-7"), 403, "not-delivered"),
    "unknown to the registry": (lambda t, p, ca: (ca.issue_bootstrap("C-8").cert, openssl_csr(t, "C-8").body, {}),
                                403, "unknown-certificate"),
    "a device certificate": (lambda t, p, ca: (make_device(p, "C-9").cert, openssl_csr(t, "C-9").body, {}), 403,
                             "not-bootstrap"),
    # The profile alone refuses: the registry calls it a bootstrap certificate.
    "a device certificate recorded as bootstrap": (
        lambda t, p, ca: _recorded(t, p, ca.issue_device("C-10"), "bootstrap"), 403, "not-bootstrap"),
    # The registry alone refuses: the certificate has the bootstrap profile.
    "a bootstrap certificate recorded as a device's": (
        lambda t, p, ca: _recorded(t, p, ca.issue_bootstrap("C-11"), "device"), 403, "not-bootstrap"),
    # The signature alone refuses: another CA of the same name, its bootstrap certificate in the registry.
    "another CA's": (lambda t, p, ca: _recorded(t, p, CertificateAuthority.create(ca.subject).issue_bootstrap("C-12"),
                                                "bootstrap"), 403, "untrusted-issuer"),
    "expired": (lambda t, p, ca: _recorded(t, p, crafted_bootstrap(ca, "C-13", start=_days(-30), end=_days(-1)),
                                           "bootstrap"), 403, "expired"),
    "not yet valid": (lambda t, p, ca: _recorded(t, p, crafted_bootstrap(ca, "C-14", start=_days(1), end=_days(30)),
                                                 "bootstrap"), 403, "not-yet-valid"),
    "issued a device certificate since": (lambda t, p, ca: _reissued(t, p, ca, "C-15"), 403, "superseded"),
}  # fmt: skip


def _days(days: int) -> dt.datetime:
    return dt.datetime.now(dt.UTC) + dt.timedelta(days=days)


def _recorded(t: Path, p: Path, issued: Issued, kind: str) -> tuple[x509.Certificate, bytes, dict[str, Any]]:
    record_bootstrap(p, issued, kind=kind)
    return issued.cert, openssl_csr(t, cn_of(issued.cert)).body, {}


def _own_key(t: Path, p: Path, ca: CertificateAuthority, name: str) -> tuple[x509.Certificate, bytes, dict[str, Any]]:
    boot = bootstrap(p, ca, name)
    key = t / "bootstrap.key"
    key.write_bytes(boot.key_pem())
    return boot.cert, openssl_csr(t, name, key_file=key).body, {}


def _revoked(t: Path, p: Path, ca: CertificateAuthority, name: str) -> tuple[x509.Certificate, bytes, dict[str, Any]]:
    boot = bootstrap(p, ca, name)
    imageprov_pki("revoke", "--pki", p, "--serial", boot.serial_hex, "--reason", "key-compromise")
    return boot.cert, openssl_csr(t, name).body, {}


def _denied(t: Path, p: Path, ca: CertificateAuthority, name: str) -> tuple[x509.Certificate, bytes, dict[str, Any]]:
    boot = bootstrap(p, ca, name)  # active in the registry: the denylist alone says revoked
    denylist = t / "denylist"
    denylist.write_text(f"{boot.serial_hex}\n")
    return boot.cert, openssl_csr(t, name).body, {"denylist": denylist}


def _pending(t: Path, p: Path, ca: CertificateAuthority, name: str) -> tuple[x509.Certificate, bytes, dict[str, Any]]:
    issued = ca.issue_bootstrap(name)
    record_bootstrap(p, issued, status=Status.PENDING)  # its station (this registry's lease) gone since
    return issued.cert, openssl_csr(t, name).body, {}


def _reissued(t: Path, p: Path, ca: CertificateAuthority, name: str) -> tuple[x509.Certificate, bytes, dict[str, Any]]:
    boot = bootstrap(p, ca, name)
    make_device(p, name)  # the line stamped the device again, with a certificate of its own
    return boot.cert, openssl_csr(t, name).body, {}


@pytest.fixture
def signatures(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The device ids the CA certifies a key for: a refused request costs no signature."""
    signed: list[str] = []
    original = CertificateAuthority.certify_device

    def certify(self: CertificateAuthority, device_id: str, *args: Any, **kwargs: Any) -> x509.Certificate:
        signed.append(device_id)
        return original(self, device_id, *args, **kwargs)

    monkeypatch.setattr(CertificateAuthority, "certify_device", certify)
    return signed


@pytest.mark.parametrize("case", list(CASES))
def test_refused(tmp_path: Path, pki: Path, ca: CertificateAuthority, case: str,
                 logs: pytest.LogCaptureFixture, signatures: list[str]) -> None:  # fmt: skip
    make, status, reason = CASES[case]
    (tmp_path / "csr").mkdir()
    cert, body, flags = make(tmp_path / "csr", pki, ca)
    before = statuses(pki)
    answer = enroll(settings(tmp_path, pki, **flags), ca, cert, body)
    assert signatures == []
    assert (answer.status, answer.mime) == (status, "text/plain"), answer.body
    assert answer.body.strip() and answer.body.endswith(b"\n")
    assert last_reason(logs) == reason and est_lines(logs)[-1]["decision"] == "refused"
    assert est_lines(logs)[-1]["possible_clone"] is False
    assert statuses(pki) == before  # nothing issued, nothing changed


def test_the_registry_s_transaction_decides_whatever_was_read_before(
    tmp_path: Path,
    pki: Path,
    ca: CertificateAuthority,
    monkeypatch: pytest.MonkeyPatch,
    logs: pytest.LogCaptureFixture,
) -> None:
    """Two edges at one bootstrap certificate both read "not used yet"; the one that records second is refused
    by what the first recorded (here: the read is made to say "enroll", as a race would)."""
    from imageprov.edge.standing import RegistryGate
    from imageprov.pki.registry import EnrollResult

    boot = bootstrap(pki, ca, "TX-1")
    config = settings(tmp_path, pki)
    assert enroll(config, ca, boot.cert, openssl_csr(tmp_path, "TX-1").body).status == 200

    async def stale(*args: Any) -> EnrollResult:
        return EnrollResult(EnrollVerdict.ENROLLED)

    monkeypatch.setattr(RegistryGate, "enrollment_verdict", stale)
    second = enroll(config, ca, boot.cert, openssl_csr(tmp_path, "TX-1").body)
    assert second.status == 403 and last_reason(logs) == "credential-used"


def test_a_revoked_device_gets_nothing_from_its_bootstrap_certificate_again(
    tmp_path: Path, pki: Path, ca: CertificateAuthority, logs: pytest.LogCaptureFixture
) -> None:
    """The key that enrolled, its certificate revoked since (key-compromise): asking again with the bootstrap
    certificate and that key is no lost answer, it is refused."""
    boot = bootstrap(pki, ca, "RV-1")
    request = openssl_csr(tmp_path, "RV-1")
    config = settings(tmp_path, pki)
    assert enroll(config, ca, boot.cert, request.body).status == 200
    imageprov_pki("revoke", "--pki", pki, "RV-1", "--reason", "key-compromise")
    again = enroll(config, ca, boot.cert, request.body)
    assert again.status == 403 and last_reason(logs) == "credential-used"
    with Registry(pki) as registry:
        assert registry.live("RV-1") is None


def test_a_device_certificate_older_than_the_bootstrap_certificate_is_superseded(
    tmp_path: Path, pki: Path, ca: CertificateAuthority
) -> None:
    old = make_device(pki, "S-1")  # e.g. a device stamped before, then stamped again with --enroll
    boot = bootstrap(pki, ca, "S-1")
    answer = enroll(settings(tmp_path, pki), ca, boot.cert, openssl_csr(tmp_path, "S-1").body)
    with Registry(pki) as registry:
        assert registry.record_of(old.serial).reason is Reason.SUPERSEDED  # type: ignore[union-attr]
        assert registry.live("S-1").serial == f"{answer.issued.serial_number:x}"  # type: ignore[union-attr]


def test_a_device_being_stamped_is_not_enrolled_under_its_station(
    tmp_path: Path, pki: Path, ca: CertificateAuthority, logs: pytest.LogCaptureFixture
) -> None:
    with Registry(pki) as station:  # a live station, delivering a device certificate older than the bootstrap one
        station.record(ca.issue_device("B-1"), status=Status.PENDING)
        boot = bootstrap(pki, ca, "B-1")
        answer = enroll(settings(tmp_path, pki), ca, boot.cert, openssl_csr(tmp_path, "B-1").body)
    assert answer.status == 503 and last_reason(logs) == "device-busy"
    with Registry(pki) as registry:
        assert registry.live("B-1", kind=Kind.BOOTSTRAP) is not None


def test_the_wrong_content_type_and_a_huge_body(tmp_path: Path, pki: Path, ca: CertificateAuthority) -> None:
    boot = bootstrap(pki, ca, "T-1")
    body = openssl_csr(tmp_path, "T-1").body

    async def steps(client: TestClient[Any, Any]) -> list[int]:
        wrong = await post(client, EST_SIMPLEENROLL, boot.cert, body, kind="x-www-form-urlencoded")
        huge = await post(client, EST_SIMPLEENROLL, boot.cert, b"A" * 100_000)
        return [wrong.status, huge.status, (await post(client, EST_SIMPLEENROLL, boot.cert, body)).status]

    assert serve(settings(tmp_path, pki), ca, steps) == [415, 413, 200]


def test_cacerts_is_the_fleet_ca(tmp_path: Path, pki: Path, ca: CertificateAuthority) -> None:
    async def steps(client: TestClient[Any, Any]) -> tuple[int, str, str, bytes]:
        async with client.get(EST_CACERTS) as answer:
            return answer.status, answer.content_type, answer.headers["Content-Transfer-Encoding"], await answer.read()

    status, content_type, encoding, body = serve(settings(tmp_path, pki), ca, steps)
    assert (status, content_type, encoding) == (200, "application/pkcs7-mime", "base64")
    assert pkcs7.load_der_pkcs7_certificates(base64.b64decode(body)) == [ca.cert]
    assert max(len(line) for line in body.splitlines()) == 64


def test_est_needs_the_registry_and_the_pki_s_own_ca(tmp_path: Path, pki: Path, ca: CertificateAuthority) -> None:
    for flags, said in (({"registry": False, "no_revocation": True, "identity": "none"}, "registry"),
                        ({"ca": _other_ca_file(tmp_path)}, "is another CA")):  # fmt: skip
        with pytest.raises(Exception, match=said):
            install(make_app(settings(tmp_path, pki, **flags)), EstSettings(ca=ca))


def _other_ca_file(tmp_path: Path) -> Path:
    path = tmp_path / "other-ca.pem"
    path.write_bytes(CertificateAuthority.create(Subject("Other CA")).cert.public_bytes(serialization.Encoding.PEM))
    return path


# -- simplereenroll ------------------------------------------------------------------------------------------------


def _enrolled(tmp_path: Path, pki: Path, ca: CertificateAuthority, name: str) -> tuple[x509.Certificate, Request]:
    """A device enrolled with its bootstrap certificate: its certificate, and its request (its key)."""
    request = openssl_csr(tmp_path, name)
    return enroll(settings(tmp_path, pki), ca, bootstrap(pki, ca, name).cert, request.body).issued, request


def test_a_device_renews_its_certificate_once(
    tmp_path: Path, pki: Path, ca: CertificateAuthority, logs: pytest.LogCaptureFixture
) -> None:
    first, request = _enrolled(tmp_path, pki, ca, "N-1")
    renewed = reenroll(settings(tmp_path, pki), ca, first, request.body)  # the same key, kept in its TPM
    assert renewed.status == 200 and renewed.content_type == "application/pkcs7-mime; smime-type=certs-only"
    second = renewed.issued
    assert second.public_key() == first.public_key() and second.serial_number != first.serial_number
    with Registry(pki) as registry:
        old = registry.record_of(f"{first.serial_number:x}")
        assert old is not None and (old.status, old.reason) == (Status.REVOKED, Reason.SUPERSEDED)
        assert registry.live("N-1").serial == f"{second.serial_number:x}"  # type: ignore[union-attr]
    line = est_lines(logs)[-1]
    assert (line["operation"], line["decision"], line["replaced"]) == ("simplereenroll", "enrolled",
                                                                       f"{first.serial_number:x}")  # fmt: skip
    # The old certificate again, for another key: refused, a possible clone.
    again = reenroll(settings(tmp_path, pki), ca, first, openssl_csr(tmp_path, "N-1").body)
    assert again.status == 403 and last_reason(logs) == "credential-used" and est_lines(logs)[-1]["possible_clone"]


REENROLL_CASES: dict[str, Any] = {
    "revoked": (lambda t, p, ca: _revoked_device(t, p, ca, "NR-1"), 403, "revoked"),
    "a bootstrap certificate": (lambda t, p, ca: (bootstrap(p, ca, "NR-2").cert, "NR-2"), 403,
                                "bootstrap-certificate"),
    # The registry alone refuses: no bootstrap policy in the certificate.
    "a device certificate recorded as bootstrap": (lambda t, p, ca: _as_bootstrap(p, ca, "NR-3"), 403,
                                                   "bootstrap-certificate"),
    "CN mismatch": (lambda t, p, ca: (_enrolled(t, p, ca, "NR-4")[0], "NR-other"), 400, "cn-mismatch"),
    # Validity alone refuses: the registry holds it active (an expired certificate renews no more: a new
    # bootstrap certificate, or the line, brings the device back).
    "expired": (lambda t, p, ca: _expired_device(p, ca, "NR-5"), 403, "expired"),
}  # fmt: skip


def _revoked_device(t: Path, p: Path, ca: CertificateAuthority, name: str) -> tuple[x509.Certificate, str]:
    cert, _ = _enrolled(t, p, ca, name)
    imageprov_pki("revoke", "--pki", p, name, "--reason", "key-compromise")
    return cert, name


def _expired_device(p: Path, ca: CertificateAuthority, name: str) -> tuple[x509.Certificate, str]:
    issued = crafted_bootstrap(ca, name, start=_days(-30), end=_days(-1), policy=False)
    record_bootstrap(p, issued, kind="device")
    return issued.cert, name


def _as_bootstrap(p: Path, ca: CertificateAuthority, name: str) -> tuple[x509.Certificate, str]:
    issued = ca.issue_device(name)
    record_bootstrap(p, issued)
    return issued.cert, name


@pytest.mark.parametrize("case", list(REENROLL_CASES))
def test_reenroll_refused(tmp_path: Path, pki: Path, ca: CertificateAuthority, case: str,
                         logs: pytest.LogCaptureFixture) -> None:  # fmt: skip
    make, status, reason = REENROLL_CASES[case]
    cert, cn = make(tmp_path, pki, ca)
    before = statuses(pki)
    answer = reenroll(settings(tmp_path, pki), ca, cert, openssl_csr(tmp_path / "renew", cn).body)
    assert (answer.status, answer.mime) == (status, "text/plain"), answer.body
    assert last_reason(logs) == reason
    assert statuses(pki) == before


@pytest.mark.parametrize("key", ["the same key", "a new key"])
def test_the_identity_pin_moves_to_the_renewed_certificate(
    tmp_path: Path, pki: Path, ca: CertificateAuthority, key: str
) -> None:
    """Pins start at a certificate's first auth request: a bootstrap certificate never has one (refused first).
    A renewal for the same key (a TPM's) hands the pin on at once, with the Mender device id: the edges'
    cut-off then finds no revoked pin, and the key, still the device's, is never rejected in Mender. For a
    new key the old key is cut off, and the new certificate takes the pin over at its first auth request."""
    name = f"PIN-{len(key)}"
    first, request = _enrolled(tmp_path, pki, ca, name)
    old, identity = (
        f"{first.serial_number:x}",
        json.dumps({"mac": f"02:00:00:00:27:{len(key):02x}"}, separators=(",", ":")),
    )
    with Registry(pki) as registry:
        assert registry.pin_identity(old, identity).verdict is PinVerdict.PINNED
        registry.set_mender_device(old, "mender-27")
    body = request.body if key == "the same key" else openssl_csr(tmp_path / "rekey", name).body
    second = reenroll(settings(tmp_path, pki), ca, first, body).issued
    new = f"{second.serial_number:x}"
    with Registry(pki) as registry:
        cut = [pin.serial for pin in registry.uncut_revoked_pins()]
        verdict = registry.pin_identity(new, identity)
        pin, before = registry.pin_of(new), registry.pin_of(old)
    assert pin is not None and pin.mender_device_id == "mender-27" and before is None
    if key == "the same key":
        assert cut == [] and verdict.verdict is PinVerdict.SAME
    else:
        assert cut == [old] and (verdict.verdict, verdict.holder) == (PinVerdict.REPINNED, old)


def test_the_registry_decides_each_enrollment_once(pki: Path, ca: CertificateAuthority) -> None:
    """Two edges with one credential: the first enrolls, the second finds it used (its certificate never recorded)."""
    boot = bootstrap(pki, ca, "RACE-1")
    key = ec.generate_private_key(ec.SECP256R1())
    with Registry(pki) as one, Registry(pki) as two:
        spki = key.public_key().public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo).decode()  # fmt: skip
        assert one.enrollment_verdict(boot.serial_hex, spki, kind=Kind.BOOTSTRAP).verdict is EnrollVerdict.ENROLLED
        assert two.enrollment_verdict(boot.serial_hex, spki, kind=Kind.BOOTSTRAP).verdict is EnrollVerdict.ENROLLED
        other = ec.generate_private_key(ec.SECP256R1()).public_key()
        first = one.enroll(boot.serial_hex, ca.certify_device("RACE-1", key.public_key()), kind=Kind.BOOTSTRAP,
                           where="EST simpleenroll")  # fmt: skip
        late = ca.certify_device("RACE-1", other)
        second = two.enroll(boot.serial_hex, late, kind=Kind.BOOTSTRAP, where="EST simpleenroll")
        assert (first.verdict, second.verdict) == (EnrollVerdict.ENROLLED, EnrollVerdict.USED)
        assert second.other == first.record.serial  # type: ignore[union-attr]
        assert one.record_of(f"{late.serial_number:x}") is None


# -- a bootstrap certificate anywhere else ----------------------------------------------------------------------


async def _auth_and_route(client: TestClient[Any, Any], issued: Issued) -> list[int]:
    signed = signed_request(issued.key, {"device_id": "X"})
    headers = {**signed.headers, "X-SSL-Client-Cert": escaped(issued.cert)}
    async with client.post(AUTH_PATH, data=signed.body, headers=headers) as answer:
        auth = answer.status
    async with client.get(CHECK, headers={"X-SSL-Client-Cert": escaped(issued.cert)}) as answer:
        return [auth, answer.status]


@pytest.mark.parametrize("recorded_as", ["bootstrap profile", "device profile recorded as bootstrap"])
def test_a_bootstrap_certificate_is_no_mender_identity(
    tmp_path: Path, pki: Path, ca: CertificateAuthority, recorded_as: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Refused at the auth request and on every device route: by its policy, and by the registry's kind."""
    caplog.set_level(logging.INFO, logger="imageprov.edge")
    name = f"X-{len(recorded_as)}"
    issued = ca.issue_bootstrap(name) if recorded_as == "bootstrap profile" else ca.issue_device(name)
    record_bootstrap(pki, issued)
    assert serve(settings(tmp_path, pki), ca, lambda client: _auth_and_route(client, issued)) == [401, 403]
    fields = [getattr(r, "fields", {}) for r in caplog.records]
    decision = next(f for f in fields if "decision" in f and f.get("cn") == name)
    route = next(f for f in fields if f.get("event") == "route-refused" and f.get("serial") == issued.serial_hex)
    assert decision["reason"] == route["reason"] == "bootstrap-certificate"
    with Registry(pki) as registry:  # never pinned: an identity needs an admitted certificate
        assert registry.pin_of(issued.serial_hex) is None


# -- through nginx ------------------------------------------------------------------------------------------------


def _curl(port: int, path: str, pki: Path, cert: Path, key: Path, out: Path, body: Path | None = None) -> int:
    """curl as the device program will run it: TLS with the client certificate, the answer into ``out``."""
    argv: list[str | Path] = ["curl", "--silent", "--show-error", "--cacert", pki / "ca-cert.pem", "--cert", cert,
                              "--key", key, "--output", out, "--write-out", "%{http_code}"]  # fmt: skip
    if body is not None:
        argv += ["--header", "Content-Type: application/pkcs10", "--data-binary", f"@{body}"]
    return int(tool(*argv, f"https://127.0.0.1:{port}{path}").stdout)


def _print_certs(answer: Path) -> Path:
    """``openssl base64 -d`` then ``openssl pkcs7 -print_certs``: the certificates of a certs-only answer, as PEM."""
    der, pem = answer.with_suffix(".p7b"), answer.with_suffix(".pem")
    tool("openssl", "base64", "-d", "-in", answer, "-out", der)
    tool("openssl", "pkcs7", "-inform", "DER", "-in", der, "-print_certs", "-out", pem)
    return pem


def test_enrollment_through_nginx(tmp_path: Path, pki: Path, ca: CertificateAuthority) -> None:
    need("nginx", "curl", "openssl")
    server = tmp_path / "server"
    imageprov_pki("server-cert", "--pki", pki, "--host", "localhost", "--ip", "127.0.0.1", "--out", server)
    boot_cert, boot_key = bootstrap(pki, ca, "NX-1").write_to(tmp_path / "boot", "cert.pem", "key.pem")
    passphrase, password = tmp_path / "passphrase", tmp_path / "password"
    passphrase.write_text(PASSPHRASE + "\n")
    password.write_text(PASSWORD + "\n")
    port = free_port()
    with edge_service(tmp_path, "--pki", pki, "--upstream", "http://127.0.0.1:9", "--username", USER,
                      "--password-file", password, "--est", "--passphrase-file", passphrase,
                      "--est-days", "30") as service:  # fmt: skip
        conf = imageprov_pki("edge", "nginx", "--pki", pki, "--server-cert", server, "--upstream", "http://127.0.0.1:9",
                             "--listen", f"127.0.0.1:{port}", "--accept", service["url"], "--est").stdout  # fmt: skip
        with nginx(tmp_path, conf, port):
            # The fleet CA, as the device fetches it.
            assert _curl(port, EST_CACERTS, pki, boot_cert, boot_key, tmp_path / "cacerts.b64") == 200
            cacerts = _print_certs(tmp_path / "cacerts.b64")
            assert x509.load_pem_x509_certificates(cacerts.read_bytes()) == [ca.cert]
            # The device's key and request, made by openssl as the device program will; enrolled once.
            request = openssl_csr(tmp_path / "device", "NX-1", key="ec:P-256")
            csr = tmp_path / "device" / "request.b64"
            csr.write_bytes(request.body)
            answer = tmp_path / "enrolled.b64"
            assert _curl(port, EST_SIMPLEENROLL, pki, boot_cert, boot_key, answer, csr) == 200, answer.read_text()
            issued = _print_certs(answer)
            verified = tool("openssl", "verify", "-CAfile", pki / "ca-cert.pem", "-purpose", "sslclient", issued)
            assert verified.stdout.decode().strip() == f"{issued}: OK"
            [cert] = x509.load_pem_x509_certificates(issued.read_bytes())
            assert cert.public_key() == request.public_key and cn_of(cert) == "NX-1"
            # Again with the same bootstrap certificate and another key: refused, logged as a possible clone.
            clone = openssl_csr(tmp_path / "clone", "NX-1")
            (tmp_path / "clone.b64").write_bytes(clone.body)
            refused = tmp_path / "refused.txt"
            assert _curl(port, EST_SIMPLEENROLL, pki, boot_cert, boot_key, refused, tmp_path / "clone.b64") == 403
            assert "used to enroll already" in refused.read_text()
            # The bootstrap certificate on a device route: the route check refuses it, Mender is never asked.
            assert _curl(port, "/api/devices/v1/deployments/device/deployments/next", pki, boot_cert, boot_key,
                         tmp_path / "next.json") == 403  # fmt: skip
            # The new certificate renews itself, with the key that never left the device.
            renewed = tmp_path / "renewed.b64"
            assert _curl(port, EST_SIMPLEREENROLL, pki, issued, request.key, renewed, csr) == 200, renewed.read_text()
            [new] = x509.load_pem_x509_certificates(_print_certs(renewed).read_bytes())
            assert new.public_key() == request.public_key and new.not_valid_after_utc > cert.not_valid_after_utc - \
                dt.timedelta(seconds=5)  # fmt: skip
        lines = log_lines(service["log"])
    est = [line for line in lines if line.get("event") == "est"]
    assert [(line["operation"], line["decision"], line["reason"]) for line in est] == [
        ("simpleenroll", "enrolled", None), ("simpleenroll", "refused", "credential-used"),
        ("simplereenroll", "enrolled", None)]  # fmt: skip
    assert est[1]["possible_clone"] is True and "possible clone" in est[1]["message"]
    assert [line["reason"] for line in lines if line.get("event") == "route-refused"] == ["bootstrap-certificate"]
    assert PASSPHRASE not in service["log"].read_text() and PASSWORD not in service["log"].read_text()
    assert PASSPHRASE not in " ".join(map(str, service["proc"].args))


def test_nginx_sends_only_the_three_est_paths_to_the_service(tmp_path: Path, pki: Path) -> None:
    """nginx -t takes the configuration; each EST path passes the certificate nginx verified, and none asks the
    route check (which refuses bootstrap certificates); --est needs --accept."""
    need("nginx")
    server = tmp_path / "server"
    imageprov_pki("server-cert", "--pki", pki, "--host", "localhost", "--out", server)
    base = ["edge", "nginx", "--pki", pki, "--server-cert", server, "--upstream", "http://127.0.0.1:9"]
    conf = imageprov_pki(*base, "--accept", "unix:/run/imageprov/edge.sock", "--est").stdout
    blocks = {path: conf.split(f"location = {path} {{", 1)[1].split("}", 1)[0]
              for path in (EST_CACERTS, EST_SIMPLEENROLL, EST_SIMPLEREENROLL)}  # fmt: skip
    for block in blocks.values():
        assert "proxy_set_header X-SSL-Client-Cert $ssl_client_escaped_cert;" in block
        assert "auth_request" not in block and "proxy_pass http://imageprov_accept;" in block
    locations = [line.strip() for line in conf.splitlines() if line.strip().startswith("location ")]
    assert [line for line in locations if ".well-known" in line] == [f"location = {p} {{" for p in blocks]
    assert ".well-known" not in imageprov_pki(*base, "--accept", "unix:/run/imageprov/edge.sock").stdout
    refused = imageprov_pki(*base, "--est", check=False)
    assert refused.returncode == 2 and "--est sends enrollments to edge serve" in refused.stderr
    (tmp_path / "nginx.conf").write_text(conf.replace("unix:/run/imageprov/edge.sock", "127.0.0.1:9"))
    tool("nginx", "-t", "-p", tmp_path, "-c", tmp_path / "nginx.conf")


def test_edge_serve_est_refuses_what_it_cannot_do(tmp_path: Path, pki: Path) -> None:
    password = tmp_path / "password"
    password.write_text(PASSWORD)
    base = ["edge", "serve", "--upstream", "http://127.0.0.1:9", "--username", USER, "--password-file", password]
    for extra, said in ((["--pki", pki, "--no-registry", "--no-revocation", "--identity", "none", "--est"], "--pki"),
                        (["--pki", pki, "--passphrase-file", password], "only --est uses")):  # fmt: skip
        proc = imageprov_pki(*base, *extra, check=False)
        assert proc.returncode == 2 and said in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
    wrong = tmp_path / "wrong"
    wrong.write_text("not the passphrase\n")
    argv = [*base, "--pki", pki, "--est", "--passphrase-file", wrong, "--listen", f"127.0.0.1:{free_port()}"]
    proc = subprocess.run([*IMAGEPROV_ARGV, *map(str, argv)], capture_output=True, text=True, timeout=120,
                          env=cli_env(None), stdin=subprocess.DEVNULL)  # fmt: skip
    assert proc.returncode == 1 and "wrong passphrase" in proc.stderr, proc.stderr
    assert "not the passphrase" not in proc.stderr


def test_the_enrollment_benchmark_runs_and_checks_its_answers() -> None:
    """``scripts/bench edge --est`` on a few devices: it enrolls and renews each, checks each answer, prints the
    ratio (so that the benchmark cannot rot between the times it is run for figures)."""
    need("nginx")
    script = Path(__file__).resolve().parent.parent / "scripts" / "bench_edge.py"
    proc = subprocess.run([sys.executable, str(script), "--est", "--devices", "5"], capture_output=True, text=True,
                          timeout=600, stdin=subprocess.DEVNULL)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert [line.split(":")[0].strip() for line in lines if line.strip().startswith(("enroll:", "renew:"))] == [
        "enroll", "renew"]  # fmt: skip
    assert "ratio enroll at the edge / issue at the station:" in lines[-1]
