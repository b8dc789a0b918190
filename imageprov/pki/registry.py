"""The record of every certificate the CA issued: SQLite beside the CA, or PostgreSQL for many hosts.

The registry is chosen by ``PKI/imageprov.toml`` (``pki/config.py``) or by a
URL. Every rule is written here once, in SQL both databases accept; the
backends (``registry_sqlite.py``, ``registry_pg.py``) only run it. The
database itself enforces the invariants: one live certificate per device (a
partial unique index), unique serials and fingerprints, the three states.

A ``pending`` certificate belongs to a station session that holds a lease
(an flock, or a PostgreSQL advisory lock): another station revokes it only
once that lease is gone, never while its owner may still deliver it.

A device certificate is bound to the first identity it presents at the edge
(``pin_identity``): the schema keeps one identity per certificate and one
current certificate per identity, so edges racing on either end with a verdict.

A device may also hold one live bootstrap certificate (kind ``bootstrap``),
good for one enrollment at first boot (EST): ``enroll`` records the device
certificate it obtains and marks the credential used (revoked, superseded) in
one transaction; the ``enrollments`` table keeps which credential obtained
which certificate, one use per credential. A device certificate renews itself
the same way (``simplereenroll``).

A registry is made only where a PKI starts (``create=True``: ``ca init``,
``ca import``, the target of ``registry migrate``); anything else that names a
registry that is not there gets ``RegistryMissing``, never a new, empty one.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from imageprov.errors import PkiError, UsageError
from imageprov.pki.ca import Issued
from imageprov.pki.config import PkiConfig, RegistryUrl, Scheme, load_config
from imageprov.pki.registry_base import (
    COLUMNS,
    Backend,
    CertificateState,
    EnrollResult,
    EnrollVerdict,
    Kind,
    Pin,
    PinResult,
    PinVerdict,
    Reason,
    Record,
    RegistryBusy,
    RegistryConflict,
    RegistryDamaged,
    RegistryMissing,
    RegistryTimeout,
    RegistryUnavailable,
    Revocation,
    Station,
    Status,
    Tx,
)
from imageprov.pki.registry_sqlite import SqliteBackend

__all__ = [
    "CertificateState", "EnrollResult", "EnrollVerdict", "Kind", "Pin", "PinResult", "PinVerdict", "Reason", "Record",
    "Registry", "RegistryBusy", "RegistryConflict", "RegistryDamaged", "RegistryMissing", "RegistryTimeout",
    "RegistryUnavailable", "Revocation", "Status", "normalize_serial",
]  # fmt: skip

REGISTRY = "registry.sqlite"

_SELECT = f"SELECT {', '.join(COLUMNS)} FROM certificates"
# Spelled as the partial indexes one_live_certificate_per_device and one_live_bootstrap_per_device are, so
# that both databases can use them: a kind's live certificate, one per device.
_LIVE = {
    kind: f"device_id = ? AND kind = '{kind.value}' AND status IN ('pending', 'active')"
    for kind in (Kind.DEVICE, Kind.BOOTSTRAP)
}
# Kinds that a station issues for a device, pending until delivered.
_DEVICE_KINDS = "kind IN ('device', 'bootstrap')"
_PIN = "SELECT serial, identity, mender_device_id, pinned_at, cut_at FROM pins"
# The current holder of an identity, and whether the certificate asking supersedes it: the holder is
# revoked, or it is an older certificate of the same device (of two issued in one second, the one recorded first).
_HOLDER = (
    "SELECT p.serial, p.mender_device_id, (h.status = 'revoked' OR (h.device_id = c.device_id AND "
    "(h.issued_at < c.issued_at OR (h.issued_at = c.issued_at AND h.rowid < c.rowid)))) AS superseded "
    "FROM pins p JOIN certificates h ON h.serial = p.serial JOIN certificates c ON c.serial = ? "
    "WHERE p.identity = ? AND p.released_at IS NULL"
)
_PIN_ATTEMPTS = 5
# Ids per query of live_of: well within SQLite's 32,766 parameters, and one plan for the database to cache.
_IDS_PER_QUERY = 500
MAX_IDENTITY = 2048  # bytes of canonical JSON: the schema's CHECK, within a btree entry of PostgreSQL


def _hand_on_pin(tx: Tx, old: str, new: str, now: str) -> None:
    """Move certificate ``old``'s current identity pin, with its Mender device id, to ``new`` (same device,
    same key); the old row stays as history, released to ``new``, as ``pin_identity`` leaves it."""
    held = tx.query("SELECT identity, mender_device_id FROM pins WHERE serial = ? AND released_at IS NULL", (old,))
    if not held:
        return  # never authenticated with it: the new one pins at its first auth request
    if tx.execute("UPDATE pins SET released_at = ?, released_to = ? WHERE serial = ? AND released_at IS NULL",
                  (now, new, old)) != 1:  # fmt: skip
        raise _LostRace
    tx.execute(
        "INSERT INTO pins (serial, identity, mender_device_id, pinned_at) VALUES (?, ?, ?, ?)",
        (new, held[0]["identity"], held[0]["mender_device_id"], now),
    )


def _now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


def normalize_serial(serial: str) -> str:
    """A serial as the registry keeps it: lowercase hex, no 0x, colons or leading zeros."""
    return serial.lower().removeprefix("0x").replace(":", "").lstrip("0") or "0"


def _required(pki_dir: Path | None) -> Path:
    if pki_dir is None:
        raise UsageError("no PKI directory given")
    return pki_dir


def connect(url: RegistryUrl, *, timeout: float, create: bool = False) -> Backend:
    """Open (and migrate forward) the registry at ``url``; make it only if ``create``."""
    if url.scheme is Scheme.SQLITE:
        return SqliteBackend(url.path, timeout=timeout, create=create)
    from imageprov.pki.registry_pg import PostgresBackend  # psycopg only where it is used

    return PostgresBackend(url.target, url.display, timeout=timeout, create=create)


StaleListener = Callable[["Registry", list[Record]], None]
# Told, when a registry is opened, of the pending certificates whose station is gone (``Registry.stale``):
# the CLI sets it for the line's commands (stamp, flash), so that a station killed after writing is reported
# at the next start-up. Library code never prints; this is how it says so.
_stale_listener: StaleListener | None = None


def report_stale_on_open(listener: StaleListener | None) -> None:
    """Have ``listener`` told of stale pending certificates whenever a registry is opened (None: no longer)."""
    global _stale_listener
    _stale_listener = listener


class _LostRace(Exception):
    """Another transaction changed what a decision was based on: decide again."""


def _canonical(identity: str) -> str:
    try:
        same = json.dumps(json.loads(identity), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except ValueError:
        same = None
    if same != identity:
        raise PkiError("an identity to pin must be canonical JSON",
                       hint='json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)')  # fmt: skip
    if len(identity.encode()) > MAX_IDENTITY:
        raise PkiError(f"an identity of {len(identity.encode())} bytes is too long to pin (at most {MAX_IDENTITY})")
    return identity


def _common_name(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value)


def _spki_pem(cert: x509.Certificate) -> str:
    """The certificate's public key as the public_key column holds it."""
    return (
        cert.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


_LIVE_KINDS = {kind.value for kind in _LIVE}
_INSERT = (
    f"INSERT INTO certificates ({', '.join(COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in COLUMNS)}) RETURNING {', '.join(COLUMNS)}"
)
# The device's live device certificate, and whether it was recorded after the credential ? (a bootstrap certificate).
_LIVE_AND_NEWER = (
    f"SELECT {', '.join('l.' + c for c in COLUMNS)}, "
    "(l.issued_at > b.issued_at OR (l.issued_at = b.issued_at AND l.rowid > b.rowid)) AS newer "
    "FROM certificates l JOIN certificates b ON b.serial = ? "
    "WHERE l.device_id = ? AND l.kind = 'device' AND l.status IN ('pending', 'active')"
)


@dataclass(frozen=True)
class _Plan:
    """What an enrollment decided, and what it changes if it issues: the certificate it replaces, if any."""

    result: EnrollResult
    replaced: Record | None = None


class Registry:
    """The certificate registry of one PKI directory. Use as a context manager.

    ``url`` (--registry) overrides the PKI's ``imageprov.toml``; without
    either, the registry is ``PKI/registry.sqlite``. Only ``create`` makes it
    if it is not there; otherwise that raises ``RegistryMissing``.
    """

    def __init__(
        self, pki_dir: Path | None, url: str | None = None, *, config: PkiConfig | None = None, create: bool = False
    ) -> None:
        self.config: PkiConfig = config or load_config(_required(pki_dir), url)
        self._db = connect(self.config.registry, timeout=self.config.timeout, create=create)
        self._session: int | None = None
        self.station = Station.this()
        if _stale_listener is not None and not create:
            try:
                stale = self.stale()
            except BaseException:
                self.close()
                raise
            if stale:
                _stale_listener(self, stale)

    @classmethod
    def at(cls, url: RegistryUrl, *, timeout: float, create: bool = False) -> Registry:
        """A registry by URL alone (no PKI directory), e.g. the target of a migration."""
        return cls(None, config=PkiConfig(url, timeout), create=create)

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

    def stale(self) -> list[Record]:
        """Pending certificates whose station is gone: it was killed (or lost the registry) after issuing them.

        Its card or image may exist and verify, yet no station will ever mark it delivered, and the
        edge refuses a pending certificate. A rerun of the device revokes it (superseded); so does
        ``revoke_stale``. Each station's lease is asked about once.
        """
        # Read from the partial index pending_certificates: a station's start-up costs what is pending.
        pending = self._select(f"{_DEVICE_KINDS} AND status = 'pending'")
        alive: dict[int | None, bool] = {}
        for record in pending:
            if record.session not in alive:
                alive[record.session] = self.owner_alive(record)
        return [record for record in pending if not alive[record.session]]

    def revoke_stale(self, reason: Reason = Reason.CESSATION_OF_OPERATION) -> list[Record]:
        """Revoke every pending certificate whose station is gone (``stale``); return what was revoked.

        A lease once gone never comes back, so none of these can be delivered after the check; the
        update still requires the certificate to be pending, in case another station settled it meanwhile.
        """
        gone = self.stale()
        if not gone:
            return []
        now, revoked = _now(), []
        with self._db.transaction() as tx:
            for record in gone:
                revoked += tx.query(
                    "UPDATE certificates SET status = 'revoked', revoked_at = ?, reason = ? "
                    f"WHERE serial = ? AND status = 'pending' RETURNING {', '.join(COLUMNS)}",
                    (now, reason.value, record.serial),
                )
        return [Record.from_row(row) for row in revoked]

    # -- changes --------------------------------------------------------------

    def record(
        self,
        issued: Issued,
        *,
        kind: str = Kind.DEVICE.value,
        status: Status = Status.ACTIVE,
        delivered_to: str | None = None,
        reissue: bool = False,
        seen_free: bool = False,
    ) -> Record:
        """Enter a newly issued certificate. A device with a live certificate of that kind (device, or
        bootstrap) is refused unless ``reissue``, which revokes the old one as superseded (never one another
        live station is still delivering). ``seen_free``: the caller found the device with none (a batch, at
        its start), so one there now was taken by another station since, and is refused as that race."""
        cert = issued.cert
        device_id = _common_name(cert)
        live_kind = Kind(kind) if kind in _LIVE_KINDS else None
        session = self.lease() if status is Status.PENDING else None
        values = self._values(cert, kind, status, delivered_to, session)
        if not reissue and not seen_free and live_kind is not None:
            # Read first, so that a conflict below can only be a race: another station
            # took the device between this read and the insert (and may have delivered it since).
            # A caller that saw the device free needs no read: any conflict is that race.
            held = self.live(device_id, kind=live_kind)
            if held is not None:
                raise self._held(held, kind)
        try:
            if not reissue:
                # One statement, one durable commit: the partial unique index
                # refuses a second live certificate.
                with self._db.autocommit() as tx:
                    [row] = tx.query(_INSERT, values)
                return Record.from_row(row)
            with self._db.transaction() as tx:
                if live_kind is not None:
                    live = [Record.from_row(r) for r in tx.query(f"{_SELECT} WHERE {_LIVE[live_kind]}", (device_id,))]
                    if live:
                        if live[0].status is Status.PENDING and self.owner_alive(live[0]):
                            raise self.busy(live[0])
                        tx.execute(
                            "UPDATE certificates SET status = 'revoked', revoked_at = ?, reason = 'superseded' "
                            f"WHERE {_LIVE[live_kind]}",
                            (_now(), device_id),
                        )
                [row] = tx.query(_INSERT, values)
        except RegistryConflict as exc:
            # A race lost to another station, which may have delivered the device since
            # (or a 1 in 2**159 serial collision): never "pass --reissue" for that.
            live_now = self.live(device_id, kind=live_kind) if live_kind is not None else None
            raise self._taken(live_now) if live_now is not None else self._raced(device_id) from exc
        return Record.from_row(row)

    def _raced(self, device_id: str) -> RegistryConflict:
        return RegistryConflict(f"device {device_id} was issued a certificate by another station at the same time")

    def _taken(self, record: Record) -> PkiError:
        """The error for a device another station took while this one was about to."""
        if record.status is Status.PENDING and self.owner_alive(record):
            return self.busy(record)
        return self._raced(record.device_id)

    def _values(
        self, cert: x509.Certificate, kind: str, status: Status, delivered_to: str | None, session: int | None
    ) -> tuple[object, ...]:
        """A certificate's row, in COLUMNS order, recorded now by this station."""
        now = _now()
        return (
            f"{cert.serial_number:x}", _common_name(cert), kind, cert.fingerprint(hashes.SHA256()).hex(),
            _spki_pem(cert), cert.not_valid_before_utc.isoformat(), cert.not_valid_after_utc.isoformat(), now,
            status.value, None, None, delivered_to, now if delivered_to else None, self.station.describe(), session,
        )  # fmt: skip

    def _held(self, record: Record, kind: str) -> PkiError:
        """The error for a device that already holds a live certificate of ``kind``."""
        if record.status is Status.PENDING and self.owner_alive(record):
            return self.busy(record)
        return PkiError(
            f"device {record.device_id} already has a {kind} certificate "
            f"({record.status.value}, serial {record.serial})",
            hint="pass --reissue to revoke it as superseded and issue a new one",
        )

    def busy(self, record: Record) -> PkiError:
        """The error for a device another live station is stamping (``record`` its pending certificate)."""
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

    def revoke_abandoned(self, device_id: str, *, kind: Kind = Kind.DEVICE) -> Record | None:
        """Revoke (superseded) ``device_id``'s pending certificate if the station that issued it is gone.

        Returns what was revoked, None if there was nothing pending; raises if
        a live station (this process included) is still delivering it."""
        live = self.live(device_id, kind=kind)
        if live is None or live.status is not Status.PENDING:
            return None
        if self.owner_alive(live):
            raise self.busy(live)
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

    # -- enrollment (EST) -----------------------------------------------------

    def enrollment_verdict(self, serial: str, public_key: str, *, kind: Kind) -> EnrollResult:
        """What ``enroll`` would decide now for the credential ``serial`` and a certificate of ``public_key``
        (PEM SubjectPublicKeyInfo), changing nothing: asked before the CA signs, so that a refusal costs no
        signature. ``enroll`` decides again, in its transaction."""
        with self._db.autocommit() as tx:
            return self._plan(tx, normalize_serial(serial), public_key, kind).result

    def enroll(self, serial: str, cert: x509.Certificate, *, kind: Kind, where: str) -> EnrollResult:
        """Record ``cert`` as its device's live certificate, obtained with the credential ``serial`` of ``kind``:
        a bootstrap certificate (EST simpleenroll) or the device's live certificate (simplereenroll).

        Decided and done in one transaction, so that edges racing on one credential get one ENROLLED:

        - the credential is unknown, of another kind, pending, or revoked: UNKNOWN, WRONG_KIND,
          NOT_DELIVERED, REVOKED; nothing changes;
        - it was used before: REPEATED if ``cert`` is for the key that use certified and that certificate
          is still active (the answer was lost on its way: it is replaced, superseded, by ``cert``), else
          USED, with the certificate it obtained (a second device holds the credential: a clone);
        - a bootstrap certificate of a device issued a device certificate since: SUPERSEDED, with that one;
          the device being stamped by a live station right now: BUSY;
        - else ENROLLED: the credential is revoked (superseded, which is what marks it used, with the
          ``enrollments`` row), the device's live device certificate too (superseded: the renewed one, or one
          older than the bootstrap certificate), and ``cert`` recorded active, delivered to ``where``.

        Identity pins: a bootstrap certificate never pins one (the edge admits it nowhere but EST). A
        certificate for the key of the one it replaces (a renewal: the key stays in its TPM) takes over that
        one's pin here, in the same transaction: else the edges' cut-off would find a revoked certificate's
        pin and reject the device's key, the live one, in Mender. For another key, the first auth request of
        ``cert`` takes the identity over (``pin_identity``: REPINNED, the Mender device id carried over), and
        the old key's auth set is cut off.
        """
        serial = normalize_serial(serial)
        public_key = _spki_pem(cert)
        for _ in range(_PIN_ATTEMPTS):
            try:
                with self._db.transaction() as tx:
                    plan = self._plan(tx, serial, public_key, kind)
                    if plan.result.verdict not in (EnrollVerdict.ENROLLED, EnrollVerdict.REPEATED):
                        return plan.result
                    return self._carry_out(tx, serial, cert, plan, where)
            except (RegistryConflict, _LostRace):
                continue  # another edge enrolled meanwhile: decided again on what it committed
        raise RegistryConflict(
            f"the enrollment with certificate {serial} kept changing while being decided",
            hint="several edges are at this credential at once; its next request is decided anew",
        )

    def _plan(self, tx: Tx, serial: str, public_key: str, kind: Kind) -> _Plan:
        found = tx.query(f"{_SELECT} WHERE serial = ?", (serial,))
        if not found:
            return _Plan(EnrollResult(EnrollVerdict.UNKNOWN))
        used = Record.from_row(found[0])
        if used.kind != kind.value:
            return _Plan(EnrollResult(EnrollVerdict.WRONG_KIND))
        earlier = tx.query("SELECT issued_serial FROM enrollments WHERE used_serial = ?", (serial,))
        if earlier:
            obtained = str(earlier[0]["issued_serial"])
            before = Record.from_row(tx.query(f"{_SELECT} WHERE serial = ?", (obtained,))[0])
            if before.status is Status.ACTIVE and before.public_key == public_key:
                return _Plan(EnrollResult(EnrollVerdict.REPEATED, other=obtained), replaced=before)
            return _Plan(EnrollResult(EnrollVerdict.USED, other=obtained))
        if used.status is Status.PENDING:
            return _Plan(EnrollResult(EnrollVerdict.NOT_DELIVERED))
        if used.status is Status.REVOKED:
            return _Plan(EnrollResult(EnrollVerdict.REVOKED))
        if kind is Kind.DEVICE:  # a renewal: the credential is the live certificate it replaces
            return _Plan(EnrollResult(EnrollVerdict.ENROLLED, other=used.serial), replaced=used)
        live = tx.query(_LIVE_AND_NEWER, (serial, used.device_id))
        if not live:
            return _Plan(EnrollResult(EnrollVerdict.ENROLLED))
        current = Record.from_row(live[0])
        if live[0]["newer"]:  # the line reissued the device since: this bootstrap certificate is stale
            return _Plan(EnrollResult(EnrollVerdict.SUPERSEDED, other=current.serial))
        if current.status is Status.PENDING and self.owner_alive(current):
            return _Plan(EnrollResult(EnrollVerdict.BUSY, other=current.serial))
        return _Plan(EnrollResult(EnrollVerdict.ENROLLED, other=current.serial), replaced=current)

    def _carry_out(self, tx: Tx, serial: str, cert: x509.Certificate, plan: _Plan, where: str) -> EnrollResult:
        now = _now()
        supersede = (
            "UPDATE certificates SET status = 'revoked', revoked_at = ?, reason = 'superseded' WHERE serial = ? "
        )
        replaced = plan.replaced
        if plan.result.verdict is EnrollVerdict.REPEATED:
            assert replaced is not None
            if tx.execute(supersede + "AND status = 'active'", (now, replaced.serial)) != 1:
                raise _LostRace
        else:
            if tx.execute(supersede + "AND status = 'active'", (now, serial)) != 1:  # the credential: used now
                raise _LostRace
            # The device certificate the new one replaces (a bootstrap certificate's: an older one, if any).
            other = replaced.serial if replaced is not None and replaced.serial != serial else None
            if other and tx.execute(supersede + "AND status IN ('pending', 'active')", (now, other)) != 1:
                raise _LostRace
        [row] = tx.query(_INSERT, self._values(cert, Kind.DEVICE.value, Status.ACTIVE, where, None))
        record = Record.from_row(row)
        if plan.result.verdict is EnrollVerdict.REPEATED:
            assert replaced is not None
            changed = tx.execute(
                "UPDATE enrollments SET issued_serial = ?, enrolled_at = ? WHERE used_serial = ? AND issued_serial = ?",
                (record.serial, now, serial, replaced.serial),
            )
            if changed != 1:
                raise _LostRace
        else:
            tx.execute(
                "INSERT INTO enrollments (used_serial, issued_serial, enrolled_at) VALUES (?, ?, ?)",
                (serial, record.serial, now),
            )
        if replaced is not None and replaced.public_key == record.public_key:
            _hand_on_pin(tx, replaced.serial, record.serial, now)
        return EnrollResult(plan.result.verdict, record, plan.result.other)

    def enrollment_of(self, serial: str) -> str | None:
        """The certificate the credential ``serial`` obtained (the last, if asked again); None if never used."""
        with self._db.autocommit() as tx:
            found = tx.query("SELECT issued_serial FROM enrollments WHERE used_serial = ?", (normalize_serial(serial),))
        return str(found[0]["issued_serial"]) if found else None

    def next_crl_number(self) -> int:
        """The next CRL number: CRLs must carry increasing numbers (RFC 5280, 5.2.3)."""
        with self._db.transaction() as tx:
            tx.execute("INSERT INTO meta VALUES ('crl_number', 0) ON CONFLICT (key) DO NOTHING")
            [row] = tx.query("UPDATE meta SET value = value + 1 WHERE key = 'crl_number' RETURNING value")
        return int(row["value"])

    # -- reads ----------------------------------------------------------------

    def revoked(self) -> list[Record]:
        return self._select("status = 'revoked'")

    def revocations(self) -> list[Revocation]:
        """Every revoked certificate's serial, date and reason, in the order issued: what a CRL lists.

        Three columns from the partial index revoked_certificates, which holds them (schema 6), not whole
        records: a CRL of a fleet's 100,000 revoked certificates is read in a fraction of the time.
        """
        with self._db.autocommit() as tx:
            # In the index's order (certificates issued in the same microsecond by serial): read from it alone.
            rows = tx.query("SELECT serial, revoked_at, reason FROM certificates WHERE status = 'revoked' "
                            "ORDER BY issued_at, serial")  # fmt: skip
        reasons = {reason.value: reason for reason in Reason}  # a dict lookup: Reason(value) costs ten times more
        return [Revocation(r["serial"], r["revoked_at"], reasons[r["reason"]] if r["reason"] else None) for r in rows]

    def all(self) -> list[Record]:
        return self._select()

    def each(self, page: int = 1000) -> Iterator[Record]:
        """Every certificate in the order recorded, read ``page`` rows at a time: memory stays flat for any fleet.

        Each page is read by the row id, from the primary key (SQLite) or its unique index (PostgreSQL), after
        the last one: a certificate recorded meanwhile comes at the end; each row is as its page found it.
        """
        after = 0
        while True:
            with self._db.autocommit() as tx:
                rows = tx.query(f"SELECT rowid AS row_id, {', '.join(COLUMNS)} FROM certificates "
                                "WHERE rowid > ? ORDER BY rowid LIMIT ?", (after, page))  # fmt: skip
            yield from (Record.from_row(row) for row in rows)
            if len(rows) < page:
                return
            after = int(rows[-1]["row_id"])

    def live(self, device_id: str, *, kind: Kind = Kind.DEVICE) -> Record | None:
        """The device's live (pending or active) certificate of ``kind``: its device certificate, unless asked."""
        found = self._select(_LIVE[kind], (device_id,))
        return found[0] if found else None

    def live_of(self, device_ids: Iterable[str], *, kind: Kind = Kind.DEVICE) -> dict[str, Record]:
        """The live certificate of each of ``device_ids`` that has one: a query per 500 ids, not one per id.

        What a station asks once at its start (``flash --wait`` with a fleet's list of ids, a rerun of a
        batch), read from the partial index one_live_certificate_per_device.
        """
        wanted = list(dict.fromkeys(device_ids))
        found: dict[str, Record] = {}
        for start in range(0, len(wanted), _IDS_PER_QUERY):
            chunk = wanted[start : start + _IDS_PER_QUERY]
            marks = ", ".join("?" for _ in chunk)
            # The kind spelled out, as in _LIVE: a partial index is used only for a condition it can see.
            where = f"device_id IN ({marks}) AND kind = '{kind.value}' AND status IN ('pending', 'active')"
            found.update((r.device_id, r) for r in self._select(where, tuple(chunk)))
        return found

    def status_of_serial(self, serial: str) -> Status | None:
        """The status of the certificate with ``serial`` (hex, any case), None if the CA never issued it."""
        state = self.state_of_serial(serial)
        return state.status if state is not None else None

    def state_of_serial(self, serial: str) -> CertificateState | None:
        """The status and kind of the certificate with ``serial`` (hex, any case), None if the CA never issued it.

        For a live revocation check (the edge): one indexed lookup, safe from
        several threads. A long-running reader survives a database restart: a
        lost connection is opened again once (never by a station holding a
        lease, whose pending certificates the lost connection took with it)."""
        sql, key = "SELECT status, kind FROM certificates WHERE serial = ?", (normalize_serial(serial),)
        try:
            with self._db.autocommit() as tx:
                found = tx.query(sql, key)
        except RegistryUnavailable as exc:
            # A slow server stays slow, and a lock stays held: only a connection lost is opened again.
            if self._session is not None or isinstance(exc, (RegistryTimeout, RegistryBusy)):
                raise
            self._db.close()
            self._db = connect(self.config.registry, timeout=self.config.timeout)
            with self._db.autocommit() as tx:
                found = tx.query(sql, key)
        return CertificateState(Status(found[0]["status"]), Kind(found[0]["kind"])) if found else None

    def record_of(self, serial: str) -> Record | None:
        """The certificate with ``serial`` (hex, any case), None if the CA never issued it."""
        found = self._select("serial = ?", (normalize_serial(serial),))
        return found[0] if found else None

    # -- identity pins ----------------------------------------------------------

    def pin_identity(self, serial: str, identity: str) -> PinResult:
        """Bind ``identity`` (canonical JSON) to the device certificate ``serial`` if it is the first it presents.

        The verdicts, decided in one transaction:

        - the certificate holds (or once held) another identity: CERTIFICATE_PINNED_ELSEWHERE; a certificate is
          bound to its first identity for good;
        - it holds this one: SAME; it held it and lost it (it was revoked, or its device reissued): IDENTITY_TAKEN,
          with the certificate holding it now (a certificate never takes an identity back);
        - nobody holds it: PINNED;
        - its holder is revoked, or is an older certificate of the same device_id: REPINNED, with that holder; the
          holder's row stays as history (``released_at``, ``released_to``) and hands on its Mender device id;
        - otherwise: IDENTITY_TAKEN, with the holder.

        Edges racing on one identity or one certificate: the schema's unique keys let one win, the others
        decide again on what it committed. Raises ``PkiError`` if ``serial`` is no device certificate of the CA's.
        """
        serial = normalize_serial(serial)
        identity = _canonical(identity)
        # Every request after a device's first: answered by one read, without taking the write lock. A
        # certificate's row never changes its identity, and a current pin is only ever released later.
        with self._db.autocommit() as tx:
            own = tx.query("SELECT identity, released_to FROM pins WHERE serial = ?", (serial,))
        if own and own[0]["identity"] != identity:
            return PinResult(PinVerdict.CERTIFICATE_PINNED_ELSEWHERE, None)
        if own and own[0]["released_to"] is None:
            return PinResult(PinVerdict.SAME, None)
        for _ in range(_PIN_ATTEMPTS):
            try:
                with self._db.transaction() as tx:
                    return self._pin(tx, serial, identity)
            except (RegistryConflict, _LostRace):
                continue
        raise RegistryConflict(
            f"the identity pin of certificate {serial} kept changing while being decided",
            hint="several edges are at this device at once; its next request is decided anew",
        )

    def _pin(self, tx: Tx, serial: str, identity: str) -> PinResult:
        found = tx.query("SELECT kind FROM certificates WHERE serial = ?", (serial,))
        if not found or found[0]["kind"] != "device":
            raise PkiError(
                f"certificate {serial} is not a device certificate of this CA's registry"
                + (f" (it is a {found[0]['kind']} certificate)" if found else ""),
                hint="only certificates the registry recorded for devices take an identity",
            )
        own = tx.query("SELECT identity, released_to FROM pins WHERE serial = ?", (serial,))
        if own and own[0]["identity"] != identity:
            return PinResult(PinVerdict.CERTIFICATE_PINNED_ELSEWHERE, None)
        if own and own[0]["released_to"] is None:
            return PinResult(PinVerdict.SAME, None)
        held = tx.query(_HOLDER, (serial, identity))
        if own:  # lost to a newer certificate or for its revocation: for good
            return PinResult(PinVerdict.IDENTITY_TAKEN, str(held[0]["serial"]) if held else own[0]["released_to"])
        now = _now()
        if not held:
            tx.execute("INSERT INTO pins (serial, identity, pinned_at) VALUES (?, ?, ?)", (serial, identity, now))
            return PinResult(PinVerdict.PINNED, None)
        holder = str(held[0]["serial"])
        if not held[0]["superseded"]:
            return PinResult(PinVerdict.IDENTITY_TAKEN, holder)
        released = tx.execute(
            "UPDATE pins SET released_at = ?, released_to = ? WHERE serial = ? AND released_at IS NULL",
            (now, serial, holder),
        )
        if released != 1:
            raise _LostRace  # another edge moved it first
        tx.execute(
            "INSERT INTO pins (serial, identity, mender_device_id, pinned_at) VALUES (?, ?, ?, ?)",
            (serial, identity, held[0]["mender_device_id"], now),
        )
        return PinResult(PinVerdict.REPINNED, holder)

    def pin_of(self, serial: str) -> Pin | None:
        """The identity certificate ``serial`` holds now; None if it never pinned one, or lost it."""
        with self._db.autocommit() as tx:
            found = tx.query(f"{_PIN} WHERE serial = ? AND released_at IS NULL", (normalize_serial(serial),))
        return Pin.from_row(found[0]) if found else None

    def set_mender_device(self, serial: str, mender_device_id: str) -> None:
        """Record the Mender device id the edge learned when it preauthorized certificate ``serial``'s key."""
        serial = normalize_serial(serial)
        with self._db.transaction() as tx:
            changed = tx.execute("UPDATE pins SET mender_device_id = ? WHERE serial = ?", (mender_device_id, serial))
        if changed != 1:
            raise PkiError(f"certificate {serial} holds no identity", hint="pin_identity comes first")

    def uncut_revoked_pins(self) -> list[Pin]:
        """Current pins whose certificate is revoked and whose device the edge has not rejected in Mender yet.

        Read through the partial index pins_not_cut (current pins not yet cut), each certificate by its key: the
        cost grows with the fleet, not with the certificates it went through."""
        with self._db.autocommit() as tx:
            found = tx.query(
                "SELECT p.serial, p.identity, p.mender_device_id, p.pinned_at, p.cut_at "
                "FROM pins p JOIN certificates c ON c.serial = p.serial "
                "WHERE p.released_at IS NULL AND p.cut_at IS NULL AND c.status = 'revoked' ORDER BY p.serial"
            )
        return [Pin.from_row(row) for row in found]

    def claim_cut(self, serial: str, seconds: float) -> bool:
        """Claim the cut-off of revoked certificate ``serial``'s device for ``seconds``; False if another has it.

        Edges sharing a registry each find the same revoked pins: the one whose claim lands rejects the
        device in Mender, the others leave it. A claim runs out (its edge died mid-call) or is released
        (``release_cut``, the call failed), and the next round takes it again.
        """
        serial = normalize_serial(serial)
        now = dt.datetime.now(dt.UTC)
        until = (now + dt.timedelta(seconds=seconds)).isoformat(timespec="seconds")
        with self._db.transaction(durable=False) as tx:
            changed = tx.execute(
                "UPDATE pins SET cut_claimed_until = ? WHERE serial = ? AND cut_at IS NULL "
                "AND (cut_claimed_until IS NULL OR cut_claimed_until < ?)",
                (until, serial, now.isoformat(timespec="seconds")),
            )
        return changed == 1

    def release_cut(self, serial: str) -> None:
        """Give a claimed cut-off back (the call to Mender failed): the next round, of any edge, tries again."""
        with self._db.transaction(durable=False) as tx:
            tx.execute("UPDATE pins SET cut_claimed_until = NULL WHERE serial = ?", (normalize_serial(serial),))

    def mark_cut(self, serial: str) -> None:
        """Record that the edge rejected certificate ``serial``'s device in Mender; marking it again changes nothing."""
        serial = normalize_serial(serial)
        with self._db.transaction() as tx:
            tx.execute("UPDATE pins SET cut_at = ? WHERE serial = ? AND cut_at IS NULL", (_now(), serial))
            known = tx.query("SELECT 1 AS k FROM pins WHERE serial = ?", (serial,))
        if not known:
            raise PkiError(f"certificate {serial} holds no identity", hint="only a pinned device can be cut off")
