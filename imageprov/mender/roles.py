"""The data partition, confirmed by the image itself: the one rootfs A's ``/etc/fstab`` mounts at ``/data``.

Roles are read from the partition table and the filesystems (disk/layout.py).
A build can number them otherwise: with ``MENDER_BOOT_PART_SIZE_MB = "0"``
meta-mender puts rootfs A at 1, rootfs B at 2, data at 3 and extra partitions
after it, and a fourth ext4 partition then looks like data. The device mounts
what its fstab says (meta-mender writes ``${MENDER_DATA_PART} /data ...``,
``/dev/mmcblk0p3`` by default, or a ``PARTUUID=``/``LABEL=`` name a BSP sets),
so credentials stamped anywhere else are lost while every other check passes.
A contradiction is refused, overrides or not; an fstab that names the data
partition in a way that cannot be matched here (``UUID=``) confirms nothing
and contradicts nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from imageprov.disk.image import DiskImage, volume_name
from imageprov.disk.layout import Volume
from imageprov.disk.table import TableType
from imageprov.errors import LayoutError

FSTAB = PurePosixPath("/etc/fstab")
DATA_MOUNT = "/data"
_ROLE_FLAGS = "name the roles with --boot-part N, --rootfs-parts A,B and --data-part N"
# /dev/mmcblk0p3, /dev/nvme0n1p3, /dev/sda3, /dev/vda3: the partition's number ends the name.
_DEVICE_NUMBER = re.compile(r"^/dev/(?:mmcblk\d+p|nvme\d+n\d+p|(?:sd|vd|hd|xvd)[a-z]+|loop\d+p|md\d+p)(\d+)$")


@dataclass(frozen=True)
class DataMount:
    """The fstab entry that mounts ``/data``: its source as written, and its line."""

    source: str
    line: int


def data_mount(fstab: str) -> DataMount | None:
    """The last entry mounting ``/data`` (mount(8) takes the last of several), or None."""
    found = None
    for number, line in enumerate(fstab.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 2 and fields[1].rstrip("/") == DATA_MOUNT:
            found = DataMount(fields[0], number)
    return found


def _unescape(text: str) -> str:
    # fstab writes a space in a name as \040 (and so on), in octal.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def mounted_volume(disk: DiskImage, source: str) -> Volume | None:
    """The volume ``source`` (an fstab device field) names in this image; None if it cannot tell."""
    source = _unescape(source)
    volumes = [v for v in disk.layout.volumes if not v.partition.is_extended]
    kind, _, value = source.partition("=")
    for prefix, name in (("/dev/disk/by-partuuid/", "PARTUUID"), ("/dev/disk/by-label/", "LABEL")):
        if source.startswith(prefix):
            kind, value = name, source.removeprefix(prefix)
    if kind == "PARTUUID":
        return next((v for v in volumes if _partuuid(disk, v) == value.lower()), None)
    if kind == "LABEL":
        return next((v for v in volumes if v.label and v.label == value), None)
    match = _DEVICE_NUMBER.match(source)
    if match is not None:
        return next((v for v in volumes if v.partition.number == int(match.group(1))), None)
    return None


def _partuuid(disk: DiskImage, volume: Volume) -> str | None:
    """What the kernel calls PARTUUID: the GPT entry's GUID, or the MBR's disk id and the number (``1234abcd-03``)."""
    table = disk.layout.table
    if table.type is TableType.GPT:
        return volume.partition.uuid.lower() if volume.partition.uuid else None
    if table.type is TableType.MBR:
        return f"{int(table.disk_id, 16):08x}-{volume.partition.number:02x}" if table.disk_id else None
    return None


def confirm_data_partition(disk: DiskImage) -> None:
    """Refuse an image whose fstab mounts another partition at ``/data`` than the one read as data."""
    layout = disk.layout
    if layout.is_bare or not layout.rootfs_partitions or layout.data_volume is None:
        return
    rootfs_a = layout.rootfs_partitions[0]
    if not rootfs_a.filesystem.is_ext:
        return  # squashfs and the like: read elsewhere
    fstab = disk.ext(rootfs_a).fetch([FSTAB])[FSTAB][1]
    mount = data_mount(fstab.decode("utf-8", "replace")) if fstab is not None else None
    if mount is None:
        return  # a rootfs that mounts no /data: nothing to confirm with
    data = layout.data_volume
    mounted = mounted_volume(disk, mount.source)
    if mounted is None:
        if _DEVICE_NUMBER.match(_unescape(mount.source)) or mount.source.startswith(("PARTUUID=", "LABEL=")):
            raise LayoutError(
                f"{volume_name(rootfs_a)}'s /etc/fstab (line {mount.line}) mounts {mount.source} at /data, "
                f"which is no partition of this image; {volume_name(data)} was read as data",
                hint=_ROLE_FLAGS,
            )
        return
    if mounted.partition.number != data.partition.number:
        raise LayoutError(
            f"{volume_name(data)} was read as data, but {volume_name(rootfs_a)}'s /etc/fstab (line {mount.line}) "
            f"mounts partition {mounted.partition.number} ({mount.source}) at /data",
            hint=_ROLE_FLAGS,
        )
