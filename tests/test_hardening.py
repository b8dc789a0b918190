"""Bad input: each gives a non-zero exit and one clear line, and loses nothing.

For each case: the golden image is unchanged, no image is left under a final
name for a failed device, no partial file is left, and the registry holds no
live certificate for it.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from imageprov.disk.golden import GoldenSpec, Scheme, build_golden
from tests.conftest import (
    IN_CI,
    PASSPHRASE,
    cli_env,
    e2fsck_clean,
    imageprov_pki,
    offset_of,
    roles,
    sha256,
    tool,
)

MIB = 1 << 20


@dataclass
class Case:
    golden: Path
    pki: Path
    out: Path
    ids: list[str]
    extra: list[str]
    env: dict[str, str]


def _run(case: Case) -> subprocess.CompletedProcess[str]:
    env = {**cli_env(), **case.env}
    args = ["stamp", str(case.golden), "--pki", str(case.pki), "--out", str(case.out), *case.extra]
    for device_id in case.ids:
        args += ["--device-id", device_id]
    import sys

    return subprocess.run([sys.executable, "-m", "imageprov", *args], capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL)  # fmt: skip


def _registry(pki: Path) -> list[dict[str, object]]:
    if not (pki / "registry.sqlite").exists():
        return []
    return json.loads(imageprov_pki("devices", "--pki", pki, "--json").stdout)  # type: ignore[no-any-return]


def _expect_refused(case: Case, message: str, code: int) -> str:
    """Refused with exit status ``code``: 2 for bad usage (arguments), 1 for anything else (README)."""
    golden_before = sha256(case.golden) if case.golden.is_file() else None
    proc = _run(case)
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("imageprov: error: ") and "Traceback" not in proc.stderr
    assert message in lines[0], lines[0]
    print(f"\nuser sees: {lines[0]}")
    if golden_before is not None:
        assert sha256(case.golden) == golden_before
    if case.out.is_dir():
        leftovers = [p.name for p in case.out.iterdir() if p != case.golden]
        assert leftovers == [], leftovers
    live = [r for r in _registry(case.pki) if r["status"] != "revoked" and r["kind"] == "device"]
    assert live == [], live
    return lines[0]


@pytest.fixture
def case(make_golden: Callable[..., Path], pki: Path, tmp_path: Path) -> Case:
    # A small data partition (8 MiB, 2048 inodes): quick to fill up.
    return Case(make_golden(Scheme.MBR, data_mib=8), pki, tmp_path / "out", ["dev-1"], [], {})


# -- the golden image ---------------------------------------------------------------


def test_missing_image(case: Case) -> None:
    case.golden = case.golden.with_name("absent.sdimg")
    _expect_refused(case, "does not exist", 2)


def test_empty_image(case: Case) -> None:
    case.golden.write_bytes(b"")
    _expect_refused(case, "too small to be a disk image", 1)


def test_random_image(case: Case) -> None:
    case.golden.write_bytes(os.urandom(4 * MIB))
    _expect_refused(case, "0x55AA", 1)


def test_truncated_image(case: Case) -> None:
    with open(case.golden, "r+b") as handle:
        handle.truncate(120 * MIB)
    _expect_refused(case, "past the end of the image", 1)


def test_corrupt_mbr_signature(case: Case) -> None:
    with open(case.golden, "r+b") as handle:
        handle.seek(511)
        handle.write(b"\x00")
    _expect_refused(case, "0x55AA", 1)


def test_corrupt_gpt_crcs(make_golden: Callable[..., Path], case: Case) -> None:
    case.golden = make_golden(Scheme.GPT)
    size = case.golden.stat().st_size
    with open(case.golden, "r+b") as handle:
        for offset in (512 + 0x38, size - 512 + 0x38):
            handle.seek(offset)
            handle.write(b"\xff\xff")
    _expect_refused(case, "CRC32", 1)


def test_ebr_loop(make_golden: Callable[..., Path], case: Case) -> None:
    case.golden = make_golden(Scheme.MBR_EXTENDED)
    from imageprov.disk.partitions import read_table

    extended = next(p for p in read_table(case.golden).partitions if p.is_extended)
    with open(case.golden, "r+b") as handle:
        # The second EBR's link points at the second EBR again.
        handle.seek(extended.offset + 446 + 16 + 8)
        (link,) = struct.unpack("<I", handle.read(4))
        handle.seek((extended.start_sector + link) * 512 + 446 + 16)
        handle.write(struct.pack("<B3sB3sII", 0, b"\0" * 3, 5, b"\0" * 3, link, 2048))
    _expect_refused(case, "loops", 1)


def test_no_data_partition(case: Case, tmp_path: Path) -> None:
    image = tmp_path / "three.sdimg"
    with open(image, "wb") as handle:
        handle.truncate(64 * MIB)
    tool("sfdisk", "--quiet", image, input=b"label: dos\nsize=8MiB, type=c\nsize=20MiB, type=83\nsize=20MiB, type=83\n")
    tool("mkfs.vfat", "--offset", "2048", image, str(8 * 1024))
    for number in (2, 3):
        tool("mke2fs", "-q", "-F", "-t", "ext4", "-E", f"offset={offset_of(image, number)}", image, "20M")
    case.golden = image
    _expect_refused(case, "--data-part", 1)


def test_data_partition_not_ext4(case: Case) -> None:
    data = roles(case.golden)["data"]
    tool("mkfs.vfat", "--offset", str(offset_of(case.golden, data) // 512), case.golden, str(32 * 1024))
    _expect_refused(case, "--data-part", 1)


def test_data_partition_with_zeroed_superblock(case: Case) -> None:
    with open(case.golden, "r+b") as handle:
        handle.seek(offset_of(case.golden, roles(case.golden)["data"]) + 1024)
        handle.write(bytes(1024))
    _expect_refused(case, "--data-part", 1)


@pytest.mark.parametrize(
    ("conf", "message"),
    [
        (None, "/etc/mender/mender.conf does not exist"),
        ("{ not json", "not valid JSON"),
        ('["a list"]', "not an object"),
        ('{"HttpsClient": "/data/mender/mender-cert.pem"}', "HttpsClient that is not an object"),
    ],
    ids=["missing", "invalid-json", "not-an-object", "https-client-not-an-object"],
)
def test_bad_mender_conf(case: Case, tmp_path: Path, conf: str | None, message: str) -> None:
    case.golden.unlink()
    case.golden = build_golden(case.golden, GoldenSpec(mender_conf=conf or "{}"))
    if conf is None:
        for role in ("rootfs-a", "rootfs-b"):
            script = tmp_path / "rm"
            script.write_text("rm /etc/mender/mender.conf\n")
            tool(
                "debugfs",
                "-w",
                "-f",
                script,
                f"{case.golden}?offset={offset_of(case.golden, roles(case.golden)[role])}",
            )
    _expect_refused(case, message, 1)


def _fill(image: Path, tmp_path: Path, *, inodes: bool) -> None:
    """Use up every block, or every inode, of the data partition with debugfs."""
    target = f"{image}?offset={offset_of(image, roles(image)['data'])}"
    script = tmp_path / "fill"
    if inodes:
        empty = tmp_path / "empty"
        empty.write_bytes(b"")
        script.write_text("".join(f"write {empty} /f{i}\n" for i in range(2100)))
    else:
        big = tmp_path / "big"
        big.write_bytes(os.urandom(10 * MIB))
        script.write_text(f"write {big} /fill\n")
    tool("debugfs", "-w", "-f", script, target)
    stats = tool("debugfs", "-R", "stats", target).stdout.decode()
    assert int(stats.split("Free inodes:" if inodes else "Free blocks:")[1].split()[0]) == 0


def test_data_partition_without_free_blocks(case: Case, tmp_path: Path) -> None:
    _fill(case.golden, tmp_path, inodes=False)
    # The batch's data conf (--conf-target auto) fails first, before any certificate is issued.
    line = _expect_refused(case, "the filesystem is full", 1)
    assert "(data) failed" in line


def test_data_partition_without_free_inodes(case: Case, tmp_path: Path) -> None:
    _fill(case.golden, tmp_path, inodes=True)
    # The batch's data conf (--conf-target auto) fails first, before any certificate is issued.
    line = _expect_refused(case, "no free inodes", 1)
    assert "(data) failed" in line


# -- the output directory -----------------------------------------------------------


def test_output_is_a_file(case: Case) -> None:
    case.out.write_text("x")  # a file where the directory should be
    golden = sha256(case.golden)
    proc = _run(case)
    assert proc.returncode == 2 and "is not a directory" in proc.stderr
    assert sha256(case.golden) == golden and case.out.read_text() == "x"


def test_output_is_read_only(case: Case) -> None:
    if os.geteuid() == 0:
        # root writes anyway: make it truly read-only with a read-only bind of tmpfs.
        case.out.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1M", "tmpfs", str(case.out)]).returncode != 0:
            if IN_CI:
                pytest.fail("cannot mount a read-only tmpfs")
            pytest.skip("cannot mount a read-only tmpfs")
        try:
            _expect_refused(case, "not writable", 2)
        finally:
            subprocess.run(["umount", str(case.out)], check=True)
    else:
        case.out.mkdir()
        case.out.chmod(0o555)
        _expect_refused(case, "not writable", 2)


def test_output_over_the_golden_image(case: Case) -> None:
    case.golden = case.golden.rename(case.golden.with_name("dev-1.sdimg"))
    case.out = case.golden.parent
    before = sha256(case.golden)
    proc = _run(case)
    assert proc.returncode == 2 and "golden image" in proc.stderr and sha256(case.golden) == before


def test_output_filesystem_fills_up(case: Case, tmp_path: Path) -> None:
    """A small tmpfs as the output: room for one image, not two.

    Devices are built in parallel, so which one runs out of space (or whether
    both do, each half-way) is up to the scheduler: what must hold whatever
    the order is that no more than one is delivered, each failure is named and
    said to be a full disk, and the registry agrees with the directory.
    """
    probe = Case(case.golden, case.pki, case.out.with_name("probe"), ["probe-1"], [], {})
    assert _run(probe).returncode == 0
    allocated = (probe.out / "probe-1.sdimg").stat().st_blocks * 512
    size = allocated * 2 + allocated // 2  # the batch copy, one image, half of another
    imageprov_pki("revoke", "--pki", case.pki, "probe-1")
    case.out.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(case.out)]).returncode != 0:
        if IN_CI:
            pytest.fail("cannot mount a tmpfs (CI runs as root)")
        pytest.skip("cannot mount a tmpfs")
    try:
        case.ids = ["fits-1", "full-2"]
        proc = _run(case)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        images = sorted(p.name for p in case.out.iterdir())
        delivered = [i for i in case.ids if f"{i}.sdimg" in images]
        failed = [i for i in case.ids if i not in delivered]
        assert images == [f"{i}.sdimg" for i in delivered] and len(delivered) <= 1, images  # nothing partial
        lines = proc.stderr.strip().splitlines()
        for device_id in failed:
            assert any(device_id in line and "No space left" in line for line in lines), proc.stderr
        for device_id in delivered:
            e2fsck_clean(case.out / f"{device_id}.sdimg", roles(case.golden)["data"])
        status = {r["device_id"]: r["status"] for r in _registry(case.pki)}
        assert status == {
            "probe-1": "revoked",
            **dict.fromkeys(delivered, "active"),
            **dict.fromkeys(failed, "revoked"),
        }
    finally:
        subprocess.run(["umount", str(case.out)], check=True)


# -- device ids -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    ["a/b", "..", "with space", 'quo"te', "quo'te", "new\nline", "nul\0byte", "ünïcode", "x" * 300, ""],
    ids=["slash", "dotdot", "space", "dquote", "squote", "newline", "nul", "non-ascii", "300-chars", "empty"],
)
def test_bad_device_ids(case: Case, tmp_path: Path, bad: str) -> None:
    ids_file = tmp_path / "ids.txt"
    ids_file.write_bytes(b"good-1\n" + bad.replace("\n", "").encode("utf-8", "surrogateescape") + b"\n")
    if "\0" in bad or "\n" in bad:
        # argv cannot carry NUL; a newline splits a line: both come through a CSV file.
        ids_file.write_bytes(b'device_id\ngood-1\n"' + bad.encode() + b'"\n')
        case.ids, case.extra = [], ["--device-ids", str(ids_file)]
    else:
        case.ids = ["good-1", bad]
    line = _expect_refused(case, "device id", 2)
    assert not case.out.exists() or list(case.out.iterdir()) == []
    assert "good-1" not in line


def test_the_same_id_twice(case: Case) -> None:
    case.ids = ["dev-1", "dev-1"]
    _expect_refused(case, "given twice", 2)


# -- the PKI --------------------------------------------------------------------------


def test_wrong_passphrase(case: Case) -> None:
    case.env = {"IMAGEPROV_CA_PASSPHRASE": "not the passphrase"}
    _expect_refused(case, "wrong passphrase", 1)


def test_missing_pki(case: Case, tmp_path: Path) -> None:
    case.pki = tmp_path / "no-pki"
    _expect_refused(case, "no PKI at", 1)


def test_ca_key_that_does_not_match(case: Case, tmp_path: Path) -> None:
    other = tmp_path / "other"
    imageprov_pki("ca", "init", other, "--cn", "Other")
    shutil.copy(other / "ca-private.key", case.pki / "ca-private.key")
    _expect_refused(case, "does not match the CA certificate", 1)


def test_expired_ca(case: Case, tmp_path: Path) -> None:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    from imageprov.pki.ca import load_ca

    ca = load_ca(case.pki, PASSPHRASE.encode())
    past = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    expired = (
        x509.CertificateBuilder().subject_name(ca.cert.subject).issuer_name(ca.cert.subject)
        .public_key(ca.key.public_key()).serial_number(7).not_valid_before(past)
        .not_valid_after(past + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca.key, hashes.SHA256())
    )  # fmt: skip
    (case.pki / "ca-cert.pem").write_bytes(expired.public_bytes(serialization.Encoding.PEM))
    _expect_refused(case, "expired", 1)
