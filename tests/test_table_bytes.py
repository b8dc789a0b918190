"""The MBR and GPT readers on tables written byte by byte: every field, bound and refusal, exactly.

test_table.py checks the readers against sfdisk on images sfdisk wrote;
these build what sfdisk never writes (edge values, damage, loops) straight
from the specs, and are fast enough to run against every mutant
(scripts/mutants).
"""

from __future__ import annotations

import os
import struct
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from imageprov.disk import gpt, mbr
from imageprov.disk.table import PartitionTable, TableType
from imageprov.errors import TableError
from tests.disk_bytes import boot_record, slot

MIB = 1 << 20
# write({offset: bytes}, size) -> (an open read-only fd of a sparse image holding them, size)
Write = Callable[[dict[int, bytes], int], tuple[int, int]]


# -- MBR ----------------------------------------------------------------------------


@pytest.fixture
def image(tmp_path: Path) -> Iterator[Write]:
    """Sparse images holding given bytes at given offsets, open read-only."""
    fds: list[int] = []

    def write(blocks: dict[int, bytes], size: int) -> tuple[int, int]:
        path = tmp_path / f"image-{len(fds)}.img"
        with open(path, "wb") as handle:
            handle.truncate(size)
            for offset, data in blocks.items():
                handle.seek(offset)
                handle.write(data)
        fds.append(os.open(path, os.O_RDONLY))
        return fds[-1], size

    yield write
    for fd in fds:
        os.close(fd)


def _refused(call: object, *args: object) -> TableError:
    with pytest.raises(TableError) as info:
        call(*args)  # type: ignore[operator]
    return info.value


def test_mbr_fields(image: Write) -> None:
    fd, size = image(
        {
            0: boot_record(
                slot(0x01, 1, 1),  # FAT12, one sector: type 1 and count 1 are real partitions
                slot(0x00, 100, 10),  # no type: an unused slot, whatever its extent
                slot(0x83, 200, 0, status=0x80),  # no sectors: unused, whatever its type
                slot(0x83, 300, 20, status=0x80),
                disk_id=0xDEADBEEF,
            )
        },
        MIB,
    )
    table = mbr.read(fd, size)
    assert table == PartitionTable(
        type=TableType.MBR, disk_id="0xdeadbeef", sector_size=512, partitions=table.partitions
    )
    assert [
        (p.number, p.start_sector, p.size_sectors, p.type, p.bootable, p.is_extended) for p in table.partitions
    ] == [
        (1, 1, 1, "1", False, False),
        (4, 300, 20, "83", True, False),
    ]
    assert not mbr.is_protective(fd)


def test_mbr_empty_first_slot_does_not_end_the_table(image: Write) -> None:
    fd, size = image({0: boot_record(slot(0, 0, 0), slot(0x83, 100, 10))}, MIB)
    assert [p.number for p in mbr.read(fd, size).partitions] == [2]


def test_protective_mbr(image: Write) -> None:
    fd, _ = image({0: boot_record(slot(0x83, 1, 1), slot(0xEE, 1, 100))}, MIB)
    assert mbr.is_protective(fd)


def test_mbr_without_signature(image: Write) -> None:
    fd, size = image({0: boot_record(slot(0x83, 1, 1), signature=b"\x55\xab")}, MIB)
    error = _refused(mbr.read, fd, size)
    assert error.message == "no partition table: the MBR signature 0x55AA is missing"
    assert error.hint == "is this a whole-disk image (.sdimg/.uefiimg), not a single partition?"
    assert _refused(mbr.is_protective, fd).message == error.message


def test_mbr_bad_status(image: Write) -> None:
    fd, size = image({0: boot_record(slot(0x83, 1, 1), slot(0x83, 10, 1, status=0x12))}, MIB)
    error = _refused(mbr.read, fd, size)
    assert (error.message, error.hint) == ("MBR slot 2 has an invalid status byte 0x12", "")


def test_mbr_two_extended_partitions(image: Write) -> None:
    fd, size = image({0: boot_record(slot(0x05, 100, 10), slot(0x0F, 200, 10))}, MIB)
    error = _refused(mbr.read, fd, size)
    assert (error.message, error.hint) == ("the MBR has two extended partitions", "")


