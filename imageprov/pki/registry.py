"""The record of every certificate the CA issued, kept in ``PKI_DIR/registry.sqlite``.

SQLite from the standard library: one file beside the CA, safe for several
stamping processes at once. Every change runs in a ``BEGIN IMMEDIATE``
transaction, so the check "does this device already have a live
certificate?" and the insert are one step; a partial unique index enforces
the same rule in the database itself.
"""

from __future__ import annotations

import datetime as dt
import enum
import os
import socket
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from imageprov.errors import PkiError, UsageError
from imageprov.pki.ca import Issued

REGISTRY = "registry.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS certificates (
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
    owner        TEXT                       -- host:pid of the process that issued it
);
CREATE UNIQUE INDEX IF NOT EXISTS one_live_certificate_per_device
    ON certificates (device_id) WHERE kind = 'device' AND status IN ('pending', 'active');
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class Status(enum.Enum):
    PENDING = "pending"  # issued for an image not yet delivered
    ACTIVE = "active"
    REVOKED = "revoked"


class Reason(enum.Enum):
    """CRL reason codes (RFC 5280, 5.3.1), by the names users type."""

    UNSPECIFIED = "unspecified"
    KEY_COMPROMISE = "key-compromise"
    CA_COMPROMISE = "ca-compromise"
    AFFILIATION_CHANGED = "affiliation-changed"
    SUPERSEDED = "superseded"
    CESSATION_OF_OPERATION = "cessation-of-operation"
    CERTIFICATE_HOLD = "certificate-hold"
    PRIVILEGE_WITHDRAWN = "privilege-withdrawn"

    @property
    def flag(self) -> x509.ReasonFlags:
        return x509.ReasonFlags[self.name.lower()]


@dataclass(frozen=True)
class Record:
    serial: str
    device_id: str
    kind: str
    fingerprint: str
    public_key: str
    not_before: str
    not_after: str
    issued_at: str
    status: Status
    revoked_at: str | None
    reason: Reason | None
    delivered_to: str | None
    delivered_at: str | None
    owner: str | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Record:
        values = dict(row)
        values["status"] = Status(values["status"])
        values["reason"] = Reason(values["reason"]) if values["reason"] else None
        return cls(**values)

    def to_dict(self) -> dict[str, str | None]:
        return {
            **{k: v for k, v in self.__dict__.items() if k != "public_key"},
            "status": self.status.value,
            "reason": self.reason.value if self.reason else None,
        }


# Who issues: lets a rerun tell a pending certificate of a crashed run from
# one that another process on this station is still delivering.
def current_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_alive(owner: str | None) -> bool:
    """True if ``owner`` is a process on this host that is still running."""
    if not owner or ":" not in owner:
        return False
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


