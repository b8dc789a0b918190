"""Golden images and line use as they come from the field (issue 11, round 2).

Each test feeds imageprov what a real site gave it (a dd of a running device,
a Yocto deploy link, Ctrl-C mid-batch, a CSV from a spreadsheet) and checks the
result with other real tools: debugfs, e2fsck, dumpe2fs, openssl, sfdisk, and
sqlite3 for the registry (tests/oracle.py), never with imageprov's own readers
alone: an image ``verify`` passes is also read with those.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from imageprov.disk.ext4 import NewFile
from imageprov.disk.golden import Scheme
from imageprov.disk.image import DiskImage
from imageprov.errors import FilesystemError
from imageprov.pki.ca import CA_KEY
from imageprov.pki.devices import read_device_ids
from tests.conftest import (
    IMAGEPROV_ARGV,
    PASSPHRASE,
    cli_env,
    imageprov,
    imageprov_pki,
    offset_of,
    partition_bytes,
    roles,
    sfdisk_json,
    sha256,
    sigint_default,
    tool,
)
from tests.oracle import check_device_image, registry, registry_rows

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
    _check_delivered(image, "j-1", pki, tmp_path)


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
    err = imageprov("prepare", image, "--server-url", "https://edge.example", "--conf-target", "rootfs").stderr
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


def _serial(image: Path) -> str:
    """The serial of the certificate in an image, read with debugfs and openssl."""
    pem = _cat(_fs(image, roles(image)["data"]), CERT)
    out = tool("openssl", "x509", "-noout", "-serial", input=pem).stdout.decode()
    return out.strip().split("=", 1)[1].lower().lstrip("0")


def _check_delivered(image: Path, device_id: str, pki: Path, tmp_path: Path, *, cwd: Path | None = None) -> str:
    """What the device finds (debugfs, openssl, e2fsck) and what the registry says (sqlite3) agree; the serial."""
    serial = check_device_image(image, device_id, pki, tmp_path)
    record = registry(pki)[serial]
    # The registry names the image as the station was given it: relative to its working directory ``cwd``.
    delivered_to = (cwd or Path()) / str(record["delivered_to"])
    assert (record["device_id"], record["status"], delivered_to) == (device_id, "active", image)
    return serial


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
    argv = [*IMAGEPROV_ARGV, "stamp", str(golden), "--pki", str(pki), "--out", str(out)]
    argv += [arg for device_id in ids for arg in ("--device-id", device_id)]
    proc = subprocess.Popen(argv, env=cli_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default)  # fmt: skip
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
    records = registry(pki)
    images = sorted(out.glob("*.sdimg"))
    assert len(images) == delivered
    for image in images:
        # Every published image holds its device's active certificate.
        record = records[_serial(image)]
        assert (record["device_id"], record["status"]) == (image.stem, "active"), image
    assert not [r for r in records.values() if r["status"] == "pending"]
    # A device interrupted after its certificate was issued has it revoked: nothing live without an image.
    for device_id in set(ids) - {image.stem for image in images}:
        assert {r["status"] for r in records.values() if r["device_id"] == device_id} <= {"revoked"}, device_id

    rerun = imageprov_pki("stamp", golden, "--pki", pki, "--out", out, *argv[9:]).stderr
    assert f"delivered {len(ids)} images" in rerun
    records = registry(pki)
    for device_id in ids:
        record = records[_serial(out / f"{device_id}.sdimg")]
        assert (record["device_id"], record["status"]) == (device_id, "active")
    assert sorted(r["device_id"] for r in records.values() if r["status"] != "revoked") == sorted(ids)


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
    assert new != old
    [aside] = (out / "superseded").iterdir()
    assert _serial(aside) == old
    imageprov("verify", image, "--ca", pki / "ca-cert.pem", "--device-id", "r-1")
    assert _check_delivered(image, "r-1", pki, tmp_path) == new
    assert (registry(pki)[old]["status"], registry(pki)[old]["reason"]) == ("revoked", "key-compromise")


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
    records = registry(pki)
    assert new != old and records[new]["status"] == "active"
    assert (records[old]["status"], records[old]["reason"]) == ("revoked", "superseded")
    assert [s for s, r in records.items() if r["device_id"] == "r-2"] == [old, new]
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


# -- 7. a symlinked image (Yocto's IMAGE_LINK_NAME) -----------------------------------------


def test_prepare_and_cp_edit_the_target_of_a_linked_image(make_golden: Callable[..., Path], tmp_path: Path) -> None:
    built = make_golden(Scheme.MBR, data_mib=8, name="core-image-20261127.sdimg")
    link = tmp_path / "core-image.sdimg"
    link.symlink_to(built.name)  # relative, as Yocto's deploy directory has it
    err = imageprov("prepare", link, "--server-url", "https://edge.example", "--conf-target", "rootfs").stderr
    assert f"{link} is a link: edited its target {built}" in err, err
    assert link.is_symlink() and link.readlink() == Path(built.name)
    conf = json.loads(_cat(_fs(built, roles(built)["rootfs-a"]), "/etc/mender/mender.conf"))
    assert conf["ServerURL"] == "https://edge.example"

    local = tmp_path / "hello.txt"
    local.write_text("hello\n")
    err = imageprov("cp", local, f"{link}:/data/hello.txt").stderr
    assert f"{link} is a link: edited its target {built}" in err, err
    assert link.is_symlink()
    assert _cat(_fs(built, roles(built)["data"]), "/hello.txt") == b"hello\n"


# -- crashes and paths that break debugfs -------------------------------------------------


def test_csv_comment_lines_anywhere_are_skipped(tmp_path: Path) -> None:
    ids = tmp_path / "ids.csv"
    ids.write_text("# exported from the MES\n# 2026-11-27\ndevice_id,mac\nd-1,aa:bb\n# a line taken out\nd-2,cc:dd\n")
    assert read_device_ids(ids) == ["d-1", "d-2"]


@pytest.mark.parametrize(
    ("conf", "message"),
    [
        ('{"ServerURL": "\\ud83d"}', "lone UTF-16 surrogate"),
        ('{"UpdatePollIntervalSeconds": 1e400}', "1e400 is out of range"),
        ('{"UpdatePollIntervalSeconds": NaN}', "NaN is not a JSON number"),
        ('{"UpdatePollIntervalSeconds": -Infinity}', "-Infinity is not a JSON number"),
    ],
    ids=["surrogate", "1e400", "nan", "infinity"],
)
def test_non_standard_json_in_mender_conf_is_refused(make_golden: Callable[..., Path], conf: str, message: str) -> None:
    image = make_golden(Scheme.MBR, data_mib=8, mender_conf=conf)
    before = sha256(image)
    proc = imageprov("prepare", image, "--server-url", "https://edge.example", "--conf-target", "rootfs", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("imageprov: error: /etc/mender/mender.conf on rootfs-a") and message in line, line
    assert sha256(image) == before


def _ca_cert(tmp_path: Path) -> Path:
    cert = tmp_path / "ca.pem"
    tool("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", tmp_path / "ca.key", "-out", cert, "-subj", "/CN=field test CA", "-days", "2")  # fmt: skip
    return cert


@pytest.mark.parametrize(
    ("script", "detail"),
    [("exit 8", "e2fsck -fn on data  (no output)"), ("kill -INT $$", "e2fsck was interrupted")],
    ids=["silent", "interrupted"],
)
def test_verify_survives_an_e2fsck_that_prints_nothing(
    make_golden: Callable[..., Path], tmp_path: Path, script: str, detail: str
) -> None:
    image = make_golden(Scheme.MBR, data_mib=8)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "e2fsck").write_text(f"#!/bin/sh\n{script}\n")
    (fake / "e2fsck").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"}
    # The fake e2fsck interrupts itself: SIGINT must reach it at its default disposition.
    proc = subprocess.run([*IMAGEPROV_ARGV, "verify", str(image), "--ca", str(_ca_cert(tmp_path))],
                          capture_output=True, text=True, env=env, preexec_fn=sigint_default)  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert detail in proc.stdout, proc.stdout


def _in(cwd: Path, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*IMAGEPROV_ARGV, *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=cli_env(), stdin=subprocess.DEVNULL)  # fmt: skip
    assert not check or proc.returncode == 0, proc.stderr
    return proc


def test_image_names_with_a_dash_or_a_question_mark_reach_debugfs(
    make_golden: Callable[..., Path], pki: Path, tmp_path: Path
) -> None:
    image = make_golden(Scheme.GPT, data_mib=8, rootfs_mib=16).rename(tmp_path / "-g?x.uefiimg")
    name = "./-g?x.uefiimg"  # what a user types; pathlib drops the ./
    alias = tmp_path / "alias.uefiimg"  # for the checks here, with debugfs
    alias.symlink_to(image)
    _in(tmp_path, "prepare", name, "--server-url", "https://edge.example", "--conf-target", "rootfs")
    assert b"https://edge.example" in _cat(_fs(alias, roles(alias)["rootfs-b"]), "/etc/mender/mender.conf")
    (tmp_path / "n.txt").write_text("n\n")
    _in(tmp_path, "cp", "n.txt", f"{name}:/data/n.txt")
    assert _in(tmp_path, "cat", f"{name}:/data/n.txt").stdout == "n\n"
    assert "n.txt" in _in(tmp_path, "ls", f"{name}:/data").stdout
    _in(tmp_path, "stamp", name, "--pki", pki, "--out", "out", "--device-id", "q-1", "--conf-target", "rootfs")
    report = json.loads(_in(tmp_path, "verify", name, "--ca", pki / "ca-cert.pem", "--json", check=False).stdout)
    missing = ["mender-cert-private.pem", "mender-cert.pem", "imageprov-device-id"]
    assert [c["name"] for c in report["checks"] if not c["ok"]] == [f"/data/mender/{m} present" for m in missing]
    imageprov("verify", tmp_path / "out/q-1.uefiimg", "--ca", pki / "ca-cert.pem", "--device-id", "q-1")
    _check_copy_of(alias, tmp_path / "out/q-1.uefiimg", "q-1", pki, tmp_path, cwd=tmp_path)
    tool("zstd", "-q", "-o", tmp_path / "-z.uefiimg.zst", "--", image)
    _in(
        tmp_path,
        "stamp",
        "./-z.uefiimg.zst",
        "--pki",
        pki,
        "--out",
        "out",
        "--device-id",
        "q-2",
        "--conf-target",
        "rootfs",
    )
    imageprov("verify", tmp_path / "out/q-2.uefiimg", "--ca", pki / "ca-cert.pem", "--device-id", "q-2")
    _check_copy_of(alias, tmp_path / "out/q-2.uefiimg", "q-2", pki, tmp_path, cwd=tmp_path)


def _check_copy_of(golden: Path, image: Path, device_id: str, pki: Path, tmp_path: Path, *, cwd: Path) -> None:
    """``image`` is ``golden`` (partition table and boot partition, by sfdisk) with the device's credentials."""
    table = [(p["start"], p["size"], p["type"]) for p in sfdisk_json(golden)["partitions"]]
    assert [(p["start"], p["size"], p["type"]) for p in sfdisk_json(image)["partitions"]] == table
    boot = roles(golden)["boot"]
    assert partition_bytes(image, boot) == partition_bytes(golden, boot)
    _check_delivered(image, device_id, pki, tmp_path, cwd=cwd)


