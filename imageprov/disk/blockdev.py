"""Block devices as flashing targets: what a device is (sysfs), and whether it may be written.

A flashing station writes whole cards, so the one question that matters most
is whether a path names a card and nothing else. ``check_target`` answers it
in one place, refusing (in this order) what is not a block device, a
partition, the disk that holds ``/``, the golden image or the PKI, a disk
that is mounted or in use, a read-only or too small disk, and a disk that is
not removable unless forced. Loop devices are allowed: they are how a
station is tested, and a loop device backed by the golden image is still
refused. Nothing here guesses a target: the caller names it.

Everything is read from sysfs (``/sys/dev/block/MAJ:MIN``) and
``/proc/self/mountinfo``; nothing needs udev.
"""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from imageprov.errors import ImageprovError

SYS = Path("/sys")
_BLKFLSBUF = 0x1261  # _IO(0x12, 97): write out and drop the device's buffer cache


class TargetError(ImageprovError):
    """A flashing target is refused, or cannot be opened or written."""


@dataclass(frozen=True)
class BlockDevice:
    """A whole disk as sysfs describes it."""

    path: Path  # as the user named it, e.g. /dev/disk/by-id/usb-...
    name: str  # the kernel's name: sdb, mmcblk0, loop3
    rdev: int
    size: int
    removable: bool
    read_only: bool
    logical_block: int
    serial: str | None = None
    model: str | None = None
    backing_file: str | None = None  # loop devices

    @property
    def is_loop(self) -> bool:
        return self.name.startswith("loop")

    @property
    def identity(self) -> str:
        """What the card is, for the registry and the line log."""
        if self.backing_file is not None:
            return f"{self.name} (loop over {self.backing_file})"
        parts = [self.name, *(p for p in (self.model, self.serial and f"serial {self.serial}") if p)]
        return " ".join(parts)


def flush_buffers(fd: int) -> None:
    """Write out and drop the page cache of a block device, so that what is read next comes from the card."""
    try:
        fcntl.ioctl(fd, _BLKFLSBUF)
    except OSError:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _sysdir(rdev: int) -> Path:
    return SYS / "dev" / "block" / f"{os.major(rdev)}:{os.minor(rdev)}"


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _disk_of(sysdir: Path) -> Path:
    """The whole disk's sysfs directory for a disk or one of its partitions."""
    real = sysdir.resolve()
    return real.parent if (real / "partition").exists() else real


def _underlying(sysdir: Path, seen: set[Path] | None = None) -> set[Path]:
    """Every whole disk the device at ``sysdir`` lives on: its own disk, the disks under a dm/md
    device (``slaves``), and the disks holding a loop device's backing file."""
    seen = set() if seen is None else seen
    disk = _disk_of(sysdir)
    if disk in seen:
        return seen
    seen.add(disk)
    for slave in (disk / "slaves").glob("*"):
        _underlying(slave, seen)
    info = _backing(disk)
    if info is not None:
        # A loop device over a device node (mount -o loop,offset=... /dev/sdb) lives on
        # that device (st_rdev); over a file, on the disk holding the file (st_dev).
        dev = info.st_rdev if stat.S_ISBLK(info.st_mode) else info.st_dev
        if os.major(dev) != 0 and _sysdir(dev).exists():
            _underlying(_sysdir(dev), seen)
    return seen


def _backing(disk: Path) -> os.stat_result | None:
    """What a loop device reads (its backing file or device node); None for another disk or a file gone."""
    backing = _read(disk / "loop" / "backing_file")
    if not backing:
        return None
    try:
        return os.stat(backing.removesuffix(" (deleted)"))
    except OSError:
        return None


