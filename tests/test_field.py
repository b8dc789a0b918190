"""Golden images and line use as they come from the field (issue 11, round 2).

Each test feeds imageprov what a real site gave it (a dd of a running device,
a Yocto deploy link, Ctrl-C mid-batch, a CSV from a spreadsheet) and checks the
result with other real tools: debugfs, e2fsck, dumpe2fs, openssl.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import pytest

from imageprov.disk.ext4 import NewFile
from imageprov.disk.golden import Scheme
from imageprov.disk.image import DiskImage
from imageprov.errors import FilesystemError
from tests.conftest import cli_env, imageprov, imageprov_pki, offset_of, roles, sfdisk_json, sha256, tool

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


# -- 2. Ctrl-C mid-batch; 5. --reissue and stamping after revoke ---------------------------


def _registry(pki: Path) -> dict[str, dict[str, str]]:
    """serial -> record, read with the CLI."""
    records = json.loads(imageprov_pki("devices", "--pki", pki, "--json").stdout)
    return {r["serial"]: r for r in records}


def _serial(image: Path) -> str:
    """The serial of the certificate in an image, read with debugfs and openssl."""
    pem = _cat(_fs(image, roles(image)["data"]), CERT)
    out = tool("openssl", "x509", "-noout", "-serial", input=pem).stdout.decode()
    return out.strip().split("=", 1)[1].lower().lstrip("0")


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_ctrl_c_mid_batch_never_publishes_a_revoked_certificate(
    make_golden: Callable[..., Path], pki: Path, tmp_path: Path
) -> None:
    # Copies of a payload: slow enough that SIGINT finds workers building.
    golden = make_golden(Scheme.MBR, rootfs_mib=16, payload_mib=8, data_mib=8)
    out = tmp_path / "out"
    ids = [f"c-{i}" for i in range(8)]
    argv = [sys.executable, "-m", "imageprov", "stamp", str(golden), "--pki", str(pki), "--out", str(out)]
    argv += [arg for device_id in ids for arg in ("--device-id", device_id)]
    proc = subprocess.Popen(argv, env=cli_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    # Interrupted once a worker is building an image (its hidden partial file is there).
    _wait_for(lambda: out.is_dir() and any(".partial" in p.name and "batch" not in p.name for p in out.iterdir()),
              "a worker to start building")  # fmt: skip
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(r"imageprov: interrupted: delivered (\d) of 8 devices; rerun the same command to stamp "
                        r"the other (\d)", last), err  # fmt: skip
    delivered = int(last.split("delivered ")[1].split()[0])
    registry = _registry(pki)
    images = sorted(out.glob("*.sdimg"))
    assert len(images) == delivered
    for image in images:
        # Every published image holds its device's active certificate.
        assert registry[_serial(image)]["status"] == "active", image
    assert not [r for r in registry.values() if r["status"] == "pending"]

    rerun = imageprov_pki("stamp", golden, "--pki", pki, "--out", out, *argv[9:]).stderr
    assert f"delivered {len(ids)} images" in rerun
    registry = _registry(pki)
    for device_id in ids:
        assert registry[_serial(out / f"{device_id}.sdimg")]["status"] == "active"


def test_rerun_after_revoke_stamps_a_new_image_and_moves_the_old_aside(
    make_golden: Callable[..., Path], pki: Path, tmp_path: Path
) -> None:
    golden = make_golden(Scheme.MBR, data_mib=8)
    out = tmp_path / "out"
    _stamp(golden, pki, out, "r-1")
    image = out / "r-1.sdimg"
    old = _serial(image)
    imageprov_pki("revoke", "--pki", pki, "r-1", "--reason", "key-compromise")
    err = _stamp(golden, pki, out, "r-1")
    assert f"r-1.sdimg holds certificate {old}, which is revoked or unknown to the registry: moved it to" in err, err
    assert "stamping a new image" in err and "already-delivered" not in err
    new = _serial(image)
    assert new != old and _registry(pki)[new]["status"] == "active"
    [aside] = (out / "superseded").iterdir()
    assert _serial(aside) == old
    imageprov("verify", image, "--ca", pki / "ca-cert.pem", "--device-id", "r-1")


def test_reissue_stamps_a_new_image_when_the_image_exists(
    make_golden: Callable[..., Path], pki: Path, tmp_path: Path
) -> None:
    golden = make_golden(Scheme.MBR, data_mib=8)
    out = tmp_path / "out"
    _stamp(golden, pki, out, "r-2", extra=("--bmap",))
    old = _serial(out / "r-2.sdimg")
    err = _stamp(golden, pki, out, "r-2", extra=("--reissue", "--bmap"))
    assert f"--reissue: r-2.sdimg's certificate {old} is revoked as superseded; moved it to" in err, err
    new = _serial(out / "r-2.sdimg")
    registry = _registry(pki)
    assert new != old and registry[new]["status"] == "active"
    assert (registry[old]["status"], registry[old]["reason"]) == ("revoked", "superseded")
    assert sorted(p.name.split("-", 1)[1] for p in (out / "superseded").iterdir()) == ["r-2.bmap", "r-2.sdimg"]
    assert (out / "r-2.bmap").is_file()


def test_an_image_of_another_live_certificate_is_not_replaced_without_reissue(
    make_golden: Callable[..., Path], pki: Path, tmp_path: Path
) -> None:
    golden = make_golden(Scheme.MBR, data_mib=8)
    _stamp(golden, pki, tmp_path / "a", "r-3")
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a/r-3.sdimg", tmp_path / "b/r-3.sdimg")
    _stamp(golden, pki, tmp_path / "c", "r-3", extra=("--reissue",))
    err = _stamp(golden, pki, tmp_path / "b", "r-3", check=False)
    assert "but the device's live certificate is" in err and "pass --reissue" in err, err
    assert _serial(tmp_path / "b/r-3.sdimg") == _serial(tmp_path / "a/r-3.sdimg")
