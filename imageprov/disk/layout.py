"""Mender's partition roles: boot, rootfs A and B, data.

Mender lays an image out as boot, rootfs A, rootfs B, an optional swap and
data last (``.sdimg``/``.biosimg`` with an MBR, ``.uefiimg``/``.gptimg`` with a
GPT). An image of exactly four partitions is read by position, as Mender's
own tools read it (``MENDER_BOOT_PART`` ... ``MENDER_DATA_PART`` default to 1
to 4): the boot partition may then be ext4 and rootfs B empty, which a real
build leaves so until the first update. Filesystem signatures only confirm
those roles, and a contradiction is refused rather than the roles shifted.
Other images (an extended partition, swap) are read from what each partition
holds. Explicit overrides serve images laid out otherwise. A bare filesystem
image (a build's ``rootfs.ext4`` or ``.dataimg``) is one volume.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field, replace

from imageprov.disk.partitions import read_table
from imageprov.disk.probe import EXT_MAGIC, Filesystem, Probe, probe, probe_at
from imageprov.disk.table import Partition, PartitionTable, TableType
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
    # Why the table and signatures alone did not give the roles (None: they
    # did). The image's own files may still say (disk/confirm.py); if they do
    # not, this is the error.
    unresolved: LayoutError | None = field(default=None, compare=False)

    def with_roles(self, roles: dict[int, Role]) -> Layout:
        """The same partitions with these roles (by number); every other one is swap, extended or other."""
        volumes = tuple(replace(v, role=_role_of(v.partition, v.filesystem, roles)) for v in self.volumes)
        return Layout(self.table, volumes)

    def _role(self, role: Role) -> Volume | None:
        return next((v for v in self.volumes if v.role is role), None)

    @property
    def boot_partition(self) -> Volume | None:
        return self._role(Role.BOOT)

    @property
    def is_bare(self) -> bool:
        """A bare filesystem image: one volume, no partition table."""
        return self.table.type is TableType.NONE

    @property
    def rootfs_partitions(self) -> tuple[Volume, ...]:
        """Rootfs A and B of a disk image; A alone in a bare rootfs image, none in a bare data image."""
        return tuple(v for v in (self._role(Role.ROOTFS_A), self._role(Role.ROOTFS_B)) if v is not None)

    @property
    def data_volume(self) -> Volume | None:
        """The data partition; None only in a bare root filesystem image."""
        return self._role(Role.DATA)

    @property
    def data_partition(self) -> Volume:
        data = self._role(Role.DATA)
        if data is None:
            raise LayoutError("a bare root filesystem image has no data partition",
                              hint="use the disk image (.sdimg, .uefiimg) or the build's .dataimg")  # fmt: skip
        return data


def read_layout(path: str | os.PathLike[str], overrides: Overrides | None = None) -> Layout:
    """Read the table of the image at ``path`` and assign Mender's roles to its partitions."""
    _refuse_unwritable(path)
    bare = _read_bare(path)
    if bare is not None:
        if overrides is not None and overrides != Overrides():
            raise LayoutError(f"{os.fspath(path)} is a bare filesystem image: it has no partitions to name")
        return bare
    table = read_table(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        probes = {p.number: probe(fd, p) for p in table.filesystem_partitions}
    finally:
        os.close(fd)
    unresolved = None
    try:
        roles = _assign(table, probes, overrides or Overrides())
    except LayoutError as exc:
        if overrides is not None and overrides != Overrides():
            raise  # what the user named does not fit: say so now
        # Many layouts meta-mender builds (no boot partition, extra partitions)
        # are not told by signatures alone; the image's files may tell them.
        roles, unresolved = {}, exc
    volumes = []
    for part in table.partitions:
        found = probes.get(part.number, Probe(Filesystem.UNKNOWN))
        volumes.append(Volume(part, found.filesystem, found.label, _role_of(part, found.filesystem, roles), found.size))
    return Layout(table, tuple(volumes), unresolved)


def _role_of(part: Partition, filesystem: Filesystem, roles: dict[int, Role]) -> Role:
    role = Role.EXTENDED if part.is_extended else roles.get(part.number, Role.OTHER)
    if role is Role.OTHER and (filesystem is Filesystem.SWAP or part.type in SWAP_TYPES):
        return Role.SWAP
    return role


# meta-mender's image type for the data partition alone; any other bare
# filesystem image is taken for a root filesystem (rootfs.ext4).
DATA_IMAGE_SUFFIX = ".dataimg"


def _read_bare(path: str | os.PathLike[str]) -> Layout | None:
    """The layout of a bare ext filesystem image, or None for a disk image."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None  # read_table says why
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, 2048, 0)
        # An MBR or a protective MBR ends its first sector with 0x55AA; an ext
        # filesystem leaves its first 1 KiB to a boot loader and puts its magic at 1080.
        if len(head) < 2048 or head[510:512] == b"\x55\xaa" or int.from_bytes(head[1080:1082], "little") != EXT_MAGIC:
            return None
        found = probe_at(fd, 0, size)
    finally:
        os.close(fd)
    part = Partition(number=0, start_sector=0, size_sectors=size // 512, type="")
    table = PartitionTable(TableType.NONE, "", 512, (part,))
    role = Role.DATA if os.fspath(path).endswith(DATA_IMAGE_SUFFIX) else Role.ROOTFS_A
    return Layout(table, (Volume(part, found.filesystem, found.label, role, found.size),))


_FLAGS = "name the roles with --boot-part N, --rootfs-parts A,B and --data-part N"
# What it would take to write into filesystems imageprov does not: say so in one line.
UNWRITABLE = {
    Filesystem.BTRFS: 'build the data partition as ext4 (MENDER_DATA_PART_FSTYPE = "ext4"): btrfs cannot be '
    "written without mounting it, and imageprov never mounts",
    Filesystem.F2FS: 'build the data partition as ext4 (MENDER_DATA_PART_FSTYPE = "ext4"): f2fs has no tool '
    "that writes files into it without mounting it, and imageprov never mounts",
    Filesystem.SQUASHFS: "a bare squashfs root filesystem is read-only and holds no data partition: use the disk "
    "image or the build's .dataimg",
}
# UBI images (.ubimg, for raw NAND) start with an erase counter header: "UBI#".
_UBI_MAGIC = b"UBI#"


def _refuse_unwritable(path: str | os.PathLike[str]) -> None:
    """One line for an image of a kind imageprov does not write: UBI, or a bare btrfs, f2fs or squashfs."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # read_table says why
    try:
        size = os.fstat(fd).st_size
        if os.pread(fd, 4, 0) == _UBI_MAGIC:
            raise LayoutError(
                f"{os.fspath(path)} is a UBI image (raw NAND flash), not a disk image",
                hint="imageprov writes ext4 partitions of .sdimg/.uefiimg/.gptimg images and .dataimg files; a UBI "
                "image would have to be rebuilt with ubinize from its volumes",
            )
        found = probe_at(fd, 0, size).filesystem if size >= 8192 else Filesystem.UNKNOWN
    finally:
        os.close(fd)
    if found in UNWRITABLE:
        raise LayoutError(f"{os.fspath(path)} is a bare {found.value} filesystem", hint=UNWRITABLE[found])


def _assign(table: PartitionTable, probes: dict[int, Probe], overrides: Overrides) -> dict[int, Role]:
    def fs(number: int) -> Filesystem:
        if number not in probes:
            raise LayoutError(
                f"the image has no partition {number} that can hold a filesystem", hint=f"partitions: {table.numbers()}"
            )
        return probes[number].filesystem

    named = [n for n in (overrides.data_part, overrides.boot_part) if n is not None]
    named += list(overrides.rootfs_parts or ())
    if len(set(named)) != len(named):
        raise LayoutError("the same partition is named for two roles")
    rootfs_b = overrides.rootfs_parts[1] if overrides.rootfs_parts else None
    for number in named:
        found = fs(number)
        if number == overrides.boot_part:
            # Mender's boot partition is vfat, or ext4 (MENDER_BOOT_PART_FSTYPE).
            if found is not Filesystem.VFAT and not found.is_ext:
                raise LayoutError(f"partition {number} holds {found.value}, not vfat or ext4, "
                                  "and cannot be the boot partition")  # fmt: skip
        elif not found.is_ext and not (number == rootfs_b and found is Filesystem.EMPTY):
            raise LayoutError(f"partition {number} holds {found.value}, not ext4; rootfs and data must be ext2/3/4")
    if len(table.partitions) == 4 and not any(p.is_extended for p in table.partitions):
        return _by_position(table, probes, overrides)
    return _by_signature(probes, overrides, named)


def _by_position(table: PartitionTable, probes: dict[int, Probe], overrides: Overrides) -> dict[int, Role]:
    """Mender's convention for four partitions: 1 boot, 2 rootfs A, 3 rootfs B, 4 data; overrides win."""
    boot, rootfs_a, rootfs_b, data = (p.number for p in table.partitions)
    chosen = {Role.BOOT: boot, Role.ROOTFS_A: rootfs_a, Role.ROOTFS_B: rootfs_b, Role.DATA: data}
    flags: dict[Role, str] = {}
    if overrides.boot_part is not None:
        chosen[Role.BOOT], flags[Role.BOOT] = overrides.boot_part, "--boot-part"
    if overrides.rootfs_parts is not None:
        chosen[Role.ROOTFS_A], chosen[Role.ROOTFS_B] = overrides.rootfs_parts
        flags[Role.ROOTFS_A] = flags[Role.ROOTFS_B] = "--rootfs-parts"
    if overrides.data_part is not None:
        chosen[Role.DATA], flags[Role.DATA] = overrides.data_part, "--data-part"
    if Role.BOOT not in flags and chosen[Role.BOOT] in [chosen[r] for r in flags]:
        # The boot partition is optional (MENDER_BOOT_PART_SIZE_MB = 0): a
        # partition named for another role is not also taken for boot.
        del chosen[Role.BOOT]
    roles: dict[int, Role] = {}
    for role, number in chosen.items():
        if number in roles:
            first = roles[number]
            raise LayoutError(
                f"partition {number} would be both {first.value} ({flags.get(first, 'by position')}) "
                f"and {role.value} ({flags.get(role, 'by position')})",
                hint=_FLAGS,
            )
        roles[number] = role
    fs = {role: probes[number].filesystem for role, number in chosen.items()}
    wrong = []
    if Role.ROOTFS_A not in flags and not fs[Role.ROOTFS_A].is_ext:
        wrong.append(f"partition {rootfs_a} (rootfs A) holds {fs[Role.ROOTFS_A].value}, not ext4")
    if Role.ROOTFS_B not in flags and not (fs[Role.ROOTFS_B].is_ext or fs[Role.ROOTFS_B] is Filesystem.EMPTY):
        wrong.append(f"partition {rootfs_b} (rootfs B) holds {fs[Role.ROOTFS_B].value}, not ext4 or empty")
    if Role.DATA not in flags and not fs[Role.DATA].is_ext:
        wrong.append(f"partition {data} (data) holds {fs[Role.DATA].value}, not ext4")
    if Role.BOOT in fs and Role.BOOT not in flags and fs[Role.BOOT] is Filesystem.SWAP:
        wrong.append(f"partition {boot} (boot) holds swap")
    if wrong:
        raise LayoutError(
            "four partitions are read by position as Mender does (1 boot, 2 rootfs A, 3 rootfs B, 4 data), but "
            + "; ".join(wrong),
            hint=_FLAGS,
        )
    return roles


def _by_signature(probes: dict[int, Probe], overrides: Overrides, named: list[int]) -> dict[int, Role]:
    roles: dict[int, Role] = {}
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
