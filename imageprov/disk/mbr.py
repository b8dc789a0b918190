"""The MBR (DOS) partition table, extended partition and its EBR chain included."""

from __future__ import annotations

import struct

from imageprov.disk.table import EXTENDED_TYPES, Partition, PartitionTable, TableType, pread_exact
from imageprov.errors import TableError

SECTOR = 512
SIGNATURE = b"\x55\xaa"
_ENTRY = struct.Struct("<B3sB3sII")  # status, CHS first, type, CHS last, LBA, sectors
_ENTRIES_AT = 446
# A chain longer than this is a loop the visited-set did not catch or garbage;
# no real disk has anywhere near this many logical partitions.
_MAX_LOGICAL = 256


def _entries(sector: bytes) -> list[tuple[int, int, int, int]]:
    """(status, type, lba, sectors) of the four slots of a boot record."""
    out = []
    for i in range(4):
        status, _, ptype, _, lba, count = _ENTRY.unpack_from(sector, _ENTRIES_AT + 16 * i)
        out.append((status, ptype, lba, count))
    return out


def _sector0(fd: int) -> bytes:
    sector = pread_exact(fd, SECTOR, 0)
    if sector[510:512] != SIGNATURE:
        raise TableError(
            "no partition table: the MBR signature 0x55AA is missing",
            hint="is this a whole-disk image (.sdimg/.uefiimg), not a single partition?",
        )
    return sector


def is_protective(fd: int) -> bool:
    """True if sector 0 is a GPT protective MBR (a slot of type 0xEE)."""
    return any(ptype == 0xEE for _, ptype, _, _ in _entries(_sector0(fd)))


def read(fd: int, image_size: int) -> PartitionTable:
    """Read the MBR at sector 0 and follow the EBR chain of an extended partition."""
    sector = _sector0(fd)
    (disk_id,) = struct.unpack_from("<I", sector, 440)
    parts: list[Partition] = []
    extended: Partition | None = None
    for index, (status, ptype, lba, count) in enumerate(_entries(sector)):
        if ptype == 0 or count == 0:
            continue
        if status not in (0x00, 0x80):
            raise TableError(f"MBR slot {index + 1} has an invalid status byte 0x{status:02x}")
        part = Partition(
            number=index + 1,
            start_sector=lba,
            size_sectors=count,
            type=f"{ptype:x}",
            bootable=status == 0x80,
            is_extended=ptype in EXTENDED_TYPES,
        )
        if part.is_extended:
            if extended is not None:
                raise TableError("the MBR has two extended partitions")
            extended = part
        parts.append(part)
    if extended is not None:
        parts.extend(_logical(fd, extended, image_size))
    return PartitionTable(
        type=TableType.MBR,
        disk_id=f"0x{disk_id:08x}",
        sector_size=SECTOR,
        partitions=tuple(parts),
    )


def _logical(fd: int, extended: Partition, image_size: int) -> list[Partition]:
    """Walk the EBR chain: slot 1 is relative to its EBR, slot 2 to the extended partition."""
    logical: list[Partition] = []
    seen: set[int] = set()
    ebr_lba = extended.start_sector
    while True:
        if ebr_lba in seen or len(logical) > _MAX_LOGICAL:
            raise TableError("the EBR chain of the extended partition loops", hint="the table is corrupt")
        seen.add(ebr_lba)
        if ebr_lba * SECTOR + SECTOR > image_size:
            raise TableError(f"an EBR at sector {ebr_lba} lies past the end of the image")
        ebr = pread_exact(fd, SECTOR, ebr_lba * SECTOR)
        if ebr[510:512] != SIGNATURE:
            raise TableError(f"the EBR at sector {ebr_lba} has no 0x55AA signature", hint="the table is corrupt")
        (status, ptype, lba, count), (_, next_type, next_lba, _) = _entries(ebr)[:2]
        if ptype != 0 and count != 0:
            part = Partition(
                number=5 + len(logical),
                start_sector=ebr_lba + lba,
                size_sectors=count,
                type=f"{ptype:x}",
                bootable=status == 0x80,
            )
            if part.offset < extended.offset or part.end > extended.end:
                raise TableError(f"logical partition {part.number} lies outside its extended partition")
            logical.append(part)
        if next_type == 0 or next_lba == 0:
            return logical
        ebr_lba = extended.start_sector + next_lba
