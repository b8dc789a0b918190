"""Roles confirmed by the image itself: what its root filesystem mounts at ``/data`` and calls rootfs A and B.

The table and the filesystems' signatures (disk/layout.py) cannot tell every
layout meta-mender builds: with ``MENDER_BOOT_PART_SIZE_MB = "0"`` rootfs A is
1, B 2 and data 3, and an extra ext4 partition at 4 then looks like data; with
``MENDER_EXTRA_PARTS`` there are more ext4 partitions than roles. The device
knows: its root filesystem's ``/etc/fstab`` mounts ``${MENDER_DATA_PART}`` at
``/data`` (and the boot partition at ``/uboot`` or ``/boot/efi``), and its
``mender.conf`` names ``RootfsPartA`` and ``RootfsPartB`` (in the rootfs, or on
the data partition with the split configuration). What the image says wins
over what was guessed; an image that contradicts itself, or the roles the user
named, is refused with one line naming both sources, so that credentials are
never written where the device will not look for them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from imageprov.disk.ext4 import Ext4
from imageprov.disk.layout import UNWRITABLE, Layout, Overrides, Role, Volume
from imageprov.disk.mounts import is_specific, mount_of, named_volume
from imageprov.disk.probe import Filesystem
from imageprov.disk.squashfs import Squashfs
from imageprov.errors import FilesystemError, LayoutError

FSTAB = PurePosixPath("/etc/fstab")
ROOTFS_CONF = PurePosixPath("/etc/mender/mender.conf")
DATA_CONF = PurePosixPath("/mender/mender.conf")
BOOT_MOUNTS = ("/uboot", "/boot/efi", "/boot")
_FLAGS = "name the roles with --boot-part N, --rootfs-parts A,B and --data-part N"
_OVERRIDDEN = {Role.DATA: "--data-part", Role.ROOTFS_A: "--rootfs-parts", Role.ROOTFS_B: "--rootfs-parts",
               Role.BOOT: "--boot-part"}  # fmt: skip


@dataclass(frozen=True)
class Said:
    """A role the image's own files give a partition, and where it says so (for messages)."""

    role: Role
    number: int
    where: str  # "... names partition {} ...": the number goes in the braces

    def said(self) -> str:
        return self.where.format(self.number)


def confirm(path: Path, layout: Layout, overrides: Overrides) -> Layout:
    """``layout`` with the roles the image itself gives; refuses a contradiction or a layout nobody can tell."""
    if layout.is_bare:
        return layout
    said = image_roles(path, layout)
    named = _named(overrides)
    for item in said:
        if item.role in named and named[item.role] != item.number:
            raise LayoutError(
                f"{_OVERRIDDEN[item.role]} names partition {named[item.role]} as {item.role.value}, but {item.said()}",
                hint="the image's own files say where the device looks: drop the flag, or fix the image",
            )
    if not said:
        if layout.unresolved is not None:
            raise layout.unresolved
        return layout
    guessed = {v.role: v.partition.number for v in layout.volumes if v.role in _OVERRIDDEN}
    if layout.unresolved is not None:
        guessed = {}
    chosen = {**guessed, **named, **{item.role: item.number for item in said}}
    # A partition the image gives a role loses any role it was guessed to have.
    taken = {item.number for item in said}
    chosen = {role: number for role, number in chosen.items()
              if number not in taken or any(i.role is role for i in said)}  # fmt: skip
    if Role.BOOT in chosen and not any(i.role is Role.BOOT for i in said) and Role.BOOT not in named:
        # A boot partition only guessed stays only if it is what boot partitions are.
        boot = _volume(layout, chosen[Role.BOOT])
        if boot is None or boot.filesystem not in (Filesystem.VFAT, *_EXT):
            del chosen[Role.BOOT]
    missing = [role.value for role in (Role.ROOTFS_A, Role.DATA) if role not in chosen]
    if missing:
        if layout.unresolved is not None:
            raise layout.unresolved
        raise LayoutError(f"the image does not say which partition is {' or '.join(missing)}", hint=_FLAGS)
    roles = {number: role for role, number in chosen.items()}
    _check(layout, chosen)
    return layout.with_roles(roles)


_EXT = (Filesystem.EXT2, Filesystem.EXT3, Filesystem.EXT4)


def _named(overrides: Overrides) -> dict[Role, int]:
    named = {}
    if overrides.data_part is not None:
        named[Role.DATA] = overrides.data_part
    if overrides.boot_part is not None:
        named[Role.BOOT] = overrides.boot_part
    if overrides.rootfs_parts is not None:
        named[Role.ROOTFS_A], named[Role.ROOTFS_B] = overrides.rootfs_parts
    return named


def _volume(layout: Layout, number: int) -> Volume | None:
    return next((v for v in layout.volumes if v.partition.number == number and not v.partition.is_extended), None)


