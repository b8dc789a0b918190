"""The partition table reader, field by field against sfdisk --json, and its refusals."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from imageprov.disk.golden import Scheme
from imageprov.disk.partitions import read_table
from imageprov.disk.table import TableType
from imageprov.errors import TableError
from tests.conftest import sfdisk_json, tool


def _compare_with_sfdisk(image: Path) -> None:
    theirs = sfdisk_json(image)
    ours = read_table(image)
    assert ours.type.value == theirs["label"]
    assert ours.sector_size == theirs["sectorsize"]
    if ours.type is TableType.GPT:
        assert ours.disk_id == theirs["id"]
        assert (ours.first_lba, ours.last_lba) == (theirs["firstlba"], theirs["lastlba"])
    else:
        assert ours.disk_id == theirs["id"]
    assert len(ours.partitions) == len(theirs["partitions"])
    for mine, part in zip(ours.partitions, theirs["partitions"]):
        assert f"{image}{mine.number}" == part["node"]
        assert mine.start_sector == part["start"]
        assert mine.size_sectors == part["size"]
        assert mine.type == part["type"]
        assert mine.bootable == part.get("bootable", False)
        if ours.type is TableType.GPT:
            assert mine.uuid == part["uuid"]
            assert mine.name == part.get("name", "")
            assert mine.attributes == _gpt_attrs(part.get("attrs", ""))


def _gpt_attrs(text: str) -> int:
    value = 0
    for word in text.split():
        if word == "RequiredPartition":
            value |= 1
        elif word == "NoBlockIOProtocol":
            value |= 2
        elif word == "LegacyBIOSBootable":
            value |= 4
        elif word.startswith("GUID:"):
            for bit in word[5:].split(","):
                value |= 1 << int(bit)
    return value


@pytest.mark.parametrize("scheme", list(Scheme), ids=[s.value for s in Scheme])
def test_table_matches_sfdisk(make_golden: Callable[..., Path], scheme: Scheme) -> None:
    _compare_with_sfdisk(make_golden(scheme))


def _sfdisk(tmp_path: Path, script: str, size_mib: int = 64) -> Path:
    image = tmp_path / "disk.img"
    with open(image, "wb") as handle:
        handle.truncate(size_mib << 20)
    tool("sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", image, input=script.encode())
    return image


def test_many_logical_partitions_match_sfdisk(tmp_path: Path) -> None:
    script = "label: dos\n" + "size=4MiB, type=83\n" * 3 + "type=5\n" + "size=3MiB, type=83\n" * 5
    image = _sfdisk(tmp_path, script)
    _compare_with_sfdisk(image)
    assert [p.number for p in read_table(image).partitions] == [1, 2, 3, 4, 5, 6, 7, 8, 9]


def test_gpt_names_attributes_and_odd_types_match_sfdisk(tmp_path: Path) -> None:
    script = (
        "label: gpt\n"
        'size=4MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="EFI system", attrs=RequiredPartition\n'
        'size=4MiB, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=rootfs-ä, attrs="GUID:60,63"\n'
        "size=4MiB, type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F\n"
    )
    _compare_with_sfdisk(_sfdisk(tmp_path, script))


def test_missing_signature_is_refused(make_golden: Callable[..., Path]) -> None:
    image = make_golden(Scheme.MBR)
    with open(image, "r+b") as handle:
        handle.seek(510)
        handle.write(b"\0\0")
    with pytest.raises(TableError, match="0x55AA"):
        read_table(image)


def test_partition_past_end_of_file_is_refused(make_golden: Callable[..., Path]) -> None:
    image = make_golden(Scheme.MBR)
    with open(image, "r+b") as handle:
        handle.truncate(100 << 20)
    with pytest.raises(TableError, match="past the end"):
        read_table(image)


def test_overlapping_partitions_are_refused(make_golden: Callable[..., Path]) -> None:
    image = make_golden(Scheme.MBR)
    with open(image, "r+b") as handle:
        handle.seek(446 + 16 * 2 + 8)  # partition 3's start LBA
        (start,) = struct.unpack("<I", handle.read(4))
        handle.seek(446 + 16 * 2 + 8)
        handle.write(struct.pack("<I", start - 2048))
    with pytest.raises(TableError, match="overlap"):
        read_table(image)


def test_ebr_loop_is_refused(make_golden: Callable[..., Path]) -> None:
    image = make_golden(Scheme.MBR_EXTENDED)
    extended = next(p for p in read_table(image).partitions if p.is_extended)
    # Follow the first EBR's link to the second EBR, then make the second
    # link to itself: a chain that never ends.
    with open(image, "r+b") as handle:
        handle.seek(extended.offset + 446 + 16 + 8)
        (link,) = struct.unpack("<I", handle.read(4))
        handle.seek((extended.start_sector + link) * 512 + 446 + 16)
        handle.write(struct.pack("<B3sB3sII", 0, b"\0" * 3, 5, b"\0" * 3, link, 2048))
    with pytest.raises(TableError, match="loops"):
        read_table(image)


def _corrupt(image: Path, offset: int) -> None:
    with open(image, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))


def test_damaged_primary_gpt_falls_back_to_backup(make_golden: Callable[..., Path]) -> None:
    image = make_golden(Scheme.GPT)
    before = read_table(image)
    _corrupt(image, 512 + 0x38)  # inside the disk GUID: the header CRC no longer matches
    after = read_table(image)
    assert after.from_backup and after.warnings
    assert after.partitions == before.partitions
    # sfdisk, too, reads the backup and agrees.
    assert [p["start"] for p in sfdisk_json(image)["partitions"]] == [p.start_sector for p in after.partitions]


def test_damaged_entry_array_falls_back_to_backup(make_golden: Callable[..., Path]) -> None:
    image = make_golden(Scheme.GPT)
    before = read_table(image)
    _corrupt(image, 1024 + 40)  # first entry's start LBA: the array CRC no longer matches
    assert read_table(image).partitions == before.partitions


def test_both_gpt_headers_damaged_is_refused(make_golden: Callable[..., Path]) -> None:
    image = make_golden(Scheme.GPT)
    size = image.stat().st_size
    _corrupt(image, 512 + 0x38)
    _corrupt(image, size - 512 + 0x38)
    with pytest.raises(TableError, match="CRC32"):
        read_table(image)
