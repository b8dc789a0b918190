"""Compressed images (.gz, .bz2, .xz, .zst) everywhere: every command that reads an image takes them,
and prepare and cp into one write back in the same compression, atomically.

Images are compressed and decompressed with each format's own command-line tool, and what they hold is
read with sfdisk and debugfs: never with imageprov's own reader.
"""

from __future__ import annotations

import json
import os
import pty
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from imageprov.disk.compress import decompressed
from imageprov.disk.golden import GoldenSpec, Scheme, build_filesystem_image
from tests.conftest import (
    IMAGEPROV_ARGV,
    cli_env,
    debugfs,
    e2fsck_clean,
    imageprov,
    imageprov_pki,
    need,
    partition_bytes,
    roles,
    sfdisk_json,
    sha256,
    sigint_default,
    tool,
)
from tests.oracle import check_device_image

KINDS = ["gz", "bz2", "xz", "zst"]
TOOLS = {"gz": "gzip", "bz2": "bzip2", "xz": "xz", "zst": "zstd"}
HTTPS_CLIENT = {"Certificate": "/data/mender/mender-cert.pem", "Key": "/data/mender/mender-cert-private.pem"}


def pack(path: Path, kind: str) -> Path:
    """``path.KIND``, made by the format's own tool; ``path`` is kept."""
    tool(TOOLS[kind], "-q", "-k", "-1", "--", path)
    return path.with_name(f"{path.name}.{kind}")


def unpack(packed: Path, kind: str, plain: Path) -> Path:
    """Decompress with the format's own tool (which also checks the file's integrity)."""
    plain.write_bytes(tool(TOOLS[kind], "-dc", "--", packed).stdout)
    return plain


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture
def small_golden(make_golden: Callable[..., Path]) -> Path:
    return make_golden(Scheme.MBR, rootfs_mib=16, data_mib=16)  # type: ignore[no-any-return]


@pytest.fixture
def private_tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty TMPDIR for the commands run, to see what they leave there."""
    path = tmp_path / "tmpdir"
    path.mkdir()
    monkeypatch.setenv("TMPDIR", str(path))
    return path


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory no one may create files in: immutable for root, 0555 for anyone else."""
    path = tmp_path / "ro"
    path.mkdir()
    yield path
    if os.geteuid() == 0:
        tool("chattr", "-i", path)
    path.chmod(0o755)


def seal(directory: Path) -> None:
    if os.geteuid() == 0:
        tool("chattr", "+i", directory)
    else:
        directory.chmod(0o555)


# -- commands that read -----------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_read_only_commands_take_compressed_images(
    small_golden: Path, tmp_path: Path, private_tmpdir: Path, kind: str
) -> None:
    golden = small_golden
    packed = pack(golden, kind)
    before, digest = listing(golden.parent), sha256(packed)
    layout = roles(golden)

    shown = json.loads(imageprov("inspect", packed, "--json").stdout)
    table = sfdisk_json(golden)
    assert [(p["start_sector"], p["size_sectors"]) for p in shown["partitions"]] == [
        (p["start"], p["size"]) for p in table["partitions"]
    ]
    assert {p["role"]: p["number"] for p in shown["partitions"] if p["role"] in layout} == layout

    conf = debugfs(golden, layout["rootfs-a"], "cat /etc/mender/mender.conf")
    assert imageprov("cat", f"{packed}:/etc/mender/mender.conf").stdout == conf
    names = debugfs(golden, layout["data"], "ls -p /mender").split()
    listed = imageprov("ls", f"{packed}:/data/mender", "--json").stdout
    assert {e["name"] for e in json.loads(listed)} == {line.split("/")[5] for line in names} - {".", ".."}
    imageprov("cp", f"{packed}:/etc/mender/mender.conf", tmp_path / "out.conf")
    assert (tmp_path / "out.conf").read_text() == conf

    # Nothing written beside the image or in TMPDIR, and the image is as it was.
    assert listing(golden.parent) == sorted([*before, "out.conf"])
    assert list(private_tmpdir.iterdir()) == []
    assert sha256(packed) == digest


