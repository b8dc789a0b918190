"""Build a Mender-style golden disk image from real tools, for demos, tests and benchmarks.

The image is laid out as Mender's image classes lay it out: boot vfat, rootfs
A, rootfs B, data ext4 last, aligned to 8 MiB (``IMAGE_ROOTFS_ALIGNMENT``).
sfdisk writes the table, mkfs.vfat and ``mke2fs -d`` write the filesystems
straight at their offsets, so the result is sparse and needs no root.
"""

from __future__ import annotations

import enum
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from imageprov.disk.vfat import Vfat
from imageprov.errors import UsageError
from imageprov.run import run

MIB = 1 << 20
ALIGN = 8 * MIB
SECTOR = 512

ESP_GUID = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX_FS_GUID = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"

DEFAULT_MENDER_CONF: dict[str, object] = {
    "ServerURL": "https://mender.example.com",
    "TenantToken": "",
    "RootfsPartA": "/dev/mmcblk0p2",
    "RootfsPartB": "/dev/mmcblk0p3",
    "UpdatePollIntervalSeconds": 1800,
    "InventoryPollIntervalSeconds": 28800,
}


class Scheme(enum.Enum):
    MBR = "mbr"  # .sdimg: 4 primaries
    MBR_EXTENDED = "mbr-extended"  # 3 primaries + extended: swap 5, data 6
    GPT = "gpt"  # .uefiimg

    @property
    def suffix(self) -> str:
        return ".uefiimg" if self is Scheme.GPT else ".sdimg"


@dataclass(frozen=True)
class GoldenSpec:
    scheme: Scheme = Scheme.MBR
    boot_mib: int = 16
    rootfs_mib: int = 64
    data_mib: int = 32
    swap_mib: int = 8
    # MiB of incompressible payload in each rootfs, so copies cost what real ones do.
    payload_mib: int = 0
    device_type: str = "imageprov-demo"
    mender_conf: str = json.dumps(DEFAULT_MENDER_CONF, indent=2) + "\n"


def build_golden(path: Path, spec: GoldenSpec = GoldenSpec()) -> Path:
    """Write a golden image to ``path`` (overwriting it) and return the path."""
    if spec.payload_mib >= spec.rootfs_mib:
        raise UsageError("the rootfs payload must be smaller than the rootfs")
    sizes = [spec.boot_mib * MIB, spec.rootfs_mib * MIB, spec.rootfs_mib * MIB]
    if spec.scheme is Scheme.MBR_EXTENDED:
        sizes.append(spec.swap_mib * MIB)
    sizes.append(spec.data_mib * MIB)
    # Each partition starts on an 8 MiB boundary; a logical partition needs
    # room for its EBR before it, which costs one more alignment step.
    starts, pos = [], ALIGN
    for index, size in enumerate(sizes):
        if spec.scheme is Scheme.MBR_EXTENDED and index >= 3:
            pos += ALIGN
        starts.append(pos)
        pos += size
    total = pos + ALIGN  # room for the backup GPT at the end
    path.unlink(missing_ok=True)
    with open(path, "wb") as handle:
        handle.truncate(total)
    _partition(path, spec.scheme, starts, sizes)
    boot, rootfs_a, rootfs_b, *rest = starts
    data = rest[-1]
    # mkfs.vfat picks the FAT size from the whole file's size, not the
    # partition's, and fails on a small partition in a large image: name it.
    fat = "16" if spec.boot_mib < 512 else "32"
    run(["mkfs.vfat", "-F", fat, "--offset", str(boot // SECTOR), "-n", "BOOT", str(path), str(spec.boot_mib * 1024)])
    Vfat(path, boot, "boot").write(PurePosixPath("/uboot.env"), b"bootcmd=run mender_setup\n")
    with tempfile.TemporaryDirectory(prefix="imageprov-golden-") as tmp:
        rootfs_tree = _rootfs_tree(Path(tmp, "rootfs"), spec)
        data_tree = _data_tree(Path(tmp, "data"), spec)
        for offset, label in ((rootfs_a, "rootfs-a"), (rootfs_b, "rootfs-b")):
            _mke2fs(path, offset, spec.rootfs_mib, label, rootfs_tree)
        _mke2fs(path, data, spec.data_mib, "data", data_tree)
    return path


def _partition(path: Path, scheme: Scheme, starts: list[int], sizes: list[int]) -> None:
    lines = [f"label: {'gpt' if scheme is Scheme.GPT else 'dos'}", "unit: sectors"]
    sec = [(s // SECTOR, n // SECTOR) for s, n in zip(starts, sizes)]
    if scheme is Scheme.GPT:
        names = ["boot", "rootfs-a", "rootfs-b", "data"]
        for (start, size), name in zip(sec, names):
            kind = ESP_GUID if name == "boot" else LINUX_FS_GUID
            lines.append(f"start={start}, size={size}, type={kind}, name={name}")
    else:
        (b, bn), (a, an), (r, rn), *logical = sec
        lines += [
            f"start={b}, size={bn}, type=c, bootable",
            f"start={a}, size={an}, type=83",
            f"start={r}, size={rn}, type=83",
        ]
        if scheme is Scheme.MBR:
            lines.append(f"start={logical[0][0]}, size={logical[0][1]}, type=83")
        else:
            first = logical[0][0] - ALIGN // SECTOR
            end = logical[-1][0] + logical[-1][1]
            lines.append(f"start={first}, size={end - first}, type=5")
            for (start, size), kind in zip(logical, ("82", "83")):
                lines.append(f"start={start}, size={size}, type={kind}")
    script = "\n".join(lines) + "\n"
    run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(path)], input=script.encode())


def _mke2fs(path: Path, offset: int, mib: int, label: str, tree: Path) -> None:
    run(
        [
            "mke2fs",
            "-q",
            "-F",
            "-t",
            "ext4",
            "-L",
            label,
            "-E",
            f"offset={offset},root_owner=0:0",
            "-d",
            str(tree),
            str(path),
            f"{mib * 1024}k",
        ]
    )


def _rootfs_tree(root: Path, spec: GoldenSpec) -> Path:
    (root / "etc/mender").mkdir(parents=True)
    (root / "data").mkdir()
    (root / "etc/mender/mender.conf").write_text(spec.mender_conf)
    (root / "etc/hostname").write_text("imageprov-demo\n")
    (root / "etc/os-release").write_text('NAME="imageprov demo"\nID=imageprov-demo\n')
    if spec.payload_mib:
        with open(root / "payload.bin", "wb") as handle:
            for _ in range(spec.payload_mib):
                handle.write(os.urandom(MIB))
    return root


def _data_tree(root: Path, spec: GoldenSpec) -> Path:
    (root / "mender").mkdir(parents=True)
    (root / "mender/device_type").write_text(f"device_type={spec.device_type}\n")
    return root
