"""Block maps in the bmap format (version 2.0) that ``bmaptool copy`` reads.

A flashing station writes only the mapped blocks, so what is left out keeps
whatever the card held before. Holes in an ext4 filesystem are unused blocks
and may hold anything; but the partition tables, the gaps that hold EBRs and
boot loaders, and the whole vfat boot partition must read exactly as in the
image, so they are mapped whether or not the image file has data there.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from imageprov.disk.copy import data_ranges
from imageprov.disk.layout import Layout
from imageprov.disk.probe import Filesystem
from imageprov.disk.table import TableType

BLOCK = 4096


def must_map(layout: Layout, image_size: int) -> list[tuple[int, int]]:
    """Byte ranges that must be written even where the image file has holes."""
    table = layout.table
    parts = sorted(table.partitions, key=lambda p: p.offset)
    ranges = [(0, min((p.offset for p in parts), default=image_size))]  # MBR/GPT, boot loader gap
    extended = next((p for p in parts if p.is_extended), None)
    if extended is not None:
        # Each logical partition's EBR sits in the gap before it.
        cursor = extended.offset
        for logical in (p for p in parts if p.number >= 5):
            ranges.append((cursor, logical.offset))
            cursor = logical.end
    if table.type is TableType.GPT and table.last_lba is not None:
        ranges.append(((table.last_lba + 1) * table.sector_size, image_size))  # backup entries and header
    for volume in layout.volumes:
        if volume.filesystem is Filesystem.VFAT:
            ranges.append((volume.partition.offset, volume.partition.end))
    return ranges


def mapped_blocks(path: Path, extra: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Inclusive block ranges holding data or named in ``extra``, merged."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        spans = list(data_ranges(fd, size)) + [(s, min(e, size)) for s, e in extra if s < e]
    finally:
        os.close(fd)
    blocks = sorted((s // BLOCK, (e - 1) // BLOCK) for s, e in spans if e > s)
    merged: list[tuple[int, int]] = []
    for first, last in blocks:
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return merged


def render(path: Path, ranges: list[tuple[int, int]]) -> bytes:
    """The bmap XML for the image at ``path`` with its mapped ``ranges`` checksummed."""
    size = path.stat().st_size
    lines = []
    with open(path, "rb") as image:
        for first, last in ranges:
            digest = hashlib.sha256()
            image.seek(first * BLOCK)
            left = min((last + 1) * BLOCK, size) - first * BLOCK
            while left > 0:
                chunk = image.read(min(left, 1 << 20))
                if not chunk:
                    break
                digest.update(chunk)
                left -= len(chunk)
            span = f"{first}" if first == last else f"{first}-{last}"
            lines.append(f'        <Range chksum="{digest.hexdigest()}"> {span} </Range>')
    mapped = sum(last - first + 1 for first, last in ranges)
    text = "\n".join(
        [
            '<?xml version="1.0" ?>',
            "<!-- Block map written by imageprov, for: bmaptool copy (with this file as its bmap) IMAGE DEVICE -->",
            '<bmap version="2.0">',
            f"    <ImageSize> {size} </ImageSize>",
            f"    <BlockSize> {BLOCK} </BlockSize>",
            f"    <BlocksCount> {-(-size // BLOCK)} </BlocksCount>",
            f"    <MappedBlocksCount> {mapped} </MappedBlocksCount>",
            "    <ChecksumType> sha256 </ChecksumType>",
            f"    <BmapFileChecksum> {'0' * 64} </BmapFileChecksum>",
            "    <BlockMap>",
            *lines,
            "    </BlockMap>",
            "</bmap>",
            "",
        ]
    )
    # The file's own checksum is taken with its field all zeros (bmap format 2.0).
    checksum = hashlib.sha256(text.encode()).hexdigest()
    return text.replace("0" * 64, checksum, 1).encode()


def bmap_for(path: Path, layout: Layout) -> bytes:
    """The bmap of the disk image at ``path``, laid out as ``layout``."""
    return render(path, mapped_blocks(path, must_map(layout, path.stat().st_size)))
