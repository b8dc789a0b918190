"""Looking after a registry: check its invariants, copy it into another database (SQLite to PostgreSQL).

Both cover the certificates, and the identity pins and enrollments the edge keeps beside them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from imageprov.errors import PkiError
from imageprov.pki.registry import Registry
from imageprov.pki.registry_base import COLUMNS, ENROLLMENT_COLUMNS, PIN_COLUMNS, Record, Row, Status, Tx, rows_of

# A certificate only ever moves forward: pending -> active -> revoked (or pending -> revoked).
_RANK = {Status.PENDING: 0, Status.ACTIVE: 1, Status.REVOKED: 2}


@dataclass(frozen=True)
class StaleCertificate:
    """A pending certificate whose station is gone, as ``registry check`` names it."""

    device_id: str
    serial: str
    owner: str | None  # the station that issued it: "host (pid N, boot B)"
    issued_at: str


@dataclass(frozen=True)
class CheckReport:
    """What ``registry check`` found: ``problems`` break an invariant, ``notes`` do not."""

    registry: str
    schema_version: int
    certificates: int
    by_status: dict[str, int]
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    pins: int = 0  # identity pins, current and moved on
    # Pending certificates whose station is gone: never to be delivered, refused by the edge (revoke --stale).
    stale: list[StaleCertificate] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check(registry: Registry) -> CheckReport:
    """Verify what the schema should already enforce, in case it was edited by hand or lost an index."""
    backend = registry.backend
    problems = backend.structure_problems()
    with backend.autocommit() as tx:

        def groups(sql: str) -> list[str]:
            return [str(row["k"]) for row in tx.query(sql)]

        for kind, what in (("device", "certificate"), ("bootstrap", "bootstrap certificate")):
            for device in groups(
                f"SELECT device_id AS k FROM certificates WHERE kind = '{kind}' AND status IN ('pending', 'active') "
                "GROUP BY device_id HAVING COUNT(*) > 1"
            ):
                problems.append(f"device {device} has more than one live {what}")
        # Compared as numbers would be: 0A and a are the same serial to a CRL.
        for serial in groups(
            "SELECT lower(ltrim(serial, '0')) AS k FROM certificates GROUP BY lower(ltrim(serial, '0')) "
            "HAVING COUNT(*) > 1"
        ):
            problems.append(f"serial {serial} was recorded more than once")
        for serial in groups(
            "SELECT serial AS k FROM certificates WHERE status = 'active' AND serial IN "
            "(SELECT serial FROM certificates WHERE status = 'active' GROUP BY serial HAVING COUNT(*) > 1)"
        ):
            problems.append(f"active serial {serial} is not unique")
        for fingerprint in groups("SELECT fingerprint AS k FROM certificates GROUP BY fingerprint HAVING COUNT(*) > 1"):
            problems.append(f"fingerprint {fingerprint} was recorded more than once")
        for serial in groups(
            "SELECT serial AS k FROM certificates WHERE (status = 'revoked') != (revoked_at IS NOT NULL) "
            "OR status NOT IN ('pending', 'active', 'revoked')"
        ):
            problems.append(f"certificate {serial} has an impossible state")
        counts = {str(r["status"]): int(r["n"]) for r in tx.query(
            "SELECT status, COUNT(*) AS n FROM certificates GROUP BY status")}  # fmt: skip
        problems += _pin_problems(tx)
        problems += _enrollment_problems(tx)
        [pins] = tx.query(
            "SELECT COUNT(*) AS n, COUNT(released_at) AS released, "
            "SUM(CASE WHEN released_at IS NULL AND cut_at IS NULL AND serial IN "
            "(SELECT serial FROM certificates WHERE status = 'revoked') THEN 1 ELSE 0 END) AS uncut FROM pins"
        )
    pending = counts.get(Status.PENDING.value, 0)
    orphans = registry.stale()
    registry_notes = []
    if orphans:
        # A note, not a problem: no invariant is broken, but each is a card or image the edge will refuse.
        shown = ", ".join(f"{r.device_id} (serial {r.serial}, {r.owner})" for r in orphans[:5])
        more = f" and {len(orphans) - 5} more" if len(orphans) > 5 else ""
        registry_notes.append(
            f"{len(orphans)} pending certificate(s) of stations that are gone, never confirmed delivered: "
            f"{shown}{more}; revoke them with 'imageprov revoke --pki PKI --stale', or stamp or flash those "
            "devices again"
        )
    if pending > len(orphans):
        registry_notes.append(f"{pending - len(orphans)} pending certificate(s) of stations at work")
    if pins["uncut"]:
        registry_notes.append(f"{pins['uncut']} revoked device(s) not yet rejected in Mender by the edge")
    if pins["released"]:
        registry_notes.append(f"{pins['released']} identity pin(s) moved on to a newer certificate (kept as history)")
    return CheckReport(
        registry.display, backend.schema_version(), sum(counts.values()), counts, problems, registry_notes,
        int(pins["n"]), [StaleCertificate(r.device_id, r.serial, r.owner, r.issued_at) for r in orphans],
    )  # fmt: skip


def _pin_problems(tx: Tx) -> list[str]:
    """The pins' invariants: one current certificate per identity, device certificates only, history that adds up."""
    checks = [
        ("SELECT identity AS k FROM pins WHERE released_at IS NULL GROUP BY identity HAVING COUNT(*) > 1",
         "identity {} is held by more than one certificate"),
        ("SELECT p.serial AS k FROM pins p LEFT JOIN certificates c ON c.serial = p.serial "
         "WHERE c.serial IS NULL OR c.kind != 'device'",
         "certificate {} holds an identity but is no device certificate of the registry's"),
        ("SELECT serial AS k FROM pins WHERE (released_at IS NULL) != (released_to IS NULL) OR released_to = serial",
         "the identity pin of certificate {} has an impossible state"),
        ("SELECT p.serial AS k FROM pins p LEFT JOIN pins n ON n.serial = p.released_to "
         "WHERE p.released_to IS NOT NULL AND (n.serial IS NULL OR n.identity != p.identity)",
         "certificate {}'s identity moved on to a certificate that never held it"),
        # An identity moves on only from a revoked certificate, or from an older one of a device whose newer
        # certificate revoked it: a live certificate that lost its identity was changed by hand.
        ("SELECT p.serial AS k FROM pins p JOIN certificates c ON c.serial = p.serial "
         "WHERE p.released_at IS NOT NULL AND c.status != 'revoked'",
         "certificate {} is live but lost its identity"),
    ]  # fmt: skip
    return [message.format(row["k"]) for sql, message in checks for row in tx.query(sql)]


