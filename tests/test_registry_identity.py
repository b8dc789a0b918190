"""Identity pins (schema 3), registries that are named but missing, and deadlines on every PostgreSQL call.

Every test that takes ``db`` runs twice: against SQLite in the PKI, and
against a real PostgreSQL started for this module (tests/pg.py). The pins are
read back with sqlite3 and psycopg directly, not only through imageprov.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from imageprov.disk.golden import Scheme
from imageprov.errors import PkiError
from imageprov.pki.ca import CertificateAuthority, load_ca
from imageprov.pki.registry import (
    Pin,
    PinResult,
    PinVerdict,
    Reason,
    Registry,
    RegistryBusy,
    RegistryMissing,
    RegistryTimeout,
    Status,
)
from imageprov.pki.registry_base import SCHEMA_VERSION, Backend, Row, Tx
from tests.conftest import IMAGEPROV_ARGV, PASSPHRASE, cli_env, imageprov_pki
from tests.pg import Db, Postgres, running_postgres


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    with running_postgres() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest) -> Db:
    return Db.make(request.param, request.getfixturevalue("postgres") if request.param == "postgresql" else None)


@pytest.fixture
def pki(tmp_path: Path, db: Db) -> Path:
    """A PKI whose imageprov.toml names its registry before ``ca init`` makes it."""
    path = tmp_path / "pki"
    path.mkdir()
    db.configure(path)
    imageprov_pki("ca", "init", path, "--cn", "Fleet CA")
    return path


def identity(**data: str) -> str:
    """Identity data as the edge passes it: canonical JSON."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def issue(registry: Registry, ca: CertificateAuthority, device_id: str, *, reissue: bool = False) -> str:
    return registry.record(ca.issue_device(device_id), reissue=reissue).serial


def _one_error_line(proc: subprocess.CompletedProcess[str], code: int = 1) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code and len(lines) == 1 and lines[0].startswith("imageprov: error: "), proc.stderr
    return lines[0]


# -- the verdicts ----------------------------------------------------------------


def test_pin_verdicts(pki: Path, db: Db) -> None:
    ca = load_ca(pki, PASSPHRASE.encode())
    mac_1, mac_2, mac_3 = identity(mac="00:01"), identity(mac="00:02"), identity(mac="00:03")
    with Registry(pki) as registry:
        first = issue(registry, ca, "d1")
        other = issue(registry, ca, "d2")
        assert registry.pin_identity(first, mac_1) == PinResult(PinVerdict.PINNED, None)
        assert registry.pin_identity(first.upper(), mac_1) == PinResult(PinVerdict.SAME, None)  # any spelling
        assert registry.pin_identity(first, mac_2) == PinResult(PinVerdict.CERTIFICATE_PINNED_ELSEWHERE, None)
        # Another device's live certificate: on either side of the line, live or revoked.
        assert registry.pin_identity(other, mac_1) == PinResult(PinVerdict.IDENTITY_TAKEN, first)
        pin = registry.pin_of(first)
        assert pin is not None and (pin.serial, pin.identity, pin.mender_device_id, pin.cut_at) == (
            first, mac_1, None, None,
        )  # fmt: skip
        assert registry.pin_of(other) is None
        registry.set_mender_device(first, "mender-1")

        # The device is reissued: its new certificate takes the identity, and the Mender device with it.
        second = issue(registry, ca, "d1", reissue=True)
        assert registry.pin_identity(second, mac_1) == PinResult(PinVerdict.REPINNED, first)
        assert registry.pin_of(first) is None
        moved = registry.pin_of(second)
        assert moved is not None and moved.mender_device_id == "mender-1"
        # The old certificate never takes it back, nor any other.
        assert registry.pin_identity(first, mac_1) == PinResult(PinVerdict.IDENTITY_TAKEN, second)
        assert registry.pin_identity(first, mac_3) == PinResult(PinVerdict.CERTIFICATE_PINNED_ELSEWHERE, None)
        # An older certificate of the same device, never pinned, does not supersede the newer holder.
        older = issue(registry, ca, "d3")
        newer = issue(registry, ca, "d3", reissue=True)
        assert registry.pin_identity(newer, mac_3) == PinResult(PinVerdict.PINNED, None)
        assert registry.pin_identity(older, mac_3) == PinResult(PinVerdict.IDENTITY_TAKEN, newer)

        # Another device's certificate takes an identity once its holder is revoked, not before.
        registry.revoke(device_id="d3", reason=Reason.KEY_COMPROMISE)
        assert registry.pin_identity(other, mac_3) == PinResult(PinVerdict.REPINNED, newer)
        assert registry.pin_identity(other, mac_3) == PinResult(PinVerdict.SAME, None)
        # An identity never moves back, even once the certificate it moved to is revoked too.
        registry.revoke(device_id="d1")
        assert registry.pin_identity(first, mac_1) == PinResult(PinVerdict.IDENTITY_TAKEN, second)
    # The holders moved on are kept as history.
    assert sorted(db.rows(pki, "SELECT serial, identity, released_to FROM pins")) == sorted(
        [(first, mac_1, second), (second, mac_1, None), (newer, mac_3, other), (other, mac_3, None)]
    )


