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
from typing import Any

from imageprov.disk.copy import edit_in_place
from imageprov.disk.ext4 import Inode, NewFile
from imageprov.disk.image import EMPTY_ROOTFS_B_NOTE, DiskImage
from imageprov.disk.layout import Overrides, Volume
from imageprov.errors import FilesystemError, UsageError
from imageprov.mender.conf import DATA_CONF, ROOTFS_CONF, Settings, conflicts, merge, parse, spelling
from imageprov.mender.server_ca import SERVER_CERT, SERVER_CERT_MODE, ServerCa
from imageprov.mender.verify import (
    DATA_CONF_PATH,
    KEY_PATH,
    ROOTFS_CONF_PATH,
    SERVER_CERT_PATH,
    migrate_scripts,
    migrate_warning,
)

# A partition, files to write on it and directories to make.
Change = tuple[Volume, list[NewFile], list[PurePosixPath]]


class ConfTarget(enum.Enum):
    # The data partition's conf, unless a rootfs conf sets what would override it.
    AUTO = "auto"
    ROOTFS = "rootfs"  # /etc/mender/mender.conf on every rootfs: the next update must carry it too
    DATA = "data"  # the data partition's conf, which updates keep: rootfs stay byte-identical


# Blocks a rootfs conf may hold only if the site builds them into every update:
# the default refuses to guess which of the two confs should carry them.
ROOTFS_OWNED = ("HttpsClient", "Security")
# meta-mender's mode for both confs (they may hold a tenant token), and so ours for a data conf we create.
NEW_DATA_CONF_MODE = 0o600


@dataclass(frozen=True)
class Prepared:
    changed: bool
    notes: tuple[str, ...]


def _rootfs_confs(disk: DiskImage) -> list[tuple[Volume, str, dict[str, Any]]]:
    """Each populated rootfs's mender.conf, parsed.

    A rootfs without one is refused even though the client could run on the
    fallback alone: it is the sign of a wrong partition or not a Mender image.
    """
    confs = []
    for volume in disk.rootfs_volumes:
        where = f"{ROOTFS_CONF} on {volume.role.value}"
        # Read whatever the rootfs is (ext4, or a read-only squashfs).
        confs.append((volume, where, parse(disk.read_on(volume, ROOTFS_CONF_PATH), where)))
    return confs


def _check_data_conf(disk: DiskImage) -> None:
    """Refuse a data partition conf that the clients would read apart, whichever conf is written."""
    data = disk.layout.data_volume
    if data is not None:
        text = disk.ext(data).fetch([DATA_CONF_PATH.inner])[DATA_CONF_PATH.inner][1]
        if text is not None:
            parse(text, DATA_CONF)


def resolve_target(disk: DiskImage, target: ConfTarget) -> ConfTarget:
    """The conf that ``target`` means for this image: ``auto`` becomes ``data``, or a one-line refusal.

    Every conf in the image is read first, whichever is to be written: one
    that the clients would read apart (a key in two spellings) is refused here,
    before a certificate is issued or anything is written, with either engine.
    """
    if disk.layout.data_volume is None:
        if target is not ConfTarget.ROOTFS:
            raise UsageError(
                f"{disk.path} is a bare root filesystem: it has no data partition for {DATA_CONF}",
                hint="prepare the disk image or the .dataimg, or pass --conf-target rootfs",
            )
    elif disk.layout.is_bare and target is ConfTarget.ROOTFS:
        raise UsageError(f"{disk.path} holds only the data partition", hint="use --conf-target data")
    rootfs_confs = _rootfs_confs(disk)
    _check_data_conf(disk)
    if target is not ConfTarget.AUTO:
        return target
    for _, where, conf in rootfs_confs:
        # In the file's own spelling: the client reads "httpsclient" as HttpsClient.
        owned = [key for name in ROOTFS_OWNED if (key := spelling(conf, name)) is not None]
        if owned:
            raise UsageError(
                f"{where} sets {' and '.join(owned)}, which the client reads over {DATA_CONF}, "
                "where --conf-target auto writes the block",
                hint="pass --conf-target rootfs (then every update must carry the block too), "
                "or use a golden image whose rootfs mender.conf leaves them out",
            )
    return ConfTarget.DATA