def _enrollment_problems(tx: Tx) -> list[str]:
    """The enrollments' invariants: a credential used is revoked, and what it obtained is a device certificate."""
    checks = [
        ("SELECT e.used_serial AS k FROM enrollments e LEFT JOIN certificates c ON c.serial = e.used_serial "
         "WHERE c.serial IS NULL OR c.status != 'revoked' OR c.kind NOT IN ('bootstrap', 'device')",
         "certificate {} was used to enroll but is not a revoked bootstrap or device certificate"),
        ("SELECT e.used_serial AS k FROM enrollments e LEFT JOIN certificates c ON c.serial = e.issued_serial "
         "WHERE c.serial IS NULL OR c.kind != 'device'",
         "certificate {} obtained something that is no device certificate of the registry's"),
    ]  # fmt: skip
    return [message.format(row["k"]) for sql, message in checks for row in tx.query(sql)]


@dataclass(frozen=True)
class MigrateReport:
    source: str
    target: str
    copied: int  # new in the target
    updated: int  # already there, moved forward (delivered or revoked since the last copy)
    unchanged: int
    verified: int  # every certificate of the source, found with the same fingerprint
    crl_number: int
    pins_copied: int = 0  # identity pins new in the target
    pins_updated: int = 0  # already there, moved forward (moved on to another certificate, cut, a Mender device id)
    pins_verified: int = 0  # every pin of the source, found holding the same identity, never behind
    enrollments_copied: int = 0  # enrollments new in the target, or moved on to a newer certificate
    enrollments_verified: int = 0  # every enrollment of the source, found the same


