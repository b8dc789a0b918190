"""The SQLite backend: one file beside the CA, for the stations of one host.

Every change runs in a ``BEGIN IMMEDIATE`` transaction, so that a check and
the change it guards are one step for every process on the host. A station's
lease is an ``flock`` on a file of its own beside the database: the kernel
releases it when the process ends, however it ends (kill -9, a container's
PID 1, another PID namespace), so no pid is ever guessed at.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO
from urllib.parse import quote

from imageprov.errors import PkiError
from imageprov.locks import held, hold
from imageprov.pki.registry_base import (
    SCHEMA_VERSION,
    Backend,
    RegistryBusy,
    RegistryConflict,
    RegistryDamaged,
    Row,
    Station,
    Tx,
    missing,
    newer_schema,
)

# The columns of certificates that version 7 copies into its new table.
_COPIED = (
    "serial, device_id, kind, fingerprint, public_key, not_before, not_after, issued_at, status, revoked_at, "
    "reason, delivered_to, delivered_at, owner, session"
)
# Version 1 is the schema of imageprov 0.1 (which had no version number): the
# steps are written so that they also upgrade such a file in place.
_MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE IF NOT EXISTS certificates (
            serial       TEXT PRIMARY KEY,          -- lowercase hex
            device_id    TEXT NOT NULL,             -- the CN; the host name for a server certificate
            kind         TEXT NOT NULL CHECK (kind IN ('device', 'server')),
            fingerprint  TEXT NOT NULL UNIQUE,      -- SHA-256 of the DER certificate, hex
            public_key   TEXT NOT NULL,             -- PEM SubjectPublicKeyInfo
            not_before   TEXT NOT NULL,
            not_after    TEXT NOT NULL,
            issued_at    TEXT NOT NULL,
            status       TEXT NOT NULL CHECK (status IN ('pending', 'active', 'revoked')),
            revoked_at   TEXT,
            reason       TEXT,
            delivered_to TEXT,
            delivered_at TEXT,
            owner        TEXT
        )""",
        """CREATE UNIQUE INDEX IF NOT EXISTS one_live_certificate_per_device
            ON certificates (device_id) WHERE kind = 'device' AND status IN ('pending', 'active')""",
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    ],
    2: [
        # AUTOINCREMENT: an id is never reused, so a dead session's
        # certificates never look owned by a new, live one.
        """CREATE TABLE sessions (
            id         INTEGER PRIMARY KEY AUTOINCREMENT,
            host       TEXT NOT NULL,
            pid        INTEGER NOT NULL,
            boot_id    TEXT NOT NULL,
            started_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%S+00:00', 'now')),
            ended_at   TEXT
        )""",
        "ALTER TABLE certificates ADD COLUMN session INTEGER REFERENCES sessions (id)",
    ],
    3: [
        # A device certificate is bound to the first identity it presents at
        # the edge, for good: one row per certificate (its primary key), one
        # current holder per identity (the partial unique index). A row whose
        # identity moved on (its certificate revoked, or its device reissued)
        # stays as history: released_at, released_to.
        """CREATE TABLE pins (
            serial           TEXT PRIMARY KEY REFERENCES certificates (serial),
            -- canonical JSON of the identity data, bounded as in PostgreSQL (a btree entry)
            identity         TEXT NOT NULL CHECK (length(CAST(identity AS BLOB)) BETWEEN 1 AND 2048),
            mender_device_id TEXT,                                  -- learned at preauthorization
            pinned_at        TEXT NOT NULL,
            released_at      TEXT,                                  -- when the identity moved on to released_to
            released_to      TEXT REFERENCES certificates (serial),
            cut_at           TEXT,                                  -- when the edge rejected the device in Mender
            CHECK ((released_at IS NULL) = (released_to IS NULL)),
            CHECK (released_to <> serial)
        )""",
        "CREATE UNIQUE INDEX one_certificate_per_identity ON pins (identity) WHERE released_at IS NULL",
        # What the edge polls: the current pins not yet cut, each certificate's status then read by its key.
        "CREATE INDEX pins_not_cut ON pins (serial) WHERE released_at IS NULL AND cut_at IS NULL",
    ],
    4: [
        # A fleet's registry keeps its history (100,000 devices, reissues, revocations): every lookup a
        # station or the edge makes per device reads an index, never the table (tests/test_registry_plans.py).
        "CREATE INDEX IF NOT EXISTS certificates_by_device ON certificates (device_id)",
        # What a station's start-up and `registry check` ask: pending certificates, whose station may be gone.
        "CREATE INDEX IF NOT EXISTS pending_certificates ON certificates (session) WHERE status = 'pending'",
        # What a CRL and a denylist list: the revoked, in the order they were issued.
        "CREATE INDEX IF NOT EXISTS revoked_certificates ON certificates (issued_at) WHERE status = 'revoked'",
    ],
    5: [
        # An edge that is about to reject a revoked device in Mender claims it first, for a while: of several
        # replicas, one acts; one that dies mid-call leaves a claim that runs out, and another takes it over.
        "ALTER TABLE pins ADD COLUMN cut_claimed_until TEXT",
    ],
    6: [
        # A CRL of a fleet's 100,000 revoked certificates read from the index alone (every column it lists, and
        # status, which SQLite needs there to call it covering): a quarter of the time of a row lookup each.
        "DROP INDEX IF EXISTS revoked_certificates",
        "CREATE INDEX revoked_certificates ON certificates (issued_at, serial, revoked_at, reason, status) "
        "WHERE status = 'revoked'",
    ],
    7: [
        # Bootstrap certificates (issue 27): a device's one enrollment at first boot (EST). SQLite cannot widen a
        # CHECK constraint in place, so the table is made anew and its rows copied, row ids kept (each() and the
        # identity pins order by them), then renamed, as https://www.sqlite.org/lang_altertable.html#otheralter
        # describes; foreign keys are not enforced on this connection, so the pins' references stay as they are.
        """CREATE TABLE certificates_7 (
            serial       TEXT PRIMARY KEY,
            device_id    TEXT NOT NULL,
            kind         TEXT NOT NULL CHECK (kind IN ('device', 'server', 'bootstrap')),
            fingerprint  TEXT NOT NULL UNIQUE,
            public_key   TEXT NOT NULL,
            not_before   TEXT NOT NULL,
            not_after    TEXT NOT NULL,
            issued_at    TEXT NOT NULL,
            status       TEXT NOT NULL CHECK (status IN ('pending', 'active', 'revoked')),
            revoked_at   TEXT,
            reason       TEXT,
            delivered_to TEXT,
            delivered_at TEXT,
            owner        TEXT,
            session      INTEGER REFERENCES sessions (id)
        )""",
        f"INSERT INTO certificates_7 (rowid, {_COPIED}) SELECT rowid, {_COPIED} FROM certificates",
        "DROP TABLE certificates",
        "ALTER TABLE certificates_7 RENAME TO certificates",
        # The indexes went with the old table: made again as versions 1, 4 and 6 made them.
        """CREATE UNIQUE INDEX one_live_certificate_per_device
            ON certificates (device_id) WHERE kind = 'device' AND status IN ('pending', 'active')""",
        "CREATE INDEX certificates_by_device ON certificates (device_id)",
        "CREATE INDEX pending_certificates ON certificates (session) WHERE status = 'pending'",
        "CREATE INDEX revoked_certificates ON certificates (issued_at, serial, revoked_at, reason, status) "
        "WHERE status = 'revoked'",
        # A device holds at most one live bootstrap certificate, beside its one live device certificate.
        """CREATE UNIQUE INDEX IF NOT EXISTS one_live_bootstrap_per_device
            ON certificates (device_id) WHERE kind = 'bootstrap' AND status IN ('pending', 'active')""",
        # Each credential is used once (its primary key): the certificate it obtained, replaced only when the
        # same key asks again; a certificate is obtained by one credential.
        """CREATE TABLE IF NOT EXISTS enrollments (
            used_serial   TEXT PRIMARY KEY REFERENCES certificates (serial),
            issued_serial TEXT NOT NULL UNIQUE REFERENCES certificates (serial),
            enrolled_at   TEXT NOT NULL,
            CHECK (issued_serial <> used_serial)
        )""",
    ],
}

