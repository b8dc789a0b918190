"""Build and line integration: prepare, the Yocto hook, bmap files with bmaptool, compressed images."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from imageprov.disk.golden import Scheme
from tests.conftest import (
    IN_CI,
    debugfs,
    e2fsck_clean,
    fsck_vfat_clean,
    imageprov,
    imageprov_pki,
    need,
    offset_of,
    partition_bytes,
    roles,
    sfdisk_json,
    sha256,
    tool,
)
from tests.oracle import check_device_image

ROOT = Path(__file__).resolve().parent.parent
HTTPS_CLIENT = {"Certificate": "/data/mender/mender-cert.pem", "Key": "/data/mender/mender-cert-private.pem"}


def _conf(image: Path, role: str = "rootfs-a") -> dict[str, object]:
    return json.loads(debugfs(image, roles(image)[role], "cat /etc/mender/mender.conf"))  # type: ignore[no-any-return]


# -- prepare -------------------------------------------------------------------


def test_prepare_is_idempotent(golden: Path) -> None:
    imageprov("prepare", golden, "--server-url", "https://edge.example.com", "--conf-target", "rootfs")
    once = sha256(golden)
    mtime = golden.stat().st_mtime_ns
    proc = imageprov("prepare", golden, "--server-url", "https://edge.example.com", "--conf-target", "rootfs")
    assert "already prepared" in proc.stderr
    assert sha256(golden) == once and golden.stat().st_mtime_ns == mtime
    for role in ("rootfs-a", "rootfs-b"):
        conf = _conf(golden, role)
        assert conf["HttpsClient"] == HTTPS_CLIENT and conf["ServerURL"] == "https://edge.example.com"
        e2fsck_clean(golden, roles(golden)[role])


def test_prepare_failure_leaves_the_image_as_it_was(make_golden: Callable[..., Path], tmp_path: Path) -> None:
    """The first write (rootfs A) succeeds, the second (rootfs B, full) fails: the image is as it was."""
    golden = make_golden(Scheme.MBR, rootfs_mib=16)
    layout = roles(golden)
    rootfs_b = f"{golden}?offset={offset_of(golden, layout['rootfs-b'])}"
    big = tmp_path / "big"
    big.write_bytes(os.urandom(18 << 20))
    script = tmp_path / "fill"
    script.write_text(f"write {big} /fill\n")
    tool("debugfs", "-w", "-f", script, rootfs_b)
    assert "Free blocks:              0" in tool("debugfs", "-R", "stats", rootfs_b).stdout.decode()
    before = sha256(golden)
    # A token long enough that the new mender.conf needs more blocks than the old one freed.
    proc = imageprov("--debug", "prepare", golden, "--conf-target", "rootfs", "--tenant-token", "t" * 8192, check=False)
    assert proc.returncode == 1, proc.stderr
    writes = [line for line in proc.stderr.splitlines() if line.startswith("+ ") and " -w " in line]
    assert len(writes) == 2 and f"offset={offset_of(golden, layout['rootfs-a'])}" in writes[0], writes
    assert "partition 3 (rootfs-b)" in proc.stderr and "the filesystem is full" in proc.stderr
    assert sha256(golden) == before
    assert [p.name for p in golden.parent.iterdir() if ".partial" in p.name] == []


def test_stamp_on_a_prepared_image_touches_only_the_data_partition(
    make_golden: Callable[..., Path], pki: Path, tmp_path: Path
) -> None:
    golden = make_golden(Scheme.GPT)
    imageprov("prepare", golden, "--server-url", "https://edge", "--conf-target", "rootfs")
    out = tmp_path / "out"
    proc = imageprov_pki("stamp", golden, "--pki", pki, "--out", out, "--device-id", "p1", "--server-url",
                         "https://edge", "--conf-target", "rootfs")  # fmt: skip
    assert "already prepared" in proc.stderr
    image = out / "p1.uefiimg"
    layout = roles(image)
    for role in ("boot", "rootfs-a", "rootfs-b"):
        assert partition_bytes(image, layout[role]) == partition_bytes(golden, layout[role])
    assert partition_bytes(image, layout["data"]) != partition_bytes(golden, layout["data"])
    check_device_image(image, "p1", pki, tmp_path)


# -- bmap and bmaptool ----------------------------------------------------------


@contextmanager
def _card(size: int, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A reused card: a loop device over a file full of stale bytes."""
    backing = tmp_path / "card.img"
    with open(backing, "wb") as handle:
        for _ in range(size // (1 << 20)):
            handle.write(b"\xa5" * (1 << 20))
    need("losetup")
    proc = tool("losetup", "--find", "--show", backing, check=False)
    if proc.returncode != 0:
        message = f"no loop device for the bmaptool test: {proc.stderr.decode().strip()}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    device = Path(proc.stdout.decode().strip())
    try:
        yield device, backing
    finally:
        tool("losetup", "-d", device, check=False)


@pytest.mark.parametrize("scheme", list(Scheme), ids=[s.value for s in Scheme])
def test_bmaptool_flashes_a_stamped_image_over_stale_data(
    make_golden: Callable[..., Path], pki: Path, tmp_path: Path, scheme: Scheme
) -> None:
    need("bmaptool")
    golden = make_golden(scheme)
    # A boot loader in the gap before the first partition (i.MX8M reads one at 33 KiB); the rest of the gap a hole.
    loader = os.urandom(8192)
    with open(golden, "r+b") as handle:
        for at in (33 * 1024, 1 << 20):
            handle.seek(at)
            handle.write(loader)
    first = min(int(p["start"]) for p in sfdisk_json(golden)["partitions"]) * 512
    out = tmp_path / "out"
    imageprov_pki("stamp", golden, "--pki", pki, "--out", out, "--device-id", "b1", "--bmap")
    image, bmap = out / f"b1{golden.suffix}", out / "b1.bmap"
    assert b'<bmap version="2.0">' in bmap.read_bytes()
    size = image.stat().st_size
    with _card(size, tmp_path) as (device, backing):
        tool("bmaptool", "copy", "--bmap", bmap, image, device)
        tool("sync")
    flashed = tmp_path / f"flashed{golden.suffix}"
    with open(backing, "rb") as src, open(flashed, "wb") as dst:
        dst.write(src.read(size))
    # Mapped less than all: stale bytes remain in ext4 holes, and the card is still right.
    assert sha256(flashed) != sha256(image)
    with open(flashed, "rb") as card, open(golden, "rb") as original:
        # The table, the boot loader and the zeros between them, not the card's stale bytes.
        assert card.read(first) == original.read(first)
    assert sfdisk_json(flashed)["partitions"] == [
        {**p, "node": p["node"].replace(str(image), str(flashed))} for p in sfdisk_json(image)["partitions"]
    ]
    layout = roles(flashed)
    for role in ("rootfs-a", "rootfs-b", "data"):
        e2fsck_clean(flashed, layout[role])
    fsck_vfat_clean(flashed, layout["boot"], tmp_path)
    assert partition_bytes(flashed, layout["boot"]) == partition_bytes(image, layout["boot"])
    check_device_image(flashed, "b1", pki, tmp_path)


# -- compressed images ----------------------------------------------------------


def _compress(path: Path, kind: str) -> Path:
    target = path.with_name(path.name + "." + kind)
    data = path.read_bytes()
    if kind == "gz":
        target.write_bytes(gzip.compress(data, 1))
    elif kind == "xz":
        target.write_bytes(lzma.compress(data, preset=0))
    elif kind == "bz2":
        target.write_bytes(bz2.compress(data, 1))
    else:
        tool("zstd", "-q", "-1", "-o", target, path)
    return target


@pytest.mark.parametrize("kind", ["gz", "xz", "bz2", "zst"])
def test_compressed_golden_images(make_golden: Callable[..., Path], pki: Path, tmp_path: Path, kind: str) -> None:
    golden = make_golden(Scheme.MBR)
    packed = _compress(golden, kind)
    golden.unlink()
    out = tmp_path / "out"
    imageprov_pki("stamp", packed, "--pki", pki, "--out", out, "--device-id", f"c-{kind}")
    image = out / f"c-{kind}.sdimg"
    assert sorted(p.name for p in out.iterdir()) == [image.name]  # the decompressed copy is gone
    check_device_image(image, f"c-{kind}", pki, tmp_path)
    # Decompressed sparse: it allocates far less than its size.
    assert image.stat().st_blocks * 512 < image.stat().st_size // 4


# Each format's own command-line tool decompresses: not imageprov, not the library it uses.
_DECOMPRESS = {"gz": ("gzip", "-dc"), "xz": ("xz", "-dc"), "bz2": ("bzip2", "-dc"), "zst": ("zstd", "-dcq")}


@pytest.mark.parametrize("kind", ["gz", "xz", "bz2", "zst"])
def test_compressed_outputs(make_golden: Callable[..., Path], pki: Path, tmp_path: Path, kind: str) -> None:
    golden = make_golden(Scheme.MBR, rootfs_mib=16, data_mib=16)
    out = tmp_path / "out"
    imageprov_pki("stamp", golden, "--pki", pki, "--out", out, "--device-id", "z1", "--compress", kind, "--bmap")
    assert sorted(p.name for p in out.iterdir()) == ["z1.bmap", f"z1.sdimg.{kind}"]
    packed = out / f"z1.sdimg.{kind}"
    assert packed.stat().st_mode & 0o777 == 0o600  # it holds the device's private key
    plain = tmp_path / "z1.sdimg"
    plain.write_bytes(tool(*_DECOMPRESS[kind], packed).stdout)
    check_device_image(plain, "z1", pki, tmp_path)
    # The bmap beside it describes the decompressed image, as bmaptool reads it.
    assert f"<ImageSize> {plain.stat().st_size} </ImageSize>".encode() in (out / "z1.bmap").read_bytes()
    # A rerun leaves the delivered compressed image alone.
    before = sha256(packed)
    proc = imageprov_pki("stamp", golden, "--pki", pki, "--out", out, "--device-id", "z1", "--compress", kind,
                         "--json")  # fmt: skip
    assert json.loads(proc.stdout)["status"] == "already-delivered"
    assert sha256(packed) == before


def test_damaged_compressed_golden_is_one_line(make_golden: Callable[..., Path], pki: Path, tmp_path: Path) -> None:
    golden = make_golden(Scheme.MBR)
    packed = _compress(golden, "gz")
    packed.write_bytes(packed.read_bytes()[:2000])
    proc = imageprov_pki("stamp", packed, "--pki", pki, "--out", tmp_path / "out", "--device-id", "x", check=False)
    assert proc.returncode == 1 and "cannot decompress" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert list((tmp_path / "out").iterdir()) == []