EXT = 2048  # the extended partition's first sector in the chains below
EXT_SIZE = 1000


def _chain(*ebrs: tuple[int, bytes], ext_size: int = EXT_SIZE) -> dict[int, bytes]:
    """The MBR with one extended partition at EXT, and each (sector, EBR)."""
    blocks = {0: boot_record(slot(0x83, 1, 100), slot(0x05, EXT, ext_size))}
    blocks.update({sector * 512: ebr for sector, ebr in ebrs})
    return blocks


def test_ebr_chain_fields_and_links(image: Write) -> None:
    fd, size = image(
        _chain(
            # Slot 1 relative to its EBR; slot 2 links relative to the extended partition.
            (EXT, boot_record(slot(0x83, 2, 10, status=0x80), slot(0x01, 1, 50))),  # a link of any type
            (EXT + 1, boot_record(slot(0x00, 5, 10), slot(0x05, 20, 50))),  # no type: no partition
            (EXT + 20, boot_record(slot(0x83, 5, 0), slot(0x05, 40, 50))),  # no sectors: no partition
            (EXT + 40, boot_record(slot(0x01, 1, 1), slot(0x05, 0, 10))),  # link to 0: the end
            (EXT + 60, boot_record(slot(0x83, 1, 1))),  # never reached
        ),
        4 * MIB,
    )
    table = mbr.read(fd, size)
    logical = [(p.number, p.start_sector, p.size_sectors, p.type, p.bootable) for p in table.partitions[2:]]
    assert logical == [(5, EXT + 2, 10, "83", True), (6, EXT + 41, 1, "1", False)]
    assert [p.is_extended for p in table.partitions] == [False, True, False, False]


def test_ebr_link_without_a_type_ends_the_chain(image: Write) -> None:
    fd, size = image(
        _chain(
            (EXT, boot_record(slot(0x83, 2, 10), slot(0x00, 100, 10))),
            (EXT + 100, boot_record(slot(0x83, 1, 1))),
        ),
        4 * MIB,
    )
    assert [p.number for p in mbr.read(fd, size).partitions] == [1, 2, 5]


def test_ebr_loop(image: Write) -> None:
    # The second EBR, with no partition of its own, links back to itself.
    fd, size = image(
        _chain(
            (EXT, boot_record(slot(0x83, 2, 10), slot(0x05, 10, 10))),
            (EXT + 10, boot_record(slot(0, 0, 0), slot(0x05, 10, 1))),
        ),
        4 * MIB,
    )
    error = _refused(mbr.read, fd, size)
    assert (error.message, error.hint) == ("the EBR chain of the extended partition loops", "the table is corrupt")


def _long_chain(count: int) -> dict[int, bytes]:
    ebrs = []
    for index in range(count):
        ebrs.append((EXT + 2 * index, boot_record(slot(0x83, 1, 1), slot(0x05, 2 * (index + 1), 2))))
    last_sector, last = ebrs[-1]
    ebrs[-1] = (last_sector, last[:462] + bytes(16) + last[478:])  # the last EBR links nowhere
    return _chain(*ebrs, ext_size=2 * count + 2)


def test_ebr_chain_length_limit(image: Write) -> None:
    fd, size = image(_long_chain(257), 4 * MIB)
    assert len(mbr.read(fd, size).partitions) == 2 + 257
    fd, size = image(_long_chain(258), 4 * MIB)
    assert _refused(mbr.read, fd, size).message == "the EBR chain of the extended partition loops"


def test_ebr_in_the_last_sector(image: Write) -> None:
    size = (EXT + 100) * 512
    fd, _ = image(
        _chain((EXT, boot_record(slot(0x83, 2, 10), slot(0x05, 99, 1))), (EXT + 99, boot_record(slot(0x83, 0, 1)))),
        size,
    )
    assert [p.start_sector for p in mbr.read(fd, size).partitions[2:]] == [EXT + 2, EXT + 99]


