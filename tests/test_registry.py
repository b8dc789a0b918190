"""The certificate registry, revocation, the CRL and the denylist, and two processes issuing at once.

Every test that takes ``pki`` runs twice: against SQLite in the PKI, and
against a real PostgreSQL started by the test session (tests/pg.py).
"""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from imageprov.errors import PkiError
from imageprov.pki.ca import load_ca
from imageprov.pki.registry import Reason, Registry, Status
from imageprov.pki.registry_base import SCHEMA_VERSION
from tests.conftest import PASSPHRASE, cli_env, imageprov_pki, need, tool
from tests.pg import Db, Postgres, running_postgres


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return imageprov_pki(*args, check=False)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    with running_postgres() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest) -> Db:
    return Db.make(request.param, request.getfixturevalue("postgres") if request.param == "postgresql" else None)


@pytest.fixture
def pki(tmp_path: Path, db: Db) -> Path:
    """A PKI whose imageprov.toml names the registry before ``ca init``, which makes it there."""
    path = tmp_path / "pki"
    path.mkdir()
    db.configure(path)
    assert cli("ca", "init", path, "--cn", "Fleet CA", "--org", "ACME").returncode == 0
    return path


def test_one_live_certificate_per_device(pki: Path, tmp_path: Path) -> None:
    assert cli("device-cert", "--pki", pki, "--device-id", "d1", "--out", tmp_path / "a").returncode == 0
    proc = cli("device-cert", "--pki", pki, "--device-id", "d1", "--out", tmp_path / "b")
    assert proc.returncode == 1 and "--reissue" in proc.stderr
    assert not (tmp_path / "b").exists()
    assert cli("device-cert", "--pki", pki, "--device-id", "d1", "--out", tmp_path / "b", "--reissue").returncode == 0
    records = json.loads(cli("devices", "--pki", pki, "--json").stdout)
    assert [(r["status"], r["reason"]) for r in records] == [("revoked", "superseded"), ("active", None)]
    first = x509.load_pem_x509_certificate((tmp_path / "a/mender-cert.pem").read_bytes())
    assert records[0]["serial"] == f"{first.serial_number:x}"
    assert records[1]["delivered_to"] == str(tmp_path / "b")
    for record in records:
        assert set(record) >= {
            "device_id",
            "serial",
            "fingerprint",
            "not_before",
            "not_after",
            "status",
            "revoked_at",
            "reason",
            "delivered_to",
        }


def test_registry_keeps_public_key_and_fingerprint(pki: Path, tmp_path: Path, db: Db) -> None:
    cli("device-cert", "--pki", pki, "--device-id", "d1", "--out", tmp_path / "a")
    pem = (tmp_path / "a/mender-cert.pem").read_bytes()
    fingerprint = (
        tool("openssl", "x509", "-in", tmp_path / "a/mender-cert.pem", "-noout", "-fingerprint", "-sha256")
        .stdout.decode()
        .split("=", 1)[1]
        .strip()
        .replace(":", "")
        .lower()
    )
    [row] = db.rows(pki, "SELECT fingerprint, public_key FROM certificates")
    assert row[0] == fingerprint
    assert str(row[1]).encode() == tool("openssl", "x509", "-noout", "-pubkey", input=pem).stdout
    # The device's private key is never in the registry.
    assert "PRIVATE" not in repr(db.rows(pki, "SELECT * FROM certificates"))
    if db.kind == "sqlite":
        assert b"PRIVATE" not in (pki / "registry.sqlite").read_bytes()


