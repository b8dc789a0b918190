"""What both registry backends share: the record, its states, the errors, and the backend interface.

The registry logic (``pki/registry.py``) is written once, in SQL that SQLite
and PostgreSQL both accept, with ``?`` placeholders; a backend runs it. What
differs between the two databases (connecting, the schema's types and its
migrations, leases, error codes) lives in its backend and nowhere else.
"""

from __future__ import annotations

import enum
import socket
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from imageprov.errors import PkiError

# Schema versions, numbered. Every backend migrates forward to this one on
# open, in one transaction; a registry with a higher number was made by a newer
# imageprov and is refused rather than misread.
SCHEMA_VERSION = 7

COLUMNS = (
    "serial", "device_id", "kind", "fingerprint", "public_key", "not_before", "not_after", "issued_at",
    "status", "revoked_at", "reason", "delivered_to", "delivered_at", "owner", "session",
)  # fmt: skip

# The identity pins (version 3): a device certificate is bound to the first identity it presents.
PIN_COLUMNS = ("serial", "identity", "mender_device_id", "pinned_at", "released_at", "released_to", "cut_at")
# The enrollments (version 7): which certificate each credential (a bootstrap certificate, or a device certificate
# that renewed itself) was used to obtain, through EST. A credential is used once.
ENROLLMENT_COLUMNS = ("used_serial", "issued_serial", "enrolled_at")


class Kind(enum.Enum):
    """What a certificate is for (the ``kind`` column)."""

    DEVICE = "device"  # a device's TLS client certificate: what the edge admits
    SERVER = "server"  # the edge's TLS server certificate
    BOOTSTRAP = "bootstrap"  # a device's one enrollment (EST), and nothing else (version 7)


Row = dict[str, Any]


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
class Revocation:
    """What a CRL or a denylist says of a revoked certificate, read without the rest of its record."""

    serial: str
    revoked_at: str | None
    reason: Reason | None


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
    owner: str | None  # who issued it, for people: "host (pid N, boot B)"
    session: int | None = None  # the station session whose lease keeps a pending certificate alive

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Record:
        values = {name: row[name] for name in COLUMNS if name in row}
        values["status"] = Status(values["status"])
        values["reason"] = Reason(values["reason"]) if values["reason"] else None
        return cls(**values)

    def to_dict(self) -> dict[str, str | int | None]:
        return {
            **{k: v for k, v in self.__dict__.items() if k != "public_key"},
            "status": self.status.value,
            "reason": self.reason.value if self.reason else None,
        }


class PinVerdict(enum.Enum):
    """What became of a certificate's claim to an identity (``Registry.pin_identity``)."""

    PINNED = "pinned"  # first use: recorded now
    SAME = "same"  # this certificate already holds this identity
    # The identity moved to this certificate: its holder was revoked, or this is
    # a newer certificate (later issued_at) of the same device_id (a reissued device).
    REPINNED = "repinned"
    CERTIFICATE_PINNED_ELSEWHERE = "certificate-pinned-elsewhere"  # this certificate holds (or held) another identity
    IDENTITY_TAKEN = "identity-taken"  # another certificate, live and not superseded by this one, holds this identity


@dataclass(frozen=True)
class PinResult:
    verdict: PinVerdict
    holder: str | None  # the other serial: the one holding the identity (IDENTITY_TAKEN) or that held it (REPINNED)


@dataclass(frozen=True)
class Pin:
    """The identity a certificate holds, and what the edge did with it in Mender."""

    serial: str
    identity: str  # canonical JSON of the identity data the device sent
    mender_device_id: str | None  # learned at preauthorization
    pinned_at: str
    cut_at: str | None  # when the edge rejected the device in Mender (its certificate revoked)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Pin:
        return cls(**{name: row[name] for name in ("serial", "identity", "mender_device_id", "pinned_at", "cut_at")})


class EnrollVerdict(enum.Enum):
    """What became of an enrollment with a credential (``Registry.enroll``): the first two issue, the rest refuse."""

    ENROLLED = "enrolled"  # the credential's first use: the new certificate is the device's live one
    # The credential was used before, and the key that enrollment certified asks again (its answer was lost):
    # that certificate is replaced by the new one. Only the device holding that key can ask so.
    REPEATED = "repeated"
    UNKNOWN = "unknown"  # the registry never recorded the credential
    WRONG_KIND = "wrong-kind"  # not the kind the operation takes (a device certificate at simpleenroll ...)
    NOT_DELIVERED = "not-delivered"  # pending: its image was never confirmed written
    REVOKED = "revoked"  # revoked, and never used to enroll
    USED = "used"  # used already, by another key: a second device holds it (a clone), or someone replays it
    SUPERSEDED = "superseded"  # the device was issued a certificate after this bootstrap certificate
    BUSY = "busy"  # a station is stamping the device right now


