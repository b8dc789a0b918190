"""The data partition is the one the image mounts at /data: rootfs A's /etc/fstab, as meta-mender writes it
(``${MENDER_DATA_PART} /data ...``), confirms what the layout reads, and a contradiction is refused by stamp,
verify and prepare with one line, before anything is written. Images are built with the real tools (sfdisk,
mke2fs) and read back with sfdisk and debugfs."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from imageprov.disk.golden import GoldenSpec, RootfsB, Scheme, build_filesystem_image
from imageprov.disk.mounts import mount_of
from tests.conftest import imageprov, imageprov_pki, offset_of, roles, tool


@pytest.mark.parametrize(
    ("scheme", "source"),
    [
        (Scheme.MBR, None),  # /dev/mmcblk0p4
        (Scheme.MBR_EXTENDED, None),  # /dev/mmcblk0p6: data is logical, after swap
        (Scheme.GPT, None),  # /dev/sda4
        (Scheme.MBR, "LABEL=data"),
        (Scheme.GPT, "PARTUUID"),  # the data partition's GPT GUID, as sfdisk reports it
        (Scheme.MBR, "PARTUUID"),  # the MBR's disk id and the number, as the kernel names it
        (Scheme.MBR, "UUID=0b2f3c1e-0000-4000-8000-000000000000"),  # cannot be matched here: confirms nothing
        (Scheme.MBR, ""),  # no /data line
    ],
)
def test_an_fstab_that_agrees_is_stamped(
    make_golden: Callable[..., Path], pki: Path, tmp_path: Path, scheme: Scheme, source: str | None
) -> None:
    if source == "PARTUUID":
        # sfdisk picks the ids at random: set them to what the fstab names, with sfdisk.
        if scheme is Scheme.GPT:
            guid = "6a1d4c2e-93b0-4f5e-8c77-0123456789ab"
            golden = make_golden(scheme, data_mount=f"PARTUUID={guid.upper()}")
            tool("sfdisk", "--part-uuid", golden, str(roles(golden)["data"]), guid)
        else:
            golden = make_golden(scheme, data_mount="PARTUUID=1234abcd-04")
            tool("sfdisk", "--disk-id", golden, "0x1234abcd")
    else:
        golden = make_golden(scheme, data_mount=source)
    imageprov_pki("stamp", golden, "--pki", pki, "--out", tmp_path / "out", "--device-id", "m-1")


def test_data_mount_reads_the_last_data_line() -> None:
    fstab = "# /data in a comment\n/dev/root / auto defaults 1 1\n/dev/mmcblk0p3 /data ext4 defaults 0 0\n" \
            "LABEL=data /data/ ext4 defaults 0 0 # the last one counts\n"  # fmt: skip
    found = mount_of(fstab, "/data")
    assert found is not None and (found.source, found.line) == ("LABEL=data", 4)
    assert mount_of("/dev/mmcblk0p3 /datastore ext4 defaults 0 0\n", "/data") is None


@pytest.mark.parametrize(
    ("scheme", "source", "named"),
    [
        # meta-mender with MENDER_BOOT_PART_SIZE_MB = "0" and one extra partition: data is 3, the extra one 4.
        (Scheme.MBR, "/dev/mmcblk0p3", "partition 3"),
        (Scheme.GPT, "/dev/sda2", "partition 2"),
        (Scheme.MBR_EXTENDED, "LABEL=rootfs-b", "partition 3"),
        (Scheme.MBR, "/dev/mmcblk0p9", "mounts /dev/mmcblk0p9 at /data, and this image has no such partition"),
    ],
)
def test_an_fstab_that_contradicts_the_layout_is_refused_before_anything_is_written(
    make_golden: Callable[..., Path], pki: Path, tmp_path: Path, scheme: Scheme, source: str, named: str
) -> None:
    golden = make_golden(scheme, data_mount=source)
    before = hashlib.sha256(golden.read_bytes()).hexdigest()
    out = tmp_path / "out"
    stamp = imageprov_pki("stamp", golden, "--pki", pki, "--out", out, "--device-id", "m-1", check=False)
    assert stamp.returncode == 1 and named in stamp.stderr and "--data-part" in stamp.stderr, stamp.stderr
    assert len(stamp.stderr.strip().splitlines()) == 1 and "Traceback" not in stamp.stderr
    assert not out.exists() or not any(out.iterdir())
    verify = imageprov("verify", golden, "--ca", pki / "ca-cert.pem", "--json", check=False)
    failed = [c for c in json.loads(verify.stdout)["checks"] if not c["ok"]]
    assert verify.returncode == 1 and failed[0]["name"] == "partition table and layout" and named in failed[0]["detail"]
    prepare = imageprov("prepare", golden, "--server-url", "https://edge.example", check=False)
    assert prepare.returncode == 1 and named in prepare.stderr
    assert hashlib.sha256(golden.read_bytes()).hexdigest() == before


def test_overrides_that_contradict_the_fstab_are_refused(make_golden: Callable[..., Path], pki: Path,
                                                         tmp_path: Path) -> None:  # fmt: skip
    golden = make_golden(Scheme.MBR)
    assert roles(golden)["data"] == 4 and offset_of(golden, 4) > 0
    stamp = imageprov_pki("stamp", golden, "--pki", pki, "--out", tmp_path / "out", "--device-id", "m-2",
                          "--data-part", "3", "--rootfs-parts", "2,4", check=False)  # fmt: skip
    assert stamp.returncode == 1 and "mounts partition 4 at /data" in stamp.stderr, stamp.stderr


def _partition_bytes(image: Path, number: int) -> str:
    table = json.loads(tool("sfdisk", "--json", image).stdout)["partitiontable"]
    part = next(p for p in table["partitions"] if p["node"].endswith(str(number)))
    with open(image, "rb") as handle:
        handle.seek(part["start"] * 512)
        return hashlib.sha256(handle.read(part["size"] * 512)).hexdigest()


def _debugfs_cat(image: Path, number: int, path: str) -> bytes:
    return tool("debugfs", "-R", f"cat {path}", f"{image}?offset={offset_of(image, number)}").stdout


# meta-mender's layouts (mender-part-images: [boot], rootfs A, rootfs B, [swap], data, MENDER_EXTRA_PARTS), and
# where data and the extra partitions land; an MBR of more than 4 holds the rest in an extended partition at 4.
LAYOUTS = {
    "boot0": ({"scheme": Scheme.MBR, "boot_mib": 0}, 3, ()),
    "boot0-extra": ({"scheme": Scheme.MBR, "boot_mib": 0, "extra_parts": 1}, 3, (4,)),
    "boot0-extra-empty-b": ({"scheme": Scheme.MBR, "boot_mib": 0, "extra_parts": 1, "rootfs_b": RootfsB.EMPTY_EXT4},
                            3, (4,)),
    "boot0-extra-unformatted-b": ({"scheme": Scheme.GPT, "boot_mib": 0, "extra_parts": 1,
                                   "rootfs_b": RootfsB.UNFORMATTED}, 3, (4,)),
    "boot0-split-conf": ({"scheme": Scheme.MBR, "boot_mib": 0, "extra_parts": 1, "split_conf": True}, 3, (4,)),
    "mbr-swap-extras": ({"scheme": Scheme.MBR_EXTENDED, "extra_parts": 2}, 6, (7, 8)),
    "mbr-6-data-at-5": ({"scheme": Scheme.MBR, "extra_parts": 1}, 5, (6,)),
    "mbr-9": ({"scheme": Scheme.MBR, "extra_parts": 4}, 5, (6, 7, 8, 9)),
    "gpt-5": ({"scheme": Scheme.GPT, "extra_parts": 1}, 4, (5,)),
    "gpt-8": ({"scheme": Scheme.GPT, "extra_parts": 4}, 4, (5, 6, 7, 8)),
    "ext4-boot": ({"scheme": Scheme.MBR, "boot_fs": "ext4", "extra_parts": 1}, 5, (6,)),
}  # fmt: skip


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_meta_mender_layouts_are_stamped_with_no_overrides(
    make_golden: Callable[..., Path], pki: Path, tmp_path: Path, name: str
) -> None:
    spec, data, extras = LAYOUTS[name]
    golden = make_golden(**spec, name=f"{name}{spec['scheme'].suffix}")
    untouched = {n: _partition_bytes(golden, n) for n in extras}
    imageprov_pki("stamp", golden, "--pki", pki, "--out", tmp_path / "out", "--device-id", "l-1")
    stamped = tmp_path / "out" / f"l-1{spec['scheme'].suffix}"
    # Read back with debugfs, at the partition sfdisk places where the image's fstab mounts /data.
    assert b"BEGIN CERTIFICATE" in _debugfs_cat(stamped, data, "/mender/mender-cert.pem")
    assert _debugfs_cat(stamped, data, "/mender/imageprov-device-id") == b"l-1\n"
    assert {n: _partition_bytes(stamped, n) for n in extras} == untouched
    inspect = json.loads(imageprov("inspect", stamped, "--json").stdout)
    assert [p["number"] for p in inspect["partitions"] if p["role"] == "data"] == [data]
    imageprov("verify", stamped, "--ca", pki / "ca-cert.pem", "--device-id", "l-1")


def _write_into(image: Path, number: int, content: Path) -> None:
    """Put a filesystem image made by its own tool at partition ``number``, with dd."""
    tool("dd", f"if={content}", f"of={image}", "bs=1M", f"seek={offset_of(image, number) // (1 << 20)}",
         "conv=notrunc,sparse", "status=none")  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("btrfs", "partition 4 (data) holds btrfs"),
        ("f2fs", "partition 4 (data) holds f2fs"),
    ],
)
def test_filesystems_imageprov_does_not_write_are_one_line(
    make_golden: Callable[..., Path], pki: Path, tmp_path: Path, kind: str, message: str
) -> None:
    golden = make_golden(Scheme.MBR, data_mib=128)
    content = tmp_path / f"fs.{kind}"
    with open(content, "wb") as handle:
        handle.truncate(128 << 20)
    tool("mkfs.btrfs", "-q", "-f", content) if kind == "btrfs" else tool("mkfs.f2fs", "-q", "-f", content)
    _write_into(golden, 4, content)
    before = hashlib.sha256(golden.read_bytes()).hexdigest()
    out = tmp_path / "out"
    stamp = imageprov_pki("stamp", golden, "--pki", pki, "--out", out, "--device-id", "u-1", check=False)
    assert stamp.returncode == 1 and message in stamp.stderr, stamp.stderr
    assert len(stamp.stderr.strip().splitlines()) == 1 and "Traceback" not in stamp.stderr
    assert hashlib.sha256(golden.read_bytes()).hexdigest() == before and not (out / "u-1.sdimg").exists()
    # The same filesystem bare, as a build deploys it: one line too.
    bare = imageprov_pki("stamp", content, "--pki", pki, "--out", out, "--device-id", "u-2", check=False)
    assert bare.returncode in (1, 2) and f"is a bare {kind} filesystem" in bare.stderr, bare.stderr


def test_a_ubi_image_is_one_line(pki: Path, tmp_path: Path) -> None:
    config = tmp_path / "ubi.ini"
    config.write_text("[data]\nmode=ubi\nvol_id=0\nvol_type=dynamic\nvol_name=data\nvol_size=1MiB\n")
    image = tmp_path / "nand.ubimg"
    tool("ubinize", "-o", image, "-m", "2048", "-p", "128KiB", config)
    for argv in (["inspect", image], ["verify", image, "--ca", pki / "ca-cert.pem"]):
        proc = imageprov(*argv, check=False)
        assert proc.returncode != 0 and "is a UBI image" in proc.stderr + proc.stdout, proc.stderr


def test_a_bare_dataimg_is_stamped_into_one_dataimg_per_device(pki: Path, tmp_path: Path) -> None:
    """For lines that flash partitions apart (Tegra's .dataimg, no .sdimg): one .dataimg and its bmap each."""
    golden = build_filesystem_image(tmp_path / "core-image.dataimg", GoldenSpec(), data=True)
    before = hashlib.sha256(golden.read_bytes()).hexdigest()
    out = tmp_path / "out"
    imageprov_pki("stamp", golden, "--pki", pki, "--out", out, "--device-id", "t-1", "--device-id", "t-2", "--bmap")
    assert hashlib.sha256(golden.read_bytes()).hexdigest() == before
    for device in ("t-1", "t-2"):
        stamped = out / f"{device}.dataimg"
        cert = tool("debugfs", "-R", "cat /mender/mender-cert.pem", stamped).stdout
        subject = tool("openssl", "x509", "-noout", "-subject", input=cert).stdout
        assert f"CN = {device}".encode() in subject
        assert tool("debugfs", "-R", "cat /mender/imageprov-device-id", stamped).stdout == f"{device}\n".encode()
        tool("e2fsck", "-fn", stamped)
        # The bmap describes the image: bmaptool copies it, and the copy is the image.
        copy = tmp_path / f"{device}.copy"
        tool("bmaptool", "copy", "--bmap", out / f"{device}.bmap", stamped, copy)
        assert hashlib.sha256(copy.read_bytes()).digest() == hashlib.sha256(stamped.read_bytes()).digest()
        imageprov("verify", stamped, "--ca", pki / "ca-cert.pem", "--device-id", device)
    rootfs = build_filesystem_image(tmp_path / "rootfs.ext4", GoldenSpec())
    refused = imageprov_pki("stamp", rootfs, "--pki", pki, "--out", out, "--device-id", "t-3", check=False)
    assert refused.returncode == 2 and "bare root filesystem image" in refused.stderr


def test_a_squashfs_rootfs_is_read_and_credentials_go_to_data(
    make_golden: Callable[..., Path], pki: Path, tmp_path: Path
) -> None:
    """ARTIFACTIMG_FSTYPE = "squashfs": the roles and the configuration are read with unsquashfs; nothing is
    written into the read-only rootfs, the block goes to the data conf."""
    golden = make_golden(Scheme.MBR, name="ro.sdimg", rootfs_fs="squashfs")
    rootfs = {n: _partition_bytes(golden, n) for n in (2, 3)}
    assert imageprov("cat", f"{golden}:/etc/mender/mender.conf").stdout.startswith("{")
    imageprov_pki("stamp", golden, "--pki", pki, "--out", tmp_path / "out", "--device-id", "r-1")
    stamped = tmp_path / "out" / "r-1.sdimg"
    assert {n: _partition_bytes(stamped, n) for n in (2, 3)} == rootfs
    conf = json.loads(_debugfs_cat(stamped, 4, "/mender/mender.conf"))
    assert conf["HttpsClient"]["Certificate"] == "/data/mender/mender-cert.pem"
    assert b"BEGIN CERTIFICATE" in _debugfs_cat(stamped, 4, "/mender/mender-cert.pem")
    imageprov("verify", stamped, "--ca", pki / "ca-cert.pem", "--device-id", "r-1")
    refused = imageprov_pki("stamp", golden, "--pki", pki, "--out", tmp_path / "out2", "--device-id", "r-2",
                            "--conf-target", "rootfs", check=False)  # fmt: skip
    assert refused.returncode != 0 and "squashfs, which is read-only" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    squashfs = tmp_path / "rootfs.squashfs"
    tool("dd", f"if={golden}", f"of={squashfs}", "bs=512", f"skip={offset_of(golden, 2) // 512}", "count=8192",
         "status=none")  # fmt: skip
    bare = imageprov_pki("stamp", squashfs, "--pki", pki, "--out", tmp_path / "out3", "--device-id", "r-3",
                         check=False)  # fmt: skip
    assert bare.returncode != 0 and "is a bare squashfs filesystem" in bare.stderr, bare.stderr
