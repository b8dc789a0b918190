"""A registry of N real certificates, made fast: for ``scripts/bench_registry.py --rows``.

Every row is a certificate the PKI's CA signed, with its own serial and
fingerprint. What makes it fast: key pairs are reused. Each worker process
issues ``KEYS`` certificates for real (``CertificateAuthority.issue_device``,
each with a new key) and signs the rest with the CA on those certificates'
profile: the same key pair, extensions and validity, a new subject CN and a
new random serial. Signing takes a tenth of a millisecond; the rows then go
in by the thousand (SQLite: ``executemany`` in one transaction per chunk,
PostgreSQL: ``COPY``) rather than through ``Registry.record`` one by one.

The schema is the one ``Registry`` made (``create=True``), and the columns are
``registry_base.COLUMNS``, so a migration that adds a nullable column needs
nothing here.

The history is a fleet's (``plan``): mostly devices with one delivered
(``active``) certificate; some reissued once or several times (the older
certificates ``revoked``, ``superseded``); some whose key was compromised
(``revoked``, ``key-compromise``), replaced or not; and a few ``pending``
certificates of stations that were killed (their sessions ended: ``registry
check`` reports them as notes, and a rerun of the device would revoke them).
About a tenth of the rows are revoked.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing
import random
import sqlite3
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.pool import AsyncResult
from pathlib import Path
from typing import NamedTuple, Protocol, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from imageprov.pki.ca import CertificateAuthority, Issued, load_ca
from imageprov.pki.registry_base import COLUMNS, Reason, Status

Row = tuple[object, ...]

KEYS = 64  # key pairs per worker, each from a certificate issued for real
CHUNK = 2000  # rows per task and per insert
SESSIONS = 8  # station runs the history comes from: all ended, as after a real line's shifts
PENDING_EVERY = 5000  # one device in this many was left pending by a station that was killed
# The shares of devices (cumulative thresholds of one draw): the rest have one active certificate.
REISSUED_ONCE = 0.06  # one certificate superseded, then the active one
REISSUED_OFTEN = REISSUED_ONCE + 0.005  # two to four superseded, then the active one
COMPROMISED = REISSUED_OFTEN + 0.02  # key-compromise, never replaced (the device is gone)
COMPROMISED_REPLACED = COMPROMISED + 0.01  # key-compromise, then a new active certificate

_SERIAL = COLUMNS.index("serial")
_DEVICE = COLUMNS.index("device_id")
_STATUS = COLUMNS.index("status")
_SESSION = COLUMNS.index("session")


class Planned(NamedTuple):
    """One certificate of the history, before it is issued."""

    device_id: str
    status: str  # a Status value
    reason: str | None  # a Reason value, for revoked ones
    delivered_to: str | None
    session: int  # index into the fill's sessions (0 .. SESSIONS - 1)


def device_id_of(number: int) -> str:
    return f"dev-{number:07d}"


def plan(rows: int, seed: int = 24) -> Iterator[Planned]:
    """Exactly ``rows`` certificates, device after device, each device's history oldest first."""
    rng = random.Random(seed)
    made = number = 0
    while made < rows:
        for planned in _history(number, rng):
            if made == rows:
                return
            yield planned
            made += 1
        number += 1


def _history(number: int, rng: random.Random) -> list[Planned]:
    device_id = device_id_of(number)
    session = rng.randrange(SESSIONS)
    if number % PENDING_EVERY == PENDING_EVERY - 1:
        return [Planned(device_id, Status.PENDING.value, None, None, session)]
    # Stamped images and flashed cards, as `stamp` and `flash` write delivered_to.
    where = (
        f"/srv/line/out/{device_id}.sdimg"
        if number % 3
        else f"card /dev/sd{'bcd'[number // 3 % 3]}: mmc cid {number:032x}"
    )

    def revoked(reason: Reason) -> Planned:
        return Planned(device_id, Status.REVOKED.value, reason.value, where, rng.randrange(SESSIONS))

    active = Planned(device_id, Status.ACTIVE.value, None, where, session)
    draw = rng.random()
    if draw < REISSUED_ONCE:
        return [revoked(Reason.SUPERSEDED), active]
    if draw < REISSUED_OFTEN:
        return [*(revoked(Reason.SUPERSEDED) for _ in range(rng.randint(2, 4))), active]
    if draw < COMPROMISED:
        return [revoked(Reason.KEY_COMPROMISE)]
    if draw < COMPROMISED_REPLACED:
        return [revoked(Reason.KEY_COMPROMISE), active]
    return [active]


# -- certificates (in worker processes) -------------------------------------------


