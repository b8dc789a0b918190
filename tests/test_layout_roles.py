"""Mender roles from tables and filesystem signatures written byte by byte: every rule and refusal, exactly.

test_layout.py checks roles on images made by real tools; these are small
and fast enough to run against every mutant of disk/layout.py (scripts/mutants).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from imageprov.disk.layout import Overrides, Role, read_layout
from imageprov.disk.probe import Filesystem
from imageprov.disk.table import PartitionTable, TableType
from imageprov.errors import LayoutError
from tests.disk_bytes import boot_record, ext_superblock, fat_boot_sector, slot, swap_header, write_image

PART = 2048  # sectors per partition: 1 MiB
ALL = "1, 2, 3, 4, 5, 6, 7"
HINT = "name them with --rootfs-parts A,B and --data-part N"


def _image(
    path: Path, *, first: bytes | None = None, fifth: bytes = b"", fifth_type: int = 0x82, seventh: bytes = b""
) -> Path:
    """boot vfat 1, rootfs 2 and 3, extended 4 holding 5 (swap by type), data 6 and 7 (nothing by default)."""
    blocks = {
        0: boot_record(
            slot(0x0C, PART, PART),
            slot(0x83, 2 * PART, PART),
            slot(0x83, 3 * PART, PART),
            slot(0x05, 4 * PART, 3 * PART),
        ),
        PART * 512: fat_boot_sector("BOOT") if first is None else first,
        2 * PART * 512: ext_superblock("rootfs-a"),
        3 * PART * 512: ext_superblock("rootfs-b", log_block=2, blocks=256),
    }
    for index, (ptype, content) in enumerate(((fifth_type, fifth), (0x83, ext_superblock("data")), (0x83, seventh))):
        ebr = (4 + index) * PART
        links = [slot(0x05, (index + 1) * PART, PART)] if index < 2 else []
        blocks[ebr * 512] = boot_record(slot(ptype, 8, PART - 8), *links)
        if content:
            blocks[(ebr + 8) * 512] = content
    return write_image(path, blocks, 7 * PART * 512)


@pytest.fixture
def image(tmp_path: Path) -> Callable[..., Path]:
    return lambda **kwargs: _image(tmp_path / f"layout-{len(list(tmp_path.iterdir()))}.img", **kwargs)


def _roles(path: Path, overrides: Overrides | None = None) -> dict[int, str]:
    return {v.partition.number: v.role.value for v in read_layout(path, overrides).volumes}


def _refused(path: Path, overrides: Overrides) -> LayoutError:
    """Why the roles cannot be read: raised at once for overrides that do not fit; without overrides, kept
    for the image's own files to settle (disk/confirm.py), every role but boot and swap left open."""
    if overrides != Overrides():
        with pytest.raises(LayoutError) as info:
            read_layout(path, overrides)
        return info.value
    layout = read_layout(path, overrides)
    assert layout.unresolved is not None
    assert {v.role for v in layout.volumes} <= {Role.BOOT, Role.SWAP, Role.EXTENDED, Role.OTHER}
    return layout.unresolved


def test_roles_found_from_the_filesystems(image: Callable[..., Path]) -> None:
    layout = read_layout(image())
    assert {v.partition.number: v.role for v in layout.volumes} == {
        1: Role.BOOT, 2: Role.ROOTFS_A, 3: Role.ROOTFS_B, 4: Role.EXTENDED, 5: Role.SWAP, 6: Role.DATA, 7: Role.OTHER,
    }  # fmt: skip
    assert [(v.filesystem, v.label, v.filesystem_size) for v in layout.volumes] == [
        (Filesystem.VFAT, "BOOT", PART * 512),
        (Filesystem.EXT4, "rootfs-a", 1024 * 1024),
        (Filesystem.EXT4, "rootfs-b", 256 * 4096),
        (Filesystem.UNKNOWN, "", 0),  # the extended container is not probed
        (Filesystem.EMPTY, "", 0),  # swap by its type alone: mkswap runs on the device
        (Filesystem.EXT4, "data", 1024 * 1024),
        (Filesystem.EMPTY, "", 0),
    ]
    assert layout.table.type is TableType.MBR and [p.number for p in layout.table.partitions] == [1, 2, 3, 4, 5, 6, 7]
    assert layout.boot_partition is layout.volumes[0]
    assert [v.partition.number for v in layout.rootfs_partitions] == [2, 3]
    assert layout.data_partition.partition.number == 6


