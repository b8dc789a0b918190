"""The PostgreSQL backend (psycopg 3): one registry for the stations of many hosts.

Every call has a deadline, ``[registry] timeout``: connecting (``connect_timeout``),
waiting for a lock (``lock_timeout``), and any statement (``statement_timeout``,
a second longer so that a lock wait is reported as one). Those the server
enforces; a server that stops answering altogether (SIGSTOP, a frozen VM, a
network that drops packets) enforces nothing, so this side gives up too: a
statement, commit or rollback that has no answer a second after the server's
own deadline has its connection shut down (``_Deadline``). Either way the
call raises ``RegistryTimeout`` (a ``RegistryUnavailable``), never hangs.

A station's lease is a session-level advisory lock held on its connection:
PostgreSQL drops it the moment the connection ends, whatever ended it (the
process killed, the host gone once TCP keepalives give up, the server
restarted), and any other station sees that in ``pg_locks``. The session row
records who held it (host, pid, boot id) for people to read.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row

from imageprov.errors import PkiError
from imageprov.pki.registry_base import (
    SCHEMA_VERSION,
    Backend,
    RegistryBusy,
    RegistryConflict,
    RegistryMissing,
    RegistryTimeout,
    RegistryUnavailable,
    Row,
    Station,
    Tx,
    newer_schema,
)

# First key of every advisory lock imageprov takes ("imgp"); the second is a
# session id, or 0 for schema migrations.
LOCK_SPACE = 0x696D6770

_MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE certificates (
            -- insertion order, named as SQLite's implicit column so that the shared SQL can order by it
            rowid        BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
            serial       TEXT PRIMARY KEY CHECK (serial ~ '^[0-9a-f]+$'),
            device_id    TEXT NOT NULL,
            kind         TEXT NOT NULL CHECK (kind IN ('device', 'server')),
            fingerprint  TEXT NOT NULL UNIQUE CHECK (fingerprint ~ '^[0-9a-f]{64}$'),
            public_key   TEXT NOT NULL,
            not_before   TIMESTAMPTZ NOT NULL,
            not_after    TIMESTAMPTZ NOT NULL,
            issued_at    TIMESTAMPTZ NOT NULL,
            status       TEXT NOT NULL CHECK (status IN ('pending', 'active', 'revoked')),
            revoked_at   TIMESTAMPTZ,
            reason       TEXT,
            delivered_to TEXT,
            delivered_at TIMESTAMPTZ,
            owner        TEXT,
            CHECK ((status = 'revoked') = (revoked_at IS NOT NULL))
        )""",
        """CREATE UNIQUE INDEX one_live_certificate_per_device
            ON certificates (device_id) WHERE kind = 'device' AND status IN ('pending', 'active')""",
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL)",
    ],
    2: [
        """CREATE TABLE sessions (
            id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            host       TEXT NOT NULL,
            pid        INTEGER NOT NULL,
            boot_id    TEXT NOT NULL,
            started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
            ended_at   TIMESTAMPTZ
        )""",
        "ALTER TABLE certificates ADD COLUMN session BIGINT REFERENCES sessions (id)",
    ],
    3: [
        # As in registry_sqlite.py: one row per certificate, for good; one current holder per identity.
        """CREATE TABLE pins (
            serial           TEXT PRIMARY KEY REFERENCES certificates (serial),
            -- canonical JSON; bounded so that it always fits a btree entry (2704 bytes)
            identity         TEXT NOT NULL CHECK (octet_length(identity) BETWEEN 1 AND 2048),
            mender_device_id TEXT,
            pinned_at        TIMESTAMPTZ NOT NULL,
            released_at      TIMESTAMPTZ,
            released_to      TEXT REFERENCES certificates (serial),
            cut_at           TIMESTAMPTZ,
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
        "ALTER TABLE pins ADD COLUMN cut_claimed_until TIMESTAMPTZ",
    ],
    6: [
        # A CRL of a fleet's 100,000 revoked certificates read from the index alone (every column it lists, and
        # status, which SQLite needs there to call it covering): a quarter of the time of a row lookup each.
        "DROP INDEX IF EXISTS revoked_certificates",
        "CREATE INDEX revoked_certificates ON certificates (issued_at, serial, revoked_at, reason, status) "
        "WHERE status = 'revoked'",
    ],
    7: [
        # Bootstrap certificates (issue 27), as in registry_sqlite.py; PostgreSQL widens the CHECK in place
        # (version 1 left it the name PostgreSQL gives a column's check).
        "ALTER TABLE certificates DROP CONSTRAINT IF EXISTS certificates_kind_check, "
        "ADD CONSTRAINT certificates_kind_check CHECK (kind IN ('device', 'server', 'bootstrap'))",
        """CREATE UNIQUE INDEX IF NOT EXISTS one_live_bootstrap_per_device
            ON certificates (device_id) WHERE kind = 'bootstrap' AND status IN ('pending', 'active')""",
        """CREATE TABLE IF NOT EXISTS enrollments (
            used_serial   TEXT PRIMARY KEY REFERENCES certificates (serial),
            issued_serial TEXT NOT NULL UNIQUE REFERENCES certificates (serial),
            enrolled_at   TIMESTAMPTZ NOT NULL,
            CHECK (issued_serial <> used_serial)
        )""",
    ],
}

INDEXES = (
    "one_live_certificate_per_device", "one_certificate_per_identity", "pins_not_cut",
    "certificates_by_device", "pending_certificates", "revoked_certificates", "one_live_bootstrap_per_device",
)  # fmt: skip


_CLIENT_DEFAULTS = {
    "application_name": "imageprov",
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
}


# Rows sent per round trip by executemany (a migration's copy), each round trip under its own deadline.
_CHUNK = 500


def _iso(value: object) -> object:
    return value.isoformat() if isinstance(value, dt.datetime) else value


class _Deadline:
    """Gives up on a server that has not answered in time, from this side: shuts the connection's socket down.

    statement_timeout and lock_timeout are the server's to enforce; a stopped
    server enforces nothing, and libpq waits for its answer without bound.
    Armed before each statement (and each COMMIT or ROLLBACK), disarmed once
    the call is over; one thread per connection watches, so that a call costs
    no thread of its own. A connection shut down is lost, and with it this
    station's lease: the station stops (``RegistryTimeout``), and what it had
    issued stays pending for a rerun to settle.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self._fd: int | None = None
        self._due: float | None = None
        self._closed = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._watch, name="imageprov-registry-deadline", daemon=True)

    def watch(self, fd: int) -> None:
        """Start watching the connection whose socket is ``fd``."""
        self._fd = fd
        self._thread.start()

    def arm(self) -> None:
        with self._changed:
            self._due = time.monotonic() + self.seconds
            self._changed.notify()

    def disarm(self) -> None:
        with self._changed:
            self._due = None

    def close(self) -> None:
        """Stop watching, before the connection is closed (its descriptor may then be reused)."""
        with self._changed:
            self._closed, self._due = True, None
            self._changed.notify()

    def _watch(self) -> None:
        with self._changed:
            while not self._closed:
                left = None if self._due is None else self._due - time.monotonic()
                if left is None or left > 0:
                    self._changed.wait(left)
                    continue
                self._due, self.expired = None, True
                assert self._fd is not None
                # A duplicate, so that closing it leaves libpq's descriptor open; shutdown(2) acts on the socket
                # both share: libpq's wait ends at once, with "server closed the connection".
                with socket.socket(fileno=os.dup(self._fd)) as stuck, contextlib.suppress(OSError):
                    stuck.shutdown(socket.SHUT_RDWR)  # OSError: the other end closed it already


