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

from imageprov.disk.golden import Scheme
from imageprov.mender.roles import data_mount
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
    found = data_mount(fstab)
    assert found is not None and (found.source, found.line) == ("LABEL=data", 4)
    assert data_mount("/dev/mmcblk0p3 /datastore ext4 defaults 0 0\n") is None


@pytest.mark.parametrize(
    ("scheme", "source", "named"),
    [
        # meta-mender with MENDER_BOOT_PART_SIZE_MB = "0" and one extra partition: data is 3, the extra one 4.
        (Scheme.MBR, "/dev/mmcblk0p3", "partition 3"),
        (Scheme.GPT, "/dev/sda2", "partition 2"),
        (Scheme.MBR_EXTENDED, "LABEL=rootfs-b", "partition 3"),
        (Scheme.MBR, "/dev/mmcblk0p9", "no partition of this image"),
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
    assert stamp.returncode == 1 and "mounts partition 4" in stamp.stderr, stamp.stderr