class Registry:
    """The certificate registry of one PKI directory. Use as a context manager."""

    def __init__(self, pki_dir: Path) -> None:
        if not pki_dir.is_dir():
            raise PkiError(f"no PKI at {pki_dir}", hint=f"create one with 'imageprov ca init {pki_dir}'")
        self.path = pki_dir / REGISTRY
        try:
            # Autocommit mode: transactions are begun explicitly, IMMEDIATE, below.
            self._db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            columns = {row["name"] for row in self._db.execute("PRAGMA table_info(certificates)")}
            if "owner" not in columns:  # registries made by imageprov 0.1.0 before owners were kept
                self._db.execute("ALTER TABLE certificates ADD COLUMN owner TEXT")
        except sqlite3.Error as exc:
            raise PkiError(f"cannot open the registry {self.path}: {exc}") from exc

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _select(self, where: str = "1", params: tuple[object, ...] = ()) -> list[Record]:
        rows = self._db.execute(f"SELECT * FROM certificates WHERE {where} ORDER BY issued_at, rowid", params)
        return [Record.from_row(r) for r in rows]

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
        which revokes the old one as superseded."""
        cert = issued.cert
        name = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
        device_id = str(name)
        now = _now()
        public_key = cert.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        try:
            with self._tx() as db:
                live = self._select("device_id = ? AND kind = 'device' AND status != 'revoked'", (device_id,))
                if kind == "device" and live:
                    if not reissue:
                        raise PkiError(
                            f"device {device_id} already has a certificate "
                            f"({live[0].status.value}, serial {live[0].serial})",
                            hint="pass --reissue to revoke it as superseded and issue a new one",
                        )
                    db.execute(
                        "UPDATE certificates SET status = 'revoked', revoked_at = ?, reason = 'superseded' "
                        "WHERE device_id = ? AND kind = 'device' AND status != 'revoked'",
                        (now, device_id),
                    )
                db.execute(
                    "INSERT INTO certificates VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, ?, ?, ?)",
                    (
                        issued.serial_hex, device_id, kind, issued.fingerprint, public_key.decode(),
                        cert.not_valid_before_utc.isoformat(), cert.not_valid_after_utc.isoformat(), now,
                        status.value, delivered_to, now if delivered_to else None, current_owner(),
                    ),
                )  # fmt: skip
        except sqlite3.IntegrityError as exc:
            # Only a race lost to another process (or a 1 in 2**159 serial
            # collision) gets here: the transaction above checked first.
            raise PkiError(f"device {device_id} was issued a certificate by another process at the same time") from exc
        except sqlite3.Error as exc:
            raise PkiError(f"cannot write the registry {self.path}: {exc}") from exc
        return self._select("serial = ?", (issued.serial_hex,))[0]

    def deliver(self, serial: str, where: str) -> None:
        """Mark a pending certificate delivered (its image is complete and checked at ``where``)."""
        with self._tx() as db:
            db.execute(
                "UPDATE certificates SET status = 'active', delivered_to = ?, delivered_at = ? "
                "WHERE serial = ? AND status = 'pending'",
                (where, _now(), serial),
            )

    def revoke(
        self, *, device_id: str | None = None, serial: str | None = None, reason: Reason = Reason.UNSPECIFIED
    ) -> list[Record]:
        """Revoke the live certificates of a device, or one certificate by serial; return what was revoked."""
        if (device_id is None) == (serial is None):
            raise UsageError("name either a device id or --serial")
        if serial is not None:
            serial = serial.lower().removeprefix("0x").replace(":", "").lstrip("0") or "0"
        where, params = ("device_id = ?", device_id) if device_id is not None else ("serial = ?", serial)
        with self._tx() as db:
            known = self._select(where, (params,))
            if not known:
                raise PkiError(
                    f"no certificate for {'device ' + str(device_id) if device_id else 'serial ' + str(serial)}"
                )
            targets = [r for r in known if r.status is not Status.REVOKED]
            if not targets:
                raise PkiError(f"{device_id or serial} is already revoked")
            db.execute(
                f"UPDATE certificates SET status = 'revoked', revoked_at = ?, reason = ? "
                f"WHERE {where} AND status != 'revoked'",
                (_now(), reason.value, params),
            )
        return [r for r in self._select(where, (params,)) if r.serial in {t.serial for t in targets}]

    def revoked(self) -> list[Record]:
        return self._select("status = 'revoked'")

    def all(self) -> list[Record]:
        return self._select()

    def live(self, device_id: str) -> Record | None:
        found = self._select("device_id = ? AND kind = 'device' AND status != 'revoked'", (device_id,))
        return found[0] if found else None

    def next_crl_number(self) -> int:
        """The next CRL number: CRLs must carry increasing numbers (RFC 5280, 5.2.3)."""
        with self._tx() as db:
            db.execute("INSERT INTO meta VALUES ('crl_number', 0) ON CONFLICT (key) DO NOTHING")
            db.execute("UPDATE meta SET value = value + 1 WHERE key = 'crl_number'")
            (value,) = db.execute("SELECT value FROM meta WHERE key = 'crl_number'").fetchone()
        return int(value)
