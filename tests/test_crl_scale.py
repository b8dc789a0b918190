"""A CRL of a large fleet, as OpenSSL (and so nginx) and the edge read it: every serial, its date and its reason.

``build_crl`` hands the builder its entries all at once and makes each entry
without the builder's setters (for a CRL of 100,000 in well under a second);
what it writes must be what the one-entry-at-a-time way wrote.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import random
import re
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from imageprov.edge.revocation import INLINE_SIZE, CrlSource
from imageprov.errors import PkiError
from imageprov.pki.ca import BACKDATE, CertificateAuthority, Subject
from imageprov.pki.registry import Reason, Record, Status
from imageprov.pki.revocation import build_crl, crl_bytes
from tests.conftest import tool

# How ``openssl crl -text`` names each reason code (crypto/x509/v3_enum.c, crl_reasons).
OPENSSL_REASON = {
    Reason.KEY_COMPROMISE: "Key Compromise",
    Reason.CA_COMPROMISE: "CA Compromise",
    Reason.AFFILIATION_CHANGED: "Affiliation Changed",
    Reason.SUPERSEDED: "Superseded",
    Reason.CESSATION_OF_OPERATION: "Cessation Of Operation",
    Reason.CERTIFICATE_HOLD: "Certificate Hold",
    Reason.PRIVILEGE_WITHDRAWN: "Privilege Withdrawn",
}
NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)


def _record(serial: str, revoked_at: str | None, reason: Reason | None) -> Record:
    return Record(
        serial=serial, device_id=f"d-{serial}", kind="device", fingerprint="", public_key="", not_before="",
        not_after="", issued_at="", status=Status.REVOKED, revoked_at=revoked_at, reason=reason,
        delivered_to=None, delivered_at=None, owner=None,
    )  # fmt: skip


def _openssl_date(when: dt.datetime) -> str:
    when = when.astimezone(dt.UTC)
    return f"{when:%b} {when.day:2d} {when:%H:%M:%S %Y} GMT"


def _entries(text: str) -> dict[int, tuple[str, str | None]]:
    """Serial -> (revocation date, reason) of each entry ``openssl crl -text`` printed."""
    listed = text.split("Revoked Certificates:", 1)[1].split("Signature Algorithm:", 1)[0]
    found: dict[int, tuple[str, str | None]] = {}
    for block in re.split(r"^\s*Serial Number: ", listed, flags=re.MULTILINE)[1:]:
        lines = [line.strip() for line in block.splitlines() if line.strip()]
        serial = int(lines[0], 16)
        assert serial not in found, f"{serial:x} listed twice"
        date = lines[1].removeprefix("Revocation Date: ")
        reason = lines[lines.index("X509v3 CRL Reason Code:") + 1] if "X509v3 CRL Reason Code:" in lines else None
        found[serial] = (date, reason)
    return found


def test_a_crl_of_thousands_lists_every_serial_with_its_date_and_reason(tmp_path: Path) -> None:
    ca = CertificateAuthority.create(Subject("Scale CA"))
    rng = random.Random(24)
    records, serials = [], set()
    while len(serials) < 2000:
        # Short and long serials, some with the high bit set (a DER integer with a leading zero octet).
        serials.add(f"{rng.getrandbits(rng.choice([16, 64, 159])) | 1:x}")
    for number, serial in enumerate(sorted(serials)):
        # Every reason and none; dates as the registry writes them (UTC), with another offset, without one,
        # and missing (a record revoked before dates were kept: the CRL's own time).
        when = NOW - dt.timedelta(minutes=number * 7)
        revoked_at = [
            when.isoformat(),
            when.astimezone(dt.timezone(dt.timedelta(hours=-5))).isoformat(),
            when.replace(tzinfo=None).isoformat(),
            None,
        ][number % 4]
        records.append(_record(serial, revoked_at, [None, *Reason][number % (len(Reason) + 1)]))
    crl = build_crl(ca, records, number=42)
    path, ca_path = tmp_path / "crl.pem", tmp_path / "ca.pem"
    path.write_bytes(crl_bytes(crl))
    ca_path.write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    proc = tool("openssl", "crl", "-in", path, "-CAfile", ca_path, "-noout", "-text")
    text = proc.stdout.decode()
    assert "verify OK" in proc.stderr.decode() + text
    assert re.search(r"X509v3 CRL Number:\s+42\n", text)
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()).key_identifier
    assert re.search(r"X509v3 Authority Key Identifier:\s+(keyid:)?" + aki.hex(":").upper(), text)
    made = crl.last_update_utc + BACKDATE  # the time build_crl read its clock: a record without a date gets it
    listed = _entries(text)
    assert len(listed) == len(records)
    for record in records:
        when = dt.datetime.fromisoformat(record.revoked_at) if record.revoked_at else made
        when = when if when.tzinfo else when.replace(tzinfo=dt.UTC)
        # RFC 5280 5.3.1: "unspecified" is not written, as no reason is.
        reason = OPENSSL_REASON.get(record.reason) if record.reason is not None else None
        assert listed[int(record.serial, 16)] == (_openssl_date(when), reason), record


@pytest.mark.parametrize(
    ("serial", "revoked_at"),
    [("0", NOW.isoformat()), ("8" + "0" * 39, NOW.isoformat()), ("a1", "1949-12-31T23:59:59+00:00")],
    ids=["zero serial", "160-bit serial", "before 1950"],
)
def test_a_record_no_crl_can_hold_is_refused_by_name(serial: str, revoked_at: str) -> None:
    """Not a crash in the encoder (it panics on a date before 1950): the record, named, and what to do."""
    ca = CertificateAuthority.create(Subject("Scale CA"))
    with pytest.raises(PkiError, match=f"serial {serial} .* cannot go in a CRL"):
        build_crl(ca, [_record("ab", None, None), _record(serial, revoked_at, Reason.SUPERSEDED)], number=1)


def test_the_edge_reads_a_crl_of_thousands_in_its_worker(tmp_path: Path) -> None:
    """Too big to read on the spot: the edge's worker process reads it, and meanwhile the CRL before it answers;
    then the set is exactly the new CRL's."""
    ca = CertificateAuthority.create(Subject("Scale CA"))
    rng = random.Random(5)
    records = [_record(f"{rng.getrandbits(159) | 1:x}", NOW.isoformat(), Reason.SUPERSEDED) for _ in range(3000)]
    before, after = {r.serial for r in records[:2000]}, {r.serial for r in records[1000:]}
    path = tmp_path / "crl.pem"
    path.write_bytes(crl_bytes(build_crl(ca, records[:2000], number=1)))
    source = CrlSource(path, ca.cert)

    async def scenario() -> None:
        assert await source.revoked_serials() == before
        new = tmp_path / "crl.new"
        new.write_bytes(crl_bytes(build_crl(ca, records[1000:], number=2)))
        assert new.stat().st_size > INLINE_SIZE
        os.replace(new, path)
        deadline = time.monotonic() + 30
        while (serials := await source.revoked_serials()) == before and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert serials == after  # never a mix of the two

    asyncio.run(scenario())
