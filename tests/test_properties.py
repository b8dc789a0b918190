"""Property tests: the table parser against an independent writer, random bytes, and the mender.conf merge."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import struct
import uuid
import zlib
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imageprov.disk.partitions import read_table
from imageprov.errors import ImageprovError, PkiError, TableError
from imageprov.mender.conf import CLIENT_CERT, CLIENT_KEY, SCHEMA, Settings, fold, merge
from imageprov.pki import crl_der
from imageprov.pki.ca import BACKDATE, CertificateAuthority, Subject
from imageprov.pki.registry_base import Reason, Revocation
from imageprov.pki.revocation import build_crl

SECTOR = 512
DISK_SECTORS = 4096  # a 2 MiB image: tables only, no filesystems needed

# -- an independent MBR writer ---------------------------------------------------------


def _entry(status: int, ptype: int, lba: int, count: int) -> bytes:
    return struct.pack("<B3sB3sII", status, b"\xfe\xff\xff", ptype, b"\xfe\xff\xff", lba, count)


@st.composite
def mbr_layouts(draw: st.DrawFn) -> dict[str, Any]:
    """Up to 3 primaries, then maybe an extended partition with 1 to 5 logical ones, all disjoint."""
    cursor = 1 + draw(st.integers(0, 64))
    primaries = []
    for _ in range(draw(st.integers(1, 3))):
        size = draw(st.integers(1, 300))
        ptype = draw(st.sampled_from([0x0C, 0x83, 0x82, 0x0B, 0xDA]))
        primaries.append((draw(st.booleans()), ptype, cursor, size))
        cursor += size + draw(st.integers(0, 16))
    logicals = []
    extended = None
    if draw(st.booleans()):
        start = cursor
        for index in range(draw(st.integers(1, 5))):
            # The first EBR opens the extended partition; each later one may follow a gap.
            ebr = start if index == 0 else cursor + draw(st.integers(0, 8))
            lba = ebr + 1 + draw(st.integers(0, 8))
            size = draw(st.integers(1, 120))
            logicals.append((ebr, lba, size, draw(st.sampled_from([0x83, 0x82]))))
            cursor = lba + size
        extended = (draw(st.sampled_from([0x05, 0x0F])), start, cursor - start)
    return {
        "primaries": primaries,
        "extended": extended,
        "logicals": logicals,
        "disk_id": draw(st.integers(0, 2**32 - 1)),
    }


def _write_mbr(path: Path, layout: dict[str, Any]) -> None:
    image = bytearray(DISK_SECTORS * SECTOR)
    entries = [_entry(0x80 if boot else 0, ptype, lba, count) for boot, ptype, lba, count in layout["primaries"]]
    if layout["extended"]:
        kind, start, size = layout["extended"]
        entries.append(_entry(0, kind, start, size))
        logicals = layout["logicals"]
        for i, (ebr, lba, size_l, ptype) in enumerate(logicals):
            record = bytearray(SECTOR)
            record[446:462] = _entry(0, ptype, lba - ebr, size_l)
            if i + 1 < len(logicals):
                record[462:478] = _entry(0, 0x05, logicals[i + 1][0] - start, 1)
            record[510:512] = b"\x55\xaa"
            image[ebr * SECTOR : (ebr + 1) * SECTOR] = record
    for i, entry in enumerate(entries):
        image[446 + 16 * i : 462 + 16 * i] = entry
    image[440:444] = struct.pack("<I", layout["disk_id"])
    image[510:512] = b"\x55\xaa"
    path.write_bytes(bytes(image))


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(layout=mbr_layouts())
def test_mbr_round_trip(tmp_path: Path, layout: dict[str, Any]) -> None:
    image = tmp_path / "mbr.img"
    _write_mbr(image, layout)
    table = read_table(image)
    assert table.disk_id == f"0x{layout['disk_id']:08x}"
    expected = [
        (i + 1, lba, count, f"{ptype:x}", boot) for i, (boot, ptype, lba, count) in enumerate(layout["primaries"])
    ]
    if layout["extended"]:
        kind, start, size = layout["extended"]
        expected.append((len(layout["primaries"]) + 1, start, size, f"{kind:x}", False))
        expected += [
            (5 + i, lba, size_l, f"{ptype:x}", False) for i, (_, lba, size_l, ptype) in enumerate(layout["logicals"])
        ]
    got = [(p.number, p.start_sector, p.size_sectors, p.type, p.bootable) for p in table.partitions]
    assert got == expected


# -- an independent GPT writer ---------------------------------------------------------


@st.composite
def gpt_layouts(draw: st.DrawFn) -> list[tuple[int, int, str, str, str, int]]:
    cursor = 34 + draw(st.integers(0, 30))
    parts = []
    for _ in range(draw(st.integers(1, 8))):
        size = draw(st.integers(1, 200))
        if cursor + size > DISK_SECTORS - 34:
            break
        name = draw(st.text(st.characters(codec="utf-16", exclude_categories=("Cs", "Cc")), max_size=20))
        parts.append(
            (
                cursor,
                cursor + size - 1,
                str(uuid.UUID(int=draw(st.integers(1, 2**128 - 1)))).upper(),
                str(uuid.uuid4()).upper(),
                name,
                draw(st.integers(0, 2**64 - 1)),
            )
        )
        cursor += size + draw(st.integers(0, 10))
    return parts


def _write_gpt(path: Path, parts: list[tuple[int, int, str, str, str, int]], disk: uuid.UUID) -> None:
    image = bytearray(DISK_SECTORS * SECTOR)
    image[446:462] = _entry(0, 0xEE, 1, DISK_SECTORS - 1)
    image[510:512] = b"\x55\xaa"
    array = bytearray(128 * 128)
    for i, (first, last, kind, unique, name, attrs) in enumerate(parts):
        encoded = name.encode("utf-16-le")[:72]
        array[i * 128 : (i + 1) * 128] = struct.pack(
            "<16s16sQQQ72s", uuid.UUID(kind).bytes_le, uuid.UUID(unique).bytes_le, first, last, attrs, encoded
        )
    last_lba = DISK_SECTORS - 1
    for current, backup, entries_lba in ((1, last_lba, 2), (last_lba, 1, last_lba - 32)):
        header = bytearray(
            struct.pack(
                "<8sIIIIQQQQ16sQIII",
                b"EFI PART",
                0x10000,
                92,
                0,
                0,
                current,
                backup,
                34,
                last_lba - 33,
                disk.bytes_le,
                entries_lba,
                128,
                128,
                zlib.crc32(array),
            )
        )
        header[16:20] = struct.pack("<I", zlib.crc32(bytes(header)))
        image[current * SECTOR : current * SECTOR + 92] = header
        image[entries_lba * SECTOR : entries_lba * SECTOR + len(array)] = array
    path.write_bytes(bytes(image))


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(parts=gpt_layouts(), disk=st.uuids(), damage_primary=st.booleans())
def test_gpt_round_trip(
    tmp_path: Path, parts: list[tuple[int, int, str, str, str, int]], disk: uuid.UUID, damage_primary: bool
) -> None:
    image = tmp_path / "gpt.img"
    _write_gpt(image, parts, disk)
    if damage_primary:
        with open(image, "r+b") as handle:
            handle.seek(SECTOR + 24)  # current LBA: breaks the header CRC
            handle.write(b"\xff")
    table = read_table(image)
    assert table.from_backup == damage_primary
    assert table.disk_id == str(disk).upper()
    got = [
        (p.start_sector, p.start_sector + p.size_sectors - 1, p.type, p.uuid, p.name, p.attributes)
        for p in table.partitions
    ]
    want = [
        (f, last, k, u, n.encode("utf-16-le")[:72].decode("utf-16-le", "ignore").split("\0")[0], a)
        for f, last, k, u, n, a in parts
    ]
    assert got == want


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(data=st.binary(min_size=0, max_size=8 * SECTOR), signed=st.booleans(), gpt=st.booleans())
def test_random_bytes_raise_only_our_error(tmp_path: Path, data: bytes, signed: bool, gpt: bool) -> None:
    raw = bytearray(data.ljust(4 * SECTOR, b"\0") if signed else data)
    if signed:
        raw[510:512] = b"\x55\xaa"
        if gpt:
            raw[446 + 4] = 0xEE
            raw[SECTOR : SECTOR + 8] = b"EFI PART"
    image = tmp_path / "random.img"
    image.write_bytes(bytes(raw))
    with contextlib.suppress(TableError):
        read_table(image)


# -- the mender.conf merge ---------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


_MENDER_KEYS = {fold(key) for key in SCHEMA}
_GO_ONLY = ("\u017f", "\u212a")  # long s and the Kelvin sign: Go's case folding takes them for s and k

# Keys the clients would read as one of Mender's have rules of their own, and so do two spellings of one key
# and a key with a character only Go folds (each refused: tests/test_conf_client_rules.py); here, the others.
_other_keys = st.text(min_size=1, max_size=12).filter(
    lambda k: fold(k) not in _MENDER_KEYS and not any(c in k for c in _GO_ONLY)
)
_other_configs = st.lists(st.tuples(_other_keys, json_values), max_size=10, unique_by=lambda kv: fold(kv[0])).map(dict)


@settings(max_examples=200, deadline=None)
@given(config=_other_configs, server=st.none() | st.text(min_size=1, max_size=30))
def test_merge_keeps_everything_else(config: dict[str, Any], server: str | None) -> None:
    text = json.dumps(config).encode()
    merged = merge(text, Settings(server_url=server), "m")
    value = json.loads(merged.text)
    assert value["HttpsClient"] == {"Certificate": CLIENT_CERT, "Key": CLIENT_KEY}
    assert value["Security"] == {"AuthPrivateKey": CLIENT_KEY}
    for key, item in config.items():
        if key != "ServerURL" or server is None:
            assert value[key] == item
    assert [k for k in value if k in config] == list(config)
    assert merge(merged.text, Settings(server_url=server), "m").text == merged.text  # idempotent


@settings(max_examples=200, deadline=None)
@given(text=st.binary(max_size=200))
def test_merge_of_garbage_raises_only_our_error(text: bytes) -> None:
    with contextlib.suppress(ImageprovError):
        merge(text, Settings(), "m")


# -- CRLs: the entries imageprov writes as DER are the ones cryptography writes ----------------------

_CRL_CA = CertificateAuthority.create(Subject("Property CA"))
_zones = st.sampled_from(
    [None, dt.UTC, dt.timezone(dt.timedelta(hours=5, minutes=30)), dt.timezone(-dt.timedelta(hours=8))]
)
_revocations = st.builds(
    Revocation,
    serial=st.integers(1, 2**159 - 1).map(lambda n: f"{n:x}"),
    # From 1951: an offset must not take a date before 1950 (refused: test_crl_scale.py); past 2050 the
    # date is a GeneralizedTime, before it a UTCTime.
    revoked_at=st.none()
    | st.sampled_from(["1950-01-01T00:00:00+00:00", "2049-12-31T23:59:59+00:00", "2050-01-01T00:00:00+00:00"])
    | st.datetimes(dt.datetime(1951, 1, 1), dt.datetime(9998, 12, 31), timezones=_zones).map(dt.datetime.isoformat),
    reason=st.none() | st.sampled_from(Reason),
)


@settings(max_examples=100, deadline=None)
@given(revoked=st.lists(_revocations, max_size=40, unique_by=lambda r: r.serial))
def test_a_crl_is_what_cryptography_would_build(revoked: list[Revocation]) -> None:
    crl = build_crl(_CRL_CA, revoked, number=7)
    assert crl.is_signature_valid(_CRL_CA.key.public_key())
    made = crl.last_update_utc + BACKDATE  # a revocation without a date gets the CRL's own time
    entries = []
    for r in revoked:
        when = dt.datetime.fromisoformat(r.revoked_at) if r.revoked_at else made
        reason = (
            []
            if r.reason in (None, Reason.UNSPECIFIED)
            else [x509.Extension(x509.CRLReason.oid, False, x509.CRLReason(r.reason.flag))]
        )
        entries.append(x509.RevokedCertificateBuilder(int(r.serial, 16), when, reason).build())
    reference = x509.CertificateRevocationListBuilder(revoked_certificates=entries).issuer_name(crl.issuer)
    reference = reference.last_update(crl.last_update_utc).next_update(crl.next_update_utc)  # type: ignore[arg-type]
    for extension in crl.extensions:
        reference = reference.add_extension(extension.value, extension.critical)
    assert reference.sign(_CRL_CA.key, _CRL_CA.curve.hash).tbs_certlist_bytes == crl.tbs_certlist_bytes
    # What the edge checks the signature over: the bytes as they are in the file, nothing before or after.
    der = crl.public_bytes(serialization.Encoding.DER)
    assert crl_der.signed_parts(der) == (crl.tbs_certlist_bytes, crl.signature)
    tbs_at = 2 + (der[1] & 0x7F if der[1] & 0x80 else 0)  # after the outer SEQUENCE's tag and length
    for bad in (der + b"\x00", der[:-1], b"\x31" + der[1:], der[:tbs_at] + b"\x31" + der[tbs_at + 1 :]):
        with pytest.raises(PkiError, match="not a signed CRL"):
            crl_der.signed_parts(bad)