def test_swap_by_its_signature_whatever_its_type(image: Callable[..., Path]) -> None:
    layout = read_layout(image(fifth=swap_header("swap"), fifth_type=0x83))
    swap = layout.volumes[4]
    assert (swap.role, swap.filesystem, swap.label) == (Role.SWAP, Filesystem.SWAP, "swap")


def test_an_empty_rootfs_b_may_be_named(image: Callable[..., Path]) -> None:
    # A fresh build leaves rootfs B empty until the first update: naming it is fine, naming it for A is not.
    roles = _roles(image(), Overrides(rootfs_parts=(2, 5), data_part=6))
    assert (roles[2], roles[5], roles[6], roles[3]) == ("rootfs-a", "rootfs-b", "data", "other")


def test_boot_override_picks_another_vfat(image: Callable[..., Path]) -> None:
    path = image(seventh=fat_boot_sector("ESP"))
    assert _roles(path)[1] == "boot" and _roles(path)[7] == "other"
    roles = _roles(path, Overrides(boot_part=7))
    assert (roles[7], roles[1]) == ("boot", "other")


def test_no_vfat_no_boot_partition(image: Callable[..., Path]) -> None:
    path = image(first=b"\0" * 512)
    layout = read_layout(path)
    assert layout.boot_partition is None
    assert _roles(path)[1] == "other"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (Overrides(data_part=2), {2: "data", 3: "rootfs-a", 6: "rootfs-b"}),
        (Overrides(rootfs_parts=(6, 2)), {6: "rootfs-a", 2: "rootfs-b", 3: "data"}),
        (
            Overrides(data_part=3, rootfs_parts=(6, 2), boot_part=1),
            {6: "rootfs-a", 2: "rootfs-b", 3: "data", 1: "boot"},
        ),
    ],
    ids=["data", "rootfs", "all"],
)
def test_overrides_name_roles(image: Callable[..., Path], overrides: Overrides, expected: dict[int, str]) -> None:
    roles = _roles(image(), overrides)
    assert {n: roles[n] for n in expected} == expected
    assert list(roles.values()).count("data") == 1 and list(roles.values()).count("rootfs-a") == 1


def test_four_ext_partitions_need_overrides(image: Callable[..., Path]) -> None:
    path = image(seventh=ext_superblock("extra"))
    seen = "(1: vfat, 2: ext4, 3: ext4, 5: empty, 6: ext4, 7: ext4)"
    error = _refused(path, Overrides())
    assert error.message == (
        f"cannot read the layout as boot + rootfs A + rootfs B + data: "
        f"4 ext partitions, not the 3 of rootfs A, rootfs B and data {seen}"
    )
    assert error.hint == HINT
    error = _refused(path, Overrides(data_part=7))
    assert error.message.endswith(f": 3 ext partitions besides data, not the 2 rootfs {seen}") and error.hint == HINT
    error = _refused(path, Overrides(rootfs_parts=(2, 3)))
    assert error.message.endswith(f": 2 ext partitions besides the rootfs, not 1 data partition {seen}")
    assert error.hint == HINT
    roles = _roles(path, Overrides(data_part=7, rootfs_parts=(3, 2)))
    assert (roles[3], roles[2], roles[7], roles[6]) == ("rootfs-a", "rootfs-b", "data", "other")


