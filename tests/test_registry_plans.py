"""Every query the registry issues, as the database plans it: per-device lookups read an index, never a table.

A fleet's registry keeps its whole history (issue 24: 100,000 devices, their
reissues and revocations), so a lookup that scans grows with it. The
registry's methods are run once on each backend while every statement is
recorded; then, with the tables holding a fleet's worth of rows (most devices
active and pinned, a few revoked, fewer pending) and their statistics
gathered, SQLite's ``EXPLAIN QUERY PLAN`` and PostgreSQL's ``EXPLAIN`` say how
each would be read:

- a per-device method (what a station, the edge or ``revoke`` asks per device)
  may only search an index on a key: no table scan, no walk of a whole index;
- a bulk method may walk only the partial index that holds what it lists
  (pending certificates, revoked ones, current pins not cut);
- ``all`` (``devices``) reads the table by design.

Dropping any index of the schema makes this test fail (``test_each_index_is_needed``).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from imageprov.errors import PkiError
from imageprov.pki.ca import CertificateAuthority, load_ca
from imageprov.pki.registry import Kind, Reason, Registry, Status
from imageprov.pki.registry_base import SCHEMA_VERSION
from imageprov.pki.registry_pg import INDEXES as PG_INDEXES
from imageprov.pki.registry_pg import _PgTx
from imageprov.pki.registry_sqlite import INDEXES as SQLITE_INDEXES
from imageprov.pki.registry_sqlite import _SqliteTx
from tests.conftest import PASSPHRASE, imageprov_pki
from tests.pg import Db, Postgres, running_postgres

TABLES = ("certificates", "pins", "sessions", "meta", "enrollments")
# Bulk methods, and the indexes each may walk from end to end: those that hold just what it lists.
BULK = {
    "stale": ("pending_certificates",),
    "revoke_stale": ("pending_certificates",),
    "revoked": ("revoked_certificates",),
    "revocations": ("revoked_certificates",),
    # The current pins not cut, or the revoked certificates: whichever the database finds fewer of.
    "uncut_revoked_pins": ("pins_not_cut", "revoked_certificates"),
}
WHOLE = {"all"}
# Tables a bulk method may read whole, by the database's choice. The edge's poll for revoked devices not yet cut
# off in Mender joins current pins with revoked certificates: PostgreSQL reads pins whole when most are current
# (every device of a fleet is): ~1 ms per 10,000 pins, once a second per edge (scripts/bench registry).
READ_WHOLE = {"uncut_revoked_pins": ("pins",)}
# The indexes that lookups need. one_live_certificate_per_device carries an invariant (tests/test_registry.py);
# its lookups are served as well by certificates_by_device. pins_not_cut is there for the poll above.
NEEDED = ("certificates_by_device", "one_certificate_per_identity", "pending_certificates", "revoked_certificates")


@dataclass(frozen=True)
class Statement:
    method: str
    sql: str
    params: tuple[object, ...]


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    with running_postgres() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest) -> Db:
    return Db.make(request.param, request.getfixturevalue("postgres") if request.param == "postgresql" else None)


@pytest.fixture
def pki(tmp_path: Path, db: Db) -> Path:
    path = tmp_path / "pki"
    path.mkdir()
    db.configure(path)
    imageprov_pki("ca", "init", path, "--cn", "Fleet CA")
    return path


def _record_statements(monkeypatch: pytest.MonkeyPatch) -> tuple[list[Statement], Callable[[str], None]]:
    """Record every statement the backends run, with the registry method that is running."""
    seen: list[Statement] = []
    method = [""]
    for cls in (_SqliteTx, _PgTx):
        for name in ("query", "execute"):
            original = getattr(cls, name)

            def spy(self: object, sql: str, params: Sequence[object] = (), _original: object = original) -> object:
                seen.append(Statement(method[0], sql, tuple(params)))
                return _original(self, sql, params)  # type: ignore[operator]

            monkeypatch.setattr(cls, name, spy)

    def calling(name: str) -> None:
        method[0] = name

    return seen, calling


def _workout(registry: Registry, ca: CertificateAuthority, calling: Callable[[str], None]) -> None:
    """Every method of the registry a station, the edge or an operator calls, each at least once."""
    ident = json.dumps({"mac": "00:11:22:33:44:55"}, separators=(",", ":"))

    def call(name: str, *args: object, **kwargs: object) -> object:
        calling(name)
        try:
            return getattr(registry, name)(*args, **kwargs)
        finally:
            calling("")

    one = call("record", ca.issue_device("d1"), status=Status.PENDING)
    call("deliver", one.serial, "card /dev/sdz")  # type: ignore[attr-defined]
    call("live", "d1")
    call("live_of", ["d1", "d2", "nobody"])
    call("status_of_serial", one.serial)  # type: ignore[attr-defined]
    call("record_of", one.serial)  # type: ignore[attr-defined]
    call("pin_identity", one.serial, ident)  # type: ignore[attr-defined]
    call("pin_of", one.serial)  # type: ignore[attr-defined]
    call("set_mender_device", one.serial, "mender-1")  # type: ignore[attr-defined]
    # Enrollment (EST): a bootstrap certificate beside the device's, and the device certificate it obtains.
    boot = call("record", ca.issue_bootstrap("d4"), kind="bootstrap")
    call("state_of_serial", boot.serial)  # type: ignore[attr-defined]
    # A line that stamps enrolling images (stamp --enroll) asks of bootstrap certificates as of device ones.
    call("live", "d4", kind=Kind.BOOTSTRAP)
    call("live_of", ["d4", "nobody"], kind=Kind.BOOTSTRAP)
    call("revoke_abandoned", "d4", kind=Kind.BOOTSTRAP)
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    spki = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    call("enrollment_verdict", boot.serial, spki, kind=Kind.BOOTSTRAP)  # type: ignore[attr-defined]
    call("enroll", boot.serial, ca.certify_device("d4", key), kind=Kind.BOOTSTRAP, where="EST")  # type: ignore[attr-defined]
    call("enrollment_of", boot.serial)  # type: ignore[attr-defined]
    two = call("record", ca.issue_device("d1"), reissue=True)  # supersedes d1's first certificate
    call("pin_identity", two.serial, ident)  # type: ignore[attr-defined]  # takes the identity over
    call("record", ca.issue_device("d2"), status=Status.PENDING)
    with pytest.raises(PkiError, match="being stamped by another station"):
        call("revoke_abandoned", "d2")  # its station is this one, alive: refused after the lookup
    call("stale")
    call("revoke_stale")
    call("revoke", device_id="d1", reason=Reason.KEY_COMPROMISE)
    three = call("record", ca.issue_device("d3"))
    call("revoke", serial=three.serial)  # type: ignore[attr-defined]
    call("uncut_revoked_pins")
    call("claim_cut", two.serial, 60)  # type: ignore[attr-defined]
    call("release_cut", two.serial)  # type: ignore[attr-defined]
    call("mark_cut", two.serial)  # type: ignore[attr-defined]
    call("revoked")
    assert sorted(r.serial for r in call("revocations")) == sorted(r.serial for r in registry.revoked())  # type: ignore[attr-defined]
    call("next_crl_number")
    every = call("all")
    calling("each")
    assert list(registry.each(page=2)) == every  # pages of 2: each read by a cursor, never a scan
    calling("")


def _statements(pki: Path, monkeypatch: pytest.MonkeyPatch) -> list[Statement]:
    seen, calling = _record_statements(monkeypatch)
    ca = load_ca(pki, PASSPHRASE.encode())
    with Registry(pki) as registry:
        _workout(registry, ca, calling)
    relevant = [s for s in seen if s.method and s.sql.lstrip().split()[0].upper() in ("SELECT", "INSERT", "UPDATE",
                                                                                      "DELETE", "WITH")]  # fmt: skip
    # Catalog lookups (pg_locks: is a station's lease alive?) are no table of the registry's.
    return [s for s in relevant if any(f" {table}" in s.sql for table in TABLES) and "pg_locks" not in s.sql]


# -- plans -----------------------------------------------------------------------


def _sqlite_findings(path: Path, statement: Statement) -> list[str]:
    """What is wrong with the statement's plan: table scans, and walks of an index not allowed to it."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {statement.sql}", statement.params)]
    allowed = BULK.get(statement.method, ())
    findings = []
    for step in plan:
        if not step.startswith("SCAN ") or step.startswith("SCAN CONSTANT"):
            continue  # SEARCH ... USING INDEX (key=?): a lookup
        if statement.method in WHOLE:
            continue
        if any(step.endswith((f"USING INDEX {index}", f"USING COVERING INDEX {index}")) for index in allowed):
            continue
        findings.append(step)
    return findings