# -- messages that mislead -----------------------------------------------------------------


def _one_error_line(proc: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert proc.returncode == code and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def _stamp_proc(golden: Path, pki: Path, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    ids = [a for i in range(3) for a in ("--device-id", f"m-{i}")]
    return imageprov_pki("stamp", golden, "--pki", pki, "--out", out, *ids, *args, check=False)


def test_a_golden_data_partition_failing_e2fsck_is_refused_once_with_its_findings(
    make_golden: Callable[..., Path], pki: Path, tmp_path: Path
) -> None:
    golden = make_golden(Scheme.MBR, data_mib=8)
    tool("debugfs", "-w", "-R", "sif /mender/device_type links_count 5", _fs(golden, roles(golden)["data"]))
    line = _one_error_line(_stamp_proc(golden, pki, tmp_path / "out"))
    assert "the golden image's partition 4 (data) fails e2fsck -fn:" in line, line
    assert re.search(r"Inode \d+ ref count is 5, should be 1", line), line
    assert "e2fsck 1.4" not in line  # the findings, not the banner
    assert registry_rows(pki) == []


def test_a_golden_data_partition_with_quota_is_refused_before_issuing(
    make_golden: Callable[..., Path], pki: Path, tmp_path: Path
) -> None:
    golden = make_golden(Scheme.MBR, data_mib=8)
    tool("tune2fs", "-O", "quota", _fs(golden, roles(golden)["data"]))
    line = _one_error_line(_stamp_proc(golden, pki, tmp_path / "out"))
    assert "partition 4 (data) has the quota feature" in line and "tune2fs -O ^quota" in line, line
    assert registry_rows(pki) == []


def test_zero_days_is_a_usage_error_before_any_work(
    make_golden: Callable[..., Path], pki: Path, tmp_path: Path
) -> None:
    golden = make_golden(Scheme.MBR, data_mib=8)
    proc = _stamp_proc(golden, pki, tmp_path / "out", "--days", "0")
    assert proc.returncode == 2 and "--days" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists() and registry_rows(pki) == []


def test_a_full_tmpdir_is_named(make_golden: Callable[..., Path], tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    image = make_golden(Scheme.MBR, data_mib=8, rootfs_mib=16, payload_mib=1)
    small = tmp_path / "small-tmp"
    small.mkdir()
    tool("mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", small)
    try:
        proc = subprocess.run([*IMAGEPROV_ARGV, "cat", f"{image}:/payload.bin"],
                              capture_output=True, env={**os.environ, "TMPDIR": str(small)})  # fmt: skip
    finally:
        tool("umount", small)
    line = _one_error_line(subprocess.CompletedProcess(proc.args, proc.returncode, "", proc.stderr.decode()))
    assert "No space left on device" in line and f"in {small}, the temporary directory" in line, line


def test_a_symlinked_mender_conf_is_named_as_such(make_golden: Callable[..., Path]) -> None:
    image = make_golden(Scheme.MBR, data_mib=8)
    for role in ("rootfs-a", "rootfs-b"):
        tool("debugfs", "-w", "-f", "-", _fs(image, roles(image)[role]),
             input=b"rm /etc/mender/mender.conf\nsymlink /etc/mender/mender.conf /data/etc/mender.conf\n")  # fmt: skip
    line = _one_error_line(imageprov("prepare", image, check=False))
    assert "/etc/mender/mender.conf on partition 2 (rootfs-a) is a symbolic link to /data/etc/mender.conf" in line
    assert "short read" not in line


def test_data_mender_as_a_file_is_named_as_such(make_golden: Callable[..., Path], tmp_path: Path) -> None:
    image = make_golden(Scheme.MBR, data_mib=8)
    (tmp_path / "f").write_text("not a directory\n")
    tool("debugfs", "-w", "-f", "-", _fs(image, roles(image)["data"]),
         input=f"rm /mender/device_type\nrmdir /mender\nwrite {tmp_path / 'f'} /mender\n".encode())  # fmt: skip
    line = _one_error_line(imageprov("prepare", image, check=False))
    assert "/data/mender in the image is a regular file, not a directory" in line, line
    assert "inode is not a directory" not in line


def test_verify_warns_about_an_expired_crl_and_fails_with_strict(
    make_golden: Callable[..., Path], pki: Path, tmp_path: Path
) -> None:
    golden = make_golden(Scheme.MBR, data_mib=8)
    _stamp(golden, pki, tmp_path / "out", "x-1")
    key = serialization.load_pem_private_key((pki / CA_KEY).read_bytes(), PASSPHRASE.encode())
    ca = x509.load_pem_x509_certificate((pki / "ca-cert.pem").read_bytes())
    now = dt.datetime.now(dt.UTC)
    crl = (x509.CertificateRevocationListBuilder().issuer_name(ca.subject)
           .last_update(now - dt.timedelta(days=8)).next_update(now - dt.timedelta(days=1))
           .sign(key, hashes.SHA256()))  # type: ignore[arg-type]  # fmt: skip
    (tmp_path / "crl.pem").write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    args = ("verify", tmp_path / "out/x-1.sdimg", "--ca", pki / "ca-cert.pem", "--crl", tmp_path / "crl.pem")
    lenient = imageprov(*args)
    assert re.search(r"^warn  CRL is current  \(its nextUpdate was .* the edge refuses every device", lenient.stdout,
                     re.M), lenient.stdout  # fmt: skip
    strict = imageprov(*args, "--strict", check=False)
    assert strict.returncode == 1 and "FAIL  CRL is current" in strict.stdout, strict.stdout


def test_a_gpt_without_its_backup_header_warns(make_golden: Callable[..., Path], tmp_path: Path) -> None:
    image = make_golden(Scheme.GPT, data_mib=8)
    size = image.stat().st_size
    os.truncate(image, size - 512 * 33)  # the backup entries and header are gone; the partitions are not
    report = imageprov("verify", image, "--ca", _ca_cert(tmp_path), check=False).stdout
    assert re.search(r"^warn  partition table  \(the image ends at \d+ bytes, before its backup GPT header", report,
                     re.M), report  # fmt: skip
    assert "warning: the image ends at" in imageprov("inspect", image).stdout


def test_reading_an_unreplayed_image_warns(make_golden: Callable[..., Path]) -> None:
    image = make_golden(Scheme.MBR, data_mib=8)
    _leave_journal_unreplayed(image, roles(image)["data"], "/mender")
    proc = imageprov("cat", f"{image}:/data/mender/device_type")
    assert proc.stdout.startswith("device_type=")
    assert "warning: partition 4 (data) has a journal never replayed" in proc.stderr, proc.stderr
    assert "warning" not in imageprov("cat", f"{make_golden(Scheme.GPT, data_mib=8)}:/etc/hostname").stderr


def test_ctrl_c_while_the_batch_is_prepared_says_so_in_one_line(
    make_golden: Callable[..., Path], pki: Path, tmp_path: Path
) -> None:
    golden = make_golden(Scheme.MBR, data_mib=8)
    out = tmp_path / "out"
    argv = [*IMAGEPROV_ARGV, "stamp", str(golden), "--pki", str(pki), "--out", str(out),
            "--server-url", "https://edge.example", "--conf-target", "rootfs", "--device-id", "p-1"]  # fmt: skip
    proc = subprocess.Popen(argv, env=cli_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default)  # fmt: skip
    # The batch's private copy is there: mender.conf is being merged into it.
    _wait_for(lambda: out.is_dir() and any("imageprov-batch" in p.name for p in out.iterdir()), "the batch copy")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert re.fullmatch(r"imageprov: interrupted: delivered (0 of 1 devices; rerun the same command to stamp the "
                        r"other 1|1 of 1 devices; rerun the same command to stamp the other 0)",
                        err.strip().splitlines()[-1]), err  # fmt: skip
    assert not [p for p in out.iterdir() if "imageprov-batch" in p.name]