@dataclass(frozen=True)
class _Profile:
    """A certificate issued for real, whose key pair and profile the next certificates reuse."""

    issued: Issued
    rdns: list[x509.RelativeDistinguishedName]
    common_name: int  # index of the CN in rdns
    extensions: list[x509.Extension[x509.ExtensionType]]
    public_key_pem: str
    not_before: str
    not_after: str

    @classmethod
    def of(cls, issued: Issued) -> _Profile:
        cert = issued.cert
        rdns = list(cert.subject.rdns)
        [index] = [n for n, rdn in enumerate(rdns) if rdn.get_attributes_for_oid(NameOID.COMMON_NAME)]
        pem = cert.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return cls(
            issued, rdns, index, list(cert.extensions), pem.decode(),
            cert.not_valid_before_utc.isoformat(), cert.not_valid_after_utc.isoformat(),
        )  # fmt: skip


class _Factory:
    def __init__(self, pki: Path, keys: int) -> None:
        self.ca: CertificateAuthority = load_ca(pki, None)
        self.profiles = [_Profile.of(self.ca.issue_device(f"key-pair-{n}")) for n in range(keys)]
        self.owner = f"fill (pid {multiprocessing.current_process().pid})"
        self.count = 0

    def certificate(self, device_id: str) -> tuple[x509.Certificate, _Profile]:
        """A certificate the CA signs for ``device_id``, on a reused key pair."""
        profile = self.profiles[self.count % len(self.profiles)]
        self.count += 1
        cert = profile.issued.cert
        rdns = list(profile.rdns)
        rdns[profile.common_name] = x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
        builder = x509.CertificateBuilder(
            cert.issuer, x509.Name(rdns), cert.public_key(), x509.random_serial_number(),
            cert.not_valid_before_utc, cert.not_valid_after_utc, profile.extensions,
        )  # fmt: skip
        return builder.sign(self.ca.key, self.ca.curve.hash), profile

    def rows(self, planned: Sequence[Planned]) -> list[Row]:
        out = []
        for entry in planned:
            cert, profile = self.certificate(entry.device_id)
            now = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
            values: dict[str, object] = {
                "serial": f"{cert.serial_number:x}",
                "device_id": entry.device_id,
                "kind": "device",
                "fingerprint": cert.fingerprint(hashes.SHA256()).hex(),
                "public_key": profile.public_key_pem,
                "not_before": profile.not_before,
                "not_after": profile.not_after,
                "issued_at": now,
                "status": entry.status,
                "revoked_at": now if entry.status == Status.REVOKED.value else None,
                "reason": entry.reason,
                "delivered_to": entry.delivered_to,
                "delivered_at": now if entry.delivered_to else None,
                "owner": self.owner,
                "session": entry.session,  # an index: the sink makes it the session's id
            }
            out.append(tuple(values.get(name) for name in COLUMNS))
        return out


_factory: _Factory | None = None


def _start_worker(pki: str, keys: int) -> None:
    global _factory
    _factory = _Factory(Path(pki), keys)


def _build(planned: list[Planned]) -> list[Row]:
    assert _factory is not None
    return _factory.rows(planned)


class Certificates:
    """Worker processes signing certificates with the CA in ``pki`` (spawned: no inherited connections)."""

    def __init__(self, pki: Path, workers: int, keys: int = KEYS) -> None:
        context = multiprocessing.get_context("spawn")
        self.workers = max(1, workers)
        self._pool = context.Pool(self.workers, initializer=_start_worker, initargs=(str(pki), keys))

    def __enter__(self) -> Certificates:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.terminate()
        self._pool.join()

    def rows(self, planned: Iterator[Planned]) -> Iterator[list[Row]]:
        """Rows in plan order, a chunk at a time; at most two chunks per worker in flight (bounded memory)."""
        window: deque[AsyncResult[list[Row]]] = deque()
        while True:
            chunk = [entry for _, entry in zip(range(CHUNK), planned)]
            if chunk:
                window.append(self._pool.apply_async(_build, (chunk,)))
            if window and (not chunk or len(window) >= 2 * self.workers):
                yield window.popleft().get()
            elif not chunk:
                return


# -- where the rows go ---------------------------------------------------------------


class Sink(Protocol):
    name: str
    seconds: float  # spent inserting

    def write(self, rows: Sequence[Row]) -> None: ...

    def finish(self) -> None: ...


def _remap(rows: Sequence[Row], ids: list[int]) -> list[Row]:
    """Rows with the session index (``Planned.session``) replaced by that session's id in this registry."""
    out = []
    for row in rows:
        values = list(row)
        values[_SESSION] = ids[cast(int, values[_SESSION])]
        out.append(tuple(values))
    return out


_ENDED = "2025-01-06T18:00:00+00:00"
_NEW_SESSION = (
    "INSERT INTO sessions (host, pid, boot_id, started_at, ended_at) VALUES (%s, %s, %s, %s, %s) RETURNING id"
)