class _PgTx(Tx):
    def __init__(self, conn: psycopg.Connection[Row], deadline: _Deadline) -> None:
        self._conn = conn
        self._deadline = deadline

    # The shared SQL is written with "?" placeholders, psycopg's are "%s".
    def execute(self, sql: str, params: Sequence[object] = ()) -> int:
        self._deadline.arm()
        return self._conn.execute(sql.replace("?", "%s"), tuple(params)).rowcount

    def query(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        self._deadline.arm()
        rows = self._conn.execute(sql.replace("?", "%s"), tuple(params)).fetchall()
        return [{k: _iso(v) for k, v in row.items()} for row in rows]

    def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        with self._conn.cursor() as cursor:
            for start in range(0, len(rows), _CHUNK):
                self._deadline.arm()
                cursor.executemany(sql.replace("?", "%s"), rows[start : start + _CHUNK])


class PostgresBackend(Backend):
    """``create``: give an empty database the registry's schema (only a command that starts a PKI, or the
    target of a migration); otherwise a database without one raises ``RegistryMissing``."""

    def __init__(self, url: str, display: str, *, timeout: float, create: bool = False) -> None:
        self.display = display
        self._timeout = timeout
        self._session: int | None = None
        # The server's statement_timeout is a second longer than its lock_timeout; this side's a second longer
        # still, so that a server that answers reports its own timeout, and only one that does not is cut off.
        self._deadline = _Deadline(timeout + 2)
        self._cut_said = False  # whether a call was told its connection was cut at the deadline
        # One connection, used by one thread at a time (the edge asks from a pool): a
        # transaction's statements must not interleave with another thread's.
        self._lock = threading.RLock()
        # A station must notice a server it can no longer reach rather than
        # wait on a dead TCP connection; values in the URL win.
        try:
            given = conninfo_to_dict(url)
            settings = {k: v for k, v in _CLIENT_DEFAULTS.items() if k not in given}
            conninfo = make_conninfo(url, connect_timeout=max(2, round(timeout)), **settings)
            self._conn = psycopg.connect(conninfo, autocommit=True, row_factory=dict_row)
        except psycopg.Error as exc:
            # Recent psycopg raises ConnectionTimeout; older ones an OperationalError saying "timeout expired".
            if type(exc).__name__ == "ConnectionTimeout" or "timeout expired" in str(exc):
                raise RegistryTimeout(
                    f"cannot connect to the registry {display}: no answer within {max(2, round(timeout))} s",
                    hint="is the server up, and not overloaded or stuck? [registry] timeout in PKI/imageprov.toml "
                    "sets the deadline",
                ) from exc
            raise RegistryUnavailable(
                f"cannot connect to the registry {display}: {_first_line(exc)}",
                hint="is the server up? a password comes from PGPASSFILE (~/.pgpass), PGPASSWORD or a service file",
            ) from exc
        self._deadline.watch(self._conn.pgconn.socket)
        try:
            with self._errors(), self._deadline_armed():
                # Timestamps come back in UTC, as SQLite's text has them; a
                # lock another transaction holds is waited for as long as SQLite
                # would, and any statement a second longer.
                self._conn.execute(
                    "SELECT set_config('TimeZone', 'UTC', false), set_config('lock_timeout', %s, false),"
                    " set_config('statement_timeout', %s, false)",
                    (f"{int(timeout * 1000)}ms", f"{int(timeout * 1000) + 1000}ms"),
                )
                version = self.schema_version()
                if version == 0 and not create:
                    raise RegistryMissing(
                        f"the database {display} holds no registry",
                        hint="check the database in [registry] url (PKI/imageprov.toml) or --registry; a registry "
                        "is made there by 'imageprov registry migrate --pki PKI --to URL' or 'imageprov ca init'",
                    )
                if version != SCHEMA_VERSION:
                    self._migrate()
        except BaseException:
            self._deadline.close()
            self._conn.close()
            raise

    @contextmanager
    def _deadline_armed(self) -> Iterator[None]:
        self._deadline.arm()
        try:
            yield
        finally:
            self._deadline.disarm()

    def schema_version(self) -> int:
        with self.autocommit() as tx:
            if tx.query("SELECT to_regclass('meta') IS NOT NULL AS present")[0]["present"]:
                found = tx.query("SELECT value FROM meta WHERE key = 'schema_version'")
                return int(found[0]["value"]) if found else 0
        return 0

    def _migrate(self) -> None:
        # Two stations opening a new database at once: one migrates, the other
        # waits and finds it done. The lock is taken before the transaction
        # begins, so that the transaction sees the catalog as the other left it.
        with self.autocommit() as tx:
            tx.query("SELECT pg_advisory_lock(?, 0)", (LOCK_SPACE,))
        try:
            with self.transaction() as tx:
                version = self.schema_version()
                if version > SCHEMA_VERSION:
                    raise newer_schema(self.display, version)
                for step in range(version + 1, SCHEMA_VERSION + 1):
                    for statement in _MIGRATIONS[step]:
                        tx.execute(statement)
                tx.execute(
                    "INSERT INTO meta VALUES ('schema_version', ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (SCHEMA_VERSION,),
                )
        finally:
            with self.autocommit() as tx:
                tx.query("SELECT pg_advisory_unlock(?, 0)", (LOCK_SPACE,))

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except psycopg.errors.IntegrityError as exc:
            raise RegistryConflict(f"the registry {self.display} refused a change: {_first_line(exc)}") from exc
        except psycopg.errors.TransactionRollback as exc:  # a deadlock or serialization failure: a race lost
            raise RegistryConflict(f"the registry {self.display} refused a change: {_first_line(exc)}") from exc
        except psycopg.errors.LockNotAvailable as exc:
            raise RegistryBusy(
                f"the registry {self.display} is locked by another session",
                hint=f"waited {self._timeout:g} s; find it in pg_stat_activity, or raise [registry] timeout "
                "in PKI/imageprov.toml",
            ) from exc
        except psycopg.errors.QueryCanceled as exc:  # statement_timeout
            raise RegistryTimeout(
                f"the registry {self.display} did not answer within {self._timeout + 1:g} s",
                hint="the database server is overloaded or stuck; [registry] timeout in PKI/imageprov.toml "
                "sets the deadline",
            ) from exc
        except psycopg.OperationalError as exc:
            if self._deadline.expired:
                # The call that waited is a timeout; the calls after it find a connection given up: lost, so that
                # a long-running reader (the edge) opens a new one, as after a restart of the server.
                said, self._cut_said = self._cut_said, True
                raise (RegistryUnavailable if said else RegistryTimeout)(
                    f"the registry {self.display} did not answer within {self._deadline.seconds:g} s"
                    + (": its connection was given up" if said else ""),
                    hint="the database server stopped answering (stopped, overloaded, or the network is down); "
                    "devices in flight are not delivered: rerun the same command once it answers",
                ) from exc
            raise RegistryUnavailable(
                f"lost the registry {self.display}: {_first_line(exc)}",
                hint="devices in flight are not delivered; rerun the same command once the database is back",
            ) from exc
        except psycopg.Error as exc:
            raise PkiError(f"cannot use the registry {self.display}: {_first_line(exc)}") from exc

    @contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[Tx]:
        with self._lock, self._errors(), self._deadline_armed(), self._conn.transaction():
            try:
                if not durable:  # the WAL writer flushes it within wal_writer_delay, in order
                    self._conn.execute("SET LOCAL synchronous_commit = off")
                yield _PgTx(self._conn, self._deadline)
            finally:
                self._deadline.arm()  # the COMMIT or ROLLBACK that follows waits for the server too

    @contextmanager
    def autocommit(self) -> Iterator[Tx]:
        with self._lock, self._errors(), self._deadline_armed():
            yield _PgTx(self._conn, self._deadline)

    def start_lease(self, station: Station) -> int:
        with self.transaction() as tx:
            [row] = tx.query(
                "INSERT INTO sessions (host, pid, boot_id) VALUES (?, ?, ?) RETURNING id",
                (station.host, station.pid, station.boot_id),
            )
        session = int(row["id"])
        with self.autocommit() as tx:
            # Session-level: held until this connection ends or it is given up.
            tx.query("SELECT pg_advisory_lock(?, ?::integer)", (LOCK_SPACE, session))
        self._session = session
        return session

    def lease_alive(self, session: int) -> bool:
        with self.autocommit() as tx:
            found = tx.query(
                "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"
                " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                " AND classid::bigint = ? AND objid::bigint = ? AND objsubid = 2",
                (LOCK_SPACE, session),
            )
        return bool(found)

    def end_lease(self) -> None:
        if self._session is None or self._conn.broken or self._conn.closed:
            return
        with self.transaction() as tx:
            tx.execute("UPDATE sessions SET ended_at = now() WHERE id = ?", (self._session,))
            tx.query("SELECT pg_advisory_unlock(?, ?::integer)", (LOCK_SPACE, self._session))
        self._session = None

    def structure_problems(self) -> list[str]:
        with self.autocommit() as tx:
            present = {
                r["indexname"] for r in tx.query("SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()")
            }
        return [f"the index {name} is missing" for name in INDEXES if name not in present]

    def close(self) -> None:
        try:
            self.end_lease()
        except PkiError:
            pass  # the connection is gone, and the lease with it
        finally:
            with self._lock:  # no call in flight: the watchdog never shuts a descriptor reused since
                self._deadline.close()
                self._conn.close()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