def _pg_nodes(node: dict[str, object]) -> Iterator[dict[str, object]]:
    yield node
    for child in node.get("Plans", []):  # type: ignore[attr-defined]
        yield from _pg_nodes(child)


def _pg_findings(conn: psycopg.Connection[tuple[object, ...]], statement: Statement) -> list[str]:
    cursor = psycopg.ClientCursor(conn)
    cursor.execute(f"EXPLAIN (FORMAT JSON) {statement.sql.replace('?', '%s')}", statement.params)
    [[plan]] = cursor.fetchall()
    allowed = BULK.get(statement.method, ())
    findings = []
    for node in _pg_nodes(plan[0]["Plan"]):  # type: ignore[index]
        kind, relation, index = node["Node Type"], node.get("Relation Name"), node.get("Index Name")
        if statement.method in WHOLE:
            continue
        if kind == "Seq Scan" and relation in TABLES and relation not in READ_WHOLE.get(statement.method, ()):
            findings.append(f"Seq Scan on {relation}")
        # A walk of a whole index: only one that holds what a bulk method lists.
        walk = kind in ("Index Scan", "Index Only Scan", "Bitmap Index Scan") and "Index Cond" not in node
        if walk and index not in allowed:
            findings.append(f"{kind} using {index} with no key")
    return findings