@pytest.mark.parametrize("kind", KINDS)
def test_verify_passes_on_stamps_compressed_output(
    small_golden: Path, pki: Path, tmp_path: Path, private_tmpdir: Path, kind: str
) -> None:
    out = tmp_path / "out"
    imageprov_pki("stamp", small_golden, "--pki", pki, "--out", out, "--device-id", "c1", "--compress", kind)
    packed = out / f"c1.sdimg.{kind}"
    # What the device gets, read with the format's tool, debugfs and openssl.
    check_device_image(unpack(packed, kind, tmp_path / "c1.sdimg"), "c1", pki, tmp_path)

    ca = pki / "ca-cert.pem"
    proc = imageprov("--debug", "verify", packed, "--ca", ca, "--device-id", "c1", "--json")
    report = json.loads(proc.stdout)
    assert report["ok"] and report["image"] == str(packed)
    assert "c1.sdimg" not in "".join(c["detail"] for c in report["checks"])  # no name of a private copy
    assert "PRIVATE KEY" not in proc.stderr and "PRIVATE KEY" not in proc.stdout
    # It really reads the image: the wrong device fails, with one line naming the image as given.
    wrong = imageprov("verify", packed, "--ca", ca, "--device-id", "c2", check=False)
    assert wrong.returncode == 1
    assert wrong.stderr.strip().splitlines()[-1].startswith(f"imageprov: error: {packed}: 1 checks failed")
    assert listing(out) == [packed.name]
    assert list(private_tmpdir.iterdir()) == []


def test_bare_data_image_keeps_its_suffix(tmp_path: Path) -> None:
    need("mke2fs")
    data = build_filesystem_image(tmp_path / "core.dataimg", GoldenSpec(data_mib=8), data=True)
    packed = pack(data, "xz")
    shown = json.loads(imageprov("inspect", packed, "--json").stdout)
    assert [p["role"] for p in shown["partitions"]] == ["data"]
    assert "device_type" in imageprov("ls", f"{packed}:/data/mender").stdout


def test_read_only_directory_decompresses_into_tmpdir(
    small_golden: Path, read_only_dir: Path, private_tmpdir: Path
) -> None:
    packed = pack(small_golden, "xz").rename(read_only_dir / "g.sdimg.xz")
    seal(read_only_dir)
    conf = debugfs(small_golden, roles(small_golden)["rootfs-a"], "cat /etc/mender/mender.conf")
    assert imageprov("cat", f"{packed}:/etc/mender/mender.conf").stdout == conf
    assert list(private_tmpdir.iterdir()) == []

    # prepare cannot write it back there: one line, before any work, the image as it was.
    digest = sha256(packed)
    proc = imageprov("prepare", packed, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"imageprov: error: cannot write {packed} back in place: {read_only_dir} is not writable "
        "(decompress it where you can write (xz -dk), change that, and compress it again)"
    ]
    assert sha256(packed) == digest and listing(read_only_dir) == ["g.sdimg.xz"]