def test_revoke_crl_and_denylist(pki: Path, tmp_path: Path) -> None:
    for device in ("d1", "d2", "d3"):
        assert cli("device-cert", "--pki", pki, "--device-id", device, "--out", tmp_path / device).returncode == 0
    serial_d2 = f"{x509.load_pem_x509_certificate((tmp_path / 'd2/mender-cert.pem').read_bytes()).serial_number:x}"
    assert cli("revoke", "--pki", pki, "d1", "--reason", "key-compromise").returncode == 0
    assert cli("revoke", "--pki", pki, "--serial", serial_d2.upper()).returncode == 0
    again = cli("revoke", "--pki", pki, "d1")
    assert again.returncode == 1 and "already revoked" in again.stderr
    assert cli("revoke", "--pki", pki, "nobody").returncode == 1

    assert cli("crl", "--pki", pki, "--out", tmp_path / "crl.pem", "--days", "7").returncode == 0
    text = tool(
        "openssl", "crl", "-in", tmp_path / "crl.pem", "-CAfile", pki / "ca-cert.pem", "-verify", "-noout", "-text"
    )
    assert b"verify OK" in text.stderr + text.stdout
    out = text.stdout.decode()
    assert "Key Compromise" in out and out.count("Serial Number:") == 2
    assert serial_d2.upper() in out.replace(":", "")
    crl = x509.load_pem_x509_crl((tmp_path / "crl.pem").read_bytes())
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 1
    assert (crl.next_update_utc - crl.last_update_utc).days == 7  # type: ignore[operator]
    # Backdated as the certificates are: an edge whose clock is a minute behind still takes it.
    assert crl.last_update_utc < dt.datetime.now(dt.UTC) - dt.timedelta(minutes=4)

    assert cli("crl", "--pki", pki, "--out", tmp_path / "crl.der", "--der").returncode == 0
    der = x509.load_der_x509_crl((tmp_path / "crl.der").read_bytes())
    assert der.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 2

    assert cli("denylist", "--pki", pki, "--out", tmp_path / "deny").returncode == 0
    lines = (tmp_path / "deny").read_text().splitlines()
    assert len(lines) == 2 and serial_d2 in lines
    # openssl verify with the CRL refuses d1 and d2 but not d3.
    for device, ok in (("d1", False), ("d2", False), ("d3", True)):
        proc = tool(
            "openssl",
            "verify",
            "-crl_check",
            "-CAfile",
            pki / "ca-cert.pem",
            "-CRLfile",
            tmp_path / "crl.pem",
            tmp_path / device / "mender-cert.pem",
            check=False,
        )
        assert (proc.returncode == 0) is ok, proc.stdout + proc.stderr


def _issue_many(pki: str, ids: list[str], queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    ca = load_ca(Path(pki), PASSPHRASE.encode())
    ok, refused = 0, 0
    with Registry(Path(pki)) as registry:
        for device in ids:
            try:
                registry.record(ca.issue_device(device), status=Status.ACTIVE)
                ok += 1
            except PkiError:
                refused += 1
    queue.put((ok, refused))


def test_two_processes_issuing_at_once(pki: Path, db: Db) -> None:
    context = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue = context.Queue()  # type: ignore[type-arg]
    shared = [f"same-{i}" for i in range(15)]
    jobs = [
        context.Process(target=_issue_many, args=(str(pki), [f"a-{i}" for i in range(25)] + shared, queue)),
        context.Process(target=_issue_many, args=(str(pki), [f"b-{i}" for i in range(25)] + shared, queue)),
    ]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(120)
        assert job.exitcode == 0
    results = [queue.get() for _ in jobs]
    assert sum(ok for ok, _ in results) == 65 and sum(r for _, r in results) == 15
    rows = db.rows(pki, "SELECT device_id, serial, status FROM certificates")
    assert len(rows) == 65 and len({serial for _, serial, _ in rows}) == 65
    assert len({device for device, _, _ in rows}) == 65
    assert all(status == "active" for _, _, status in rows)


def test_registry_record_roundtrip(pki: Path) -> None:
    ca = load_ca(pki, PASSPHRASE.encode())
    with Registry(pki) as registry:
        pending = registry.record(ca.issue_device("x"), status=Status.PENDING)
        assert registry.live("x") == pending
        registry.deliver(pending.serial, "/out/x.sdimg")
        active = registry.live("x")
        assert active is not None and active.status is Status.ACTIVE and active.delivered_to == "/out/x.sdimg"
        [revoked] = registry.revoke(device_id="x", reason=Reason.CESSATION_OF_OPERATION)
        assert revoked.reason is Reason.CESSATION_OF_OPERATION and revoked.revoked_at
        assert registry.live("x") is None


def test_missing_pki_is_one_line(tmp_path: Path) -> None:
    proc = cli("devices", "--pki", tmp_path / "nowhere")
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        f"imageprov: error: no PKI at {tmp_path}/nowhere (create one with 'imageprov ca init {tmp_path}/nowhere')"
    ]