def test_ebr_past_the_end(image: Write) -> None:
    size = (EXT + 100) * 512
    fd, _ = image(_chain((EXT, boot_record(slot(0x83, 2, 10), slot(0x05, 100, 1)))), size)
    error = _refused(mbr.read, fd, size)
    assert (error.message, error.hint) == (f"an EBR at sector {EXT + 100} lies past the end of the image", "")


def test_ebr_without_signature(image: Write) -> None:
    fd, size = image(_chain((EXT, boot_record(slot(0x83, 2, 10), signature=b"\xaa\x55"))), MIB * 4)
    error = _refused(mbr.read, fd, size)
    assert (error.message, error.hint) == (f"the EBR at sector {EXT} has no 0x55AA signature", "the table is corrupt")


@pytest.mark.parametrize(
    ("start", "count", "inside"),
    [(0, 10, True), (EXT_SIZE - 10, 10, True), (EXT_SIZE - 10, 11, False)],
    ids=["at-the-start", "to-the-end", "past-the-end"],
)
def test_logical_partition_inside_its_extended_partition(image: Write, start: int, count: int, inside: bool) -> None:
    fd, size = image(_chain((EXT, boot_record(slot(0x83, start, count)))), 4 * MIB)
    if inside:
        assert mbr.read(fd, size).partitions[2].start_sector == EXT + start
    else:
        error = _refused(mbr.read, fd, size)
        assert (error.message, error.hint) == ("logical partition 5 lies outside its extended partition", "")


# -- GPT ----------------------------------------------------------------------------

DISK_GUID = uuid.UUID("1111111A-2222-3333-4444-55555555555F")
TYPE_GUID = uuid.UUID("0FC63DAF-8483-4772-8E79-3D69D8477DE4")
PART_GUID = uuid.UUID("AAAAAAAA-BBBB-CCCC-DDDD-EEEEEEEEEEEE")


@dataclass
class Gpt:
    """A GPT, each field settable; ``blocks()`` renders it with correct CRCs unless told otherwise."""

    sector: int = 512
    sectors: int = 2048
    # (first LBA, last LBA, attributes, name); None: an unused entry (zero type GUID).
    entries: list[tuple[int, int, int, str] | None] = field(default_factory=lambda: [(40, 99, 5, "data")])
    count: int = 128
    entry_size: int = 128
    header_size: int = 92
    first: int = 34
    last: int | None = None
    entries_lba: int = 2
    break_header_crc: bool = False
    break_array_crc: bool = False
    signature: bytes = b"EFI PART"

    def array(self) -> bytes:
        data = bytearray(self.count * self.entry_size)
        for index, spec in enumerate(self.entries):
            if spec is None:
                continue
            start, end, attrs, name = spec
            entry = struct.pack(
                "<16s16sQQQ72s", TYPE_GUID.bytes_le, PART_GUID.bytes_le, start, end, attrs, name.encode("utf-16-le")
            )
            data[index * self.entry_size : index * self.entry_size + 128] = entry[: self.entry_size]
        return bytes(data)

    def header(self, at: int, entries_lba: int) -> bytes:
        last = self.last if self.last is not None else self.sectors - 34
        array = self.array()
        crc = zlib.crc32(array) ^ (1 if self.break_array_crc else 0)
        fields = [
            self.signature,
            0x10000,
            self.header_size,
            0,
            0,
            at,
            self.sectors - 1 - at + 1,
            self.first,
            last,
            DISK_GUID.bytes_le,
            entries_lba,
            self.count,
            self.entry_size,
            crc,
        ]
        raw = bytearray(struct.pack("<8sIIIIQQQQ16sQIII", *fields).ljust(self.sector, b"\0"))
        header_crc = zlib.crc32(bytes(raw[: self.header_size])) ^ (1 if self.break_header_crc else 0)
        struct.pack_into("<I", raw, 16, header_crc)
        return bytes(raw)

    def blocks(self, *, primary: bool = True, backup: bool = True) -> dict[int, bytes]:
        out = {0: boot_record(slot(0xEE, 1, self.sectors - 1))}
        backup_array_lba = self.sectors - 1 - (len(self.array()) + self.sector - 1) // self.sector
        if primary:
            out[self.sector] = self.header(1, self.entries_lba)
            out[self.entries_lba * self.sector] = self.array()
        if backup:
            out[(self.sectors - 1) * self.sector] = self.header(self.sectors - 1, backup_array_lba)
            out[backup_array_lba * self.sector] = self.array()
        return out

    @property
    def size(self) -> int:
        return self.sectors * self.sector