def test_decompressed_copy_is_private_sparse_and_removed(
    small_golden: Path, read_only_dir: Path, private_tmpdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tempfile.tempdir", None)  # TMPDIR as set here, not as first seen
    packed = pack(small_golden, "gz")
    size = small_golden.stat().st_size
    with decompressed(packed) as plain:
        assert plain.parent == packed.parent and plain.name.startswith(".") and plain.suffix == ".sdimg"
        assert plain.stat().st_mode & 0o777 == 0o600
        assert plain.stat().st_size == size and plain.stat().st_blocks * 512 < size // 4
        assert sha256(plain) == sha256(small_golden)
    assert not plain.exists()

    sealed = pack(small_golden, "zst").rename(read_only_dir / "g.sdimg.zst")
    seal(read_only_dir)
    with decompressed(sealed) as plain:
        assert plain.parent == private_tmpdir and plain.stat().st_mode & 0o777 == 0o600
        assert plain.stat().st_blocks * 512 < size // 4
    assert list(private_tmpdir.iterdir()) == []


def test_damaged_or_missing_compressed_image_is_one_line(small_golden: Path, private_tmpdir: Path) -> None:
    packed = pack(small_golden, "xz")
    packed.write_bytes(packed.read_bytes()[:3000])
    before = listing(small_golden.parent)
    for argv in (["inspect", packed], ["cat", f"{packed}:/etc/mender/mender.conf"]):
        proc = imageprov(*argv, check=False)
        assert proc.returncode == 1 and proc.stderr.startswith(f"imageprov: error: cannot decompress {packed}")
        assert len(proc.stderr.strip().splitlines()) == 1
    assert listing(small_golden.parent) == before and list(private_tmpdir.iterdir()) == []
    proc = imageprov("inspect", small_golden.parent / "none.sdimg.gz", check=False)
    assert (
        proc.returncode == 2
        and proc.stderr == f"imageprov: error: {small_golden.parent}/none.sdimg.gz does not exist\n"
    )


# -- commands that edit -------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_prepare_writes_back_in_the_same_compression(small_golden: Path, tmp_path: Path, kind: str) -> None:
    golden = small_golden
    packed = pack(golden, kind)
    packed.chmod(0o640)
    before = listing(golden.parent)
    proc = imageprov("prepare", packed)
    assert proc.stderr.strip().splitlines()[-1] == f"prepared {packed}"
    assert packed.stat().st_mode & 0o777 == 0o640
    plain = unpack(packed, kind, tmp_path / "prepared.sdimg")
    layout = roles(plain)
    fallback = json.loads(debugfs(plain, layout["data"], "cat /mender/mender.conf"))
    assert fallback["HttpsClient"] == HTTPS_CLIENT
    # Only the data partition changed; the table and both rootfs are the golden image's.
    assert sfdisk_json(plain)["partitions"] == [
        {**p, "node": p["node"].replace(str(golden), str(plain))} for p in sfdisk_json(golden)["partitions"]
    ]
    for role in ("boot", "rootfs-a", "rootfs-b"):
        assert partition_bytes(plain, layout[role]) == partition_bytes(golden, layout[role])
    e2fsck_clean(plain, layout["data"])
    assert listing(golden.parent) == sorted([*before, "prepared.sdimg"])

    # Prepared already: not written to at all.
    digest, mtime = sha256(packed), packed.stat().st_mtime_ns
    assert "already prepared" in imageprov("prepare", packed).stderr
    assert sha256(packed) == digest and packed.stat().st_mtime_ns == mtime


def test_prepare_edits_a_links_target(small_golden: Path) -> None:
    """Yocto's IMAGE_LINK_NAME: core-image.sdimg.bz2 -> core-image-20240101.sdimg.bz2."""
    target = pack(small_golden, "bz2").rename(small_golden.parent / "core-image-20240101.sdimg.bz2")
    link = small_golden.parent / "core-image.sdimg.bz2"
    link.symlink_to(target.name)
    proc = imageprov("prepare", link)
    assert f"edited its target {target}" in proc.stderr
    assert link.is_symlink() and os.readlink(link) == target.name
    plain = unpack(target, "bz2", small_golden.parent / "check.sdimg")
    assert json.loads(debugfs(plain, roles(plain)["data"], "cat /mender/mender.conf"))["HttpsClient"] == HTTPS_CLIENT


def test_cp_into_a_compressed_image(small_golden: Path, tmp_path: Path) -> None:
    packed = pack(small_golden, "gz")
    (tmp_path / "note.txt").write_text("hello\n")
    imageprov("cp", tmp_path / "note.txt", f"{packed}:/data/note.txt", "--mode", "600")
    plain = unpack(packed, "gz", tmp_path / "check.sdimg")
    data = roles(plain)["data"]
    assert debugfs(plain, data, "cat /note.txt") == "hello\n"
    assert "Mode:  0600" in debugfs(plain, data, "stat /note.txt")
    e2fsck_clean(plain, data)


def _zstd_wrapper(tmp_path: Path, action: str) -> dict[str, str]:
    """PATH with a zstd that, when asked to compress, interrupts its caller (Ctrl-C) or fails; else the real one."""
    need("zstd")
    real = shutil.which("zstd")
    assert real is not None
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "zstd"
    fault = 'kill -INT "$PPID"' if action == "interrupt" else 'echo "zstd: injected failure" >&2; exit 1'
    wrapper.write_text(f'#!/bin/sh\ncase " $* " in *" -d "*) ;; *) {fault} ;; esac\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    return cli_env(None, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")


@pytest.mark.parametrize("action", ["interrupt", "fail"])
def test_prepare_interrupted_or_failed_while_writing_back(small_golden: Path, tmp_path: Path, action: str) -> None:
    packed = pack(small_golden, "zst")
    env = _zstd_wrapper(tmp_path, action)
    digest, before = sha256(packed), listing(small_golden.parent)
    proc = subprocess.run(
        [*IMAGEPROV_ARGV, "prepare", str(packed)],
        env=env,
        capture_output=True,
        text=True,
        preexec_fn=sigint_default,
    )
    if action == "interrupt":
        assert proc.returncode == 130 and "Traceback" not in proc.stderr  # typer exits 130 quietly
    else:
        assert proc.returncode == 1 and "zstd failed: zstd: injected failure" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    assert sha256(packed) == digest
    assert listing(small_golden.parent) == before  # no partial file, no decompressed copy left


# -- progress -----------------------------------------------------------------------


def test_progress_on_a_terminal_only(small_golden: Path) -> None:
    packed = pack(small_golden, "xz")
    assert "decompressing" not in imageprov("inspect", packed).stderr
    primary, secondary = pty.openpty()
    with subprocess.Popen(
        [*IMAGEPROV_ARGV, "inspect", str(packed)], stdout=subprocess.PIPE, stderr=secondary, stdin=subprocess.DEVNULL
    ) as child:
        os.close(secondary)
        shown = b""
        while True:
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            shown += chunk
        stdout, _ = child.communicate()
    os.close(primary)
    assert child.returncode == 0 and stdout.startswith(b"table: MBR")
    assert f"decompressing {packed.name}".encode() in shown and b"100%" in shown
