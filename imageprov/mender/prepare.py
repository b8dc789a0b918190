"""What is the same for every device: mender.conf's HttpsClient and Security blocks, and /data/mender.

``stamp`` does this once per batch on a private copy; ``imageprov prepare``
does it once, in place, on a build's own image (a Yocto post-build hook), so
that stamping then touches only the data partition. Preparing is idempotent:
a prepared image needs no change and is not written to.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from imageprov.disk.copy import edit_in_place
from imageprov.disk.ext4 import NewFile
from imageprov.disk.image import DiskImage
from imageprov.disk.layout import Overrides, Volume
from imageprov.errors import UsageError
from imageprov.mender.conf import DATA_CONF, ROOTFS_CONF, Settings, auth_private_key, merge, parse
from imageprov.mender.verify import DATA_CONF_PATH, KEY_PATH, ROOTFS_CONF_PATH

# A partition, files to write on it and directories to make.
Change = tuple[Volume, list[NewFile], list[PurePosixPath]]


class ConfTarget(enum.Enum):
    ROOTFS = "rootfs"  # /etc/mender/mender.conf on both rootfs partitions
    DATA = "data"  # the fallback config on the data partition: rootfs stay byte-identical


@dataclass(frozen=True)
class Prepared:
    changed: bool
    notes: tuple[str, ...]


def plan_changes(disk: DiskImage, settings: Settings, target: ConfTarget) -> tuple[list[Change], list[str]]:
    """The writes every device's image needs, and notes for the user; none if the image is prepared."""
    layout = disk.layout
    notes: list[str] = []
    changes: list[Change] = []
    data_fs = disk.ext(layout.data_partition)
    for volume in layout.rootfs_partitions:
        where = f"{ROOTFS_CONF} on {volume.role.value}"
        current = disk.ext(volume).read(ROOTFS_CONF_PATH)
        if target is ConfTarget.ROOTFS:
            merged = merge(current, settings, where)
            if merged.replaced is not None:
                notes.append(f"{where}: replaced HttpsClient {merged.replaced}")
            if merged.replaced_auth_key is not None:
                notes.append(f"{where}: replaced Security.AuthPrivateKey {merged.replaced_auth_key}")
            if merged.changed:
                changes.append((volume, [NewFile(ROOTFS_CONF_PATH, merged.text, 0o644)], []))
            continue
        main = parse(current, where)
        # The client reads /etc/mender/mender.conf over the fallback: a block there wins.
        if "HttpsClient" in main and main["HttpsClient"] != settings.https_client:
            raise UsageError(
                f"{where} has its own HttpsClient, which overrides the data partition's",
                hint="use --conf-target rootfs, or remove it from the golden image",
            )
        wanted = settings.auth_private_key
        if wanted is not None and auth_private_key(main) not in (None, wanted):
            raise UsageError(
                f"{where} has its own Security.AuthPrivateKey, which overrides the data partition's",
                hint="use --conf-target rootfs, --auth-key device, or remove it from the golden image",
            )
    if target is ConfTarget.DATA:
        inode, fallback = data_fs.fetch([DATA_CONF_PATH.inner])[DATA_CONF_PATH.inner]
        merged = merge(fallback, settings, DATA_CONF)
        if merged.replaced is not None:
            notes.append(f"{DATA_CONF}: replaced HttpsClient {merged.replaced}")
        if merged.replaced_auth_key is not None:
            notes.append(f"{DATA_CONF}: replaced Security.AuthPrivateKey {merged.replaced_auth_key}")
        if merged.changed or inode is None:
            changes.append((layout.data_partition, [NewFile(DATA_CONF_PATH.inner, merged.text, 0o644)], []))
    if data_fs.stat(KEY_PATH.inner.parent) is None:
        changes.append((layout.data_partition, [], [KEY_PATH.inner.parent]))
    return changes, notes


def apply_changes(disk: DiskImage, changes: list[Change]) -> None:
    for volume, files, dirs in changes:
        disk.ext(volume).write_files(files, dirs=dirs)


def prepare_in_place(
    image: Path, settings: Settings, target: ConfTarget = ConfTarget.ROOTFS, overrides: Overrides | None = None
) -> Prepared:
    """Prepare ``image`` in place, atomically; an image already prepared is not written to at all."""
    disk = DiskImage.open(image, overrides)
    changes, notes = plan_changes(disk, settings, target)
    if not changes:
        return Prepared(False, tuple(notes))
    with edit_in_place(image) as staging:
        apply_changes(disk.at(staging), changes)
    return Prepared(True, tuple(notes))
