"""A Mender disk image and the files inside its partitions.

Paths follow mender-artifact's convention, so that users of the manual recipe
need to learn nothing new: ``/data/...`` is on the data partition,
``/uboot/...`` and ``/boot/efi/...`` on the boot partition, and anything else
on the root filesystem, which is written to both rootfs A and B, or to A
alone while B is empty (a real build leaves it so; the first update fills it).
A bare filesystem image holds one area: a ``rootfs.ext4`` the root filesystem,
a ``.dataimg`` the data partition.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePosixPath

from imageprov.disk.confirm import confirm, read_files
from imageprov.disk.ext4 import Ext4, NewFile, fs_path
from imageprov.disk.layout import Layout, Overrides, Role, Volume, read_layout
from imageprov.disk.probe import Filesystem
from imageprov.disk.vfat import Vfat
from imageprov.errors import FilesystemError, UsageError

# The filesystems imageprov reads or writes; another partition is left alone.
_MENDER_ROLES = (Role.ROOTFS_A, Role.ROOTFS_B, Role.DATA)
BOOT_PREFIXES = (PurePosixPath("/uboot"), PurePosixPath("/boot/efi"))
DATA_PREFIX = PurePosixPath("/data")
EMPTY_ROOTFS_B_NOTE = (
    "rootfs B is empty: only rootfs A was changed; B receives its root filesystem from the first update"
)


class Area(enum.Enum):
    """Where a device path lives in the image."""

    DATA = "data"
    BOOT = "boot"
    ROOTFS = "rootfs"


@dataclass(frozen=True)
class DevicePath:
    """A path as the device sees it, split into the area and the path inside that filesystem."""

    device_path: PurePosixPath
    area: Area
    inner: PurePosixPath

    @classmethod
    def parse(cls, path: str) -> DevicePath:
        full = fs_path(path)
        for prefix, area in [(DATA_PREFIX, Area.DATA), *((p, Area.BOOT) for p in BOOT_PREFIXES)]:
            if full == prefix or prefix in full.parents:
                return cls(full, area, PurePosixPath("/") / full.relative_to(prefix))
        return cls(full, Area.ROOTFS, full)


def split_image_path(spec: str) -> tuple[Path, DevicePath]:
    """Split ``IMAGE:/PATH`` (mender-artifact's notation) into the image and the device path."""
    image, sep, path = spec.partition(":/")
    if not sep or not image:
        raise UsageError(f"{spec!r} is not IMAGE:/PATH", hint="e.g. golden.sdimg:/etc/mender/mender.conf")
    return Path(image), DevicePath.parse("/" + path)


@dataclass(frozen=True)
class DiskImage:
    path: Path
    layout: Layout
    # What messages call the image when ``path`` is a private copy of the user's file (cp's staging copy).
    shown: Path | None = None

    @classmethod
    def open(cls, path: Path, overrides: Overrides | None = None, *, shown: Path | None = None) -> DiskImage:
        """Read the table and roles of the image at ``path``."""
        if not path.exists():
            raise UsageError(f"{path} does not exist")
        if not path.is_file() and not path.is_block_device():  # a flashed card is read in place
            raise UsageError(f"{path} is not a regular file or a block device")
        overrides = overrides or Overrides()
        return cls(path, confirm(path, read_layout(path, overrides), overrides), shown)

    def at(self, path: Path) -> DiskImage:
        """The same layout, for a copy of this image at ``path``."""
        copy = DiskImage(path, self.layout, self.shown)
        if "rootfs_volumes" in self.__dict__:  # a copy holds the same filesystems: no second look
            copy.__dict__["rootfs_volumes"] = self.rootfs_volumes
        return copy

    @cached_property
    def rootfs_volumes(self) -> tuple[Volume, ...]:
        """The rootfs partitions that hold a root filesystem: rootfs A, and B unless it is empty.

        meta-mender leaves rootfs B unformatted, or an empty ext4 (``part --fstype``
        with no source), unless ``mender-prepopulate-inactive-partition``.
        """
        volumes = self.layout.rootfs_partitions
        if len(volumes) < 2:
            return volumes
        rootfs_b = volumes[1]
        if rootfs_b.filesystem is Filesystem.SQUASHFS:
            return volumes  # a squashfs is never empty: it is made from a tree
        if rootfs_b.filesystem.is_ext and self.ext(rootfs_b).stat(PurePosixPath("/etc")) is not None:
            return volumes
        return volumes[:1]

    @property
    def rootfs_b_empty(self) -> bool:
        """A disk image whose rootfs B holds no root filesystem yet."""
        return len(self.layout.rootfs_partitions) == 2 and len(self.rootfs_volumes) == 1

    def ext(self, volume: Volume) -> Ext4:
        """The ext filesystem on ``volume``, checked to fit its partition."""
        _check_fits(volume)
        if volume.filesystem is Filesystem.SQUASHFS:
            raise FilesystemError(
                f"{volume_name(volume)} holds squashfs, which is read-only",
                hint="what the device must get goes to the data partition: /data/..., --conf-target data",
            )
        if not volume.filesystem.is_ext:
            raise FilesystemError(f"{volume_name(volume)} holds {volume.filesystem.value}, not ext4")
        return Ext4(self.path, volume.partition.offset, volume_name(volume))

    def read_files(self, volume: Volume, paths: list[PurePosixPath]) -> dict[PurePosixPath, bytes | None]:
        """Regular files of an ext or squashfs volume (None: not there): what reading needs, whichever it is."""
        if volume.filesystem is Filesystem.SQUASHFS:
            return read_files(self.path, volume, paths)
        return {p: content for p, (_, content) in self.ext(volume).fetch(paths).items()}

    def unreplayed(self) -> list[Ext4]:
        """The ext filesystems whose journal holds transactions never written to them."""
        found = [self.ext(v) for v in self.layout.volumes if v.filesystem.is_ext and v.role in _MENDER_ROLES]
        return [fs for fs in found if fs.needs_recovery()]

    def replay_journals(self) -> list[str]:
        """Replay every journal that needs it, in place (on a private copy only); return the volumes' names."""
        replayed = self.unreplayed()
        for fs in replayed:
            fs.replay_journal()
        return [fs.name for fs in replayed]

    def vfat(self, volume: Volume) -> Vfat:
        _check_fits(volume)
        return Vfat(self.path, volume.partition.offset, volume_name(volume))

    def volumes_for(self, area: Area) -> tuple[Volume, ...]:
        """The volumes a path in ``area`` lives on: the rootfs that hold one (A and B), one otherwise."""
        if self.layout.is_bare:
            return self._bare_volume(area)
        if area is Area.DATA:
            return (self.layout.data_partition,)
        if area is Area.ROOTFS:
            return self.rootfs_volumes
        boot = self.layout.boot_partition
        if boot is None:
            raise FilesystemError(f"{self.shown or self.path} has no boot partition", hint="name it with --boot-part N")
        return (boot,)

    def _bare_volume(self, area: Area) -> tuple[Volume, ...]:
        (volume,) = self.layout.volumes
        holds = Area.DATA if volume.role is Role.DATA else Area.ROOTFS
        if area is not holds:
            what = "the data partition (/data/...)" if holds is Area.DATA else "a root filesystem"
            raise UsageError(
                f"{self.shown or self.path} is a bare filesystem image holding {what}: it has no {area.value} area",
                hint="name a path in it, or open the disk image (.sdimg, .uefiimg)",
            )
        return (volume,)

    def _is_vfat(self, path: DevicePath, volume: Volume) -> bool:
        # Mender's boot partition may be ext4 (MENDER_BOOT_PART_FSTYPE): then it is edited as one.
        return path.area is Area.BOOT and not volume.filesystem.is_ext

    def read(self, path: DevicePath) -> bytes:
        """The content of a file, read from the first volume of its area (rootfs A for the rootfs)."""
        volume = self.volumes_for(path.area)[0]
        if self._is_vfat(path, volume):
            return self.vfat(volume).read(path.inner)
        return self.read_on(volume, path.inner)

    def read_on(self, volume: Volume, inner: PurePosixPath) -> bytes:
        """The regular file at ``inner`` of an ext or squashfs volume; a missing one (or a link) is an error."""
        if volume.filesystem is Filesystem.SQUASHFS:
            content = self.read_files(volume, [inner])[inner]
            if content is None:
                raise FilesystemError(f"{inner} is not a file on {volume_name(volume)}")
            return content
        return self.ext(volume).read(inner)  # says what is there instead: a link, a directory

    def listdir(self, path: DevicePath) -> list[tuple[str, str, int]]:
        """(name, "d" or "-" + mode, size) of each entry of a directory."""
        volume = self.volumes_for(path.area)[0]
        if self._is_vfat(path, volume):
            return [(e.name, "d" if e.is_dir else "-", e.size) for e in self.vfat(volume).listdir(path.inner)]
        return [(e.name, _mode_string(e.mode), e.size) for e in self.ext(volume).listdir(path.inner)]

    def write(self, path: DevicePath, content: bytes, *, mode: int, uid: int, gid: int) -> list[Volume]:
        """Write a file on every volume of its area; return the volumes written."""
        volumes = self.volumes_for(path.area)
        if path.inner == PurePosixPath("/"):
            raise UsageError(f"{path.device_path} is a directory; name the file to write")
        for volume in volumes:
            if self._is_vfat(path, volume):
                if (mode, uid, gid) != (0o644, 0, 0):
                    raise UsageError("vfat has no modes or owners", hint="drop --mode/--owner for /uboot paths")
                self.vfat(volume).write(path.inner, content)
            else:
                self.ext(volume).write_files([NewFile(path.inner, content, mode, uid, gid)])
        return list(volumes)


def volume_name(volume: Volume) -> str:
    if volume.partition.number == 0:
        return f"the filesystem image ({volume.role.value})"
    return f"partition {volume.partition.number} ({volume.role.value})"


def _check_fits(volume: Volume) -> None:
    if volume.filesystem_size > volume.partition.size:
        raise FilesystemError(
            f"the {volume.filesystem.value} filesystem on {volume_name(volume)} is {volume.filesystem_size} bytes, "
            f"larger than its partition ({volume.partition.size} bytes)",
            hint="the image is corrupt or was truncated; refusing to write past the partition",
        )


def _mode_string(mode: int) -> str:
    kinds = {0o040000: "d", 0o120000: "l", 0o100000: "-"}
    text = kinds.get(mode & 0o170000, "?")
    for shift in (6, 3, 0):
        bits = (mode >> shift) & 7
        text += ("r" if bits & 4 else "-") + ("w" if bits & 2 else "-") + ("x" if bits & 1 else "-")
    return text


def parse_mode(text: str) -> int:
    """Parse a permission mode, always as octal: ``600`` and ``0600`` are both rw-------.

    mender-artifact 3.9 reads ``-m 600`` as decimal and writes mode 0130; we never do.
    """
    digits = text.removeprefix("0o")
    if not digits or len(digits) > 4 or any(c not in "01234567" for c in digits):
        raise UsageError(f"mode {text!r} is not an octal permission mode", hint="e.g. 0600 or 644")
    value = int(digits, 8)
    if value > 0o7777:
        raise UsageError(f"mode {text!r} is out of range")
    return value


def parse_owner(text: str) -> tuple[int, int]:
    """Parse ``UID:GID`` (numeric: the names of the device's users are not known here)."""
    uid, sep, gid = text.partition(":")
    if not sep or not uid.isdigit() or not gid.isdigit():
        raise UsageError(f"owner {text!r} is not UID:GID", hint="e.g. 0:0")
    return int(uid), int(gid)