def test_gpt_fields(image: Write) -> None:
    spec = Gpt(entries=[(40, 99, 5, "data"), None, (100, 100, 0, "one")])
    fd, size = image(spec.blocks(), spec.size)
    table = gpt.read(fd, size)
    assert (table.type, table.disk_id, table.sector_size, table.first_lba, table.last_lba) == (
        TableType.GPT,
        str(DISK_GUID).upper(),
        512,
        34,
        2048 - 34,
    )
    assert not table.from_backup and table.warnings == ()
    first = table.partitions[0]
    assert (
        first.number,
        first.start_sector,
        first.size_sectors,
        first.type,
        first.uuid,
        first.name,
        first.attributes,
        first.sector_size,
    ) == (1, 40, 60, str(TYPE_GUID).upper(), str(PART_GUID).upper(), "data", 5, 512)
    # An unused entry is skipped, and the numbers after it keep their slot.
    assert [(p.number, p.name, p.size_sectors) for p in table.partitions] == [(1, "data", 60), (3, "one", 1)]


def test_gpt_4k_sectors(image: Write) -> None:
    spec = Gpt(sector=4096, sectors=256, first=6, last=250, entries_lba=2, entries=[(6, 250, 0, "data")])
    fd, size = image(spec.blocks(), spec.size)
    table = gpt.read(fd, size)
    assert table.sector_size == 4096 and table.partitions[0].offset == 6 * 4096
    assert table.partitions[0].sector_size == 4096


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"signature": b"EFI PARX"}, "no GPT header at LBA 1"),
        ({"header_size": 91}, "GPT header at LBA 1 has an invalid size 91"),
        ({"header_size": 513}, "GPT header at LBA 1 has an invalid size 513"),
        ({"break_header_crc": True}, "GPT header at LBA 1 fails its CRC32"),
        ({"entry_size": 120}, "GPT header at LBA 1 describes an invalid entry array"),
        ({"entry_size": 132}, "GPT header at LBA 1 describes an invalid entry array"),
        ({"count": 8193}, "GPT header at LBA 1 describes an invalid entry array"),
        ({"break_array_crc": True}, "GPT partition entry array of the header at LBA 1 fails its CRC32"),
    ],
    ids=[
        "signature",
        "header-too-small",
        "header-too-large",
        "header-crc",
        "entry-too-small",
        "entry-not-8",
        "array-too-large",
        "array-crc",
    ],
)
def test_gpt_damaged_both_headers(image: Write, change: dict[str, object], why: str) -> None:
    spec = Gpt(sectors=20480, **change)  # type: ignore[arg-type]
    fd, size = image(spec.blocks(), spec.size)
    error = _refused(gpt.read, fd, size)
    assert error.message == f"the GPT is unreadable: {why}"
    assert error.hint == "primary and backup headers are both damaged"


@pytest.mark.parametrize(
    "change", [{"header_size": 92}, {"header_size": 512}, {"entry_size": 136}, {"count": 8192}], ids=str
)
def test_gpt_limits_that_are_allowed(image: Write, change: dict[str, int]) -> None:
    spec = Gpt(sectors=20480, **change)  # type: ignore[arg-type]
    fd, size = image(spec.blocks(), spec.size)
    assert gpt.read(fd, size).partitions[0].name == "data"


def test_gpt_header_not_where_it_says(image: Write) -> None:
    spec = Gpt(count=4)
    # MBR, header, a 4-entry array, and a stray byte: too small for a 4 KiB sector, no whole last sector for a backup.
    fd, size = image({0: spec.blocks()[0], 512: spec.header(7, 2), 1024: spec.array()}, 3 * 512 + 1)
    error = _refused(gpt.read, fd, size)
    assert error.message == "the GPT is unreadable: GPT header at LBA 1 says it is at LBA 7"
    assert error.hint == ""


