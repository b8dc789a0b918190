"""Build a Mender-style golden disk image from real tools, for demos, tests and benchmarks.

The image is laid out as Mender's image classes lay it out: boot vfat, rootfs
A, rootfs B, data ext4 last, aligned to 8 MiB (``IMAGE_ROOTFS_ALIGNMENT``).
sfdisk writes the table, mkfs.vfat and ``mke2fs -d`` write the filesystems
straight at their offsets, so the result is sparse and needs no root.

Options reproduce what real meta-mender builds give: an ext4 boot partition
(``MENDER_BOOT_PART_FSTYPE``), rootfs B left empty (an empty ext4, what wic's
``part --fstype`` without a source makes, or never formatted), and the split
configuration (``split-mender-config``: RootfsPartA/B in
``/data/mender/mender.conf``, the rest in ``/etc/mender/mender.conf``, both
0600, ``/var/lib/mender`` a link to ``/data/mender``). ``build_filesystem_image``
writes a bare ``rootfs.ext4`` or ``.dataimg`` as the build deploys them.
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


# The keys meta-mender's split configuration keeps on the data partition
# (MENDER_PERSISTENT_CONFIGURATION_VARS); the others stay in the rootfs.
PERSISTENT_KEYS = ("RootfsPartA", "RootfsPartB")


class RootfsB(enum.Enum):
    COPY = "copy"  # a copy of rootfs A (mender-prepopulate-inactive-partition)
    EMPTY_EXT4 = "empty-ext4"  # an ext4 with nothing in it: meta-mender's default
    UNFORMATTED = "unformatted"  # zeros: no filesystem until the first update


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
    boot_fs: str = "vfat"  # or "ext4"
    rootfs_b: RootfsB = RootfsB.COPY
    split_conf: bool = False
    # What rootfs A's /etc/fstab mounts at /data; None: the data partition by
    # device name, as meta-mender writes it (${MENDER_DATA_PART}); "": no such line.
    data_mount: str | None = None


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
    # Logical partitions are numbered from 5, after the extended one at 4.
    data_number = 4 + len(rest) if spec.scheme is Scheme.MBR_EXTENDED else len(starts)
    # mkfs.vfat picks the FAT size from the whole file's size, not the
    # partition's, and fails on a small partition in a large image: name it.
    uboot_env = b"bootcmd=run mender_setup\n"
    with tempfile.TemporaryDirectory(prefix="imageprov-golden-") as tmp:
        if spec.boot_fs == "ext4":
            boot_tree = Path(tmp, "boot")
            boot_tree.mkdir()
            (boot_tree / "uboot.env").write_bytes(uboot_env)
            _mke2fs(path, boot, spec.boot_mib, "boot", boot_tree)
        else:
            fat = "16" if spec.boot_mib < 512 else "32"
            run(["mkfs.vfat", "-F", fat, "--offset", str(boot // SECTOR), "-n", "BOOT", str(path),
                 str(spec.boot_mib * 1024)])  # fmt: skip
            Vfat(path, boot, "boot").write(PurePosixPath("/uboot.env"), uboot_env)
        rootfs_tree = _rootfs_tree(Path(tmp, "rootfs"), spec, data_number)
        data_tree = _data_tree(Path(tmp, "data"), spec)
        _mke2fs(path, rootfs_a, spec.rootfs_mib, "rootfs-a", rootfs_tree)
        if spec.rootfs_b is RootfsB.COPY:
            _mke2fs(path, rootfs_b, spec.rootfs_mib, "rootfs-b", rootfs_tree)
        elif spec.rootfs_b is RootfsB.EMPTY_EXT4:
            empty = Path(tmp, "empty")
            empty.mkdir()
            _mke2fs(path, rootfs_b, spec.rootfs_mib, "rootfs-b", empty)
        _mke2fs(path, data, spec.data_mib, "data", data_tree)
    return path


def build_filesystem_image(path: Path, spec: GoldenSpec = GoldenSpec(), *, data: bool = False) -> Path:
    """Write a bare ext4 image as a build deploys it: the root filesystem (``rootfs.ext4``) or ``.dataimg``."""
    path.unlink(missing_ok=True)
    mib = spec.data_mib if data else spec.rootfs_mib
    with open(path, "wb") as handle:
        handle.truncate(mib * MIB)
    with tempfile.TemporaryDirectory(prefix="imageprov-golden-") as tmp:
        tree = _data_tree(Path(tmp, "data"), spec) if data else _rootfs_tree(Path(tmp, "rootfs"), spec)
        _mke2fs(path, 0, mib, "data" if data else "rootfs", tree)
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


def _rootfs_tree(root: Path, spec: GoldenSpec, data_number: int) -> Path:
    (root / "etc/mender").mkdir(parents=True)
    (root / "data").mkdir()
    # meta-mender's fstab (base-files): MENDER_BOOT_PART at /uboot, MENDER_DATA_PART at /data.
    device = "/dev/sda" if spec.scheme is Scheme.GPT else "/dev/mmcblk0p"
    source = spec.data_mount if spec.data_mount is not None else f"{device}{data_number}"
    lines = ["/dev/root            /                    auto       defaults              1  1",
             "proc                 /proc                proc       defaults              0  0",
             f"{device}1 /uboot {spec.boot_fs} defaults 0 0"]  # fmt: skip
    if source:
        lines.append(f"{source} /data ext4 defaults 0 0")
    (root / "etc/fstab").write_text("\n".join(lines) + "\n")
    conf = root / "etc/mender/mender.conf"
    if spec.split_conf:
        transient = {k: v for k, v in json.loads(spec.mender_conf).items() if k not in PERSISTENT_KEYS}
        conf.write_text(json.dumps(transient, indent=4, sort_keys=True))
        conf.chmod(0o600)
        (root / "var/lib").mkdir(parents=True)
        (root / "var/lib/mender").symlink_to("/data/mender")
    else:
        conf.write_text(spec.mender_conf)
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
    if spec.split_conf:
        persistent = {k: v for k, v in json.loads(spec.mender_conf).items() if k in PERSISTENT_KEYS}
        conf = root / "mender/mender.conf"
        conf.write_text(json.dumps(persistent, indent=4, sort_keys=True))
        conf.chmod(0o600)
    return root
