"""Which filesystem a partition holds, read from the filesystem's own signature.

The partition type byte or GUID says what a partition was meant for; the
superblock says what is really there, and debugfs or pyfatfs must be pointed
only at what they can open.
"""

from __future__ import annotations

import enum
import os
import struct
from dataclasses import dataclass

from imageprov.disk.table import Partition

EXT_MAGIC = 0xEF53
_EXT_INCOMPAT_EXTENTS = 0x40
_EXT_INCOMPAT_64BIT = 0x80
_EXT_INCOMPAT_FLEX_BG = 0x200
_EXT_COMPAT_JOURNAL = 0x4


class Filesystem(enum.Enum):
    EXT4 = "ext4"
    EXT3 = "ext3"
    EXT2 = "ext2"
    VFAT = "vfat"
    SWAP = "swap"
    # Filesystems meta-mender can build that imageprov reads (squashfs, a
    # read-only rootfs) or names when it refuses them (btrfs, f2fs data).
    SQUASHFS = "squashfs"
    BTRFS = "btrfs"
    F2FS = "f2fs"
    # Zeros where every filesystem keeps its signature: a partition never
    # formatted (meta-mender can leave rootfs B so until the first update).
    EMPTY = "empty"
    UNKNOWN = "unknown"

    @property
    def is_ext(self) -> bool:
        return self in (Filesystem.EXT2, Filesystem.EXT3, Filesystem.EXT4)


@dataclass(frozen=True)
class Probe:
    filesystem: Filesystem
    label: str = ""
    # Bytes the filesystem says it spans; 0 when unknown.
    size: int = 0


def probe(fd: int, part: Partition) -> Probe:
    """Identify the filesystem at the start of ``part``."""
    return probe_at(fd, part.offset, part.size)


def probe_at(fd: int, offset: int, size: int) -> Probe:
    """Identify the filesystem at byte ``offset`` of an image, in a region of ``size`` bytes."""
    head = os.pread(fd, min(size, 8192), offset)
    found = _ext(head) or _fat(head) or _swap(head) or _squashfs(head) or _f2fs(head)
    if found is None and size > _BTRFS_SUPER + 4096:
        # btrfs leaves its first 64 KiB to boot loaders: zeros there are not yet "empty".
        found = _btrfs(os.pread(fd, 4096, offset + _BTRFS_SUPER))
    if found is None and head and not any(head):
        return Probe(Filesystem.EMPTY)
    return found or Probe(Filesystem.UNKNOWN)


def _squashfs(head: bytes) -> Probe | None:
    # The superblock's magic "hsqs" and, at 40, the bytes the filesystem uses.
    if head[:4] != b"hsqs" or len(head) < 48:
        return None
    return Probe(Filesystem.SQUASHFS, "", struct.unpack_from("<Q", head, 40)[0])


def _f2fs(head: bytes) -> Probe | None:
    if len(head) < 1028 or struct.unpack_from("<I", head, 1024)[0] != 0xF2F52010:
        return None
    return Probe(Filesystem.F2FS)


# btrfs keeps its superblock at 64 KiB, its magic 64 bytes in and its label at 0x12b.
_BTRFS_SUPER = 0x10000


def _btrfs(super_block: bytes) -> Probe | None:
    if super_block[0x40:0x48] != b"_BHRfS_M":
        return None
    return Probe(Filesystem.BTRFS, _text(super_block[0x12B : 0x12B + 256]))


def _ext(head: bytes) -> Probe | None:
    sb = head[1024:2048]
    if len(sb) < 1024 or struct.unpack_from("<H", sb, 56)[0] != EXT_MAGIC:
        return None
    blocks_lo, log_block = struct.unpack_from("<I", sb, 4)[0], struct.unpack_from("<I", sb, 24)[0]
    compat, incompat = struct.unpack_from("<I", sb, 92)[0], struct.unpack_from("<I", sb, 96)[0]
    blocks_hi = struct.unpack_from("<I", sb, 336)[0] if incompat & _EXT_INCOMPAT_64BIT else 0
    if log_block > 6:  # block sizes go from 1 KiB to 64 KiB
        return None
    if incompat & (_EXT_INCOMPAT_EXTENTS | _EXT_INCOMPAT_64BIT | _EXT_INCOMPAT_FLEX_BG):
        kind = Filesystem.EXT4
    elif compat & _EXT_COMPAT_JOURNAL:
        kind = Filesystem.EXT3
    else:
        kind = Filesystem.EXT2
    size = ((blocks_hi << 32) | blocks_lo) * (1024 << log_block)
    return Probe(kind, _text(sb[120:136]), size)


def _fat(head: bytes) -> Probe | None:
    bs = head[:512]
    if len(bs) < 512 or bs[510:512] != b"\x55\xaa" or bs[0] not in (0xEB, 0xE9):
        return None
    bytes_per_sector, sectors_per_cluster = struct.unpack_from("<HB", bs, 11)
    if bytes_per_sector not in (512, 1024, 2048, 4096) or sectors_per_cluster == 0:
        return None
    if sectors_per_cluster & (sectors_per_cluster - 1):
        return None
    total16, fat16_size = struct.unpack_from("<H", bs, 19)[0], struct.unpack_from("<H", bs, 22)[0]
    total32 = struct.unpack_from("<I", bs, 32)[0]
    # FAT32 has a zero 16-bit FAT size and keeps its label further on.
    label = bs[71:82] if fat16_size == 0 else bs[43:54]
    sectors = total16 or total32
    text = _text(label)
    return Probe(Filesystem.VFAT, "" if text == "NO NAME" else text, sectors * bytes_per_sector)


def _swap(head: bytes) -> Probe | None:
    if head[4086:4096] in (b"SWAPSPACE2", b"SWAP-SPACE"):
        return Probe(Filesystem.SWAP, _text(head[1024 + 28 : 1024 + 44]))
    return None


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace").strip()
