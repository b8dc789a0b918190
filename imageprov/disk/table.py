"""Partition tables: the data model shared by the MBR and GPT readers.

Pure Python over ``os.pread``: nothing here needs root, a loop device or a
tool, so it runs the same on a build host and on a flashing station.
"""

from __future__ import annotations

import enum
import itertools
import os
from dataclasses import dataclass, field

from imageprov.errors import TableError


class TableType(enum.Enum):
    MBR = "dos"  # the names sfdisk --json uses for "label"
    GPT = "gpt"
    # A bare filesystem image (a build's rootfs.ext4 or .dataimg): one
    # filesystem at offset 0, no table, as mender-artifact also accepts.
    NONE = "none"


# MBR partition types that hold a chain of EBRs rather than a filesystem.
EXTENDED_TYPES = frozenset({0x05, 0x0F, 0x85})


@dataclass(frozen=True)
class Partition:
    """One partition, numbered as Linux numbers it (logical MBR partitions from 5)."""

    number: int
    start_sector: int
    size_sectors: int
    # MBR: the type byte as lowercase hex without leading zero ("c", "83"),
    # as sfdisk prints it; GPT: the uppercase type GUID.
    type: str
    sector_size: int = 512
    bootable: bool = False
    uuid: str | None = None
    name: str | None = None
    attributes: int = 0
    is_extended: bool = False

    @property
    def offset(self) -> int:
        """Byte offset of the partition inside the image."""
        return self.start_sector * self.sector_size

    @property
    def size(self) -> int:
        """Size of the partition in bytes."""
        return self.size_sectors * self.sector_size

    @property
    def end(self) -> int:
        """Byte offset just past the partition."""
        return self.offset + self.size


@dataclass(frozen=True)
class PartitionTable:
    type: TableType
    disk_id: str
    sector_size: int
    partitions: tuple[Partition, ...]
    # GPT only: the usable LBA range, and whether the primary header was
    # damaged and the backup header was read instead.
    first_lba: int | None = None
    last_lba: int | None = None
    from_backup: bool = False
    warnings: tuple[str, ...] = field(default=())

    def partition(self, number: int) -> Partition:
        """The partition with Linux number ``number``."""
        for part in self.partitions:
            if part.number == number:
                return part
        raise TableError(f"the image has no partition {number}", hint=f"partitions: {self.numbers()}")

    def numbers(self) -> str:
        return ", ".join(str(p.number) for p in self.partitions) or "none"

    @property
    def filesystem_partitions(self) -> tuple[Partition, ...]:
        """Partitions that can hold data (the MBR extended container left out)."""
        return tuple(p for p in self.partitions if not p.is_extended)


def check_bounds(partitions: tuple[Partition, ...], image_size: int) -> None:
    """Refuse partitions past the end of the image and partitions that overlap."""
    for part in partitions:
        if part.size_sectors == 0:
            raise TableError(f"partition {part.number} is empty (0 sectors)")
        if part.end > image_size:
            raise TableError(
                f"partition {part.number} ends at byte {part.end}, past the end of the image ({image_size} bytes)",
                hint="the image is truncated or the table is corrupt",
            )
    # The extended container overlaps its logical partitions by design.
    data = sorted((p for p in partitions if not p.is_extended), key=lambda p: p.offset)
    for left, right in itertools.pairwise(data):
        if right.offset < left.end:
            raise TableError(f"partitions {left.number} and {right.number} overlap", hint="the table is corrupt")


def pread_exact(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise TableError(f"the image ends at byte {offset + len(data)} while reading its partition table")
    return data