def _check(layout: Layout, chosen: dict[Role, int]) -> None:
    """Each role's partition holds what that role needs."""
    for role, number in chosen.items():
        volume = _volume(layout, number)
        if volume is None:
            raise LayoutError(f"the image has no partition {number} for {role.value}", hint=_FLAGS)
        found = volume.filesystem
        fits = {
            Role.DATA: found.is_ext,
            # A read-only squashfs rootfs is read, never written (disk/squashfs.py).
            Role.ROOTFS_A: found.is_ext or found is Filesystem.SQUASHFS,
            Role.ROOTFS_B: found.is_ext or found in (Filesystem.EMPTY, Filesystem.SQUASHFS),
            Role.BOOT: found in (Filesystem.VFAT, *_EXT),
        }[role]
        if not fits and found in UNWRITABLE:
            raise LayoutError(f"partition {number} ({role.value}) holds {found.value}", hint=UNWRITABLE[found])
        if not fits:
            raise LayoutError(
                f"partition {number} is {role.value}, but holds {found.value}"
                + (", which imageprov cannot write to (ext2/3/4 only)" if role is Role.DATA else ""),
                hint=_FLAGS,
            )


def image_roles(path: Path, layout: Layout) -> list[Said]:
    """The roles the root filesystem's fstab and Mender configuration give; empty if there is no such file."""
    root = _root_filesystem(path, layout)
    if root is None:
        return []
    volume, files = root
    name = f"partition {volume.partition.number}"
    said: list[Said] = []
    fstab = files.get(FSTAB)
    data = None
    if fstab is not None:
        text = fstab.decode("utf-8", "replace")
        data_mount = mount_of(text, "/data")
        if data_mount is not None:
            where = f"{name}'s /etc/fstab (line {data_mount.line}) mounts partition {{}} at /data"
            data = _resolve(layout, data_mount.source, Role.DATA, where, said)
        for mountpoint in BOOT_MOUNTS:
            boot = mount_of(text, mountpoint)
            if boot is not None:
                where = f"{name}'s /etc/fstab (line {boot.line}) mounts partition {{}} at {mountpoint}"
                _resolve(layout, boot.source, Role.BOOT, where, said)
                break
    conf, conf_where = _rootfs_parts(files.get(ROOTFS_CONF)), f"{name}'s {ROOTFS_CONF}"
    if not conf and data is not None and data.filesystem.is_ext:
        conf, conf_where = _rootfs_parts(_read(path, data, DATA_CONF)), f"/data{DATA_CONF}"
    for key, role in (("rootfsparta", Role.ROOTFS_A), ("rootfspartb", Role.ROOTFS_B)):
        if key in conf:
            _resolve(layout, conf[key], role, f"{conf_where} names partition {{}} RootfsPart{key[-1].upper()}", said)
    if not any(item.role is Role.ROOTFS_A for item in said) and not conf:
        # No RootfsPartA anywhere: the partition holding the root filesystem is A.
        said.append(Said(Role.ROOTFS_A, volume.partition.number, "partition {} holds the root filesystem"))
    numbers: dict[int, Said] = {}
    for item in said:
        other = numbers.setdefault(item.number, item)
        if other is not item:
            raise LayoutError(
                f"the image contradicts itself: {other.said()} ({other.role.value}), "
                f"and {item.said()} ({item.role.value})",
                hint=_FLAGS,
            )
    return said


def _resolve(layout: Layout, source: str, role: Role, where: str, said: list[Said]) -> Volume | None:
    volume = named_volume(layout, source)
    if volume is None:
        if is_specific(source):
            raise LayoutError(f"{where.replace('partition {}', source)}, and this image has no such partition",
                              hint=_FLAGS)  # fmt: skip
        return None  # UUID=, ubi0_1: nothing matched here, nothing contradicted
    said.append(Said(role, volume.partition.number, where))
    return volume


def _root_filesystem(path: Path, layout: Layout) -> tuple[Volume, dict[PurePosixPath, bytes]] | None:
    """The first ext or squashfs partition (the guessed rootfs A first) holding an fstab or a Mender conf."""
    readable = (*_EXT, Filesystem.SQUASHFS)
    candidates = [v for v in layout.volumes if v.filesystem in readable and not v.partition.is_extended]
    candidates.sort(key=lambda v: (v.role is not Role.ROOTFS_A, v.partition.number))
    for volume in candidates:
        try:
            found = read_files(path, volume, [FSTAB, ROOTFS_CONF])
        except FilesystemError:
            continue  # not readable as a root filesystem: another candidate may be
        files = {p: content for p, content in found.items() if content is not None}
        if files:
            return volume, files
    return None


def read_files(path: Path, volume: Volume, paths: list[PurePosixPath]) -> dict[PurePosixPath, bytes | None]:
    """The regular files at ``paths`` in an ext or squashfs volume (None: not there)."""
    name = f"partition {volume.partition.number}"
    if volume.filesystem is Filesystem.SQUASHFS:
        return Squashfs(path, volume.partition.offset, name).fetch(paths)
    return {p: content for p, (_, content) in Ext4(path, volume.partition.offset, name).fetch(paths).items()}


def _read(path: Path, volume: Volume, inner: PurePosixPath) -> bytes | None:
    try:
        return read_files(path, volume, [inner])[inner]
    except FilesystemError:
        return None


def _rootfs_parts(conf: bytes | None) -> dict[str, str]:
    """RootfsPartA/B of a mender.conf, by lowercase key (the client matches keys without regard to case)."""
    if conf is None:
        return {}
    try:
        parsed = json.loads(conf)
    except ValueError:
        return {}  # verify says what is wrong with it
    if not isinstance(parsed, dict):
        return {}
    return {
        k.lower(): v for k, v in parsed.items() if k.lower() in ("rootfsparta", "rootfspartb") and isinstance(v, str)
    }