def _findings(db: Db, pki: Path, statements: list[Statement]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    if db.server is None:
        for s in statements:
            for problem in _sqlite_findings(pki / "registry.sqlite", s):
                found.setdefault(f"{s.method}: {s.sql}", []).append(problem)
        return found
    with psycopg.connect(db.server.url(db.database), autocommit=True) as conn:
        for s in statements:
            for problem in _pg_findings(conn, s):
                found.setdefault(f"{s.method}: {s.sql}", []).append(problem)
    return found


FLEET = 20_000


def _fill(db: Db, pki: Path) -> None:
    """FLEET devices as a fleet has them: all pinned, 1 in 50 revoked (and its pin cut), 1 in 1,000 pending."""
    status = "CASE WHEN n % 50 = 0 THEN 'revoked' WHEN n % 1000 = 1 THEN 'pending' ELSE 'active' END"
    if db.server is None:
        series = f"WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s WHERE n < {FLEET})"
        hexed, fp = "printf('%x', 1000000 + n)", "printf('%064x', n)"
        stamp, analyze = "'2026-01-01T00:00:00+00:00'", "ANALYZE"
    else:
        series = f"WITH s(n) AS (SELECT generate_series(1, {FLEET}))"
        hexed, fp = "to_hex(1000000 + n)", "lpad(to_hex(n), 64, '0')"
        stamp, analyze = "'2026-01-01T00:00:00+00:00'::timestamptz", "ANALYZE certificates; ANALYZE pins"
    db.execute(
        pki,
        f"""
        INSERT INTO certificates (serial, device_id, kind, fingerprint, public_key, not_before, not_after, issued_at,
                                  status, revoked_at, reason)
        {series} SELECT {hexed}, 'fleet-' || n, 'device', {fp}, 'pem', {stamp}, {stamp}, {stamp}, {status},
                        CASE WHEN n % 50 = 0 THEN {stamp} END, CASE WHEN n % 50 = 0 THEN 'superseded' END FROM s;
        INSERT INTO pins (serial, identity, pinned_at, cut_at)
        {series} SELECT {hexed}, '{{"mac":"' || n || '"}}', {stamp}, CASE WHEN n % 50 = 0 THEN {stamp} END
        FROM s WHERE n % 1000 != 1;
        {analyze};""",
    )


def test_every_query_reads_an_index(db: Db, pki: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fill(db, pki)
    statements = _statements(pki, monkeypatch)
    methods = {s.method for s in statements}
    # The workout reached every method it calls (a method that failed early would hide its queries).
    assert methods >= {"record", "deliver", "live", "live_of", "status_of_serial", "record_of", "pin_identity",
                       "pin_of", "set_mender_device", "stale", "revoke_stale", "revoke", "uncut_revoked_pins",
                       "mark_cut", "claim_cut", "release_cut", "revoked", "revocations", "next_crl_number", "all",
                       "each", "state_of_serial", "enrollment_verdict", "enroll", "enrollment_of"}, methods  # fmt: skip
    assert _findings(db, pki, statements) == {}


def test_the_schema_has_the_indexes_needed() -> None:
    assert set(NEEDED) <= set(SQLITE_INDEXES) & set(PG_INDEXES)


@pytest.mark.parametrize("index", NEEDED)
def test_each_index_is_needed(db: Db, pki: Path, monkeypatch: pytest.MonkeyPatch, index: str) -> None:
    """Without any one of these indexes, some query scans: the check above would catch its loss."""
    _fill(db, pki)
    statements = _statements(pki, monkeypatch)
    db.execute(pki, f"DROP INDEX {index}")
    assert _findings(db, pki, statements) != {}


def test_a_schema_3_registry_is_brought_up_to_date_in_place(db: Db, pki: Path) -> None:
    drop = ("DROP INDEX certificates_by_device; DROP INDEX pending_certificates; DROP INDEX revoked_certificates; "
            "ALTER TABLE pins DROP COLUMN cut_claimed_until; ")  # fmt: skip
    db.execute(pki, drop + ("PRAGMA user_version = 3" if db.server is None else
                            "UPDATE meta SET value = 3 WHERE key = 'schema_version'"))  # fmt: skip
    report = json.loads(imageprov_pki("registry", "check", "--pki", pki, "--json").stdout)
    assert (report["schema_version"], report["problems"]) == (SCHEMA_VERSION, []), report
