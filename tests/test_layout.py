"""Mender roles found from the table and the filesystems' signatures, and the overrides."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from imageprov.disk.golden import Scheme
from imageprov.disk.layout import Overrides, read_layout
from imageprov.disk.probe import Filesystem
from imageprov.errors import LayoutError
from tests.conftest import imageprov, roles, tool


@pytest.mark.parametrize(
    ("scheme", "expected"),
    [
        (Scheme.MBR, {"boot": 1, "rootfs-a": 2, "rootfs-b": 3, "data": 4}),
        (Scheme.MBR_EXTENDED, {"boot": 1, "rootfs-a": 2, "rootfs-b": 3, "extended": 4, "swap": 5, "data": 6}),
        (Scheme.GPT, {"boot": 1, "rootfs-a": 2, "rootfs-b": 3, "data": 4}),
    ],
    ids=[s.value for s in Scheme],
)
def test_roles_of_mender_layouts(make_golden: Callable[..., Path], scheme: Scheme, expected: dict[str, int]) -> None:
    image = make_golden(scheme)
    layout = read_layout(image)
    assert {v.role.value: v.partition.number for v in layout.volumes} == expected
    # The independent reading tests use (sfdisk alone) agrees on the Mender volumes.
    assert roles(image) == {k: v for k, v in expected.items() if k not in ("extended", "swap")}
    assert layout.data_partition.filesystem is Filesystem.EXT4
    assert layout.data_partition.label == "data"
    assert [v.label for v in layout.rootfs_partitions] == ["rootfs-a", "rootfs-b"]
    boot = layout.boot_partition
    assert boot is not None and boot.filesystem is Filesystem.VFAT and boot.label == "BOOT"


def test_filesystem_size_comes_from_the_superblock(make_golden: Callable[..., Path]) -> None:
    image = make_golden(Scheme.MBR, data_mib=40)
    data = read_layout(image).data_partition
    header = tool("dumpe2fs", "-h", f"{image}?offset={data.partition.offset}").stdout.decode()
    fields = dict(line.split(":", 1) for line in header.splitlines() if ":" in line)
    size = int(fields["Block count"]) * int(fields["Block size"])
    assert data.filesystem_size == size == 40 << 20


def _extra_ext_partition(tmp_path: Path) -> Path:
    """boot + 4 ext4 partitions: which is data cannot be guessed."""
    image = tmp_path / "odd.img"
    with open(image, "wb") as handle:
        handle.truncate(64 << 20)
    script = "label: dos\nstart=2048, size=8MiB, type=c\n" + "size=12MiB, type=83\n" * 2 + "type=5\n"
    script += "size=8MiB, type=83\nsize=8MiB, type=83\n"
    tool("sfdisk", "--quiet", image, input=script.encode())
    tool("mkfs.vfat", "--offset", "2048", image, str(8 * 1024))
    from imageprov.disk.partitions import read_table

    for part in read_table(image).filesystem_partitions[1:]:
        tool("mke2fs", "-q", "-F", "-t", "ext4", "-E", f"offset={part.offset}", image, f"{part.size // 1024}k")
    return image


def test_ambiguous_layout_is_refused_naming_the_override(tmp_path: Path) -> None:
    image = _extra_ext_partition(tmp_path)
    # The table and signatures do not say; nor do the filesystems, which hold nothing.
    unresolved = read_layout(image).unresolved
    assert unresolved is not None and "--data-part" in str(unresolved) and "--rootfs-parts" in str(unresolved)
    proc = imageprov("inspect", image, check=False)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "--data-part" in proc.stderr


def test_overrides_resolve_an_ambiguous_layout(tmp_path: Path) -> None:
    image = _extra_ext_partition(tmp_path)
    layout = read_layout(image, Overrides.parse(6, "2,3", None))
    assert layout.data_partition.partition.number == 6
    assert [v.partition.number for v in layout.rootfs_partitions] == [2, 3]
    assert read_layout(image, Overrides.parse(5, "2,3", 1)).data_partition.partition.number == 5
    proc = imageprov("inspect", image, "--data-part", "6", "--rootfs-parts", "2,3", "--json")
    assert '"role": "data"' in proc.stdout


@pytest.mark.parametrize(
    ("data", "rootfs", "boot", "message"),
    [
        (1, None, None, "not ext4"),
        (None, "2,2", None, "two partitions"),
        (None, "2,x", None, "two partitions"),
        (9, None, None, "no partition 9"),
        (None, None, 2, "would be both boot"),
        (2, "2,3", None, "two roles"),
    ],
)
def test_bad_overrides_are_refused(
    make_golden: Callable[..., Path], data: int | None, rootfs: str | None, boot: int | None, message: str
) -> None:
    image = make_golden(Scheme.MBR)
    with pytest.raises(LayoutError, match=message):
        read_layout(image, Overrides.parse(data, rootfs, boot))