def _mounts() -> list[tuple[str, str, str]]:
    """(``major:minor``, mount point, source) of every mount, from /proc/self/mountinfo."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    mounts = []
    for line in lines:
        fields, _, tail = line.partition(" - ")
        left, right = fields.split(), tail.split()
        if len(left) >= 5 and len(right) >= 2:
            mounts.append((left[2], left[4].replace("\\040", " "), right[1]))
    return mounts


def _disks_of_mount(dev_id: str, source: str) -> set[Path]:
    major, _, minor = dev_id.partition(":")
    sysdir = SYS / "dev" / "block" / f"{major}:{minor}"
    if major != "0" and sysdir.exists():
        return _underlying(sysdir)
    # btrfs (and other filesystems on anonymous device numbers) name their disk only as the mount's source.
    if not source.startswith("/dev/"):
        return set()
    try:
        info = os.stat(source)
    except OSError:
        return set()
    return _underlying(_sysdir(info.st_rdev)) if stat.S_ISBLK(info.st_mode) else set()


def disks_holding(path: Path) -> set[Path]:
    """The sysfs directories of the whole disks that the file or directory ``path`` is stored on."""
    dev = os.stat(path).st_dev
    if os.major(dev) != 0 and _sysdir(dev).exists():
        return _underlying(_sysdir(dev))
    wanted = f"{os.major(dev)}:{os.minor(dev)}"
    found: set[Path] = set()
    for dev_id, _, source in _mounts():  # tmpfs, overlay, NFS: no disk; btrfs: its source
        if dev_id == wanted:
            found |= _disks_of_mount(dev_id, source)
    return found


def _mounted_disks() -> dict[Path, str]:
    """Whole disks under a mounted filesystem or an active swap area, with the mount point."""
    found: dict[Path, str] = {}
    for dev_id, where, source in _mounts():
        for disk in _disks_of_mount(dev_id, source):
            found.setdefault(disk, where)
    for line in (_read(Path("/proc/swaps")) or "").splitlines()[1:]:
        device = line.split()[0] if line.split() else ""
        try:
            swap = os.stat(device)
        except OSError:
            continue
        if stat.S_ISBLK(swap.st_mode):
            for disk in _underlying(_sysdir(swap.st_rdev)):
                found.setdefault(disk, "swap")
    return found


def _same_bytes(disk: Path) -> set[Path]:
    """``disk`` and every disk whose bytes it shows: a loop device over a device node is that device.

    (A loop device over a regular file shows the file, not the disk holding it.)"""
    found = {disk}
    info = _backing(disk)
    if info is not None and stat.S_ISBLK(info.st_mode):
        found |= _same_bytes(_disk_of(_sysdir(info.st_rdev)))
    return found


def _loops_over(disks: set[Path]) -> list[Path]:
    """The loop devices whose backing file is one of ``disks`` or a partition of them."""
    found = []
    for loop in (SYS / "block").glob("loop*"):
        info = _backing(loop)
        if info is not None and stat.S_ISBLK(info.st_mode) and _disk_of(_sysdir(info.st_rdev)) in disks:
            found.append(loop.resolve())
    return found


def _serial(disk: Path) -> str | None:
    # SCSI/NVMe/MMC devices carry it on their device; USB readers on the USB
    # device a few levels up.
    device = (disk / "device").resolve()
    for where in [device, *list(device.parents)[:6]]:
        value = _read(where / "serial")
        if value:
            return value
    return _read(device / "wwid")


def identify(path: Path) -> BlockDevice:
    """Describe the block device at ``path`` (a whole disk or a partition) from sysfs."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise TargetError(f"target {path} does not exist", hint="name the card's device, e.g. /dev/sdb") from exc
    if not stat.S_ISBLK(info.st_mode):
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "a regular file" if stat.S_ISREG(info.st_mode) else ""
        raise TargetError(
            f"target {path} is not a block device{f' but {kind}' if kind else ''}",
            hint="name the card's device, e.g. /dev/sdb; images are written to files by 'imageprov stamp'",
        )
    sysdir = _sysdir(info.st_rdev).resolve()
    # sysfs counts 512-byte sectors whatever the device's; the device is not even opened.
    size = int(_read(sysdir / "size") or 0) * 512
    model = " ".join(filter(None, (_read(sysdir / "device" / n) for n in ("vendor", "model")))) or None
    return BlockDevice(
        path=path,
        name=sysdir.name,
        rdev=info.st_rdev,
        size=size,
        removable=_read(sysdir / "removable") == "1",
        read_only=_read(sysdir / "ro") == "1",
        logical_block=int(_read(sysdir / "queue" / "logical_block_size") or 512),
        serial=_serial(sysdir),
        model=model,
        backing_file=_read(sysdir / "loop" / "backing_file"),
    )


def _on_removable_bus(disk: Path) -> bool:
    # Card readers and USB sticks that do not set the removable flag.
    real = str((disk / "device").resolve())
    return disk.name.startswith("mmcblk") or "/usb" in real