@dataclass(frozen=True)
class EnrollResult:
    verdict: EnrollVerdict
    record: Record | None = None  # ENROLLED, REPEATED: the certificate recorded
    # ENROLLED: the device certificate it replaced, if any; REPEATED, USED: the one the credential obtained before;
    # SUPERSEDED: the device's newer certificate; BUSY: the one being stamped.
    other: str | None = None


@dataclass(frozen=True)
class CertificateState:
    """A certificate's status and kind: what the edge asks per request, from the primary key."""

    status: Status
    kind: Kind


class RegistryUnavailable(PkiError):
    """The registry cannot be reached (database down, connection lost): no device can be issued."""


class RegistryBusy(RegistryUnavailable):
    """Another process holds a lock on the registry for longer than we wait.

    Unavailable as far as a station goes: every device it issues or delivers needs that lock, so it
    stops at the first (one line, the rest for a rerun) rather than waiting out the deadline per device."""


class RegistryTimeout(RegistryUnavailable):
    """The registry did not answer within ``[registry] timeout`` (an overloaded or stuck server)."""


class RegistryMissing(PkiError):
    """The registry named (by imageprov.toml, --registry, or the PKI's default) does not exist.

    Only the commands that start a PKI create one (``Registry(..., create=True)``)."""


class RegistryDamaged(PkiError):
    """The registry's storage is corrupt."""


class RegistryConflict(PkiError):
    """A change broke one of the registry's invariants (a race lost to another station)."""


@dataclass(frozen=True)
class Station:
    """Who holds a lease: enough for a person to find the station."""

    host: str
    pid: int
    boot_id: str

    @classmethod
    def this(cls) -> Station:
        import os

        return cls(socket.gethostname(), os.getpid(), boot_id())

    def describe(self) -> str:
        return f"{self.host} (pid {self.pid}, boot {self.boot_id[:8]})"


def boot_id() -> str:
    """This kernel's boot id: a pid is only meaningful together with it."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


class Tx(ABC):
    """One open transaction (or a read outside one) on a backend."""

    @abstractmethod
    def execute(self, sql: str, params: Sequence[object] = ()) -> int:
        """Run a change; return how many rows it touched."""

    @abstractmethod
    def query(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        """Run a query; rows as dicts, timestamps as ISO 8601 text."""

    def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        for row in rows:
            self.execute(sql, row)


class Backend(ABC):
    """A database holding a registry: SQLite or PostgreSQL."""

    #: the URL with any password masked, for messages
    display: str

    @abstractmethod
    def transaction(self, *, durable: bool = True) -> AbstractContextManager[Tx]:
        """A transaction that serializes writers (SQLite: BEGIN IMMEDIATE).

        Not ``durable``: its commit does not wait for the disk. It still
        reaches the disk before any later durable commit, in order; a power
        cut may lose it alone."""

    @abstractmethod
    def autocommit(self) -> AbstractContextManager[Tx]:
        """Statements outside a transaction: each is its own, and sees what others committed."""

    @abstractmethod
    def start_lease(self, station: Station) -> int:
        """Open a station session whose lease lasts as long as this process holds it; return its id."""

    @abstractmethod
    def lease_alive(self, session: int) -> bool:
        """True while the station that opened ``session`` still holds its lease."""

    @abstractmethod
    def end_lease(self) -> None:
        """Give up this process's lease, if it holds one."""

    @abstractmethod
    def schema_version(self) -> int: ...

    @abstractmethod
    def structure_problems(self) -> list[str]:
        """What is wrong with the storage or the schema itself (integrity, missing indexes)."""

    @abstractmethod
    def close(self) -> None: ...


def missing(where: str) -> RegistryMissing:
    return RegistryMissing(
        f"no registry at {where}",
        hint="check [registry] url in PKI/imageprov.toml (or --registry), or restore it from a backup; a registry is "
        "made only by 'imageprov ca init', 'ca import' or 'registry migrate --to'",
    )


def newer_schema(display: str, version: int) -> PkiError:
    return PkiError(
        f"the registry {display} has schema version {version}, newer than this imageprov knows ({SCHEMA_VERSION})",
        hint="upgrade imageprov on this station; an older one would misread it",
    )


def rows_of(records: Iterable[Record]) -> list[tuple[object, ...]]:
    """Records as rows in COLUMNS order, for inserts."""
    return [
        tuple(
            (value.value if isinstance(value, enum.Enum) else value)
            for value in (getattr(record, name) for name in COLUMNS)
        )
        for record in records
    ]
