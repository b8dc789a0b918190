"""Mender's partition roles: boot, rootfs A and B, data.

Mender lays an image out as boot (vfat), rootfs A, rootfs B, an optional swap
and data last (``.sdimg``/``.biosimg`` with an MBR, ``.uefiimg``/``.gptimg``
with a GPT). We find the roles from what each partition really holds, and
take explicit overrides for images laid out otherwise.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass

from imageprov.disk.partitions import read_table
from imageprov.disk.probe import Filesystem, Probe, probe
from imageprov.disk.table import Partition, PartitionTable
from imageprov.errors import LayoutError

# MBR type 0x82 and the GPT Linux swap GUID: a swap partition may hold no
# signature until the device first runs mkswap.
SWAP_TYPES = frozenset({"82", "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F"})


class Role(enum.Enum):
    BOOT = "boot"
    ROOTFS_A = "rootfs-a"
    ROOTFS_B = "rootfs-b"
    DATA = "data"
    SWAP = "swap"
    EXTENDED = "extended"
    OTHER = "other"


@dataclass(frozen=True)
class Volume:
    """A partition, what filesystem it holds and what Mender uses it for."""

    partition: Partition
    filesystem: Filesystem
    label: str
    role: Role
    filesystem_size: int = 0


@dataclass(frozen=True)
class Overrides:
    data_part: int | None = None
    rootfs_parts: tuple[int, int] | None = None
    boot_part: int | None = None

    @classmethod
    def parse(cls, data_part: int | None, rootfs_parts: str | None, boot_part: int | None) -> Overrides:
        """Build overrides from CLI strings such as ``--rootfs-parts 2,3``."""
        pair = None
        if rootfs_parts:
            try:
                numbers = [int(n) for n in rootfs_parts.split(",")]
            except ValueError:
                numbers = []
            if len(numbers) != 2 or numbers[0] == numbers[1]:
                raise LayoutError(f"--rootfs-parts {rootfs_parts!r} must name two partitions, e.g. 2,3")
            pair = (numbers[0], numbers[1])
        return cls(data_part=data_part, rootfs_parts=pair, boot_part=boot_part)


@dataclass(frozen=True)
class Layout:
    table: PartitionTable
    volumes: tuple[Volume, ...]

    def _role(self, role: Role) -> Volume | None:
        return next((v for v in self.volumes if v.role is role), None)

    @property
    def boot_partition(self) -> Volume | None:
        return self._role(Role.BOOT)

    @property
    def rootfs_partitions(self) -> tuple[Volume, Volume]:
        a, b = self._role(Role.ROOTFS_A), self._role(Role.ROOTFS_B)
        assert a is not None and b is not None  # read_layout guarantees both
        return a, b

    @property
    def data_partition(self) -> Volume:
        data = self._role(Role.DATA)
        assert data is not None  # read_layout guarantees it
        return data


def read_layout(path: str | os.PathLike[str], overrides: Overrides | None = None) -> Layout:
    """Read the table of the image at ``path`` and assign Mender's roles to its partitions."""
    table = read_table(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        probes = {p.number: probe(fd, p) for p in table.filesystem_partitions}
    finally:
        os.close(fd)
    roles = _assign(table, probes, overrides or Overrides())
    volumes = []
    for part in table.partitions:
        found = probes.get(part.number, Probe(Filesystem.UNKNOWN))
        role = Role.EXTENDED if part.is_extended else roles.get(part.number, Role.OTHER)
        if role is Role.OTHER and (found.filesystem is Filesystem.SWAP or part.type in SWAP_TYPES):
            role = Role.SWAP
        volumes.append(Volume(part, found.filesystem, found.label, role, found.size))
    return Layout(table, tuple(volumes))


def _assign(table: PartitionTable, probes: dict[int, Probe], overrides: Overrides) -> dict[int, Role]:
    def fs(number: int) -> Filesystem:
        if number not in probes:
            raise LayoutError(
                f"the image has no partition {number} that can hold a filesystem", hint=f"partitions: {table.numbers()}"
            )
        return probes[number].filesystem

    roles: dict[int, Role] = {}
    named = [n for n in (overrides.data_part, overrides.boot_part) if n is not None]
    named += list(overrides.rootfs_parts or ())
    if len(set(named)) != len(named):
        raise LayoutError("the same partition is named for two roles")
    for number in named:
        wanted_vfat = number == overrides.boot_part
        found = fs(number)
        if wanted_vfat and found is not Filesystem.VFAT:
            raise LayoutError(f"partition {number} holds {found.value}, not vfat, and cannot be the boot partition")
        if not wanted_vfat and not found.is_ext:
            raise LayoutError(f"partition {number} holds {found.value}, not ext4; rootfs and data must be ext2/3/4")

    ext = [n for n in sorted(probes) if probes[n].filesystem.is_ext and n not in named]
    rootfs = list(overrides.rootfs_parts) if overrides.rootfs_parts else None
    data = overrides.data_part
    if rootfs is None and data is None:
        if len(ext) != 3:
            raise _ambiguous(probes, f"{len(ext)} ext partitions, not the 3 of rootfs A, rootfs B and data")
        rootfs, data = ext[:2], ext[2]
    elif rootfs is None:
        if len(ext) != 2:
            raise _ambiguous(probes, f"{len(ext)} ext partitions besides data, not the 2 rootfs")
        rootfs = ext[:2]
    elif data is None:
        if len(ext) != 1:
            raise _ambiguous(probes, f"{len(ext)} ext partitions besides the rootfs, not 1 data partition")
        data = ext[0]
    assert rootfs is not None and data is not None
    roles[rootfs[0]], roles[rootfs[1]], roles[data] = Role.ROOTFS_A, Role.ROOTFS_B, Role.DATA

    boot = overrides.boot_part
    if boot is None:
        boot = next((n for n in sorted(probes) if probes[n].filesystem is Filesystem.VFAT), None)
    if boot is not None:
        roles[boot] = Role.BOOT
    return roles


def _ambiguous(probes: dict[int, Probe], why: str) -> LayoutError:
    seen = ", ".join(f"{n}: {p.filesystem.value}" for n, p in sorted(probes.items()))
    return LayoutError(
        f"cannot read the layout as boot + rootfs A + rootfs B + data: {why} ({seen})",
        hint="name them with --rootfs-parts A,B and --data-part N",
    )
