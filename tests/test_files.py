"""Files inside the image's partitions, in place: cp, cat and ls, checked with debugfs, e2fsck and fsck.vfat."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from imageprov.disk.golden import Scheme
from imageprov.disk.image import Area, DevicePath, parse_mode
from imageprov.errors import UsageError
from tests.conftest import debugfs, e2fsck_clean, fsck_vfat_clean, imageprov, offset_of, roles, sha256, tool


def _stat(image: Path, number: int, path: str) -> tuple[str, str, str]:
    """(mode, uid, gid) of a file as debugfs stat prints them."""
    out = debugfs(image, number, f'stat "{path}"')
    mode = out.split("Mode:")[1].split()[0]
    uid = out.split("User:")[1].split()[0]
    gid = out.split("Group:")[1].split()[0]
    return mode, uid, gid


@pytest.mark.parametrize("mode_arg", ["600", "0600"])
def test_cp_key_to_data_partition(golden: Path, tmp_path: Path, mode_arg: str) -> None:
    key = tmp_path / "device.key"
    key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot really\n")
    imageprov("cp", key, f"{golden}:/data/mender/mender-cert-private.pem", "--mode", mode_arg)
    data = roles(golden)["data"]
    assert debugfs(golden, data, "cat /mender/mender-cert-private.pem") == key.read_text()
    # mender-artifact 3.9 would have written 0130 here.
    assert _stat(golden, data, "/mender/mender-cert-private.pem") == ("0600", "0", "0")
    assert imageprov("cat", f"{golden}:/data/mender/mender-cert-private.pem").stdout == key.read_text()
    listing = imageprov("ls", f"{golden}:/data/mender").stdout
    assert "-rw-------" in listing and "mender-cert-private.pem" in listing and "device_type" in listing
    e2fsck_clean(golden, data)


def test_cp_rootfs_path_goes_to_both_rootfs(golden: Path, tmp_path: Path) -> None:
    conf = tmp_path / "mender.conf"
    conf.write_text('{"ServerURL": "https://edge.example.com"}\n')
    imageprov("cp", conf, f"{golden}:/etc/mender/mender.conf", "--mode", "0640", "--owner", "0:1000")
    layout = roles(golden)
    for number in (layout["rootfs-a"], layout["rootfs-b"]):
        assert debugfs(golden, number, "cat /etc/mender/mender.conf") == conf.read_text()
        assert _stat(golden, number, "/etc/mender/mender.conf") == ("0640", "0", "1000")
        # The rest of the rootfs is still there.
        assert "imageprov-demo" in debugfs(golden, number, "cat /etc/hostname")
        e2fsck_clean(golden, number)


def test_cp_creates_missing_parents_root_owned(golden: Path, tmp_path: Path) -> None:
    src = tmp_path / "a file"
    src.write_text("x")
    imageprov("cp", src, f"{golden}:/opt/deep er/dir/file name", "--mode", "644")
    rootfs_a = roles(golden)["rootfs-a"]
    assert _stat(golden, rootfs_a, "/opt/deep er/dir") == ("0755", "0", "0")
    assert debugfs(golden, rootfs_a, 'cat "/opt/deep er/dir/file name"') == "x"
    e2fsck_clean(golden, rootfs_a)


def test_cp_to_boot_partition_and_back(golden: Path, tmp_path: Path) -> None:
    src = tmp_path / "boot.scr"
    src.write_bytes(os.urandom(70_000))
    imageprov("cp", src, f"{golden}:/uboot/scripts/boot.scr")
    # mtools reads the vfat partition in place: an independent reader.
    boot = f"{golden}@@{offset_of(golden, roles(golden)['boot'])}"
    assert tool("mtype", "-i", boot, "::/scripts/boot.scr").stdout == src.read_bytes()
    assert tool("mdir", "-b", "-i", boot, "::/scripts").stdout.decode().split() == ["::/scripts/boot.scr"]
    out = tmp_path / "out.scr"
    imageprov("cp", f"{golden}:/uboot/scripts/boot.scr", out)
    assert out.read_bytes() == src.read_bytes()
    assert "uboot.env" in imageprov("ls", f"{golden}:/boot/efi").stdout
    fsck_vfat_clean(golden, roles(golden)["boot"], tmp_path)


def test_cp_out_of_image_is_private_and_into_a_directory(golden: Path, tmp_path: Path) -> None:
    outdir = tmp_path / "out"
    outdir.mkdir()
    imageprov("cp", f"{golden}:/data/mender/device_type", outdir)
    copied = outdir / "device_type"
    assert copied.read_text() == "device_type=imageprov-demo\n"
    assert copied.stat().st_mode & 0o777 == 0o600
    # Into a directory that is not there: one line, as cp says it (it was a traceback).
    missing = imageprov("cp", f"{golden}:/data/mender/device_type", tmp_path / "nowhere" / "device_type", check=False)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert f"{tmp_path / 'nowhere'} is not a directory" in missing.stderr and not (tmp_path / "nowhere").exists()


def test_replacing_a_file_keeps_the_others(golden: Path, tmp_path: Path) -> None:
    src = tmp_path / "device_type"
    for content in ("device_type=first\n", "device_type=second and longer\n"):
        src.write_text(content)
        imageprov("cp", src, f"{golden}:/data/mender/device_type")
    data = roles(golden)["data"]
    assert debugfs(golden, data, "cat /mender/device_type") == "device_type=second and longer\n"
    e2fsck_clean(golden, data)


def _fails_unchanged(image: Path, *args: str | Path) -> str:
    before = sha256(image)
    proc = imageprov(*args, check=False)
    assert proc.returncode != 0
    assert sha256(image) == before, "a failed operation changed the image"
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc.stderr


def test_a_file_larger_than_the_free_space_leaves_the_image_as_it_was(
    make_golden: Callable[..., Path], tmp_path: Path
) -> None:
    image = make_golden(Scheme.MBR, data_mib=8)
    big = tmp_path / "big"
    big.write_bytes(os.urandom(12 << 20))
    message = _fails_unchanged(image, "cp", big, f"{image}:/data/big")
    assert "partition 4 (data)" in message
    assert [p for p in image.parent.iterdir() if ".partial" in p.name] == []


def test_failing_on_rootfs_b_leaves_rootfs_a_as_it_was(make_golden: Callable[..., Path], tmp_path: Path) -> None:
    image = make_golden(Scheme.MBR)
    # Make /etc/mender a file on rootfs B only: the write to A succeeds, then B fails.
    b = roles(image)["rootfs-b"]
    from tests.conftest import offset_of, tool

    script = tmp_path / "script"
    script.write_text("rm /etc/mender/mender.conf\nrmdir /etc/mender\nwrite /etc/hostname /etc/mender\n")
    tool("debugfs", "-w", "-f", script, f"{image}?offset={offset_of(image, b)}")
    src = tmp_path / "conf"
    src.write_text("{}")
    message = _fails_unchanged(image, "cp", src, f"{image}:/etc/mender/mender.conf")
    assert "not a directory" in message


@pytest.mark.parametrize(
    "dest",
    ['/data/with "quote"', "/data/a\nb", "/data/../etc/passwd", "/data/" + "x" * 300, "/data/mender"],
)
def test_bad_paths_are_refused_unchanged(make_golden: Callable[..., Path], tmp_path: Path, dest: str) -> None:
    image = make_golden(Scheme.MBR)
    src = tmp_path / "src"
    src.write_text("x")
    _fails_unchanged(image, "cp", src, f"{image}:{dest}")


def test_bad_mode_and_owner_are_refused(make_golden: Callable[..., Path], tmp_path: Path) -> None:
    image = make_golden(Scheme.MBR)
    src = tmp_path / "src"
    src.write_text("x")
    assert "octal" in _fails_unchanged(image, "cp", src, f"{image}:/data/x", "--mode", "800")
    assert "UID:GID" in _fails_unchanged(image, "cp", src, f"{image}:/data/x", "--owner", "root")
    assert "no modes" in _fails_unchanged(image, "cp", src, f"{image}:/uboot/x", "--mode", "600")


def test_filesystem_larger_than_its_partition_is_not_written(make_golden: Callable[..., Path], tmp_path: Path) -> None:
    image = make_golden(Scheme.MBR)
    # Shrink partition 4 in the table so the data filesystem overhangs it.
    import struct

    with open(image, "r+b") as handle:
        handle.seek(446 + 16 * 3 + 12)
        (sectors,) = struct.unpack("<I", handle.read(4))
        handle.seek(446 + 16 * 3 + 12)
        handle.write(struct.pack("<I", sectors // 2))
    src = tmp_path / "src"
    src.write_text("x")
    assert "larger than its partition" in _fails_unchanged(image, "cp", src, f"{image}:/data/x")


def test_missing_file_and_bad_specs(golden: Path) -> None:
    assert "does not exist" in imageprov("cat", f"{golden}:/etc/nothing", check=False).stderr
    assert "IMAGE:/PATH" in imageprov("cp", "a", "b", check=False).stderr
    proc = imageprov("inspect", golden.parent / "absent.sdimg", check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


@pytest.mark.parametrize(("text", "value"), [("600", 0o600), ("0600", 0o600), ("0o644", 0o644), ("4755", 0o4755)])
def test_modes_are_octal(text: str, value: int) -> None:
    assert parse_mode(text) == value


@pytest.mark.parametrize("text", ["", "8", "600a", "77777", "-1"])
def test_bad_modes(text: str) -> None:
    with pytest.raises(UsageError):
        parse_mode(text)


@pytest.mark.parametrize(
    ("path", "area", "inner"),
    [
        ("/data/mender/x", Area.DATA, "/mender/x"),
        ("/data", Area.DATA, "/"),
        ("/database/x", Area.ROOTFS, "/database/x"),
        ("/uboot/uboot.env", Area.BOOT, "/uboot.env"),
        ("/boot/efi/EFI/BOOT/x", Area.BOOT, "/EFI/BOOT/x"),
        ("/boot/vmlinuz", Area.ROOTFS, "/boot/vmlinuz"),
        ("//etc//mender/", Area.ROOTFS, "/etc/mender"),
    ],
)
def test_device_paths_follow_mender_artifact(path: str, area: Area, inner: str) -> None:
    parsed = DevicePath.parse(path)
    assert (parsed.area, str(parsed.inner)) == (area, inner)


def test_apply_writes_each_file_with_its_own_mode_and_owner(make_golden: Callable[..., Path]) -> None:
    """A plan says where files go; their modes and owners are the caller's, never a plan's leftovers."""
    from pathlib import PurePosixPath

    from imageprov.disk.ext4 import Ext4, NewFile
    from tests.conftest import offset_of

    golden = make_golden(Scheme.MBR)
    data = roles(golden)["data"]
    fs = Ext4(golden, offset_of(golden, data), "data")
    key, note = PurePosixPath("/mender/k.pem"), PurePosixPath("/new dir/note")
    plan = fs.plan([key, note])
    fs.apply(plan, [NewFile(key, b"secret\n", 0o400, 0, 0), NewFile(note, b"n\n", 0o640, 0, 1000)])
    assert _stat(golden, data, "/mender/k.pem") == ("0400", "0", "0")
    assert _stat(golden, data, "/new dir/note") == ("0640", "0", "1000")
    assert debugfs(golden, data, 'cat "/new dir/note"') == "n\n"
    # Replacing the file: the mode of this write, not the one it had.
    fs.apply(fs.plan([key]), [NewFile(key, b"again\n", 0o600, 0, 0)])
    assert _stat(golden, data, "/mender/k.pem") == ("0600", "0", "0")
    with pytest.raises(UsageError, match="not the ones planned"):
        fs.apply(plan, [NewFile(key, b"x")])
    e2fsck_clean(golden, data)