def _session_values(n: int) -> tuple[object, ...]:
    """A station run that ended: its lease is gone, so its pending certificates are stale."""
    return (f"line-{n}", 1000 + n, f"{n:08x}-0000-0000-0000-000000000000", _ENDED, _ENDED)


class SqliteSink:
    """Straight into the registry's file (made by ``Registry``), one transaction per chunk."""

    def __init__(self, path: Path) -> None:
        self.name = "sqlite"
        self.seconds = 0.0
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: one fsync at the checkpoint, not per chunk
        # Serials and fingerprints are random: their indexes take every insert to a random page. With
        # SQLite's default 2 MB of cache, 100,000 rows took 15 s; kept in memory, a fraction of that.
        self._db.execute("PRAGMA cache_size = -1048576")  # KiB: up to 1 GiB, for this connection only
        self._db.execute("BEGIN IMMEDIATE")
        self._sessions: list[int] = []
        for n in range(SESSIONS):
            [(session,)] = self._db.execute(_NEW_SESSION.replace("%s", "?"), _session_values(n)).fetchall()
            self._sessions.append(int(session))
        self._db.execute("COMMIT")
        self._insert = f"INSERT INTO certificates ({', '.join(COLUMNS)}) VALUES ({', '.join('?' for _ in COLUMNS)})"

    def write(self, rows: Sequence[Row]) -> None:
        start = time.perf_counter()
        self._db.execute("BEGIN IMMEDIATE")
        self._db.executemany(self._insert, _remap(rows, self._sessions))
        self._db.execute("COMMIT")
        self.seconds += time.perf_counter() - start

    def finish(self) -> None:
        start = time.perf_counter()
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._db.close()
        self.seconds += time.perf_counter() - start


class PostgresSink:
    """``COPY`` into the registry's database (made by ``Registry``); then ``VACUUM ANALYZE``, as autovacuum would."""

    def __init__(self, url: str) -> None:
        import psycopg

        self.name = "postgresql"
        self.seconds = 0.0
        self._conn = psycopg.connect(url)
        self._sessions: list[int] = []
        with self._conn.transaction():
            for n in range(SESSIONS):
                [(session,)] = self._conn.execute(_NEW_SESSION, _session_values(n)).fetchall()
                self._sessions.append(int(session))
        self._copy = f"COPY certificates ({', '.join(COLUMNS)}) FROM STDIN"

    def write(self, rows: Sequence[Row]) -> None:
        start = time.perf_counter()
        with self._conn.transaction(), self._conn.cursor().copy(self._copy) as copy:
            for row in _remap(rows, self._sessions):
                copy.write_row(row)
        self.seconds += time.perf_counter() - start

    def finish(self) -> None:
        start = time.perf_counter()
        # The planner's statistics, and the visibility map (index-only scans): what autovacuum gives a
        # registry that grew over months, here at once rather than at autovacuum's whim mid-measurement.
        self._conn.autocommit = True
        self._conn.execute("VACUUM ANALYZE certificates")
        self._conn.close()
        self.seconds += time.perf_counter() - start


# -- the fill ----------------------------------------------------------------------------


@dataclass
class Sample:
    """A uniform sample of what was filled (reservoir sampling): ids and serials for the lookups to time."""

    size: int
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    seen: int = 0
    items: list[tuple[str, str]] = field(default_factory=list)  # (device_id, serial)

    def offer(self, item: tuple[str, str]) -> None:
        self.seen += 1
        if len(self.items) < self.size:
            self.items.append(item)
        else:
            slot = self.rng.randrange(self.seen)
            if slot < self.size:
                self.items[slot] = item


@dataclass
class Filled:
    rows: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0  # wall, certificates and inserts overlapping
    delivered: Sample = field(default_factory=lambda: Sample(3000))  # active certificates: (device_id, serial)
    revoked: Sample = field(default_factory=lambda: Sample(1000))


def fill(rows: int, certificates: Certificates, sinks: Sequence[Sink], seed: int = 24) -> Filled:
    """Issue ``rows`` certificates (``plan``) and write each chunk to every sink; then finish the sinks."""
    filled = Filled()
    start = time.perf_counter()
    for chunk in certificates.rows(plan(rows, seed)):
        for sink in sinks:
            sink.write(chunk)
        for row in chunk:
            status = str(row[_STATUS])
            filled.by_status[status] = filled.by_status.get(status, 0) + 1
            if status == Status.ACTIVE.value:
                filled.delivered.offer((str(row[_DEVICE]), str(row[_SERIAL])))
            elif status == Status.REVOKED.value:
                filled.revoked.offer((str(row[_DEVICE]), str(row[_SERIAL])))
        filled.rows += len(chunk)
    for sink in sinks:
        sink.finish()
    filled.seconds = time.perf_counter() - start
    return filled