def test_revoked_pins_to_cut(pki: Path, db: Db) -> None:
    ca = load_ca(pki, PASSPHRASE.encode())
    with Registry(pki) as registry:
        serials = {name: issue(registry, ca, name) for name in ("live", "gone", "moved")}
        for name, serial in serials.items():
            registry.pin_identity(serial, identity(name=name))
            registry.set_mender_device(serial, f"mender-{name}")
        assert registry.uncut_revoked_pins() == []
        registry.revoke(device_id="gone")
        registry.revoke(device_id="moved")
        # A reissued device holds its identity again: its Mender device is not to be rejected.
        again = issue(registry, ca, "moved")
        assert registry.pin_identity(again, identity(name="moved")).verdict is PinVerdict.REPINNED
        [due] = registry.uncut_revoked_pins()
        assert (due.serial, due.identity, due.mender_device_id, due.cut_at) == (
            serials["gone"], identity(name="gone"), "mender-gone", None,
        )  # fmt: skip
        # Of the edges that find it, one claims the cut-off; a claim given back or run out is taken again.
        assert registry.claim_cut(due.serial, 60) and not registry.claim_cut(due.serial, 60)
        registry.release_cut(due.serial)
        assert registry.claim_cut(due.serial.upper(), -5)  # an edge that died mid-call: run out already
        assert registry.claim_cut(due.serial, 60)
        registry.mark_cut(due.serial)
        assert not registry.claim_cut(due.serial, -5)  # cut off: nothing left to claim
        cut = registry.pin_of(due.serial)
        assert cut is not None and cut.cut_at is not None
        registry.mark_cut(due.serial.upper())  # again: nothing changes
        assert registry.pin_of(due.serial) == cut
        assert registry.uncut_revoked_pins() == []
        with pytest.raises(PkiError, match="holds no identity"):
            registry.mark_cut(issue(registry, ca, "never-pinned"))
        with pytest.raises(PkiError, match="holds no identity"):
            registry.set_mender_device("abcdef", "mender-x")


def test_only_device_certificates_pin_canonical_identities(pki: Path, db: Db, tmp_path: Path) -> None:
    ca = load_ca(pki, PASSPHRASE.encode())
    imageprov_pki("server-cert", "--pki", pki, "--host", "edge.lan", "--out", tmp_path / "edge")
    with Registry(pki) as registry:
        [server] = [r.serial for r in registry.all() if r.kind == "server"]
        device = issue(registry, ca, "d1")
        with pytest.raises(PkiError, match=r"not a device certificate.*server certificate"):
            registry.pin_identity(server, identity(mac="00:01"))
        with pytest.raises(PkiError, match="not a device certificate"):
            registry.pin_identity("abcdef0123", identity(mac="00:01"))
        for spelled in ('{"mac": "00:01"}', '{"b":"1","a":"2"}', "not json", ""):
            with pytest.raises(PkiError, match="canonical JSON"):
                registry.pin_identity(device, spelled)
        with pytest.raises(PkiError, match="too long"):
            registry.pin_identity(device, identity(blob="é" * 1100))
        assert registry.pin_identity(device, identity(blob="é" * 1000)).verdict is PinVerdict.PINNED
    assert db.rows(pki, "SELECT COUNT(*) FROM pins") == [(1,)]


# -- races -------------------------------------------------------------------------


