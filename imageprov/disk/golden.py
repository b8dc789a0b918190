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
SWAP_GUID = "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F"

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
    boot_mib: int = 16  # 0: no boot partition (MENDER_BOOT_PART_SIZE_MB = "0")
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
    # None: swap in an MBR_EXTENDED image only (its swap 5, data 6).
    swap_part: bool | None = None
    extra_parts: int = 0  # MENDER_EXTRA_PARTS: ext4 partitions after data
    rootfs_fs: str = "ext4"  # or "squashfs" (ARTIFACTIMG_FSTYPE): read-only rootfs A and B
    extra_mib: int = 8
    # What rootfs A's /etc/fstab mounts at /data; None: the data partition by
    # device name, as meta-mender writes it (${MENDER_DATA_PART}); "": no such line.
    data_mount: str | None = None


@dataclass(frozen=True)
class _Part:
    """One partition of a golden image, in meta-mender's order."""

    role: str  # boot, rootfs-a, rootfs-b, swap, data, extraN
    size: int
    number: int = 0
    start: int = 0


def _plan(spec: GoldenSpec) -> list[_Part]:
    """meta-mender's order: [boot], rootfs A, rootfs B, [swap], data, [extras]; numbered and placed.

    An MBR of more than four partitions holds the fourth and later ones as
    logical partitions of an extended one at 4, numbered from 5, as wic makes it."""
    roles = [("boot", spec.boot_mib)] if spec.boot_mib else []
    roles += [("rootfs-a", spec.rootfs_mib), ("rootfs-b", spec.rootfs_mib)]
    if spec.swap_part if spec.swap_part is not None else spec.scheme is Scheme.MBR_EXTENDED:
        roles.append(("swap", spec.swap_mib))
    roles.append(("data", spec.data_mib))
    roles += [(f"extra{n}", spec.extra_mib) for n in range(1, spec.extra_parts + 1)]
    extended = spec.scheme is not Scheme.GPT and len(roles) > 4
    parts, pos = [], ALIGN
    for index, (role, mib) in enumerate(roles):
        logical = extended and index >= 3
        # Each partition starts on an 8 MiB boundary; a logical partition needs
        # room for its EBR before it, which costs one more alignment step.
        pos += ALIGN if logical else 0
        parts.append(_Part(role, mib * MIB, index + 2 if logical else index + 1, pos))
        pos += mib * MIB
    return parts


def build_golden(path: Path, spec: GoldenSpec = GoldenSpec()) -> Path:
    """Write a golden image to ``path`` (overwriting it) and return the path."""
    if spec.payload_mib >= spec.rootfs_mib:
        raise UsageError("the rootfs payload must be smaller than the rootfs")
    parts = _plan(spec)
    by_role = {p.role: p for p in parts}
    total = parts[-1].start + parts[-1].size + ALIGN  # room for the backup GPT at the end
    path.unlink(missing_ok=True)
    with open(path, "wb") as handle:
        handle.truncate(total)
    _partition(path, spec.scheme, parts)
    # mkfs.vfat picks the FAT size from the whole file's size, not the
    # partition's, and fails on a small partition in a large image: name it.
    uboot_env = b"bootcmd=run mender_setup\n"
    with tempfile.TemporaryDirectory(prefix="imageprov-golden-") as tmp:
        boot = by_role.get("boot")
        if boot is not None and spec.boot_fs == "ext4":
            boot_tree = Path(tmp, "boot")
            boot_tree.mkdir()
            (boot_tree / "uboot.env").write_bytes(uboot_env)
            _mke2fs(path, boot.start, spec.boot_mib, "boot", boot_tree)
        elif boot is not None:
            fat = "16" if spec.boot_mib < 512 else "32"
            run(["mkfs.vfat", "-F", fat, "--offset", str(boot.start // SECTOR), "-n", "BOOT", str(path),
                 str(spec.boot_mib * 1024)])  # fmt: skip
            Vfat(path, boot.start, "boot").write(PurePosixPath("/uboot.env"), uboot_env)
        rootfs_tree = _rootfs_tree(Path(tmp, "rootfs"), spec, {p.role: p.number for p in parts})
        data_tree = _data_tree(Path(tmp, "data"), spec, {p.role: p.number for p in parts})
        rootfs_a, rootfs_b = by_role["rootfs-a"].start, by_role["rootfs-b"].start
        if spec.rootfs_fs == "squashfs":  # both slots hold the same read-only tree
            _squashfs(path, [rootfs_a, rootfs_b], rootfs_tree, Path(tmp, "rootfs.squashfs"))
        else:
            _mke2fs(path, rootfs_a, spec.rootfs_mib, "rootfs-a", rootfs_tree)
            if spec.rootfs_b is RootfsB.COPY:
                _mke2fs(path, rootfs_b, spec.rootfs_mib, "rootfs-b", rootfs_tree)
            elif spec.rootfs_b is RootfsB.EMPTY_EXT4:
                empty = Path(tmp, "empty")
                empty.mkdir()
                _mke2fs(path, rootfs_b, spec.rootfs_mib, "rootfs-b", empty)
        _mke2fs(path, by_role["data"].start, spec.data_mib, "data", data_tree)
        for part in parts:
            if part.role.startswith("extra"):
                extra = Path(tmp, part.role)
                extra.mkdir()
                (extra / "README").write_text(f"{part.role}: not Mender's\n")
                _mke2fs(path, part.start, spec.extra_mib, part.role, extra)
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


def _partition(path: Path, scheme: Scheme, parts: list[_Part]) -> None:
    lines = [f"label: {'gpt' if scheme is Scheme.GPT else 'dos'}", "unit: sectors"]
    for part in parts:
        start, size = part.start // SECTOR, part.size // SECTOR
        if scheme is Scheme.GPT:
            kind = {"boot": ESP_GUID, "swap": SWAP_GUID}.get(part.role, LINUX_FS_GUID)
            lines.append(f"start={start}, size={size}, type={kind}, name={part.role}")
            continue
        if part.number == 5:  # the first logical one: the extended partition holding it and the rest
            first = start - ALIGN // SECTOR
            last = parts[-1]
            lines.append(f"start={first}, size={(last.start + last.size) // SECTOR - first}, type=5")
        kind = {"boot": "c", "swap": "82"}.get(part.role, "83")
        lines.append(f"start={start}, size={size}, type={kind}" + (", bootable" if part.role == "boot" else ""))
    script = "\n".join(lines) + "\n"
    run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(path)], input=script.encode())