def _one_error_line(proc: subprocess.CompletedProcess[str], code: int = 1) -> str:
    """A refusal is one line on stderr (no traceback) and the documented exit code."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code and len(lines) == 1 and lines[0].startswith("imageprov: error: "), proc.stderr
    return lines[0]


def test_deliver_refuses_a_certificate_revoked_meanwhile(pki: Path) -> None:
    ca = load_ca(pki, PASSPHRASE.encode())
    with Registry(pki) as registry:
        pending = registry.record(ca.issue_device("x"), status=Status.PENDING)
        assert registry.status_of_serial(pending.serial.upper()) is Status.PENDING
        # Another command revokes it while its image is being built.
        assert cli("revoke", "--pki", pki, "x").returncode == 0
        with pytest.raises(PkiError, match="cannot be delivered: it is revoked"):
            registry.deliver(pending.serial, "/out/x.sdimg")
        assert registry.status_of_serial(pending.serial) is Status.REVOKED
        assert registry.status_of_serial("0" + pending.serial) is Status.REVOKED
        assert registry.status_of_serial("abcdef") is None
        # The edge asks from threads of its own.
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(registry.status_of_serial, [pending.serial] * 8))
        assert answers == [Status.REVOKED] * 8


# A station on another host, and PID 1 of a container: the two cases a
# host:pid owner got wrong (one taken for dead, the other for alive forever).
_STATION = """
import os, socket, sys
from pathlib import Path
socket.sethostname("other-host")
from imageprov.pki.ca import load_ca
from imageprov.pki.registry import Registry, Status
pki = Path(sys.argv[1])
with Registry(pki) as registry:
    ca = load_ca(pki, os.environ["IMAGEPROV_CA_PASSPHRASE"].encode())
    registry.record(ca.issue_device("dev-1"), status=Status.PENDING)
    print("recorded", flush=True)
    sys.stdin.read()
