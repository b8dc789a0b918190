"""The GUID partition table (UEFI spec 2.10, section 5.3).

The primary header is at LBA 1 and its backup at the last LBA. Both carry a
CRC32 of themselves and of the partition entry array; we check both and fall
back to the backup when the primary is damaged, as firmware does.
"""

from __future__ import annotations

import dataclasses
import struct
import uuid
import zlib

from imageprov.disk.table import Partition, PartitionTable, TableType, pread_exact
from imageprov.errors import TableError

SIGNATURE = b"EFI PART"
_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
_ENTRY = struct.Struct("<16s16sQQQ72s")
# The spec's minimum array size is 16 KiB; anything far beyond 128 entries of
# 128 bytes is a corrupt header, and we refuse rather than read gigabytes.
_MAX_ARRAY = 1 << 20


def _try_header(fd: int, lba: int, sector: int) -> tuple[PartitionTable | None, str]:
    """Parse the header at ``lba``; (table, "") or (None, why it is unusable)."""
    raw = pread_exact(fd, sector, lba * sector)
    (
        sig,
        _rev,
        hsize,
        hcrc,
        _res,
        current,
        _backup,
        first,
        last,
        disk_guid,
        entries_lba,
        count,
        entry_size,
        entries_crc,
    ) = _HEADER.unpack_from(raw)
    if sig != SIGNATURE:
        return None, f"no GPT header at LBA {lba}"
    if not 92 <= hsize <= sector:
        return None, f"GPT header at LBA {lba} has an invalid size {hsize}"
    zeroed = raw[:16] + b"\0\0\0\0" + raw[20:hsize]
    if zlib.crc32(zeroed) != hcrc:
        return None, f"GPT header at LBA {lba} fails its CRC32"
    if current != lba:
        return None, f"GPT header at LBA {lba} says it is at LBA {current}"
    if entry_size < 128 or entry_size % 8 or count * entry_size > _MAX_ARRAY:
        return None, f"GPT header at LBA {lba} describes an invalid entry array"
    array = pread_exact(fd, count * entry_size, entries_lba * sector)
    if zlib.crc32(array) != entries_crc:
        return None, f"GPT partition entry array of the header at LBA {lba} fails its CRC32"
    parts = []
    for index in range(count):
        type_guid, part_guid, start, end, attrs, name = _ENTRY.unpack_from(array, index * entry_size)
        if type_guid == bytes(16):
            continue
        if end < start or start < first or end > last:
            raise TableError(f"GPT partition {index + 1} lies outside the usable area (LBA {first}-{last})")
        parts.append(
            Partition(
                number=index + 1,
                start_sector=start,
                size_sectors=end - start + 1,
                type=str(uuid.UUID(bytes_le=type_guid)).upper(),
                sector_size=sector,
                uuid=str(uuid.UUID(bytes_le=part_guid)).upper(),
                name=name.decode("utf-16-le").split("\0", 1)[0],
                attributes=attrs,
            )
        )
    table = PartitionTable(
        type=TableType.GPT,
        disk_id=str(uuid.UUID(bytes_le=disk_guid)).upper(),
        sector_size=sector,
        partitions=tuple(parts),
        first_lba=first,
        last_lba=last,
    )
    return table, ""


def _check_backup(fd: int, image_size: int, sector: int, table: PartitionTable) -> PartitionTable:
    """Warn about a missing or damaged backup header: firmware and sgdisk rely on it when the primary fails."""
    alternate = _HEADER.unpack_from(pread_exact(fd, sector, sector))[6]
    if (alternate + 1) * sector > image_size:
        warning = (
            f"the image ends at {image_size} bytes, before its backup GPT header (LBA {alternate}): "
            "it was truncated (sgdisk -e or sfdisk --relocate gpt-bak-std repairs it)"
        )
    else:
        backup, why = _try_header(fd, alternate, sector)
        if backup is not None:
            return table
        warning = f"the backup GPT header is damaged ({why})"
    return dataclasses.replace(table, warnings=(*table.warnings, warning))


def read(fd: int, image_size: int) -> PartitionTable:
    """Read the GPT behind a protective MBR, from the backup header if the primary is damaged."""
    problems = [f"the image is {image_size} bytes, too small for a GPT header"] if image_size < 1024 else []
    # 512-byte sectors for image files; 4096 for images of 4Kn media.
    for sector in (512, 4096):
        if image_size < 2 * sector:
            continue
        table, why = _try_header(fd, 1, sector)
        if table is not None:
            return _check_backup(fd, image_size, sector, table)
        problems.append(why)
        if image_size % sector:
            continue
        backup, why_backup = _try_header(fd, image_size // sector - 1, sector)
        if backup is not None:
            warning = f"primary GPT header damaged ({why}); read the backup header"
            return PartitionTable(
                type=backup.type,
                disk_id=backup.disk_id,
                sector_size=backup.sector_size,
                partitions=backup.partitions,
                first_lba=backup.first_lba,
                last_lba=backup.last_lba,
                from_backup=True,
                warnings=(warning,),
            )
        problems.append(why_backup)
    raise TableError(
        f"the GPT is unreadable: {problems[0]}",
        hint="primary and backup headers are both damaged" if len(problems) > 1 else "",
    )