# Indexes that carry an invariant or keep the edge's lookups off a table scan; `registry check` looks for them.
INDEXES = (
    "one_live_certificate_per_device", "one_certificate_per_identity", "pins_not_cut",
    "certificates_by_device", "pending_certificates", "revoked_certificates", "one_live_bootstrap_per_device",
)  # fmt: skip


class _SqliteTx(Tx):
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def execute(self, sql: str, params: Sequence[object] = ()) -> int:
        return self._db.execute(sql, tuple(params)).rowcount

    def query(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        return [dict(row) for row in self._db.execute(sql, tuple(params))]

    def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        self._db.executemany(sql, rows)


class SqliteBackend(Backend):
    """``create``: make the file if it is not there (only a command that starts a PKI); otherwise a file that
    is missing or holds no registry raises ``RegistryMissing``, never becomes a new, empty registry."""

    def __init__(self, path: Path, *, timeout: float, create: bool = False) -> None:
        self.path = path
        self.display = f"sqlite://{path}"
        self._timeout = timeout
        self._lease: IO[bytes] | None = None
        self._lease_path: Path | None = None
        self._session: int | None = None
        with self._errors():
            if not create and not path.is_file():
                raise missing(str(path))
            if not path.parent.is_dir():
                raise PkiError(f"no directory {path.parent} for the registry {path}")
            # Autocommit mode: transactions are begun explicitly, IMMEDIATE, below.
            # Any thread may use it (the edge asks from a pool), one at a time (_lock).
            # mode=rw: a file removed since the check above is not made anew either.
            self._db = sqlite3.connect(
                f"file:{quote(str(path))}?mode={'rwc' if create else 'rw'}",
                uri=True, timeout=timeout, isolation_level=None, check_same_thread=False,
            )  # fmt: skip
        self._lock = threading.RLock()
        try:
            with self._errors():
                self._db.row_factory = sqlite3.Row
                self._db.execute("PRAGMA synchronous=FULL")
                version = self.schema_version()
                if version == 0 and not create:  # an empty file (touched, or cut short): not a registry
                    raise missing(str(path))
                if version != SCHEMA_VERSION:
                    self._db.execute("PRAGMA journal_mode=WAL")  # kept in the file: once is enough
                    self._migrate()
        except BaseException:
            self._db.close()
            raise

    def _migrate(self) -> None:
        with self.transaction():
            version = self.schema_version()  # again: another process may have migrated meanwhile
            if version > SCHEMA_VERSION:
                raise newer_schema(self.display, version)
            for step in range(version + 1, SCHEMA_VERSION + 1):
                if step == 2 and "owner" not in self._columns():  # 0.1 files from before owners were kept
                    self._db.execute("ALTER TABLE certificates ADD COLUMN owner TEXT")
                for statement in _MIGRATIONS[step]:
                    self._db.execute(statement)
            # user_version lives in the file's header page: it commits with the steps.
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION:d}")

    def _columns(self) -> set[str]:
        return {row["name"] for row in self._db.execute("PRAGMA table_info(certificates)")}

    def schema_version(self) -> int:
        with self._errors():
            (version,) = self._db.execute("PRAGMA user_version").fetchone()
            if version == 0 and self._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'certificates'").fetchone():
                return 1  # made by imageprov 0.1, before versions were numbered
            return int(version)

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.IntegrityError as exc:
            raise RegistryConflict(f"the registry {self.path} refused a change: {exc}") from exc
        except sqlite3.OperationalError as exc:
            text = str(exc)
            if "locked" in text or "busy" in text:
                raise RegistryBusy(
                    f"the registry {self.path} is locked by another process",
                    hint=f"waited {self._timeout:g} s; if a sqlite3 shell or a backup holds it, end that and retry "
                    "(or raise [registry] timeout in PKI/imageprov.toml)",
                ) from exc
            raise PkiError(f"cannot use the registry {self.path}: {text}") from exc
        except sqlite3.DatabaseError as exc:  # "file is not a database", "database disk image is malformed"
            raise RegistryDamaged(
                f"the registry {self.path} is damaged: {exc}",
                hint="restore it from a backup; 'imageprov registry check' shows what is wrong",
            ) from exc

    @contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[Tx]:
        with self._lock, self._errors():
            # In WAL mode, NORMAL skips the fsync at commit; the next FULL commit syncs the log up to it.
            if not durable:
                self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield _SqliteTx(self._db)
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            finally:
                if not durable:
                    self._db.execute("PRAGMA synchronous=FULL")

    @contextmanager
    def autocommit(self) -> Iterator[Tx]:
        with self._lock, self._errors():
            yield _SqliteTx(self._db)

    def _lease_file(self, session: int) -> Path:
        return self.path.with_name(f"{self.path.name}.leases") / f"{session}.lock"

    def start_lease(self, station: Station) -> int:
        with self.transaction() as tx:
            [row] = tx.query(
                "INSERT INTO sessions (host, pid, boot_id) VALUES (?, ?, ?) RETURNING id",
                (station.host, station.pid, station.boot_id),
            )
        session = int(row["id"])
        path = self._lease_file(session)
        path.parent.mkdir(mode=0o755, exist_ok=True)
        handle = open(path, "wb")  # noqa: SIM115 - held open for as long as the lease lasts
        hold(handle.fileno())
        self._lease, self._lease_path, self._session = handle, path, session
        return session

    def lease_alive(self, session: int) -> bool:
        return held(self._lease_file(session))  # no file: ended, or never got as far as certificates

    def end_lease(self) -> None:
        if self._lease is None:
            return
        assert self._lease_path is not None
        try:
            with self.transaction(durable=False) as tx:
                tx.execute(
                    "UPDATE sessions SET ended_at = strftime('%Y-%m-%dT%H:%M:%S+00:00', 'now') WHERE id = ?",
                    (self._session,),
                )
        finally:
            self._lease_path.unlink(missing_ok=True)
            self._lease.close()
            self._lease = None

    def structure_problems(self) -> list[str]:
        with self.autocommit() as tx:
            problems = [
                r["integrity_check"] for r in tx.query("PRAGMA integrity_check") if r["integrity_check"] != "ok"
            ]
            present = {r["name"] for r in tx.query("SELECT name FROM sqlite_master WHERE type = 'index'")}
        return problems + [f"the index {name} is missing" for name in INDEXES if name not in present]

    def close(self) -> None:
        try:
            self.end_lease()
        finally:
            self._db.close()
