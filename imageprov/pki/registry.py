"""The record of every certificate the CA issued: SQLite beside the CA, or PostgreSQL for many hosts.

The registry is chosen by ``PKI/imageprov.toml`` (``pki/config.py``) or by a
URL. Every rule is written here once, in SQL both databases accept; the
backends (``registry_sqlite.py``, ``registry_pg.py``) only run it. The
database itself enforces the invariants: one live certificate per device (a
partial unique index), unique serials and fingerprints, the three states.

A ``pending`` certificate belongs to a station session that holds a lease
(an flock, or a PostgreSQL advisory lock): another station revokes it only
once that lease is gone, never while its owner may still deliver it.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from types import TracebackType

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from imageprov.errors import PkiError, UsageError
from imageprov.pki.ca import Issued
from imageprov.pki.config import PkiConfig, RegistryUrl, Scheme, load_config
from imageprov.pki.registry_base import (
    COLUMNS,
    Backend,
    Reason,
    Record,
    RegistryBusy,
    RegistryConflict,
    RegistryDamaged,
    RegistryUnavailable,
    Station,
    Status,
)
from imageprov.pki.registry_sqlite import SqliteBackend

__all__ = [
    "Reason", "Record", "Registry", "RegistryBusy", "RegistryConflict", "RegistryDamaged", "RegistryUnavailable",
    "Status", "normalize_serial",
]  # fmt: skip

REGISTRY = "registry.sqlite"

_SELECT = f"SELECT {', '.join(COLUMNS)} FROM certificates"
_LIVE = "device_id = ? AND kind = 'device' AND status != 'revoked'"


def _now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


def normalize_serial(serial: str) -> str:
    """A serial as the registry keeps it: lowercase hex, no 0x, colons or leading zeros."""
    return serial.lower().removeprefix("0x").replace(":", "").lstrip("0") or "0"


def _required(pki_dir: Path | None) -> Path:
    if pki_dir is None:
        raise UsageError("no PKI directory given")
    return pki_dir


def connect(url: RegistryUrl, *, timeout: float) -> Backend:
    """Open (and migrate forward) the registry at ``url``."""
    if url.scheme is Scheme.SQLITE:
        return SqliteBackend(url.path, timeout=timeout)
    from imageprov.pki.registry_pg import PostgresBackend  # psycopg only where it is used

    return PostgresBackend(url.target, url.display, timeout=timeout)


class Registry:
    """The certificate registry of one PKI directory. Use as a context manager.

    ``url`` (--registry) overrides the PKI's ``imageprov.toml``; without
    either, the registry is ``PKI/registry.sqlite``.
    """

    def __init__(self, pki_dir: Path | None, url: str | None = None, *, config: PkiConfig | None = None) -> None:
        self.config: PkiConfig = config or load_config(_required(pki_dir), url)
        self._db = connect(self.config.registry, timeout=self.config.timeout)
        self._session: int | None = None
        self.station = Station.this()

    @classmethod
    def at(cls, url: RegistryUrl, *, timeout: float) -> Registry:
        """A registry by URL alone (no PKI directory), e.g. the target of a migration."""
        return cls(None, config=PkiConfig(url, timeout))

    @property
    def display(self) -> str:
        """Where the registry is, safe to print (no password)."""
        return self._db.display

    @property
    def backend(self) -> Backend:
        return self._db

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    def _select(self, where: str = "1 = 1", params: tuple[object, ...] = ()) -> list[Record]:
        with self._db.autocommit() as tx:
            rows = tx.query(f"{_SELECT} WHERE {where} ORDER BY issued_at, rowid", params)
        return [Record.from_row(r) for r in rows]

    # -- leases ---------------------------------------------------------------

    def lease(self) -> int:
        """This process's station session, started at its first pending certificate."""
        if self._session is None:
            self._session = self._db.start_lease(self.station)
        return self._session

    def owns(self, record: Record) -> bool:
        """True if this process issued ``record`` (under its current lease)."""
        return record.session is not None and record.session == self._session

    def owner_alive(self, record: Record) -> bool:
        """True if the station that issued ``record`` still holds its lease (this process included)."""
        if record.session is None:
            return False  # issued outside a session (imageprov 0.1): nobody can still deliver it
        return record.session == self._session or self._db.lease_alive(record.session)

    # -- changes --------------------------------------------------------------

    def record(
        self,
        issued: Issued,
        *,
        kind: str = "device",
        status: Status = Status.ACTIVE,
        delivered_to: str | None = None,
        reissue: bool = False,
    ) -> Record:
        """Enter a newly issued certificate. A device with a live certificate is refused unless ``reissue``,
        which revokes the old one as superseded (never one another live station is still delivering)."""
        cert = issued.cert
        name = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
        device_id = str(name)
        now = _now()
        public_key = cert.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        session = self.lease() if status is Status.PENDING else None
        insert = (
            f"INSERT INTO certificates ({', '.join(COLUMNS)}) "
            f"VALUES ({', '.join('?' for _ in COLUMNS)}) RETURNING {', '.join(COLUMNS)}"
        )
        values = (
            issued.serial_hex, device_id, kind, issued.fingerprint, public_key.decode(),
            cert.not_valid_before_utc.isoformat(), cert.not_valid_after_utc.isoformat(), now,
            status.value, None, None, delivered_to, now if delivered_to else None, self.station.describe(), session,
        )  # fmt: skip
        try:
            if not reissue:
                # One statement, one durable commit: the partial unique index
                # refuses a second live certificate; the reason is read after.
                with self._db.autocommit() as tx:
                    [row] = tx.query(insert, values)
                return Record.from_row(row)
            with self._db.transaction() as tx:
                live = [Record.from_row(r) for r in tx.query(f"{_SELECT} WHERE {_LIVE}", (device_id,))]
                if kind == "device" and live:
                    if live[0].status is Status.PENDING and self.owner_alive(live[0]):
                        raise self._busy(live[0])
                    tx.execute(
                        f"UPDATE certificates SET status = 'revoked', revoked_at = ?, reason = 'superseded' "
                        f"WHERE {_LIVE}",
                        (now, device_id),
                    )
                [row] = tx.query(insert, values)
        except RegistryConflict as exc:
            live_now = self.live(device_id) if kind == "device" else None
            if live_now is not None and live_now.status is Status.PENDING and self.owner_alive(live_now):
                raise self._busy(live_now) from exc
            if live_now is not None and not reissue:
                raise PkiError(
                    f"device {device_id} already has a certificate ({live_now.status.value}, serial {live_now.serial})",
                    hint="pass --reissue to revoke it as superseded and issue a new one",
                ) from exc
            # A race lost to another station (or a 1 in 2**159 serial collision).
            raise RegistryConflict(
                f"device {device_id} was issued a certificate by another station at the same time"
            ) from exc
        return Record.from_row(row)

    def _busy(self, record: Record) -> PkiError:
        return PkiError(
            f"device {record.device_id} is being stamped by another station: {record.owner}",
            hint="leave it to that station; rerun once it has finished",
        )

    def deliver(self, serial: str, where: str) -> Record:
        """Mark a pending certificate delivered (its image is complete and checked at ``where``).

        Raises if it was revoked meanwhile (or is unknown): the caller must
        then not hand out what it built with it."""
        # Not durable: a delivery lost to a power cut is found again by a
        # rerun (the image is there, its certificate pending), unlike a lost issue.
        with self._db.transaction(durable=False) as tx:
            changed = tx.query(
                f"UPDATE certificates SET status = 'active', delivered_to = ?, delivered_at = ? "
                f"WHERE serial = ? AND status = 'pending' RETURNING {', '.join(COLUMNS)}",
                (where, _now(), serial),
            )
        if changed:
            return Record.from_row(changed[0])
        found = self._select("serial = ?", (serial,))
        # Already active: a rerun found the complete image first and said so. Fine.
        if not (found and found[0].status is Status.ACTIVE):
            state = f"it is {found[0].status.value}" if found else "the registry does not know it"
            raise PkiError(f"certificate {serial} cannot be delivered: {state}",
                           hint="it was revoked meanwhile; rerun to stamp the device anew")  # fmt: skip
        return found[0]

    def revoke(
        self, *, device_id: str | None = None, serial: str | None = None, reason: Reason = Reason.UNSPECIFIED
    ) -> list[Record]:
        """Revoke the live certificates of a device, or one certificate by serial; return what was revoked."""
        if (device_id is None) == (serial is None):
            raise UsageError("name either a device id or --serial")
        if serial is not None:
            serial = normalize_serial(serial)
        where, key = ("device_id = ?", device_id) if device_id is not None else ("serial = ?", serial)
        with self._db.transaction() as tx:
            known = [Record.from_row(r) for r in tx.query(f"{_SELECT} WHERE {where}", (key,))]
            if not known:
                raise PkiError(
                    f"no certificate for {'device ' + str(device_id) if device_id else 'serial ' + str(serial)}"
                )
            targets = {r.serial for r in known if r.status is not Status.REVOKED}
            if not targets:
                raise PkiError(f"{device_id or serial} is already revoked")
            tx.execute(
                f"UPDATE certificates SET status = 'revoked', revoked_at = ?, reason = ? "
                f"WHERE {where} AND status != 'revoked'",
                (_now(), reason.value, key),
            )
        return [r for r in self._select(where, (key,)) if r.serial in targets]

    def revoke_abandoned(self, device_id: str) -> Record | None:
        """Revoke (superseded) ``device_id``'s pending certificate if the station that issued it is gone.

        Returns what was revoked, None if there was nothing pending; raises if
        a live station (this process included) is still delivering it."""
        live = self.live(device_id)
        if live is None or live.status is not Status.PENDING:
            return None
        if self.owner_alive(live):
            raise self._busy(live)
        # A lease once gone never comes back: the check above cannot go stale.
        with self._db.transaction() as tx:
            changed = tx.execute(
                "UPDATE certificates SET status = 'revoked', revoked_at = ?, reason = 'superseded' "
                "WHERE serial = ? AND status = 'pending'",
                (_now(), live.serial),
            )
        if changed != 1:
            raise PkiError(f"device {device_id}'s certificate {live.serial} changed while being checked",
                           hint="another station is at it; rerun")  # fmt: skip
        return self._select("serial = ?", (live.serial,))[0]

    def next_crl_number(self) -> int:
        """The next CRL number: CRLs must carry increasing numbers (RFC 5280, 5.2.3)."""
        with self._db.transaction() as tx:
            tx.execute("INSERT INTO meta VALUES ('crl_number', 0) ON CONFLICT (key) DO NOTHING")
            [row] = tx.query("UPDATE meta SET value = value + 1 WHERE key = 'crl_number' RETURNING value")
        return int(row["value"])

    # -- reads ----------------------------------------------------------------

    def revoked(self) -> list[Record]:
        return self._select("status = 'revoked'")

    def all(self) -> list[Record]:
        return self._select()

    def live(self, device_id: str) -> Record | None:
        found = self._select(_LIVE, (device_id,))
        return found[0] if found else None

    def status_of_serial(self, serial: str) -> Status | None:
        """The status of the certificate with ``serial`` (hex, any case), None if the CA never issued it.

        For a live revocation check (the edge): one indexed lookup, safe from
        several threads. A long-running reader survives a database restart: a
        lost connection is opened again once (never by a station holding a
        lease, whose pending certificates the lost connection took with it)."""
        sql, key = "SELECT status FROM certificates WHERE serial = ?", (normalize_serial(serial),)
        try:
            with self._db.autocommit() as tx:
                found = tx.query(sql, key)
        except RegistryUnavailable:
            if self._session is not None:
                raise
            self._db.close()
            self._db = connect(self.config.registry, timeout=self.config.timeout)
            with self._db.autocommit() as tx:
                found = tx.query(sql, key)
        return Status(found[0]["status"]) if found else None