def migrate(source: Registry, target: Registry) -> MigrateReport:
    """Copy every certificate of ``source`` into ``target``, then verify; safe to run again.

    A second run copies what is new and moves forward what changed (delivered,
    revoked) since the first; it never moves a certificate backwards."""
    records = source.all()
    busy = [r for r in records if r.status is Status.PENDING and source.owner_alive(r)]
    if busy:
        raise PkiError(
            f"{len(busy)} certificate(s) are being stamped right now (e.g. {busy[0].device_id} by {busy[0].owner})",
            hint="stop every station before moving the registry",
        )
    with source.backend.autocommit() as tx:
        found = tx.query("SELECT value FROM meta WHERE key = 'crl_number'")
        pins = tx.query(f"SELECT {', '.join(PIN_COLUMNS)} FROM pins ORDER BY serial")
        enrollments = tx.query(f"SELECT {', '.join(ENROLLMENT_COLUMNS)} FROM enrollments ORDER BY used_serial")
    crl_number = int(found[0]["value"]) if found else 0
    copied = updated = unchanged = 0
    with target.backend.transaction() as tx:
        there = {r.serial: r for r in (Record.from_row(row) for row in tx.query(
            f"SELECT {', '.join(COLUMNS)} FROM certificates"))}  # fmt: skip
        # Moved forward first: a device reissued since the last copy has its old certificate revoked in the
        # target before its new one arrives (one live certificate per device, at every statement).
        for record in records:
            old = there.get(record.serial)
            if old is None:
                continue
            if old.fingerprint != record.fingerprint:
                raise PkiError(
                    f"serial {record.serial} names different certificates in {source.display} and {target.display}",
                    hint="the target holds another CA's registry: migrate into an empty database",
                )
            if _RANK[record.status] > _RANK[old.status]:
                tx.execute(
                    "UPDATE certificates SET status = ?, revoked_at = ?, reason = ?, delivered_to = ?, "
                    "delivered_at = ? WHERE serial = ?",
                    (record.status.value, record.revoked_at, record.reason.value if record.reason else None,
                     record.delivered_to, record.delivered_at, record.serial),
                )  # fmt: skip
                updated += 1
            else:
                unchanged += 1
        new = [r for r in records if r.serial not in there]
        # Sessions belong to the database they ran against: none of them runs against the target.
        tx.executemany(
            f"INSERT INTO certificates ({', '.join(COLUMNS)}) VALUES ({', '.join('?' for _ in COLUMNS)})",
            rows_of(_without_session(r) for r in new),
        )
        copied = len(new)
        tx.execute("INSERT INTO meta VALUES ('crl_number', 0) ON CONFLICT (key) DO NOTHING")
        # CRL numbers must keep increasing after the move (RFC 5280, 5.2.3).
        tx.execute("UPDATE meta SET value = ? WHERE key = 'crl_number' AND value < ?", (crl_number, crl_number))
        pins_copied, pins_updated = _copy_pins(pins, tx, source, target)
        enrollments_copied = _copy_enrollments(enrollments, tx)
    verified = _verify(records, target)
    pins_verified = _verify_pins(pins, target)
    enrollments_verified = _verify_enrollments(enrollments, target)
    return MigrateReport(
        source.display, target.display, copied, updated, unchanged, verified, crl_number,
        pins_copied, pins_updated, pins_verified, enrollments_copied, enrollments_verified,
    )  # fmt: skip


def _copy_enrollments(enrollments: list[Row], tx: Tx) -> int:
    """Copy the enrollments after the certificates they name; one that moved on (a repeated enrollment) follows."""
    there = {row["used_serial"]: row for row in tx.query(f"SELECT {', '.join(ENROLLMENT_COLUMNS)} FROM enrollments")}
    changed = 0
    for row in enrollments:
        old = there.get(row["used_serial"])
        if old is None:
            tx.execute(
                f"INSERT INTO enrollments ({', '.join(ENROLLMENT_COLUMNS)}) VALUES (?, ?, ?)",
                tuple(row[name] for name in ENROLLMENT_COLUMNS),
            )
        elif old["issued_serial"] != row["issued_serial"]:
            tx.execute(
                "UPDATE enrollments SET issued_serial = ?, enrolled_at = ? WHERE used_serial = ?",
                (row["issued_serial"], row["enrolled_at"], row["used_serial"]),
            )
        else:
            continue
        changed += 1
    return changed


