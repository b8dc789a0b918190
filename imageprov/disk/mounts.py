"""What an fstab or a Mender configuration names a partition by, matched to the partitions of an image.

The device sees ``/dev/mmcblk0p3``, ``/dev/sda3``, ``PARTUUID=...`` or
``LABEL=...``; an image holds partition 3 of a table. Names are matched by the
partition's number, the PARTUUID the kernel gives it (the GPT entry's GUID, or
the MBR's disk id and the number), or its filesystem's label. A name of
another kind (``UUID=``, ``ubi0_1``) matches nothing and says nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from imageprov.disk.layout import Layout, Volume
from imageprov.disk.table import TableType

# /dev/mmcblk0p3, /dev/nvme0n1p3, /dev/sda3, /dev/hda3, /dev/vda3, /dev/loop0p3: the number ends the name.
_DEVICE_NUMBER = re.compile(r"^/dev/(?:mmcblk\d+p|nvme\d+n\d+p|(?:sd|vd|hd|xvd)[a-z]+|loop\d+p|md\d+p)(\d+)$")
_BY = {"/dev/disk/by-partuuid/": "PARTUUID", "/dev/disk/by-label/": "LABEL"}


@dataclass(frozen=True)
class Mount:
    """An fstab entry: its source as written, and its line."""

    source: str
    line: int


def mount_of(fstab: str, mountpoint: str) -> Mount | None:
    """The last entry mounting ``mountpoint`` (mount(8) takes the last of several), or None."""
    found = None
    for number, line in enumerate(fstab.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 2 and (_unescape(fields[1]).rstrip("/") or "/") == mountpoint:
            found = Mount(_unescape(fields[0]), number)
    return found


def _unescape(text: str) -> str:
    # fstab writes a space in a name as \040 (and so on), in octal.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def is_specific(name: str) -> bool:
    """Whether ``name`` is of a kind matched here, so that matching nothing means it is not in the image."""
    return bool(_DEVICE_NUMBER.match(name)) or name.startswith(("PARTUUID=", "LABEL=", *_BY))


def named_volume(layout: Layout, name: str) -> Volume | None:
    """The volume ``name`` (an fstab source, a RootfsPartA value) names in ``layout``; None if none is."""
    volumes = [v for v in layout.volumes if not v.partition.is_extended]
    kind, _, value = name.partition("=")
    for prefix, by in _BY.items():
        if name.startswith(prefix):
            kind, value = by, name.removeprefix(prefix)
    if kind == "PARTUUID":
        return next((v for v in volumes if _partuuid(layout, v) == value.lower()), None)
    if kind == "LABEL":
        return next((v for v in volumes if v.label and v.label == value), None)
    match = _DEVICE_NUMBER.match(name)
    if match is not None:
        return next((v for v in volumes if v.partition.number == int(match.group(1))), None)
    return None


def _partuuid(layout: Layout, volume: Volume) -> str | None:
    table = layout.table
    if table.type is TableType.GPT:
        return volume.partition.uuid.lower() if volume.partition.uuid else None
    if table.type is TableType.MBR and table.disk_id:
        return f"{int(table.disk_id, 16):08x}-{volume.partition.number:02x}"
    return None