def check_target(
    path: Path,
    *,
    image_size: int,
    protected: Iterable[Path] = (),
    force: bool = False,
) -> BlockDevice:
    """The whole disk at ``path`` if it may be overwritten by an image of ``image_size`` bytes; else raise.

    ``protected`` are files and directories (the golden image, the PKI) whose
    disks are refused, besides the disk holding ``/``. ``force`` allows a disk
    that is not removable, and nothing else.
    """
    device = identify(path)
    sysdir = _sysdir(device.rdev).resolve()
    if (sysdir / "partition").exists():
        raise TargetError(
            f"target {path} is partition {_read(sysdir / 'partition')} of /dev/{sysdir.parent.name}, not a whole disk",
            hint=f"name the whole card, /dev/{sysdir.parent.name}",
        )
    if sysdir in disks_holding(Path("/")):
        raise TargetError(f"target {path} ({device.name}) holds the root filesystem /", hint="this is the system disk")
    for kept in protected:
        if sysdir in disks_holding(kept) or _backs(device, kept):
            raise TargetError(f"target {path} ({device.name}) holds {kept}", hint="it would be overwritten")
    # The target and the disks it is another name for (a loop device over the card is the card).
    under = _same_bytes(sysdir)
    mounted = _mounted_disks()
    for disk in sorted(under & set(mounted)):
        through = "" if disk == sysdir else f" through /dev/{disk.name}"
        raise TargetError(
            f"target {path} ({device.name}) is mounted, or holds a mounted partition{through} (on {mounted[disk]})",
            hint="unmount it first (umount), or check that this is the card",
        )
    holders = sorted(p.name for p in [*sysdir.glob("holders/*"), *sysdir.glob(f"{sysdir.name}*/holders/*")])
    # A loop device over the card (or one of its partitions) holds it, though sysfs
    # lists no holder for a loop device: found from the loop devices' backing files.
    holders += sorted(loop.name for loop in _loops_over(under) if loop != sysdir)
    if holders:
        raise TargetError(f"target {path} ({device.name}) is in use by {', '.join(holders)}")
    if device.read_only:
        raise TargetError(f"target {path} ({device.name}) is read-only", hint="is the card's lock switch on?")
    if device.size < image_size:
        raise TargetError(
            f"target {path} ({device.name}) has {device.size} bytes, less than the image's {image_size}",
            hint="use a larger card",
        )
    if not (device.removable or device.is_loop or _on_removable_bus(sysdir) or force):
        raise TargetError(
            f"target {path} ({device.name}) is not a removable disk",
            hint="pass --force if this fixed disk really is to be overwritten",
        )
    return device


def _backs(device: BlockDevice, kept: Path) -> bool:
    """True if ``device`` is a loop device whose backing file is ``kept`` or lies under it."""
    if device.backing_file is None:
        return False
    backing = Path(device.backing_file.removesuffix(" (deleted)"))
    try:
        if os.path.samefile(backing, kept):
            return True
    except OSError:
        return False
    return kept.is_dir() and kept.resolve() in backing.resolve().parents


def open_exclusive(device: BlockDevice) -> tuple[int, bool]:
    """Open the whole disk for writing, and whether with O_DIRECT.

    O_EXCL makes the kernel refuse while anything holds the disk (a mount, a
    dm or md device) and keeps others from claiming it while we write.
    """
    flags = os.O_WRONLY | os.O_EXCL | os.O_CLOEXEC
    try:
        try:
            return os.open(device.path, flags | os.O_DIRECT), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: this device does not take O_DIRECT
                raise
            return os.open(device.path, flags), False
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise TargetError(
                f"target {device.path} ({device.name}) is busy: mounted or held by another program"
            ) from exc
        raise TargetError(f"cannot open target {device.path} ({device.name}): {exc.strerror}") from exc


def removable_disks(names: Iterable[str] = ()) -> dict[str, int]:
    """Whole disks with a medium in them, by kernel name, with their size in bytes.

    Without ``names`` (fnmatch patterns of kernel names), disks with the
    removable flag and SD/MMC slots only; with them, exactly the disks they
    match, loop devices included.
    """
    patterns = list(names)
    found = {}
    for entry in (SYS / "block").iterdir():
        if patterns:
            if not any(fnmatch.fnmatchcase(entry.name, p) for p in patterns):
                continue
        elif not (_read(entry / "removable") == "1" or entry.name.startswith("mmcblk")):
            # Not every USB disk: a backup drive plugged in at the station must not be taken for a card.
            continue
        sectors = _read(entry / "size")
        if sectors and sectors.isdigit() and int(sectors) > 0:
            found[entry.name] = int(sectors) * 512  # sysfs counts 512-byte sectors whatever the device's
    return found