def _verify_enrollments(enrollments: list[Row], target: Registry) -> int:
    with target.backend.autocommit() as tx:
        there = {row["used_serial"]: row["issued_serial"] for row in tx.query(
            "SELECT used_serial, issued_serial FROM enrollments")}  # fmt: skip
    wrong = [row["used_serial"] for row in enrollments if there.get(row["used_serial"]) != row["issued_serial"]]
    if wrong:
        raise PkiError(f"{len(wrong)} enrollment(s) did not arrive intact in {target.display} (e.g. {wrong[0]})")
    return len(enrollments)


def _copy_pins(pins: list[Row], tx: Tx, source: Registry, target: Registry) -> tuple[int, int]:
    """Copy the identity pins after the certificates they name; return (copied, moved forward)."""
    there = {row["serial"]: row for row in tx.query(f"SELECT {', '.join(PIN_COLUMNS)} FROM pins")}
    updated = 0
    # Changes first: an identity that moved on leaves its old holder before its new holder's row arrives.
    for pin in pins:
        old = there.get(pin["serial"])
        if old is None:
            continue
        if old["identity"] != pin["identity"]:
            raise PkiError(
                f"certificate {pin['serial']} holds different identities in {source.display} and {target.display}",
                hint="the target holds another registry's pins: migrate into an empty database",
            )
        forward = {
            "released_at": old["released_at"] is None and pin["released_at"] is not None,
            "released_to": old["released_to"] is None and pin["released_to"] is not None,
            "cut_at": old["cut_at"] is None and pin["cut_at"] is not None,
            "mender_device_id": pin["mender_device_id"] is not None
            and pin["mender_device_id"] != old["mender_device_id"],
        }
        moved = [name for name, changed in forward.items() if changed]
        if moved:
            tx.execute(
                f"UPDATE pins SET {', '.join(f'{name} = ?' for name in moved)} WHERE serial = ?",
                (*(pin[name] for name in moved), pin["serial"]),
            )
            updated += 1
    new = [pin for pin in pins if pin["serial"] not in there]
    tx.executemany(
        f"INSERT INTO pins ({', '.join(PIN_COLUMNS)}) VALUES ({', '.join('?' for _ in PIN_COLUMNS)})",
        [tuple(pin[name] for name in PIN_COLUMNS) for pin in new],
    )
    return len(new), updated


def _verify_pins(pins: list[Row], target: Registry) -> int:
    """Read the target's pins back: every source pin there, the same identity, moved on and cut if it was."""
    with target.backend.autocommit() as tx:
        there = {row["serial"]: row for row in tx.query(f"SELECT {', '.join(PIN_COLUMNS)} FROM pins")}
    wrong = [
        pin["serial"]
        for pin in pins
        if (t := there.get(pin["serial"])) is None
        or t["identity"] != pin["identity"]
        or (pin["released_to"] is not None and t["released_to"] != pin["released_to"])
        or (pin["cut_at"] is not None and t["cut_at"] is None)
    ]
    if wrong:
        raise PkiError(f"{len(wrong)} identity pin(s) did not arrive intact in {target.display} (e.g. {wrong[0]})")
    return len(pins)


def _without_session(record: Record) -> Record:
    return Record(**{**record.__dict__, "session": None})


def _verify(records: list[Record], target: Registry) -> int:
    """Read the target back: every source certificate there, same fingerprint and key, never behind."""
    there = {r.serial: r for r in target.all()}
    wrong = [
        r.serial
        for r in records
        if (t := there.get(r.serial)) is None
        or (t.fingerprint, t.public_key, t.device_id, t.kind) != (r.fingerprint, r.public_key, r.device_id, r.kind)
        or _RANK[t.status] < _RANK[r.status]
    ]
    if wrong:
        raise PkiError(f"{len(wrong)} certificate(s) did not arrive intact in {target.display} (e.g. {wrong[0]})")
    return len(records)