"""


def test_a_pending_certificate_is_revoked_only_once_its_station_is_gone(pki: Path, db: Db) -> None:
    need("unshare")
    station = subprocess.Popen(
        ["unshare", "--uts", "--pid", "--fork", "--kill-child", sys.executable, "-c", _STATION, pki],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent, env=cli_env(),
    )  # fmt: skip
    try:
        assert station.stdout is not None and station.stdout.readline() == "recorded\n"
        with Registry(pki) as registry:
            live = registry.live("dev-1")
            assert live is not None and live.owner is not None and live.owner.startswith("other-host (pid 1, boot ")
            with pytest.raises(PkiError, match="being stamped by another station: other-host"):
                registry.revoke_abandoned("dev-1")
        reissue = cli("device-cert", "--pki", pki, "--device-id", "dev-1", "--out", pki / "x", "--reissue")
        assert "being stamped by another station" in _one_error_line(reissue)
        station.kill()  # kill -9 of unshare; --kill-child takes its PID 1 down with it
        station.wait(60)
        with Registry(pki) as registry:
            _poll(lambda: not registry.owner_alive(live))
            revoked = registry.revoke_abandoned("dev-1")
        assert revoked is not None and revoked.serial == live.serial
        assert db.rows(pki, "SELECT status, reason FROM certificates") == [("revoked", "superseded")]
    finally:
        station.kill()
        station.wait(60)


def _poll(condition: Callable[[], bool], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_a_locked_registry_is_one_line(pki: Path, db: Db) -> None:
    db.configure(pki, timeout=0.5)
    assert cli("device-cert", "--pki", pki, "--device-id", "d1", "--out", pki / "d1").returncode == 0
    if db.kind == "sqlite":
        holder = sqlite3.connect(pki / "registry.sqlite", isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
    else:
        import psycopg

        assert db.server is not None
        holder = psycopg.connect(db.server.url(db.database))  # type: ignore[assignment]
        holder.execute("LOCK TABLE certificates, meta IN ACCESS EXCLUSIVE MODE")
    try:
        for argv in (["revoke", "--pki", pki, "d1"], ["crl", "--pki", pki, "--out", pki / "crl.pem"]):
            assert "is locked by another" in _one_error_line(cli(*argv))
    finally:
        holder.rollback()
        holder.close()
    assert cli("revoke", "--pki", pki, "d1").returncode == 0


def test_a_damaged_or_unreachable_registry_is_one_line(pki: Path, db: Db, tmp_path: Path) -> None:
    for device in ("d1", "d2", "d3"):
        assert cli("device-cert", "--pki", pki, "--device-id", device, "--out", pki / device).returncode == 0
    if db.kind == "sqlite":
        path = pki / "registry.sqlite"
        assert path.stat().st_size >= 3 * 4096 and not Path(f"{path}-wal").exists()
        with open(path, "r+b") as handle:  # the pages after the header: the tables' contents
            handle.seek(4096)
            handle.write(b"\xa5" * (path.stat().st_size - 4096))
        assert "is damaged" in _one_error_line(cli("devices", "--pki", pki))
    else:
        url = f"postgresql:///{db.database}?host={tmp_path}/no-server&user=imageprov"
        line = _one_error_line(cli("devices", "--pki", pki, "--registry", url))
        assert "cannot connect to the registry" in line


def test_a_password_in_the_url_is_refused_and_never_shown(pki: Path) -> None:
    for url in ("postgresql://station:s3cret-pw@db.lan/imageprov", "postgresql://db.lan/imageprov?password=s3cret-pw"):
        line = _one_error_line(cli("devices", "--pki", pki, "--registry", url), code=2)
        assert "holds a password" in line and "PGPASSFILE" in line and "s3cret-pw" not in line


def test_a_newer_schema_is_refused(pki: Path, db: Db) -> None:
    assert cli("devices", "--pki", pki).returncode == 0  # made by this imageprov
    if db.kind == "sqlite":
        db.execute(pki, "PRAGMA user_version = 99")
    else:
        db.execute(pki, "UPDATE meta SET value = 99 WHERE key = 'schema_version'")
    line = _one_error_line(cli("devices", "--pki", pki))
    assert f"schema version 99, newer than this imageprov knows ({SCHEMA_VERSION})" in line
    assert "upgrade imageprov" in line


def test_a_registry_of_imageprov_0_1_is_upgraded_in_place(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    assert cli("ca", "init", pki, "--cn", "Fleet CA").returncode == 0
    (pki / "registry.sqlite").unlink()
    old = sqlite3.connect(pki / "registry.sqlite")
    old.executescript(
        """CREATE TABLE certificates (serial TEXT PRIMARY KEY, device_id TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('device', 'server')), fingerprint TEXT NOT NULL UNIQUE,
        public_key TEXT NOT NULL, not_before TEXT NOT NULL, not_after TEXT NOT NULL, issued_at TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('pending', 'active', 'revoked')), revoked_at TEXT, reason TEXT,
        delivered_to TEXT, delivered_at TEXT);
        CREATE UNIQUE INDEX one_live_certificate_per_device ON certificates (device_id)
            WHERE kind = 'device' AND status IN ('pending', 'active');
        CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
        INSERT INTO certificates VALUES ('1a', 'old-1', 'device', 'ff', 'pem', '2025-01-01T00:00:00+00:00',
            '2035-01-01T00:00:00+00:00', '2025-01-01T00:00:00+00:00', 'pending', NULL, NULL, NULL, NULL);"""
    )
    old.close()
    [record] = json.loads(imageprov_pki("devices", "--pki", pki, "--json").stdout)
    assert (record["device_id"], record["status"], record["owner"], record["session"]) == (
        "old-1",
        "pending",
        None,
        None,
    )
    check = sqlite3.connect(pki / "registry.sqlite")
    assert check.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    assert check.execute("SELECT COUNT(*) FROM sessions").fetchone() == (0,)
    # Its owner is unknown: no station can still be delivering it, so a new certificate supersedes it.
    with Registry(pki) as registry:
        revoked = registry.revoke_abandoned("old-1")
    assert revoked is not None and revoked.reason is Reason.SUPERSEDED


def _open_at_once(pki: str, barrier: Any, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    barrier.wait()
    try:
        with Registry(Path(pki), create=True) as registry:
            queue.put(registry.backend.schema_version())
    except PkiError as exc:
        queue.put(str(exc))


def test_stations_opening_a_new_registry_at_once(tmp_path: Path, db: Db) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    db.configure(pki)  # a new database: the first of the stations making it creates its schema
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(3)
    queue: multiprocessing.Queue = context.Queue()  # type: ignore[type-arg]
    jobs = [context.Process(target=_open_at_once, args=(str(pki), barrier, queue)) for _ in range(3)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(120)
    assert [queue.get(timeout=10) for _ in jobs] == [SCHEMA_VERSION] * 3


def test_registry_check_finds_what_the_schema_should_have_refused(pki: Path, db: Db) -> None:
    for device in ("d1", "d2"):
        assert cli("device-cert", "--pki", pki, "--device-id", device, "--out", pki / device).returncode == 0
    ok = imageprov_pki("registry", "check", "--pki", pki)
    assert f"schema {SCHEMA_VERSION}, 2 certificates (2 active), 0 identity pins" in ok.stdout
    assert "problem" not in ok.stdout
    # Someone dropped the index and gave d1 a second live certificate by hand.
    db.execute(pki, "DROP INDEX one_live_certificate_per_device")
    columns = "device_id, kind, public_key, not_before, not_after, issued_at, status"
    db.execute(
        pki,
        f"INSERT INTO certificates (serial, fingerprint, {columns}) SELECT 'abc', "
        f"'{'0' * 64}', {columns} FROM certificates WHERE device_id = 'd1'",
    )
    bad = cli("registry", "check", "--pki", pki, "--json")
    assert bad.returncode == 1
    report = json.loads(bad.stdout)
    assert report["ok"] is False and report["problems"] == [
        "the index one_live_certificate_per_device is missing",
        "device d1 has more than one live certificate",
    ]


def test_migrate_sqlite_to_postgresql(tmp_path: Path, postgres: Postgres) -> None:
    pki = tmp_path / "pki"
    assert cli("ca", "init", pki, "--cn", "Fleet CA").returncode == 0
    for device in ("d1", "d2", "d3"):
        assert cli("device-cert", "--pki", pki, "--device-id", device, "--out", pki / device).returncode == 0
    assert cli("revoke", "--pki", pki, "d1", "--reason", "key-compromise").returncode == 0
    for _ in range(2):
        assert cli("crl", "--pki", pki, "--out", pki / "crl.pem").returncode == 0
    target = Db.make("postgresql", postgres)
    url = target.url(pki)

    def migrate() -> dict[str, Any]:
        result: dict[str, Any] = json.loads(
            imageprov_pki("registry", "migrate", "--pki", pki, "--to", url, "--json").stdout
        )
        return result

    first = migrate()
    assert (first["copied"], first["updated"], first["unchanged"], first["verified"]) == (3, 0, 0, 3)
    source = sqlite3.connect(pki / "registry.sqlite")
    query = "SELECT serial, fingerprint, public_key, status, reason FROM certificates ORDER BY serial"
    assert target.rows(pki, query) == source.execute(query).fetchall()
    again = migrate()
    assert (again["copied"], again["updated"], again["unchanged"]) == (0, 0, 3)
    # Revoked in SQLite after the first copy: a rerun carries it forward.
    assert cli("revoke", "--pki", pki, "d2").returncode == 0
    third = migrate()
    assert (third["copied"], third["updated"], third["unchanged"]) == (0, 1, 2)
    assert target.rows(pki, query) == source.execute(query).fetchall()
    # Switched over: CRL numbers keep increasing.
    target.configure(pki)
    assert cli("crl", "--pki", pki, "--out", pki / "crl.pem").returncode == 0
    crl = x509.load_pem_x509_crl((pki / "crl.pem").read_bytes())
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 3
    assert len(list(crl)) == 2


def test_registry_urls(tmp_path: Path) -> None:
    from imageprov.errors import UsageError
    from imageprov.pki.config import PkiConfig, RegistryUrl, Scheme, load_config, mask_password

    assert RegistryUrl.parse("sqlite:///srv/pki/r.sqlite", base=tmp_path).path == Path("/srv/pki/r.sqlite")
    assert RegistryUrl.parse("sqlite:registry.sqlite", base=tmp_path).path == tmp_path / "registry.sqlite"
    pg = RegistryUrl.parse("postgresql:///imageprov?host=/run/pg&service=line", base=tmp_path)
    assert pg.scheme is Scheme.POSTGRESQL and pg.display == "postgresql:///imageprov?host=/run/pg&service=line"
    for bad in ("mysql://db/x", "sqlite:", "registry.sqlite"):
        with pytest.raises(UsageError):
            RegistryUrl.parse(bad, base=tmp_path)
    assert (
        mask_password("postgresql://u:pw@h:5432/db?sslmode=require") == "postgresql://u:***@h:5432/db?sslmode=require"
    )
    assert mask_password("postgresql://h/db?user=u&password=pw") == "postgresql://h/db?user=u&password=***"
    config = tmp_path / "imageprov.toml"
    assert load_config(tmp_path).registry.path == tmp_path / "registry.sqlite"
    config.write_text('[registry]\nurl = "sqlite:///srv/r.sqlite"\ntimeout = 2.5\n')
    assert load_config(tmp_path) == PkiConfig(RegistryUrl(Scheme.SQLITE, "/srv/r.sqlite"), 2.5)
    assert load_config(tmp_path, "sqlite:other.sqlite").registry.path == tmp_path / "other.sqlite"  # --registry wins
    for bad in ('[registry]\nurl = "sqlite:x"\nuser = "me"\n', "[registry]\ntimeout = 0\n", "[registry\n"):
        config.write_text(bad)
        with pytest.raises(UsageError):
            load_config(tmp_path)


def test_live_of_answers_for_a_whole_line_list(pki: Path) -> None:
    """The live certificate of each id that has one, over more ids than one query takes; revoked ones left out."""
    ca = load_ca(pki, PASSPHRASE.encode())
    with Registry(pki) as registry:
        active = registry.record(ca.issue_device("a"))
        pending = registry.record(ca.issue_device("p"), status=Status.PENDING)
        gone = registry.record(ca.issue_device("r"))
        registry.revoke(serial=gone.serial)
        registry.record(ca.issue_device("s"))
        newer = registry.record(ca.issue_device("s"), reissue=True)
        ids = [f"none-{n}" for n in range(1200)] + ["a", "p", "r", "s", "a"]
        found = registry.live_of(ids)
    assert {k: (v.serial, v.status) for k, v in found.items()} == {
        "a": (active.serial, Status.ACTIVE),
        "p": (pending.serial, Status.PENDING),
        "s": (newer.serial, Status.ACTIVE),
    }


def test_a_device_taken_and_delivered_by_another_station_meanwhile_is_a_race_not_a_reissue(
    pki: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read before the insert saw no certificate; another station then issued and delivered one.
    The refusal says so: "pass --reissue" would revoke the card that station just wrote."""
    ca = load_ca(pki, PASSPHRASE.encode())
    with Registry(pki) as mine, Registry(pki) as other:
        read = mine.live

        def read_then_lose_the_race(device_id: str, **kwargs: Any) -> Any:
            seen = read(device_id, **kwargs)
            if seen is None:
                theirs = other.record(ca.issue_device(device_id), status=Status.PENDING)
                other.deliver(theirs.serial, "their.sdimg")
            return seen

        monkeypatch.setattr(mine, "live", read_then_lose_the_race)
        with pytest.raises(PkiError) as refused:
            mine.record(ca.issue_device("dev-r"), status=Status.PENDING)
        assert "at the same time" in str(refused.value) and "reissue" not in f"{refused.value} {refused.value.hint}"
        monkeypatch.undo()
        # Held before the read: that one is for --reissue.
        with pytest.raises(PkiError, match="already has a device certificate") as held:
            mine.record(ca.issue_device("dev-r"), status=Status.PENDING)
        assert "--reissue" in str(held.value.hint)
        # Held before the read, but after the caller's batch found the device free: the same race, earlier.
        with pytest.raises(PkiError, match="at the same time") as taken:
            mine.record(ca.issue_device("dev-r"), status=Status.PENDING, seen_free=True)
        assert "reissue" not in f"{taken.value} {taken.value.hint}"