def test_gpt_backup_header_is_read_when_the_primary_is_damaged(image: Write) -> None:
    spec = Gpt()
    fd, size = image(spec.blocks(primary=False), spec.size)
    table = gpt.read(fd, size)
    assert table.from_backup
    assert table.warnings == ("primary GPT header damaged (no GPT header at LBA 1); read the backup header",)
    assert (table.type, table.disk_id, table.sector_size, table.first_lba, table.last_lba) == (
        TableType.GPT,
        str(DISK_GUID).upper(),
        512,
        34,
        2048 - 34,
    )
    assert [p.name for p in table.partitions] == ["data"]


@pytest.mark.parametrize(
    ("start", "end", "ok"),
    [(34, 34, True), (2014, 2014, True), (33, 40, False), (40, 2015, False), (50, 49, False)],
    ids=["first-usable", "last-usable", "before-first", "past-last", "end-before-start"],
)
def test_gpt_partition_in_the_usable_area(image: Write, start: int, end: int, ok: bool) -> None:
    spec = Gpt(entries=[(100, 200, 0, "a"), (start, end, 0, "b")])
    fd, size = image(spec.blocks(), spec.size)
    if ok:
        assert gpt.read(fd, size).partitions[1].start_sector == start
    else:
        error = _refused(gpt.read, fd, size)
        assert error.message == "GPT partition 2 lies outside the usable area (LBA 34-2014)"


def test_gpt_too_small_for_a_header(image: Write) -> None:
    fd, size = image({0: Gpt().blocks()[0]}, 1023)
    error = _refused(gpt.read, fd, size)
    assert error.message == "the GPT is unreadable: the image is 1023 bytes, too small for a GPT header"


def test_gpt_in_an_image_of_two_sectors(image: Write) -> None:
    # Room for a header at LBA 1: it is read (and found missing), not refused for size.
    fd, size = image({0: Gpt().blocks()[0]}, 1024)
    assert _refused(gpt.read, fd, size).message == "the GPT is unreadable: no GPT header at LBA 1"


def test_gpt_of_4k_sectors_in_an_image_with_a_stray_byte(image: Write) -> None:
    spec = Gpt(sector=4096, sectors=256, first=6, last=250, entries=[(6, 250, 0, "data")])
    fd, size = image(spec.blocks(), spec.size + 1)
    assert gpt.read(fd, size).sector_size == 4096


def test_gpt_small_enough_for_one_sector_size(image: Write) -> None:
    # 8 sectors of 512 bytes: both headers tried and damaged, and no room for 4 KiB sectors.
    spec = Gpt(sectors=8, count=4, first=3, last=5, entries=[(3, 5, 0, "d")], break_header_crc=True)
    fd, size = image(spec.blocks(), spec.size)
    error = _refused(gpt.read, fd, size)
    assert error.message == "the GPT is unreadable: GPT header at LBA 1 fails its CRC32"
    assert error.hint == "primary and backup headers are both damaged"
    spec.break_header_crc = False
    fd, size = image(spec.blocks(), spec.size)
    assert [p.name for p in gpt.read(fd, size).partitions] == ["d"]


def test_gpt_backup_header_missing_or_damaged_is_a_warning(image: Write) -> None:
    spec = Gpt()
    fd, size = image(spec.blocks(backup=False), spec.size - 512)  # the last sector, with the backup, cut off
    table = gpt.read(fd, size)
    assert [p.name for p in table.partitions] == ["data"] and not table.from_backup
    assert table.warnings == (
        f"the image ends at {size} bytes, before its backup GPT header (LBA 2047): "
        "it was truncated (sgdisk -e or sfdisk --relocate gpt-bak-std repairs it)",
    )
    blocks = spec.blocks()
    blocks[(spec.sectors - 1) * 512] = bytes(512)
    fd, size = image(blocks, spec.size)
    table = gpt.read(fd, size)
    assert table.warnings == ("the backup GPT header is damaged (no GPT header at LBA 2047)",)
    assert [p.name for p in table.partitions] == ["data"]