def _squashfs(path: Path, offsets: list[int], tree: Path, scratch: Path) -> None:
    """The tree as a squashfs (owned by root, as an image build makes it) at each of ``offsets``."""
    run(["mksquashfs", str(tree), str(scratch), "-noappend", "-quiet", "-all-root", "-no-progress"])
    data = scratch.read_bytes()
    with open(path, "r+b") as handle:
        for offset in offsets:
            handle.seek(offset)
            handle.write(data)


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


# The numbers of the default layout (boot 1, rootfs A 2, B 3, data 4), as a bare rootfs.ext4 assumes.
_DEFAULT_NUMBERS = {"boot": 1, "rootfs-a": 2, "rootfs-b": 3, "data": 4}


def _device(spec: GoldenSpec) -> str:
    """MENDER_STORAGE_DEVICE_BASE: what the device calls the partitions, short of their number."""
    return "/dev/sda" if spec.scheme is Scheme.GPT else "/dev/mmcblk0p"


def _conf(spec: GoldenSpec, numbers: dict[str, int]) -> str:
    """The configuration, its RootfsPartA/B naming this layout's partitions (a test's own text kept as it is)."""
    try:
        conf = json.loads(spec.mender_conf)
    except ValueError:
        return spec.mender_conf
    wanted = {"RootfsPartA": numbers["rootfs-a"], "RootfsPartB": numbers["rootfs-b"]}
    if not isinstance(conf, dict) or wanted == {"RootfsPartA": 2, "RootfsPartB": 3}:
        return spec.mender_conf
    for key, number in wanted.items():
        if conf.get(key) == DEFAULT_MENDER_CONF[key]:
            conf[key] = f"{_device(spec)}{number}"
    return json.dumps(conf, indent=2) + "\n"


def _rootfs_tree(root: Path, spec: GoldenSpec, numbers: dict[str, int] = _DEFAULT_NUMBERS) -> Path:
    (root / "etc/mender").mkdir(parents=True)
    (root / "data").mkdir()
    # meta-mender's fstab (base-files): MENDER_BOOT_PART at /uboot, MENDER_DATA_PART at /data.
    device = _device(spec)
    source = spec.data_mount if spec.data_mount is not None else f"{device}{numbers['data']}"
    lines = ["/dev/root            /                    auto       defaults              1  1",
             "proc                 /proc                proc       defaults              0  0"]  # fmt: skip
    if "boot" in numbers and spec.boot_mib:
        lines.append(f"{device}{numbers['boot']} /uboot {spec.boot_fs} defaults 0 0")
    if source:
        lines.append(f"{source} /data ext4 defaults 0 0")
    (root / "etc/fstab").write_text("\n".join(lines) + "\n")
    conf = root / "etc/mender/mender.conf"
    text = _conf(spec, numbers)
    if spec.split_conf:
        transient = {k: v for k, v in json.loads(text).items() if k not in PERSISTENT_KEYS}
        conf.write_text(json.dumps(transient, indent=4, sort_keys=True))
        conf.chmod(0o600)
        (root / "var/lib").mkdir(parents=True)
        (root / "var/lib/mender").symlink_to("/data/mender")
    else:
        conf.write_text(text)
    (root / "etc/hostname").write_text("imageprov-demo\n")
    (root / "etc/os-release").write_text('NAME="imageprov demo"\nID=imageprov-demo\n')
    if spec.payload_mib:
        with open(root / "payload.bin", "wb") as handle:
            for _ in range(spec.payload_mib):
                handle.write(os.urandom(MIB))
    return root


def _data_tree(root: Path, spec: GoldenSpec, numbers: dict[str, int] = _DEFAULT_NUMBERS) -> Path:
    (root / "mender").mkdir(parents=True)
    (root / "mender/device_type").write_text(f"device_type={spec.device_type}\n")
    if spec.split_conf:
        persistent = {k: v for k, v in json.loads(_conf(spec, numbers)).items() if k in PERSISTENT_KEYS}
        conf = root / "mender/mender.conf"
        conf.write_text(json.dumps(persistent, indent=4, sort_keys=True))
        conf.chmod(0o600)
    return root
