"""Block maps: which byte ranges must be written, how they become blocks, and the XML bmaptool reads.

Layouts are built as values, files are small sparse files: fast enough to run
against every mutant of disk/bmap.py (scripts/mutants). test_integration.py
flashes real images with bmaptool.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from imageprov.disk.bmap import BLOCK, bmap_for, mapped_blocks, must_map, render
from imageprov.disk.layout import Layout, Role, Volume
from imageprov.disk.probe import Filesystem
from imageprov.disk.table import Partition, PartitionTable, TableType

MIB = 1 << 20


def _volume(number: int, start: int, size: int, filesystem: Filesystem, **kwargs: object) -> Volume:
    part = Partition(number=number, start_sector=start, size_sectors=size, type="83", **kwargs)  # type: ignore[arg-type]
    return Volume(part, filesystem, "", Role.OTHER)


def _layout(*volumes: Volume, kind: TableType = TableType.MBR, last_lba: int | None = None) -> Layout:
    table = PartitionTable(kind, "x", 512, tuple(v.partition for v in volumes), last_lba=last_lba)
    return Layout(table, volumes)


def test_mbr_gap_and_vfat_are_mapped() -> None:
    # Listed out of order: the gap ends at the first partition on the disk, not the first listed.
    layout = _layout(
        _volume(2, 40960, 2048, Filesystem.EXT4),
        _volume(1, 16384, 8192, Filesystem.VFAT),
        _volume(3, 65536, 2048, Filesystem.SWAP),
    )
    assert must_map(layout, 64 * MIB) == [(0, 16384 * 512), (16384 * 512, (16384 + 8192) * 512)]


def test_no_partitions_maps_the_whole_image() -> None:
    assert must_map(_layout(), 5 * MIB) == [(0, 5 * MIB)]


def test_ebrs_of_an_extended_partition_are_mapped() -> None:
    extended = _volume(4, 10000, 10000, Filesystem.UNKNOWN, is_extended=True)
    sixth = _volume(6, 15000, 1000, Filesystem.EXT4)
    fifth = _volume(5, 10002, 998, Filesystem.EXT4)
    layout = _layout(_volume(1, 2048, 2048, Filesystem.EXT4), extended, sixth, fifth)
    assert must_map(layout, 20 * MIB) == [(0, 2048 * 512), (10000 * 512, 10002 * 512), (11000 * 512, 15000 * 512)]


def test_gpt_backup_is_mapped() -> None:
    layout = _layout(_volume(1, 2048, 2048, Filesystem.EXT4), kind=TableType.GPT, last_lba=10000)
    assert must_map(layout, 6 * MIB) == [(0, 2048 * 512), (10001 * 512, 6 * MIB)]
    without = _layout(_volume(1, 2048, 2048, Filesystem.EXT4), kind=TableType.GPT)
    assert must_map(without, 6 * MIB) == [(0, 2048 * 512)]
    mbr = _layout(_volume(1, 2048, 2048, Filesystem.EXT4), last_lba=10000)  # only a GPT has a backup
    assert must_map(mbr, 6 * MIB) == [(0, 2048 * 512)]


def _sparse(path: Path, size: int, *data_at: int) -> Path:
    with open(path, "wb") as handle:
        handle.truncate(size)
        for offset in data_at:
            handle.seek(offset)
            handle.write(b"\x01" * BLOCK)
    return path


def test_mapped_blocks_merge_data_and_extras(tmp_path: Path) -> None:
    image = _sparse(tmp_path / "img", 64 * BLOCK, 2 * BLOCK, 3 * BLOCK, 10 * BLOCK, 40 * BLOCK)
    extras = [
        (0, 1),  # one byte: all of block 0 (block 1 stays a hole)
        (4 * BLOCK, 5 * BLOCK),  # adjacent to data in 2-3: merged
        (9 * BLOCK + 1, 10 * BLOCK),  # inside block 9, adjacent to 10
        (20 * BLOCK, 20 * BLOCK),  # empty: nothing
        (30 * BLOCK, 25 * BLOCK),  # backwards: nothing
        (38 * BLOCK, 41 * BLOCK),  # overlapping data at 40
        (63 * BLOCK, 100 * BLOCK),  # past the end: up to the end
        (64 * BLOCK, 70 * BLOCK),  # wholly past the end: nothing
    ]
    assert mapped_blocks(image, extras) == [(0, 0), (2, 4), (9, 10), (38, 40), (63, 63)]


def test_mapped_blocks_of_a_hole(tmp_path: Path) -> None:
    hole = _sparse(tmp_path / "img", 8 * BLOCK)
    assert mapped_blocks(hole, []) == []
    assert mapped_blocks(hole, [(8 * BLOCK, 9 * BLOCK)]) == []  # past the end: cut to nothing, not a block


def _bmap_fields(text: str) -> dict[str, str]:
    return dict(re.findall(r"<(\w+)> (.*?) </\1>", text))


def test_render(tmp_path: Path) -> None:
    image = tmp_path / "img"
    content = bytes(range(256)) * (5 * BLOCK // 256) + b"tail"  # 5 blocks and 4 bytes
    image.write_bytes(content)
    text = render(image, [(0, 0), (2, 2), (4, 5)]).decode()
    checksum = _bmap_fields(text)["BmapFileChecksum"]
    sums = [hashlib.sha256(part).hexdigest() for part in (content[:BLOCK], content[2 * BLOCK : 3 * BLOCK],
                                                             content[4 * BLOCK :])]  # fmt: skip
    # The whole file, as bmaptool's own files are laid out; the last block is partial.
    assert text == (
        '<?xml version="1.0" ?>\n'
        "<!-- Block map written by imageprov, for: bmaptool copy (with this file as its bmap) IMAGE DEVICE -->\n"
        '<bmap version="2.0">\n'
        f"    <ImageSize> {len(content)} </ImageSize>\n"
        f"    <BlockSize> {BLOCK} </BlockSize>\n"
        "    <BlocksCount> 6 </BlocksCount>\n"
        "    <MappedBlocksCount> 4 </MappedBlocksCount>\n"
        "    <ChecksumType> sha256 </ChecksumType>\n"
        f"    <BmapFileChecksum> {checksum} </BmapFileChecksum>\n"
        "    <BlockMap>\n"
        f'        <Range chksum="{sums[0]}"> 0 </Range>\n'
        f'        <Range chksum="{sums[1]}"> 2 </Range>\n'
        f'        <Range chksum="{sums[2]}"> 4-5 </Range>\n'
        "    </BlockMap>\n"
        "</bmap>\n"
    )
    # The file's checksum is taken with its own field all zeros (bmap format 2.0).
    assert hashlib.sha256(text.replace(checksum, "0" * 64).encode()).hexdigest() == checksum


def test_render_a_range_larger_than_a_read(tmp_path: Path) -> None:
    image = tmp_path / "img"
    content = os.urandom(MIB + 1)  # read in pieces of 1 MiB: one byte is left for a second read
    image.write_bytes(content)
    text = render(image, [(0, MIB // BLOCK)]).decode()
    assert f'<Range chksum="{hashlib.sha256(content).hexdigest()}"> 0-{MIB // BLOCK} </Range>' in text


def test_bmap_for_an_image(tmp_path: Path) -> None:
    image = _sparse(tmp_path / "img", 32 * BLOCK, 20 * BLOCK)
    layout = _layout(_volume(1, 8 * BLOCK // 512, 8 * BLOCK // 512, Filesystem.VFAT))
    fields = _bmap_fields(bmap_for(image, layout).decode())
    assert fields["MappedBlocksCount"] == str(16 + 1)  # gap 0-7, vfat 8-15, data at 20
    gpt = _layout(_volume(1, 8 * BLOCK // 512, 8 * BLOCK // 512, Filesystem.EXT4), kind=TableType.GPT,
                  last_lba=24 * BLOCK // 512 - 1)  # fmt: skip
    fields = _bmap_fields(bmap_for(image, gpt).decode())
    assert fields["MappedBlocksCount"] == str(8 + 1 + 8)  # gap 0-7, data at 20, the backup GPT in 24-31
