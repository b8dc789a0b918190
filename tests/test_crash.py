"""Crashes mid-batch and stations stamping at once: nothing lost, nothing delivered twice."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509

from imageprov.disk.golden import Scheme
from imageprov.disk.image import DiskImage
from imageprov.mender.verify import verify_image
from imageprov.pki.ca import load_cert
from tests.conftest import cli_env, imageprov_pki

CERT = Path("/mender/mender-cert.pem")


def _stamp_argv(golden: Path, pki: Path, out: Path, ids: list[str]) -> list[str]:
    argv = [sys.executable, "-m", "imageprov", "stamp", str(golden), "--pki", str(pki), "--out", str(out), "--json"]
    for device_id in ids:
        argv += ["--device-id", device_id]
    return argv


def _image_serial(image: Path) -> str:
    disk = DiskImage.open(image)
    pem = disk.ext(disk.layout.data_partition).read(CERT)
    return f"{x509.load_pem_x509_certificate(pem).serial_number:x}"


def _check_consistent(pki: Path, out: Path, ids: list[str], *, all_delivered: bool) -> None:
    """Every final image verifies and holds its device's one active certificate."""
    ca = load_cert(pki / "ca-cert.pem")
    rows = (
        sqlite3.connect(pki / "registry.sqlite")
        .execute("SELECT device_id, serial, status FROM certificates WHERE kind = 'device'")
        .fetchall()
    )
    assert len({serial for _, serial, _ in rows}) == len(rows), "duplicate serials"
    for device_id in ids:
        image = out / f"{device_id}.sdimg"
        active = [serial for d, serial, status in rows if d == device_id and status == "active"]
        pending = [serial for d, serial, status in rows if d == device_id and status == "pending"]
        if image.exists():
            report = verify_image(image, ca, device_id=device_id, fsck_rootfs=False)
            assert report.ok, (image, report.failures)
            assert active + pending == [_image_serial(image)], (device_id, rows)
        else:
            assert not all_delivered, f"{device_id} was not delivered"
            assert active == [], f"{device_id} has an active certificate but no image"
    leftovers = [p.name for p in out.iterdir() if ".partial" in p.name]
    if all_delivered:
        assert leftovers == []
        assert all(status != "pending" for _, _, status in rows)


@pytest.mark.parametrize("seed", [11, 33, 44])
def test_sigkill_mid_batch_then_rerun(make_golden: Callable[..., Path], pki: Path, tmp_path: Path, seed: int) -> None:
    golden = make_golden(Scheme.MBR)
    out = tmp_path / "out"
    ids = [f"k{seed}-{i:02d}" for i in range(30)]
    argv = _stamp_argv(golden, pki, out, ids)
    # How long a whole batch takes here, on other ids, to aim the kill inside it.
    started = time.monotonic()
    calibration = [f"c{seed}-{i:02d}" for i in range(30)]
    subprocess.run(
        _stamp_argv(golden, pki, tmp_path / "calibration", calibration), env=cli_env(), check=True, capture_output=True
    )
    whole = time.monotonic() - started
    proc = subprocess.Popen(
        argv, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    time.sleep(random.Random(seed).uniform(0.3, 0.95) * whole)
    os.killpg(proc.pid, signal.SIGKILL)  # the station dies: imageprov and its debugfs
    proc.wait()
    _check_consistent(pki, out, ids, all_delivered=False)
    delivered = len([p for p in out.iterdir() if p.name.endswith(".sdimg") and ".partial" not in p.name])
    print(f"seed {seed}: {delivered} of 30 delivered when killed")

    rerun = subprocess.run(argv, env=cli_env(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    _check_consistent(pki, out, ids, all_delivered=True)
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{i}.sdimg" for i in ids)


def test_two_stations_at_once(make_golden: Callable[..., Path], pki: Path, tmp_path: Path) -> None:
    golden = make_golden(Scheme.MBR)
    out = tmp_path / "out"
    shared = [f"s-{i}" for i in range(8)]
    first = [f"a-{i}" for i in range(6)] + shared
    second = [f"b-{i}" for i in range(6)] + shared[::-1]
    procs = [
        subprocess.Popen(
            _stamp_argv(golden, pki, out, ids), env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for ids in (first, second)
    ]
    for proc in procs:
        proc.communicate(timeout=300)
    everyone = sorted(set(first + second))
    _check_consistent(pki, out, everyone, all_delivered=False)
    # What one station could not do because the other was at it, a rerun finishes; nothing is done twice.
    for ids in (first, second):
        rerun = subprocess.run(_stamp_argv(golden, pki, out, ids), env=cli_env(), capture_output=True, text=True)
        assert rerun.returncode == 0, rerun.stderr
    _check_consistent(pki, out, everyone, all_delivered=True)
    rows = (
        sqlite3.connect(pki / "registry.sqlite")
        .execute("SELECT device_id FROM certificates WHERE status = 'active'")
        .fetchall()
    )
    assert sorted(d for (d,) in rows) == everyone


def test_keys_never_leak(make_golden: Callable[..., Path], pki: Path, tmp_path: Path) -> None:
    golden = make_golden(Scheme.MBR)
    out = tmp_path / "out"
    private_tmp = tmp_path / "tmpdir"
    private_tmp.mkdir()
    env = cli_env(TMPDIR=str(private_tmp))
    argv = _stamp_argv(golden, pki, out, ["h-1", "h-2"])
    argv.insert(3, "--debug")
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    # A failing device's message, too.
    failing = subprocess.run(
        _stamp_argv(golden, pki, tmp_path / "out2", ["h-1"]), env=env, capture_output=True, text=True
    )
    assert failing.returncode == 1
    disk = DiskImage.open(out / "h-1.sdimg")
    key = disk.ext(disk.layout.data_partition).read(Path("/mender/mender-cert-private.pem")).decode()
    body = [line for line in key.splitlines() if "PRIVATE KEY" not in line]
    for text in (proc.stdout, proc.stderr, failing.stdout, failing.stderr):
        assert "PRIVATE KEY" not in text
        assert not any(line in text for line in body)
    assert "debugfs" in proc.stderr  # --debug did log the commands
    assert list(private_tmp.iterdir()) == []  # temporary key files are gone
    ca_key = pki / "ca-private.key"
    assert ca_key.stat().st_mode & 0o077 == 0
    for image in out.iterdir():
        assert image.stat().st_mode & 0o077 == 0


def test_golden_image_is_opened_read_only(make_golden: Callable[..., Path], pki: Path, tmp_path: Path) -> None:
    golden = make_golden(Scheme.MBR)
    golden.chmod(0o444)
    stat = golden.stat()
    if os.geteuid() == 0:
        # Root ignores the mode; an immutable file refuses even root's writes where the filesystem has chattr.
        subprocess.run(["chattr", "+i", str(golden)], capture_output=True)
    try:
        imageprov_pki("stamp", golden, "--pki", pki, "--out", tmp_path / "out", "--device-id", "ro-1")
    finally:
        subprocess.run(["chattr", "-i", str(golden)], capture_output=True)
    assert golden.stat().st_mtime_ns == stat.st_mtime_ns and golden.stat().st_size == stat.st_size
