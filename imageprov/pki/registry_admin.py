"""Looking after a registry: check its invariants, copy it into another database (SQLite to PostgreSQL)."""

from __future__ import annotations

from dataclasses import dataclass, field

from imageprov.errors import PkiError
from imageprov.pki.registry import Registry
from imageprov.pki.registry_base import COLUMNS, Record, Status, rows_of

# A certificate only ever moves forward: pending -> active -> revoked (or pending -> revoked).
_RANK = {Status.PENDING: 0, Status.ACTIVE: 1, Status.REVOKED: 2}


@dataclass(frozen=True)
class CheckReport:
    """What ``registry check`` found: ``problems`` break an invariant, ``notes`` do not."""

    registry: str
    schema_version: int
    certificates: int
    by_status: dict[str, int]
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

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

        for device in groups(
            "SELECT device_id AS k FROM certificates WHERE kind = 'device' AND status IN ('pending', 'active') "
            "GROUP BY device_id HAVING COUNT(*) > 1"
        ):
            problems.append(f"device {device} has more than one live certificate")
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
    pending = [r for r in registry.all() if r.status is Status.PENDING]
    orphans = [r for r in pending if not registry.owner_alive(r)]
    if orphans:
        registry_notes = [
            f"{len(orphans)} pending certificate(s) of stations that are gone (e.g. {orphans[0].device_id}, "
            f"{orphans[0].owner}): the next stamp of those devices revokes them"
        ]
    else:
        registry_notes = []
    if len(pending) > len(orphans):
        registry_notes.append(f"{len(pending) - len(orphans)} pending certificate(s) of stations at work")
    return CheckReport(
        registry.display, backend.schema_version(), sum(counts.values()), counts, problems, registry_notes
    )


@dataclass(frozen=True)
class MigrateReport:
    source: str
    target: str
    copied: int  # new in the target
    updated: int  # already there, moved forward (delivered or revoked since the last copy)
    unchanged: int
    verified: int  # every certificate of the source, found with the same fingerprint
    crl_number: int


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
    crl_number = int(found[0]["value"]) if found else 0
    copied = updated = unchanged = 0
    with target.backend.transaction() as tx:
        there = {r.serial: r for r in (Record.from_row(row) for row in tx.query(
            f"SELECT {', '.join(COLUMNS)} FROM certificates"))}  # fmt: skip
        new = [r for r in records if r.serial not in there]
        # Sessions belong to the database they ran against: none of them runs against the target.
        tx.executemany(
            f"INSERT INTO certificates ({', '.join(COLUMNS)}) VALUES ({', '.join('?' for _ in COLUMNS)})",
            rows_of(_without_session(r) for r in new),
        )
        copied = len(new)
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
        tx.execute("INSERT INTO meta VALUES ('crl_number', 0) ON CONFLICT (key) DO NOTHING")
        # CRL numbers must keep increasing after the move (RFC 5280, 5.2.3).
        tx.execute("UPDATE meta SET value = ? WHERE key = 'crl_number' AND value < ?", (crl_number, crl_number))
    verified = _verify(records, target)
    return MigrateReport(source.display, target.display, copied, updated, unchanged, verified, crl_number)


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