@pytest.mark.parametrize(
    ("overrides", "message", "hint"),
    [
        (Overrides(boot_part=5), "partition 5 holds empty, not vfat or ext4, and cannot be the boot partition", ""),
        (Overrides(data_part=1), "partition 1 holds vfat, not ext4; rootfs and data must be ext2/3/4", ""),
        (Overrides(rootfs_parts=(5, 2)), "partition 5 holds empty, not ext4; rootfs and data must be ext2/3/4", ""),
        (
            Overrides(data_part=4),
            "the image has no partition 4 that can hold a filesystem",
            "partitions: 1, 2, 3, 4, 5, 6, 7",
        ),
        (
            Overrides(data_part=9),
            "the image has no partition 9 that can hold a filesystem",
            "partitions: 1, 2, 3, 4, 5, 6, 7",
        ),
        (Overrides(data_part=2, rootfs_parts=(2, 3)), "the same partition is named for two roles", ""),
        (Overrides(data_part=1, boot_part=1), "the same partition is named for two roles", ""),
    ],
    ids=["boot-not-vfat", "data-not-ext", "rootfs-not-ext", "extended", "absent", "data-and-rootfs", "data-and-boot"],
)
def test_bad_overrides(image: Callable[..., Path], overrides: Overrides, message: str, hint: str) -> None:
    error = _refused(image(), overrides)
    assert (error.message, error.hint) == (message, hint)


@pytest.mark.parametrize(
    ("text", "pair"), [(None, None), ("", None), ("2,3", (2, 3)), ("3,2", (3, 2)), (" 7 , 8", (7, 8))]
)
def test_rootfs_parts_parsed(text: str | None, pair: tuple[int, int] | None) -> None:
    assert Overrides.parse(6, text, 1) == Overrides(data_part=6, rootfs_parts=pair, boot_part=1)


@pytest.mark.parametrize("text", ["2", "2,2", "2,x", "2,3,4", ","])
def test_bad_rootfs_parts(text: str) -> None:
    with pytest.raises(LayoutError) as info:
        Overrides.parse(None, text, None)
    assert info.value.message == f"--rootfs-parts {text!r} must name two partitions, e.g. 2,3"


# -- four partitions: read by position, as Mender's tools do --------------------------

FLAGS = "name the roles with --boot-part N, --rootfs-parts A,B and --data-part N"
BY_POSITION = "four partitions are read by position as Mender does (1 boot, 2 rootfs A, 3 rootfs B, 4 data), but "


def _four(path: Path, boot: bytes, rootfs_a: bytes, rootfs_b: bytes, data: bytes) -> Path:
    blocks = {0: boot_record(*(slot(0x83, n * PART, PART) for n in range(1, 5)))}
    for number, content in enumerate((boot, rootfs_a, rootfs_b, data), start=1):
        if content:
            blocks[number * PART * 512] = content
    return write_image(path, blocks, 5 * PART * 512)


def test_four_partitions_by_position(tmp_path: Path) -> None:
    # An ext4 boot partition (MENDER_BOOT_PART_FSTYPE) and an empty rootfs B, as a fresh build leaves it.
    path = _four(tmp_path / "a.img", ext_superblock("boot"), ext_superblock("a"), b"", ext_superblock("data"))
    assert _roles(path) == {1: "boot", 2: "rootfs-a", 3: "rootfs-b", 4: "data"}
    vfat = _four(
        tmp_path / "b.img", fat_boot_sector("B"), ext_superblock("a"), ext_superblock("b"), ext_superblock("d")
    )
    assert _roles(vfat) == {1: "boot", 2: "rootfs-a", 3: "rootfs-b", 4: "data"}


@pytest.mark.parametrize(
    ("contents", "why"),
    [
        ((b"", b"", b"", b"d"), "partition 2 (rootfs A) holds empty, not ext4"),
        ((b"", b"a", b"v", b""),
         "partition 3 (rootfs B) holds vfat, not ext4 or empty; partition 4 (data) holds empty, not ext4"),
        ((b"s", b"a", b"b", b"d"), "partition 1 (boot) holds swap"),
    ],
    ids=["rootfs-a", "rootfs-b-and-data", "boot-swap"],
)  # fmt: skip
def test_four_partitions_that_contradict_their_positions(tmp_path: Path, contents: tuple[bytes, ...], why: str) -> None:
    make = {b"": b"", b"a": ext_superblock("a"), b"b": ext_superblock("b"), b"d": ext_superblock("d"),
            b"v": fat_boot_sector("V"), b"s": swap_header()}  # fmt: skip
    path = _four(tmp_path / "x.img", *(make[c] for c in contents))
    error = _refused(path, Overrides())
    assert (error.message, error.hint) == (BY_POSITION + why, FLAGS)


