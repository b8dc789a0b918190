"""Disk structures written byte by byte from their specs, for tests of the pure readers."""

from __future__ import annotations

import struct
from pathlib import Path


def slot(ptype: int, lba: int, count: int, status: int = 0) -> bytes:
    """One 16-byte slot of an MBR or EBR (CHS fields left zero, as Linux ignores them)."""
    return struct.pack("<B3sB3sII", status, b"\0" * 3, ptype, b"\0" * 3, lba, count)


def boot_record(*slots: bytes, disk_id: int = 0, signature: bytes = b"\x55\xaa") -> bytes:
    """A 512-byte MBR or EBR holding ``slots``."""
    sector = bytearray(512)
    struct.pack_into("<I", sector, 440, disk_id)
    for index, slot in enumerate(slots):
        sector[446 + 16 * index : 446 + 16 * (index + 1)] = slot
    sector[510:512] = signature
    return bytes(sector)


def ext_superblock(label: str, *, blocks: int = 1024, log_block: int = 0, incompat: int = 0x40) -> bytes:
    """The first 2 KiB of an ext filesystem: its superblock at 1024 (ext4's extents flag by default)."""
    head = bytearray(2048)
    struct.pack_into("<I", head, 1024 + 4, blocks)
    struct.pack_into("<I", head, 1024 + 24, log_block)
    struct.pack_into("<HH", head, 1024 + 56, 0xEF53, 1)  # magic, state: cleanly unmounted
    struct.pack_into("<I", head, 1024 + 96, incompat)
    head[1024 + 120 : 1024 + 120 + len(label)] = label.encode()
    return bytes(head)


def fat_boot_sector(label: str, *, sectors: int = 2048) -> bytes:
    """A FAT16 boot sector: jump, 512-byte sectors, one per cluster, size and label."""
    sector = bytearray(512)
    sector[0] = 0xEB
    struct.pack_into("<HB", sector, 11, 512, 1)
    struct.pack_into("<H", sector, 19, sectors)
    struct.pack_into("<H", sector, 22, 8)  # FAT16: a 16-bit FAT size
    sector[43:54] = label.encode().ljust(11)
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def swap_header(label: str = "") -> bytes:
    """The first page of a Linux swap area (mkswap's version-1 signature)."""
    page = bytearray(4096)
    page[1024 + 28 : 1024 + 28 + len(label)] = label.encode()
    page[4086:4096] = b"SWAPSPACE2"
    return bytes(page)


def write_image(path: Path, blocks: dict[int, bytes], size: int) -> Path:
    """A sparse file of ``size`` bytes holding each ``blocks`` value at its offset."""
    with open(path, "wb") as handle:
        handle.truncate(size)
        for offset, data in blocks.items():
            handle.seek(offset)
            handle.write(data)
    return path