def _race(pki: Path, claims: Sequence[tuple[str, str]], *, shared: bool = False) -> list[PinResult]:
    """Every claim at once, each from its own connection as edge instances would, or all from the threads of
    one (``shared``) as one edge's pool does."""
    registries = [Registry(pki)] * len(claims) if shared else [Registry(pki) for _ in claims]
    start = threading.Barrier(len(claims))

    def claim(index: int) -> PinResult:
        start.wait()
        return registries[index].pin_identity(*claims[index])

    try:
        with ThreadPoolExecutor(len(claims)) as pool:
            return list(pool.map(claim, range(len(claims))))  # an exception in any fails the test
    finally:
        for registry in set(registries):
            registry.close()


def test_edges_racing_end_in_clean_verdicts(pki: Path, db: Db) -> None:
    ca = load_ca(pki, PASSPHRASE.encode())
    racers = 6
    with Registry(pki) as registry:
        for round_ in range(4):
            # Several certificates claim one identity: one holds it.
            serials = [issue(registry, ca, f"r{round_}-{i}") for i in range(racers)]
            wanted = identity(mac=f"same-{round_}")
            results = _race(pki, [(serial, wanted) for serial in serials], shared=round_ % 2 == 1)
            [winner] = [s for s, r in zip(serials, results, strict=True) if r.verdict is PinVerdict.PINNED]
            assert sorted(r.verdict.value for r in results) == ["identity-taken"] * (racers - 1) + ["pinned"]
            assert {r.holder for r in results if r.verdict is PinVerdict.IDENTITY_TAKEN} == {winner}

            # One certificate claims several identities: it holds one.
            one = issue(registry, ca, f"one-{round_}")
            results = _race(pki, [(one, identity(mac=f"many-{round_}-{i}")) for i in range(racers)])
            assert sorted(r.verdict.value for r in results) == ["certificate-pinned-elsewhere"] * (racers - 1) + [
                "pinned"
            ]

            # The holder is revoked and several new certificates claim its identity: one takes it over.
            registry.revoke(serial=winner)
            serials = [issue(registry, ca, f"n{round_}-{i}") for i in range(racers)]
            results = _race(pki, [(serial, wanted) for serial in serials])
            [taker] = [s for s, r in zip(serials, results, strict=True) if r.verdict is PinVerdict.REPINNED]
            assert {r.holder for r in results} == {winner, taker}
            assert [r.holder for r in results if r.verdict is PinVerdict.REPINNED] == [winner]
    twice = "SELECT identity FROM pins WHERE released_at IS NULL GROUP BY identity HAVING COUNT(*) > 1"
    assert db.rows(pki, twice) == []
    [(current,)] = db.rows(pki, "SELECT COUNT(*) FROM pins WHERE released_at IS NULL")
    assert current == 4 * 2


# -- every query on an index ------------------------------------------------------------