def test_four_partitions_with_overrides(tmp_path: Path) -> None:
    path = _four(tmp_path / "a.img", ext_superblock("x"), ext_superblock("a"), ext_superblock("b"), ext_superblock("d"))
    # Data named on partition 1: the optional boot partition is not also taken there.
    assert _roles(path, Overrides(data_part=1)) == {1: "data", 2: "rootfs-a", 3: "rootfs-b", 4: "other"}
    assert _roles(path, Overrides(rootfs_parts=(3, 2), boot_part=4, data_part=1)) == {
        1: "data", 2: "rootfs-b", 3: "rootfs-a", 4: "boot"}  # fmt: skip
    error = _refused(path, Overrides(rootfs_parts=(2, 4)))
    assert (error.message, error.hint) == ("partition 4 would be both rootfs-b (--rootfs-parts) and data (by position)",
                                           FLAGS)  # fmt: skip
    error = _refused(path, Overrides(boot_part=2))
    assert error.message == "partition 2 would be both boot (--boot-part) and rootfs-a (by position)"
    error = _refused(path, Overrides(data_part=2))
    assert error.message == "partition 2 would be both rootfs-a (by position) and data (--data-part)"


# -- a bare filesystem image ----------------------------------------------------------


@pytest.mark.parametrize(("name", "role"), [("core-image.rootfs.ext4", "rootfs-a"), ("core-image.dataimg", "data")])
def test_bare_filesystem_image(tmp_path: Path, name: str, role: str) -> None:
    path = write_image(tmp_path / name, {0: ext_superblock("fs", blocks=4096)}, 4096 * 1024 + 100)
    layout = read_layout(path)
    [volume] = layout.volumes
    assert layout.is_bare and layout.table == PartitionTable(TableType.NONE, "", 512, (volume.partition,))
    assert volume.partition.type == ""
    assert (volume.partition.number, volume.partition.offset, volume.partition.size_sectors) == (0, 0, 8192)
    assert (volume.role.value, volume.filesystem, volume.label, volume.filesystem_size) == (
        role, Filesystem.EXT4, "fs", 4096 * 1024)  # fmt: skip
    if role == "data":
        assert layout.data_partition is volume and layout.rootfs_partitions == ()
    else:
        assert layout.rootfs_partitions == (volume,) and layout.data_volume is None
        with pytest.raises(LayoutError) as info:
            layout.data_partition  # noqa: B018
        assert info.value.message == "a bare root filesystem image has no data partition"
        assert info.value.hint == "use the disk image (.sdimg, .uefiimg) or the build's .dataimg"
    assert read_layout(path, Overrides()).volumes == layout.volumes
    with pytest.raises(LayoutError) as info:
        read_layout(path, Overrides(data_part=1))
    assert info.value.message == f"{path} is a bare filesystem image: it has no partitions to name"


def test_what_is_not_a_bare_filesystem_image(tmp_path: Path) -> None:
    # An ext superblock behind an MBR signature is a disk image; so is anything too short for a superblock.
    signed = bytearray(ext_superblock("fs"))
    signed[510:512] = b"\x55\xaa"
    assert not read_layout(_image(tmp_path / "disk.img")).is_bare
    from imageprov.errors import TableError

    # Read as a disk: an MBR with no partitions.
    unresolved = read_layout(write_image(tmp_path / "signed.img", {0: bytes(signed)}, MIB_4)).unresolved
    assert unresolved is not None and "0 ext partitions" in unresolved.message
    with pytest.raises(TableError):
        read_layout(write_image(tmp_path / "short.img", {0: ext_superblock("fs")[:2047]}, 2047))
    with pytest.raises(TableError):
        read_layout(tmp_path / "absent.img")
    not_ext = bytearray(ext_superblock("fs"))
    not_ext[1080] = 0x54
    with pytest.raises(TableError):
        read_layout(write_image(tmp_path / "not-ext.img", {0: bytes(not_ext)}, MIB_4))


MIB_4 = 4 << 20