def plan_changes(disk: DiskImage, settings: Settings, target: ConfTarget) -> tuple[list[Change], list[str]]:
    """The writes every device's image needs, and notes for the user; none if the image is prepared."""
    layout = disk.layout
    notes: list[str] = []
    changes: list[Change] = []
    data = layout.data_volume
    mender_dir = disk.ext(data).stat(KEY_PATH.inner.parent) if data is not None else None
    if mender_dir is not None and mender_dir.kind != "directory":
        kind = "regular file" if mender_dir.kind == "regular" else mender_dir.kind
        raise FilesystemError(
            f"{KEY_PATH.device_path.parent} in the image is a {kind}, not a directory: "
            "the Mender client keeps its state, key and certificate in that directory",
            hint="fix the golden image: make /mender on the data partition a directory",
        )
    target = resolve_target(disk, target)
    if settings.server_ca is not None and data is None:
        raise UsageError(
            f"{disk.path} has no data partition for {SERVER_CERT}, which ServerCertificate would name",
            hint="prepare the disk image, or leave out --server-ca for a bare root filesystem",
        )
    data_files: list[NewFile] = []
    if target is ConfTarget.ROOTFS:
        if disk.rootfs_b_empty:
            notes.append(EMPTY_ROOTFS_B_NOTE)
        notes.append(f"HttpsClient goes to {ROOTFS_CONF}: an update built without it removes it")
        for volume in disk.rootfs_volumes:
            where = f"{ROOTFS_CONF} on {volume.role.value}"
            fs = disk.ext(volume)
            current = fs.read(ROOTFS_CONF_PATH)
            merged = merge(current, settings, where)
            if merged.replaced is not None:
                notes.append(f"{where}: replaced HttpsClient {merged.replaced}")
            if merged.replaced_auth_key is not None:
                notes.append(f"{where}: replaced Security.AuthPrivateKey {merged.replaced_auth_key}")
            if merged.changed:
                changes.append((volume, [_keeping_owner(fs.stat(ROOTFS_CONF_PATH), ROOTFS_CONF_PATH, merged.text)], []))
    else:
        for _, where, conf in _rootfs_confs(disk):
            # The client reads /etc/mender/mender.conf over the fallback: what it sets wins.
            overridden = conflicts(conf, settings)
            if overridden:
                raise UsageError(
                    f"{where} sets {', '.join(overridden)}, which the client reads over {DATA_CONF}",
                    hint="pass --conf-target rootfs, or set these in the build (MENDER_SERVER_URL, "
                    "MENDER_TENANT_TOKEN) and leave them out here",
                )
        data_fs = disk.ext(layout.data_partition)
        inode, fallback = data_fs.fetch([DATA_CONF_PATH.inner])[DATA_CONF_PATH.inner]
        merged = merge(fallback, settings, DATA_CONF)
        if merged.replaced is not None:
            notes.append(f"{DATA_CONF}: replaced HttpsClient {merged.replaced}")
        if merged.replaced_auth_key is not None:
            notes.append(f"{DATA_CONF}: replaced Security.AuthPrivateKey {merged.replaced_auth_key}")
        if merged.changed or inode is None:
            data_files.append(_keeping_owner(inode, DATA_CONF_PATH.inner, merged.text, NEW_DATA_CONF_MODE))
        # The script runs on the device at an update: it rewrites the conf written here.
        scripts = migrate_scripts(disk)
        if scripts:
            notes.append(migrate_warning(scripts))
    if settings.server_ca is not None:
        data_files += _server_cert_file(disk, settings.server_ca)
    dirs = [KEY_PATH.inner.parent] if data is not None and mender_dir is None else []
    if data_files or dirs:
        # One change for the data partition: its directory is made with the files that go into it.
        changes.append((layout.data_partition, data_files, dirs))
    return changes, notes


def _server_cert_file(disk: DiskImage, server_ca: ServerCa) -> list[NewFile]:
    """The edge's certificate(s) at SERVER_CERT, 0644 root:root; nothing if the image holds them already."""
    inode, content = disk.ext(disk.layout.data_partition).fetch([SERVER_CERT_PATH.inner])[SERVER_CERT_PATH.inner]
    if inode is not None and inode.kind not in ("regular",):
        raise FilesystemError(f"{SERVER_CERT} in the image is a {inode.kind}, not a file",
                              hint="fix the golden image: remove it, or leave out --server-ca")  # fmt: skip
    # Replaced, not merged: a site that changes its edge's CA means the new one only.
    if (
        inode is not None
        and content == server_ca.pem
        and (inode.mode, inode.uid, inode.gid) == (SERVER_CERT_MODE, 0, 0)
    ):
        return []
    return [NewFile(SERVER_CERT_PATH.inner, server_ca.pem, SERVER_CERT_MODE)]


def _keeping_owner(inode: Inode | None, path: PurePosixPath, text: bytes, new_mode: int = 0o644) -> NewFile:
    # meta-mender installs both confs 0600 (they may hold a tenant token): a
    # merge keeps the mode and owner that were there, a new file gets ``new_mode``, root's.
    if inode is None or inode.kind != "regular":
        return NewFile(path, text, new_mode)
    return NewFile(path, text, inode.mode, inode.uid, inode.gid)


def apply_changes(disk: DiskImage, changes: list[Change]) -> None:
    for volume, files, dirs in changes:
        disk.ext(volume).write_files(files, dirs=dirs)


def prepare_in_place(
    image: Path, settings: Settings, target: ConfTarget = ConfTarget.AUTO, overrides: Overrides | None = None
) -> Prepared:
    """Prepare ``image`` in place, atomically; an image already prepared is not written to at all."""
    disk = DiskImage.open(image, overrides)
    replayed: list[str] = []
    unreplayed = bool(disk.unreplayed())
    if not unreplayed:
        changes, notes = plan_changes(disk, settings, target)
        if not changes:
            return Prepared(False, tuple(notes))
    with edit_in_place(image) as staging:
        copy = disk.at(staging)
        if unreplayed:
            # What the build left unreplayed is replayed before anything is read or written.
            replayed = copy.replay_journals()
            changes, notes = plan_changes(copy, settings, target)
        apply_changes(copy, changes)
    if replayed:
        notes.insert(0, f"replayed the journal of {', '.join(replayed)}")
    return Prepared(True, tuple(notes))