class _Recording(Tx):
    def __init__(self, inner: Tx, seen: list[tuple[str, tuple[object, ...]]]) -> None:
        self._inner, self._seen = inner, seen

    def execute(self, sql: str, params: Sequence[object] = ()) -> int:
        self._seen.append((sql, tuple(params)))
        return self._inner.execute(sql, params)

    def query(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        self._seen.append((sql, tuple(params)))
        return self._inner.query(sql, params)


def _record_statements(monkeypatch: pytest.MonkeyPatch, backend: Backend) -> list[tuple[str, tuple[object, ...]]]:
    """Every statement the registry runs from now on, with its parameters."""
    seen: list[tuple[str, tuple[object, ...]]] = []
    for name in ("transaction", "autocommit"):
        original: Callable[..., contextlib.AbstractContextManager[Tx]] = getattr(backend, name)

        @contextlib.contextmanager
        def recording(*args: object, _original: Callable[..., contextlib.AbstractContextManager[Tx]] = original,
                      **kwargs: object) -> Iterator[Tx]:  # fmt: skip
            with _original(*args, **kwargs) as tx:
                yield _Recording(tx, seen)

        monkeypatch.setattr(backend, name, recording)
    return seen


def _table_scans(backend: Backend, kind: str, sql: str, params: tuple[object, ...]) -> list[str]:
    """The steps of ``sql``'s plan that read a whole table, or a whole index that is not partial (the same cost)."""
    if kind == "sqlite":
        with backend.autocommit() as tx:
            partial = {
                str(r["name"]) for r in tx.query("SELECT name, sql FROM sqlite_master") if " WHERE " in str(r["sql"])
            }
            plan = [str(row["detail"]) for row in tx.query(f"EXPLAIN QUERY PLAN {sql}", params)]
        # "SEARCH p USING INDEX x (identity=?)" looks keys up; "SCAN p" or "SCAN p USING INDEX x" reads all of it.
        scans = [re.fullmatch(r"SCAN \w+(?: USING (?:COVERING )?INDEX (\w+))?", line) for line in plan]
        return [m.group(0) for m in scans if m and m.group(1) not in partial]
    # A few rows are read faster in full: take that choice away to see whether an index serves the query.
    with backend.transaction() as tx:
        partial = {str(r["indexname"]) for r in tx.query("SELECT indexname, indexdef FROM pg_indexes")
                   if " WHERE " in str(r["indexdef"])}  # fmt: skip
        tx.execute("SET LOCAL enable_seqscan = off")
        [row] = tx.query(f"EXPLAIN (FORMAT JSON) {sql}", params)
    found: list[str] = []

    def walk(node: dict[str, object]) -> None:
        whole_index = node["Node Type"] in ("Index Scan", "Index Only Scan", "Bitmap Index Scan") and (
            "Index Cond" not in node and node["Index Name"] not in partial
        )
        if node["Node Type"] == "Seq Scan" or whole_index:
            found.append(f"{node['Node Type']} on {node.get('Relation Name')} {node.get('Index Name', '')}")
        for child in node.get("Plans", []):  # type: ignore[attr-defined]
            walk(child)

    walk(row["QUERY PLAN"][0]["Plan"])
    return found


def test_every_pin_query_is_served_by_an_index(pki: Path, db: Db, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = load_ca(pki, PASSPHRASE.encode())
    with Registry(pki) as registry:
        holder, other = issue(registry, ca, "d1"), issue(registry, ca, "d2")
        seen = _record_statements(monkeypatch, registry.backend)
        registry.pin_identity(holder, identity(mac="1"))  # pinned
        registry.pin_identity(holder, identity(mac="1"))  # same
        registry.pin_identity(holder, identity(mac="2"))  # pinned elsewhere
        registry.pin_identity(other, identity(mac="1"))  # taken
        registry.set_mender_device(holder, "mender-1")
        registry.pin_of(holder)
        registry.record_of(holder)
        registry.status_of_serial(holder)
        registry.revoke(device_id="d1")
        registry.pin_identity(other, identity(mac="1"))  # repinned
        registry.uncut_revoked_pins()
        registry.mark_cut(holder)
        statements = list(dict.fromkeys(seen))
        monkeypatch.undo()
        assert len(statements) >= 10
        pins = [(sql, params) for sql, params in statements if "pins" in sql or "WHERE serial = ?" in sql]
        scans = {sql: found for sql, params in pins if (found := _table_scans(registry.backend, db.kind, sql, params))}
        assert scans == {}


# -- registry check and migrate ---------------------------------------------------------


def test_registry_check_finds_broken_pins(pki: Path, db: Db) -> None:
    ca = load_ca(pki, PASSPHRASE.encode())
    with Registry(pki) as registry:
        first, second = issue(registry, ca, "d1"), issue(registry, ca, "d2")
        registry.pin_identity(first, identity(mac="1"))
        registry.revoke(device_id="d1")
        registry.pin_identity(second, identity(mac="1"))
    ok = imageprov_pki("registry", "check", "--pki", pki, "--json")
    report = json.loads(ok.stdout)
    assert report["ok"] and report["pins"] == 2 and report["problems"] == []
    assert "1 identity pin(s) moved on to a newer certificate (kept as history)" in report["notes"]
    # By hand: the index dropped, the moved-on holder made current again, a live certificate's pin released.
    db.execute(pki, "DROP INDEX one_certificate_per_identity")
    db.execute(pki, f"UPDATE pins SET released_at = NULL, released_to = NULL WHERE serial = '{first}'")
    db.execute(pki, f"UPDATE pins SET released_at = pinned_at, released_to = '{first}' WHERE serial = '{second}'")
    bad = imageprov_pki("registry", "check", "--pki", pki, "--json", check=False)
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["problems"] == [
        "the index one_certificate_per_identity is missing",
        f"certificate {second} is live but lost its identity",
    ]
    db.execute(pki, f"UPDATE pins SET released_at = NULL, released_to = NULL WHERE serial = '{second}'")
    problems = json.loads(imageprov_pki("registry", "check", "--pki", pki, "--json", check=False).stdout)["problems"]
    assert problems == [
        "the index one_certificate_per_identity is missing",
        'identity {"mac":"1"} is held by more than one certificate',
    ]


def test_a_schema_2_registry_gains_pins_in_place(pki: Path, db: Db, tmp_path: Path) -> None:
    imageprov_pki("device-cert", "--pki", pki, "--device-id", "d1", "--out", tmp_path / "d1")
    # Back to what imageprov wrote before pins: schema 2.
    if db.kind == "sqlite":
        db.execute(pki, "DROP TABLE pins; PRAGMA user_version = 2")
    else:
        db.execute(pki, "DROP TABLE pins; UPDATE meta SET value = 2 WHERE key = 'schema_version'")
    check = imageprov_pki("registry", "check", "--pki", pki)
    assert f"schema {SCHEMA_VERSION}, 1 certificates (1 active), 0 identity pins" in check.stdout
    ca = load_ca(pki, PASSPHRASE.encode())
    with Registry(pki) as registry:
        [record] = registry.all()
        assert registry.pin_identity(record.serial, identity(mac="1")).verdict is PinVerdict.PINNED
        assert registry.pin_identity(issue(registry, ca, "d2"), identity(mac="1")).verdict is PinVerdict.IDENTITY_TAKEN


def test_migrate_carries_pins(tmp_path: Path, postgres: Postgres) -> None:
    pki = tmp_path / "pki"
    imageprov_pki("ca", "init", pki, "--cn", "Fleet CA")
    ca = load_ca(pki, PASSPHRASE.encode())
    with Registry(pki) as registry:
        serials = {name: issue(registry, ca, name) for name in ("a", "b", "c")}
        for name in ("a", "b"):
            registry.pin_identity(serials[name], identity(mac=name))
        registry.set_mender_device(serials["a"], "mender-a")
        registry.revoke(device_id="a")
        a2 = issue(registry, ca, "a")
        registry.pin_identity(a2, identity(mac="a"))  # a moved on to a2
    target = Db.make("postgresql", postgres)
    url = target.url(pki)
    columns = "serial, identity, mender_device_id, released_to, cut_at IS NULL"

    def source_rows() -> list[tuple[object, ...]]:
        with contextlib.closing(sqlite3.connect(pki / "registry.sqlite")) as source:
            return sorted(source.execute(f"SELECT {columns} FROM pins").fetchall())

    def migrate() -> dict[str, int]:
        out = imageprov_pki("registry", "migrate", "--pki", pki, "--to", url, "--json").stdout
        report: dict[str, int] = json.loads(out)
        return report

    first = migrate()
    assert (first["pins_copied"], first["pins_updated"], first["pins_verified"]) == (3, 0, 3)
    assert sorted(target.rows(pki, f"SELECT {columns} FROM pins")) == source_rows()
    unchanged = migrate()
    assert (unchanged["pins_copied"], unchanged["pins_updated"]) == (0, 0)
    # Pinned, revoked, cut and moved on in SQLite after the first copy: a rerun carries it forward.
    with Registry(pki) as registry:
        registry.pin_identity(serials["c"], identity(mac="c"))
        registry.revoke(device_id="b")
        registry.mark_cut(serials["b"])
        registry.revoke(device_id="a")
        a3 = issue(registry, ca, "a")
        assert registry.pin_identity(a3, identity(mac="a")) == PinResult(PinVerdict.REPINNED, a2)
    again = migrate()
    assert (again["pins_copied"], again["pins_updated"], again["pins_verified"]) == (2, 2, 5)
    assert sorted(target.rows(pki, f"SELECT {columns} FROM pins")) == source_rows()
    target.configure(pki)
    with Registry(pki) as registry:
        assert registry.pin_identity(a3, identity(mac="a")) == PinResult(PinVerdict.SAME, None)
        assert registry.uncut_revoked_pins() == []
        assert imageprov_pki("registry", "check", "--pki", pki).returncode == 0


# -- a registry that is named but missing ----------------------------------------------------


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture
def fleet(tmp_path: Path, make_golden: Callable[..., Path]) -> tuple[Path, Path]:
    """A whole PKI (CA key and certificate, a registry with one device) and a golden image."""
    pki = tmp_path / "pki"
    imageprov_pki("ca", "init", pki, "--cn", "Fleet CA")
    imageprov_pki("device-cert", "--pki", pki, "--device-id", "d1", "--out", tmp_path / "d1")
    return pki, make_golden(Scheme.MBR, rootfs_mib=16, data_mib=16)


def test_a_registry_named_but_missing_is_never_created(fleet: tuple[Path, Path], tmp_path: Path) -> None:
    pki, golden = fleet
    out = tmp_path / "out"
    everything: list[list[str | Path]] = [
        ["devices"], ["revoke", "d1"], ["denylist", "--out", out], ["registry", "check"],
        ["crl", "--out", out], ["device-cert", "--device-id", "d2", "--out", out],
        ["server-cert", "--host", "edge.lan", "--out", out],
        ["stamp", golden, "--device-id", "d2", "--out", out], ["flash", golden, "--target", f"{out}=d2"],
    ]  # fmt: skip
    registry_only = everything[:4]
    # A PKI folder holding only the CA's certificate, and one whose imageprov.toml misspells its registry.
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(pki / "ca-cert.pem", bare / "ca-cert.pem")
    (pki / "imageprov.toml").write_text('[registry]\nurl = "sqlite:registy.sqlite"\n')
    cases = [(bare, bare / "registry.sqlite", argv) for argv in registry_only]
    cases += [(pki, pki / "registy.sqlite", argv) for argv in everything]
    # And a registry given by --registry that is not there.
    cases += [(pki, tmp_path / "elsewhere.sqlite", [*argv, "--registry", f"sqlite://{tmp_path}/elsewhere.sqlite"])
              for argv in registry_only]  # fmt: skip
    before = {folder: _tree(folder) for folder in (bare, pki)}
    for folder, missing, argv in cases:
        proc = imageprov_pki(*argv, "--pki", folder, check=False)
        assert f"error: no registry at {missing} (check [registry] url" in _one_error_line(proc), argv
        assert _tree(folder) == before[folder] and not missing.exists(), argv
        # Nothing written (stamp makes --out before it opens anything: an empty directory at most).
        assert not out.exists() or (argv[0] == "stamp" and not any(out.iterdir())), argv
        if out.exists():
            out.rmdir()
    for folder in (bare, pki):  # as the edge opens it
        with pytest.raises(RegistryMissing, match="no registry at"):
            Registry(folder)
    (pki / "imageprov.toml").unlink()
    assert json.loads(imageprov_pki("devices", "--pki", pki, "--json").stdout)[0]["device_id"] == "d1"


def test_an_empty_file_or_database_is_no_registry(tmp_path: Path, postgres: Postgres) -> None:
    pki = tmp_path / "pki"
    imageprov_pki("ca", "init", pki, "--cn", "Fleet CA")
    empty = Db.make("postgresql", postgres)
    line = _one_error_line(imageprov_pki("devices", "--pki", pki, "--registry", empty.url(pki), check=False))
    assert f"the database {empty.url(pki)} holds no registry" in line and "registry migrate" in line
    assert empty.rows(pki, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'") == []
    (tmp_path / "touched.sqlite").touch()
    touched = imageprov_pki("devices", "--pki", pki, "--registry", "sqlite:../touched.sqlite", check=False)
    line = _one_error_line(touched)
    assert f"no registry at {pki}/../touched.sqlite" in line and (tmp_path / "touched.sqlite").stat().st_size == 0
    # The commands that start a registry make it there.
    imageprov_pki("registry", "migrate", "--pki", pki, "--to", empty.url(pki))
    assert imageprov_pki("devices", "--pki", pki, "--registry", empty.url(pki)).returncode == 0
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    Db.make("postgresql", postgres).configure(fresh)
    imageprov_pki("ca", "init", fresh, "--cn", "Fleet CA")
    assert sorted(p.name for p in fresh.iterdir()) == ["ca-cert.pem", "ca-private.key", "imageprov.toml"]
    assert imageprov_pki("registry", "check", "--pki", fresh).returncode == 0


# -- deadlines ---------------------------------------------------------------------------------


def _pg_registry(postgres: Postgres, tmp_path: Path, timeout: float) -> tuple[Path, Db]:
    pki = tmp_path / "pki"
    pki.mkdir()
    db = Db.make("postgresql", postgres)
    db.configure(pki, timeout=timeout)
    imageprov_pki("ca", "init", pki, "--cn", "Fleet CA")
    return pki, db


def test_a_slow_server_is_cut_at_the_deadline(postgres: Postgres, tmp_path: Path) -> None:
    pki, db = _pg_registry(postgres, tmp_path, 0.5)
    with Registry(pki) as registry:
        began = time.monotonic()
        # The server's statement_timeout (1.5 s) or, if the server is late, this side's watchdog (2.5 s).
        late = pytest.raises(RegistryTimeout, match=r"did not answer within (1\.5|2\.5) s")
        with late, registry.backend.autocommit() as tx:
            tx.query("SELECT pg_sleep(20)")
        assert time.monotonic() - began < 10
        assert registry.status_of_serial("abc") is None  # the connection is still good
    # Every insert into the registry now takes a minute: the CLI gives up with one line, and issues nothing.
    db.execute(
        pki,
        "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(60); RETURN NEW; END $$;"
        " CREATE TRIGGER slow BEFORE INSERT ON certificates FOR EACH ROW EXECUTE FUNCTION slow()",
    )
    began = time.monotonic()
    proc = imageprov_pki("device-cert", "--pki", pki, "--device-id", "d1", "--out", tmp_path / "d1", check=False)
    assert re.search(r"did not answer within (1\.5|2\.5) s", _one_error_line(proc))
    assert time.monotonic() - began < 15 and not (tmp_path / "d1").exists()
    assert db.rows(pki, "SELECT COUNT(*) FROM certificates") == [(0,)]


def test_a_lock_held_by_another_connection_ends_at_the_deadline(pki: Path, db: Db) -> None:
    db.configure(pki, timeout=0.5)
    ca = load_ca(pki, PASSPHRASE.encode())
    with Registry(pki) as registry:
        first, second = issue(registry, ca, "d1"), issue(registry, ca, "d2")
        # Another edge is halfway through pinning this identity to the first certificate.
        if db.kind == "sqlite":
            holder = sqlite3.connect(pki / "registry.sqlite", isolation_level=None)
            holder.execute("BEGIN IMMEDIATE")
        else:
            import psycopg

            assert db.server is not None
            holder = psycopg.connect(db.server.url(db.database))  # type: ignore[assignment]
        holder.execute(
            "INSERT INTO pins (serial, identity, pinned_at) VALUES ('" + first + '\', \'{"mac":"1"}\', '
            "'2025-01-01T00:00:00+00:00')"
        )
        try:
            began = time.monotonic()
            with pytest.raises(RegistryBusy, match="is locked by another"):
                registry.pin_identity(second, identity(mac="1"))
            assert time.monotonic() - began < 3
        finally:
            if db.kind == "sqlite":
                holder.execute("COMMIT")
            else:
                holder.commit()
            holder.close()
        assert registry.pin_identity(second, identity(mac="1")) == PinResult(PinVerdict.IDENTITY_TAKEN, first)


def test_a_server_that_never_answers_the_connection_is_one_line(tmp_path: Path) -> None:
    """A socket that accepts and says nothing: connect_timeout ends it, even before any statement."""
    pki = tmp_path / "pki"
    imageprov_pki("ca", "init", pki, "--cn", "Fleet CA")
    (pki / "imageprov.toml").write_text("[registry]\ntimeout = 1\n")
    silent = tmp_path / "silent"
    silent.mkdir()
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(silent / ".s.PGSQL.5432"))
        listener.listen(8)
        began = time.monotonic()
        proc = subprocess.run(
            [*IMAGEPROV_ARGV, "devices", "--pki", str(pki), "--registry",
             f"postgresql:///registry?host={silent}&user=nobody"],
            capture_output=True, text=True, env=cli_env(), stdin=subprocess.DEVNULL, timeout=60,
        )  # fmt: skip
    assert "cannot connect to the registry" in _one_error_line(proc)
    assert time.monotonic() - began < 15


def test_pin_records_read_back(pki: Path) -> None:
    ca = load_ca(pki, PASSPHRASE.encode())
    with Registry(pki) as registry:
        serial = issue(registry, ca, "d1")
        record = registry.record_of("0" + serial.upper())
        assert record is not None and record.status is Status.ACTIVE and record.device_id == "d1"
        assert registry.record_of("abcdef") is None
        registry.pin_identity(serial, identity(mac="1"))
        pin = registry.pin_of(serial)
        assert isinstance(pin, Pin) and pin.pinned_at >= record.issued_at
