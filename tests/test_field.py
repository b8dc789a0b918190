"""Golden images and line use as they come from the field (issue 11, round 2).

Each test feeds imageprov what a real site gave it (a dd of a running device,
a Yocto deploy link, Ctrl-C mid-batch, a CSV from a spreadsheet) and checks the
result with other real tools: debugfs, e2fsck, dumpe2fs, openssl.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import pytest

from imageprov.disk.ext4 import NewFile
from imageprov.disk.golden import Scheme
from imageprov.disk.image import DiskImage
from imageprov.errors import FilesystemError
from tests.conftest import imageprov, imageprov_pki, offset_of, roles, sfdisk_json, sha256, tool

KEY = "/mender/mender-cert-private.pem"
CERT = "/mender/mender-cert.pem"


def _stamp(golden: Path, pki: Path, out: Path, *ids: str, extra: tuple[str, ...] = (), check: bool = True) -> str:
    args = [arg for device_id in ids for arg in ("--device-id", device_id)]
    proc = imageprov_pki("stamp", golden, "--pki", pki, "--out", out, *args, *extra, check=check)
    return proc.stderr


def _fs(image: Path, number: int) -> str:
    return f"{image}?offset={offset_of(image, number)}"


def _features(image: Path, number: int) -> str:
    out = tool("dumpe2fs", "-h", _fs(image, number)).stdout.decode()
    return next(line for line in out.splitlines() if line.startswith("Filesystem features:"))


def _leave_journal_unreplayed(image: Path, number: int, directory: str) -> None:
    """What a dd of a running device gives: needs_recovery and a committed transaction in the journal.

    The transaction holds ``directory``'s block as it is now; replaying it after
    anything was added to that directory takes the additions away again.
    """
    fs = _fs(image, number)
    block = int(tool("debugfs", "-R", f"bmap {directory} 0", fs).stdout.split()[0])
    size = int(next(ln for ln in tool("dumpe2fs", "-h", fs).stdout.decode().splitlines()
                    if ln.startswith("Block size:")).split()[-1])  # fmt: skip
    saved = image.with_name(f"block-{number}")
    with open(image, "rb") as handle:
        handle.seek(offset_of(image, number) + block * size)
        saved.write_bytes(handle.read(size))
    tool("debugfs", "-w", "-f", "-", fs, input=f"jo\njw -b {block} {saved}\njc\n".encode())
    assert "needs_recovery" in _features(image, number)


def _first_mount(image: Path, number: int, tmp: Path) -> Path:
    """The partition as the device sees it after mounting: copied out, its journal replayed by e2fsck."""
    part = next(p for p in sfdisk_json(image)["partitions"] if p["node"] == f"{image}{number}")
    copy = tmp / f"mounted-{image.name}-{number}.ext4"
    with open(image, "rb") as src, open(copy, "wb") as dst:
        src.seek(part["start"] * 512)
        dst.write(src.read(part["size"] * 512))
    proc = tool("e2fsck", "-fy", copy, check=False)
    assert proc.returncode in (0, 1), proc.stdout.decode()
    return copy


def _cat(fs: Path | str, path: str) -> bytes:
    return tool("debugfs", "-R", f"cat {path}", fs).stdout


# -- 1. an unreplayed journal ----------------------------------------------------------


def test_stamp_replays_an_unreplayed_journal_on_its_copy(
    make_golden: Callable[..., Path], pki: Path, tmp_path: Path
) -> None:
    golden = make_golden(Scheme.MBR, data_mib=8)
    data = roles(golden)["data"]
    _leave_journal_unreplayed(golden, data, "/mender")
    before = sha256(golden)
    out = tmp_path / "out"
    err = _stamp(golden, pki, out, "j-1")
    image = out / "j-1.sdimg"
    # The device's first mount: whatever the journal held is replayed; the key stays.
    mounted = _first_mount(image, data, tmp_path)
    assert _cat(mounted, KEY).startswith(b"-----BEGIN PRIVATE KEY-----")
    assert _cat(mounted, CERT).startswith(b"-----BEGIN CERTIFICATE-----")
    assert "replayed the journal of partition 4 (data)" in err, err
    assert sha256(golden) == before
    assert "needs_recovery" not in _features(image, data)
    imageprov("verify", image, "--ca", pki / "ca-cert.pem", "--device-id", "j-1")


def test_verify_fails_an_image_with_an_unreplayed_journal(
    make_golden: Callable[..., Path], pki: Path, tmp_path: Path
) -> None:
    golden = make_golden(Scheme.MBR, data_mib=8)
    out = tmp_path / "out"
    _stamp(golden, pki, out, "j-2")
    image = out / "j-2.sdimg"
    _leave_journal_unreplayed(image, roles(image)["data"], "/mender")
    proc = imageprov("verify", image, "--ca", pki / "ca-cert.pem", check=False)
    assert proc.returncode == 1
    assert "FAIL  journal of data replayed  (needs_recovery is set)" in proc.stdout, proc.stdout


def test_prepare_and_cp_replay_the_journal_first(make_golden: Callable[..., Path], tmp_path: Path) -> None:
    image = make_golden(Scheme.GPT, data_mib=8)
    rootfs_a, data = roles(image)["rootfs-a"], roles(image)["data"]
    _leave_journal_unreplayed(image, rootfs_a, "/etc/mender")
    _leave_journal_unreplayed(image, data, "/mender")
    err = imageprov("prepare", image, "--server-url", "https://edge.example").stderr
    assert "replayed the journal of partition 2 (rootfs-a), partition 4 (data)" in err, err
    for number in (rootfs_a, data):
        assert "needs_recovery" not in _features(image, number)
    conf = json.loads(_cat(_first_mount(image, rootfs_a, tmp_path), "/etc/mender/mender.conf"))
    assert conf["ServerURL"] == "https://edge.example" and "HttpsClient" in conf

    _leave_journal_unreplayed(image, data, "/mender")
    note = tmp_path / "note.txt"
    note.write_text("kept\n")
    err = imageprov("cp", note, f"{image}:/data/mender/note.txt").stderr
    assert "replayed the journal of partition 4 (data)" in err, err
    assert _cat(_first_mount(image, data, tmp_path), "/mender/note.txt") == b"kept\n"


def test_debugfs_never_writes_behind_an_unreplayed_journal(make_golden: Callable[..., Path]) -> None:
    image = make_golden(Scheme.MBR, data_mib=8)
    _leave_journal_unreplayed(image, roles(image)["data"], "/mender")
    disk = DiskImage.open(image)
    before = sha256(image)
    with pytest.raises(FilesystemError, match="journal that was never replayed"):
        disk.ext(disk.layout.data_partition).write_files([NewFile(PurePosixPath("/x"), b"x")])
    assert sha256(image) == before
