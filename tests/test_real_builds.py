"""Images as real meta-mender builds make them: four partitions read by position, an ext4 boot
partition, rootfs B empty or unformatted, the split configuration, bare rootfs.ext4 and .dataimg.

Results are checked with sfdisk, debugfs, e2fsck and the real Mender client.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from imageprov.disk.golden import DEFAULT_MENDER_CONF, GoldenSpec, RootfsB, Scheme, build_filesystem_image
from imageprov.mender.conf import Settings, conflicts, effective
from tests.conftest import (
    debugfs,
    e2fsck_clean,
    imageprov,
    imageprov_pki,
    need,
    offset_of,
    partition_bytes,
    sfdisk_json,
    tool,
)
from tests.mender_client import client_config

BLOCK = {"Certificate": "/data/mender/mender-cert.pem", "Key": "/data/mender/mender-cert-private.pem"}
# The client signs its auth requests with the certificate's key.
SECURITY = {"AuthPrivateKey": BLOCK["Key"]}
PERSISTENT = {"RootfsPartA": "/dev/mmcblk0p2", "RootfsPartB": "/dev/mmcblk0p3"}


def _one_line_error(proc: Any, code: int, *needles: str) -> None:
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("imageprov: error: "), proc.stderr
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)


def _roles(image: Path, *flags: str) -> dict[str, tuple[int, str]]:
    doc = json.loads(imageprov("inspect", image, "--json", *flags).stdout)
    return {p["role"]: (p["number"], p["filesystem"]) for p in doc["partitions"]}


def _conf(image: Path, number: int, path: str) -> dict[str, Any]:
    return json.loads(debugfs(image, number, f"cat {path}"))  # type: ignore[no-any-return]


def _mode(image: Path, number: int, path: str) -> str:
    out = debugfs(image, number, f"stat {path}")
    return out.split("Mode:", 1)[1].split()[0]


def _stamp(golden: Path, pki: Path, out: Path, device_id: str, *extra: str, check: bool = True) -> Any:
    return imageprov_pki("stamp", golden, "--pki", pki, "--out", out, "--device-id", device_id, *extra, check=check)


def _client_sees(image: Path, rootfs: int, data: int, tmp_path: Path) -> dict[str, Any]:
    """The configuration the real client loads from this image's rootfs conf over its data conf."""
    main, fallback = tmp_path / "main.conf", tmp_path / "fallback.conf"
    for number, inner, local in ((rootfs, "/etc/mender/mender.conf", main), (data, "/mender/mender.conf", fallback)):
        local.unlink(missing_ok=True)
        tool("debugfs", "-R", f"dump {inner} {local}", f"{image}?offset={offset_of(image, number)}")
    return client_config(main, fallback, tmp_path)


@pytest.fixture
def real_sdimg(make_golden: Callable[..., Path]) -> Path:
    """meta-mender's defaults: ext4 boot, an empty ext4 rootfs B, split configuration."""
    return make_golden(Scheme.MBR, name="real.sdimg", boot_fs="ext4", rootfs_b=RootfsB.EMPTY_EXT4, split_conf=True)


# -- layout -----------------------------------------------------------------


def test_four_partitions_are_read_by_position(real_sdimg: Path, make_golden: Callable[..., Path]) -> None:
    assert len(sfdisk_json(real_sdimg)["partitions"]) == 4
    assert _roles(real_sdimg) == {
        "boot": (1, "ext4"),
        "rootfs-a": (2, "ext4"),
        "rootfs-b": (3, "ext4"),
        "data": (4, "ext4"),
    }
    unformatted = make_golden(Scheme.GPT, name="unformatted.uefiimg", rootfs_b=RootfsB.UNFORMATTED)
    assert _roles(unformatted)["rootfs-b"] == (3, "empty")
    assert _roles(unformatted)["rootfs-a"] == (2, "ext4")


def test_a_contradiction_names_the_partitions_and_the_flags(make_golden: Callable[..., Path]) -> None:
    golden = make_golden(Scheme.MBR)
    with open(golden, "r+b") as handle:  # rootfs A loses its superblock
        handle.seek(offset_of(golden, 2))
        handle.write(bytes(8192))
    proc = imageprov("inspect", golden, check=False)
    # The image (rootfs B's copy of the configuration) says partition 2 is rootfs A: it holds nothing.
    _one_line_error(proc, 1, "partition 2 is rootfs-a, but holds empty", "--rootfs-parts", "--data-part", "--boot-part")
    # Roles never shift: rootfs B is not taken for A.
    proc = imageprov("ls", f"{golden}:/etc", check=False)
    _one_line_error(proc, 1, "partition 2 is rootfs-a")
    proc = imageprov("inspect", make_golden(Scheme.MBR, name="ok.sdimg"), "--data-part", "3", check=False)
    _one_line_error(proc, 1, "partition 3 would be both rootfs-b (by position) and data (--data-part)")


def test_no_boot_partition_and_swap_need_the_overrides(tmp_path: Path) -> None:
    """rootfs A, rootfs B, swap, data: four partitions, but not Mender's four."""
    need("sfdisk", "mke2fs", "mkswap")
    image = tmp_path / "noboot.img"
    with open(image, "wb") as handle:
        handle.truncate(48 << 20)
    script = "label: dos\nstart=2048, size=12MiB, type=83\nsize=12MiB, type=83\nsize=4MiB, type=82\ntype=83\n"
    tool("sfdisk", "--quiet", image, input=script.encode())
    parts = sfdisk_json(image)["partitions"]
    swap = tmp_path / "swap.img"
    with open(swap, "wb") as handle:
        handle.truncate(parts[2]["size"] * 512)
    tool("mkswap", swap)
    with open(image, "r+b") as handle:
        handle.seek(parts[2]["start"] * 512)
        handle.write(swap.read_bytes())
    for part in (parts[0], parts[1], parts[3]):
        tool("mke2fs", "-q", "-F", "-t", "ext4", "-E", f"offset={part['start'] * 512}", image,
             f"{part['size'] // 2}k")  # fmt: skip
    _one_line_error(imageprov("inspect", image, check=False), 1, "partition 3 (rootfs B) holds swap")
    assert _roles(image, "--rootfs-parts", "1,2", "--data-part", "4") == {
        "rootfs-a": (1, "ext4"),
        "rootfs-b": (2, "ext4"),
        "swap": (3, "swap"),
        "data": (4, "ext4"),
    }


def test_extended_layout_with_an_unformatted_b_is_read_from_the_image(
    make_golden: Callable[..., Path], pki: Path, tmp_path: Path
) -> None:
    """Signatures alone see two ext partitions for three roles; rootfs A's fstab and mender.conf say which."""
    golden = make_golden(Scheme.MBR_EXTENDED, rootfs_b=RootfsB.UNFORMATTED)
    assert _roles(golden)["rootfs-b"] == (3, "empty") and _roles(golden)["data"] == (6, "ext4")
    # Rootfs A without its files: the signatures alone cannot tell, and say which flags do.
    bare = make_golden(Scheme.MBR_EXTENDED, name="bare.sdimg", rootfs_b=RootfsB.UNFORMATTED)
    for path in ("/etc/mender/mender.conf", "/etc/fstab"):
        tool("debugfs", "-w", "-R", f"rm {path}", f"{bare}?offset={offset_of(bare, 2)}")
    _one_line_error(imageprov("inspect", bare, check=False), 1, "2 ext partitions", "--rootfs-parts A,B")
    flags = ("--rootfs-parts", "2,3", "--data-part", "6")
    assert _roles(bare, *flags)["rootfs-b"] == (3, "empty")
    _stamp(golden, pki, tmp_path / "out", "x-1")
    image = tmp_path / "out" / "x-1.sdimg"
    assert _conf(image, 6, "/mender/mender.conf") == {"HttpsClient": BLOCK, "Security": SECURITY}
    imageprov("verify", image, "--ca", pki / "ca-cert.pem", *flags)


def test_ext4_boot_partition_is_read_and_written_as_ext4(real_sdimg: Path, tmp_path: Path) -> None:
    assert imageprov("cat", f"{real_sdimg}:/uboot/uboot.env").stdout == "bootcmd=run mender_setup\n"
    script = tmp_path / "boot.scr"
    script.write_bytes(b"echo hi\n")
    imageprov("cp", script, f"{real_sdimg}:/uboot/boot.scr", "--mode", "0600")
    assert debugfs(real_sdimg, 1, "cat /boot.scr") == "echo hi\n"
    assert _mode(real_sdimg, 1, "/boot.scr") == "0600"
    e2fsck_clean(real_sdimg, 1)


# -- stamping real builds ---------------------------------------------------


def test_stamp_real_sdimg_writes_only_the_data_partition(real_sdimg: Path, pki: Path, tmp_path: Path) -> None:
    need("debugfs", "e2fsck")
    before = {n: partition_bytes(real_sdimg, n) for n in (1, 2, 3)}
    out = tmp_path / "out"
    proc = _stamp(real_sdimg, pki, out, "r-1", "--boot-part", "1")
    assert "rootfs B is empty" not in proc.stderr  # the rootfs were not to be written at all
    image = out / "r-1.sdimg"
    assert {n: partition_bytes(image, n) for n in (1, 2, 3)} == before
    assert _conf(image, 4, "/mender/mender.conf") == {**PERSISTENT, "HttpsClient": BLOCK, "Security": SECURITY}
    assert _mode(image, 4, "/mender/mender.conf") == "0600"  # as meta-mender installed it
    e2fsck_clean(image, 4)
    proc = imageprov("verify", image, "--ca", pki / "ca-cert.pem", "--device-id", "r-1")
    assert "rootfs B" in proc.stdout and "warn" not in proc.stdout
    assert _client_sees(image, 2, 4, tmp_path)["HttpsClient"] == BLOCK
    # A wrong override is refused before any certificate is issued.
    proc = _stamp(real_sdimg, pki, tmp_path / "o2", "r-2", "--boot-part", "2", check=False)
    _one_line_error(proc, 1, "partition 2 would be both boot (--boot-part) and rootfs-a (by position)")
    assert not list((tmp_path / "o2").glob("*.sdimg"))


def test_unformatted_rootfs_b_gets_rootfs_changes_on_a_only(
    make_golden: Callable[..., Path], pki: Path, tmp_path: Path
) -> None:
    golden = make_golden(Scheme.GPT, name="unf.uefiimg", rootfs_b=RootfsB.UNFORMATTED)
    empty_b = partition_bytes(golden, 3)
    out = tmp_path / "out"
    proc = _stamp(golden, pki, out, "u-1", "--conf-target", "rootfs", "--server-url", "https://edge")
    assert "rootfs B is empty" in proc.stderr and "first update" in proc.stderr
    image = out / "u-1.uefiimg"
    assert partition_bytes(image, 3) == empty_b
    assert _conf(image, 2, "/etc/mender/mender.conf")["HttpsClient"] == BLOCK
    e2fsck_clean(image, 2)
    proc = imageprov("verify", image, "--ca", pki / "ca-cert.pem", "--server-url", "https://edge")
    assert "warn  HttpsClient survives an update (rootfs-a)" in proc.stdout
    # cp and prepare accept it too.
    local = tmp_path / "motd"
    local.write_text("hello\n")
    proc = imageprov("cp", local, f"{golden}:/etc/motd")
    assert "partition 2 (rootfs-a)" in proc.stderr and "rootfs B is empty" in proc.stderr
    assert debugfs(golden, 2, "cat /etc/motd") == "hello\n"
    assert partition_bytes(golden, 3) == empty_b
    imageprov("prepare", golden)
    assert _conf(golden, 4, "/mender/mender.conf")["HttpsClient"] == BLOCK
    assert partition_bytes(golden, 3) == empty_b


# -- where the block goes: --conf-target --------------------------------------


@pytest.mark.parametrize("key", ["HttpsClient", "Security"])
def test_auto_refuses_a_rootfs_that_sets_the_block(
    make_golden: Callable[..., Path], pki: Path, tmp_path: Path, key: str
) -> None:
    value = BLOCK if key == "HttpsClient" else {"AuthPrivateKey": "/data/mender/k.pem"}
    conf = json.dumps({**DEFAULT_MENDER_CONF, key: value})
    golden = make_golden(Scheme.MBR, mender_conf=conf)
    proc = _stamp(golden, pki, tmp_path / "out", "a-1", check=False)
    _one_line_error(proc, 2, f"/etc/mender/mender.conf on rootfs-a sets {key}", "--conf-target rootfs")
    assert not list((tmp_path / "out").glob("*.sdimg"))
    _stamp(golden, pki, tmp_path / "out", "a-1", "--conf-target", "rootfs")


def test_server_url_with_data_target_is_refused_where_the_rootfs_overrides_it(
    make_golden: Callable[..., Path], pki: Path, tmp_path: Path
) -> None:
    """Issue 11, item 3: the rootfs conf (read last, it wins) sets ServerURL and TenantToken."""
    golden = make_golden(Scheme.MBR)
    for flag in ("--server-url", "--tenant-token"):
        value = "https://another.example" if flag == "--server-url" else "X"
        proc = _stamp(golden, pki, tmp_path / "out", "s-1", "--conf-target", "data", flag, value, check=False)
        key = "ServerURL" if flag == "--server-url" else "TenantToken"
        _one_line_error(proc, 2, f"sets {key}", "--conf-target rootfs")
    assert not list((tmp_path / "out").glob("*.sdimg"))
    # The same value as the rootfs's is no conflict: it takes effect already.
    _stamp(golden, pki, tmp_path / "out", "s-1", "--server-url", DEFAULT_MENDER_CONF["ServerURL"])  # type: ignore[arg-type]


def test_server_url_in_the_data_conf_is_what_the_client_uses(
    make_golden: Callable[..., Path], pki: Path, tmp_path: Path
) -> None:
    bare_rootfs_conf = json.dumps(PERSISTENT)  # split: the rootfs conf keeps nothing then
    golden = make_golden(Scheme.MBR, mender_conf=bare_rootfs_conf, split_conf=True)
    out = tmp_path / "out"
    _stamp(golden, pki, out, "e-1", "--server-url", "https://edge", "--tenant-token", "T")
    image = out / "e-1.sdimg"
    seen = _client_sees(image, 2, 4, tmp_path)
    assert (seen["ServerURL"], seen["TenantToken"], seen["HttpsClient"]) == ("https://edge", "T", BLOCK)
    ca = pki / "ca-cert.pem"
    imageprov("verify", image, "--ca", ca, "--server-url", "https://edge", "--tenant-token", "T")
    proc = imageprov("verify", image, "--ca", ca, "--server-url", "https://other", check=False)
    assert proc.returncode == 1 and "FAIL  ServerURL the client uses (rootfs-a)" in proc.stdout


def test_verify_checks_the_field_the_client_uses(real_sdimg: Path, pki: Path, tmp_path: Path) -> None:
    """A rootfs conf naming only HttpsClient.Key overrides the fallback's Key, field by field."""
    out = tmp_path / "out"
    _stamp(real_sdimg, pki, out, "f-1")
    image = out / "f-1.sdimg"
    imageprov("verify", image, "--ca", pki / "ca-cert.pem")
    conf = {**_conf(image, 2, "/etc/mender/mender.conf"), "HttpsClient": {"Key": "/etc/mender/other.pem"}}
    local = tmp_path / "mender.conf"
    local.write_text(json.dumps(conf))
    imageprov("cp", local, f"{image}:/etc/mender/mender.conf", "--mode", "0600")
    assert _client_sees(image, 2, 4, tmp_path)["HttpsClient"] == {**BLOCK, "Key": "/etc/mender/other.pem"}
    proc = imageprov("verify", image, "--ca", pki / "ca-cert.pem", check=False)
    assert proc.returncode == 1
    assert "FAIL  mender.conf on rootfs-a" in proc.stdout and "other.pem" in proc.stdout


CASES = [
    ({"HttpsClient": {"Certificate": "/m/c"}}, {"HttpsClient": {"Certificate": "/f/c", "Key": "/f/k"}}),
    (
        {"ServerURL": "https://m", "HttpsClient": None},
        {"ServerURL": "https://f", "TenantToken": "t", "HttpsClient": BLOCK},
    ),
    ({"HttpsClient": {"Key": ""}, "TenantToken": ""}, {"HttpsClient": BLOCK, "TenantToken": "t"}),
    ({"Security": {"AuthPrivateKey": "/m/a"}}, {"Security": {"AuthPrivateKey": "/f/a", "SSLEngine": "e"}}),
    ({}, {"ServerURL": "https://f", "HttpsClient": BLOCK}),
]


@pytest.mark.parametrize(("main", "fallback"), CASES)
def test_effective_matches_the_real_client(tmp_path: Path, main: dict[str, Any], fallback: dict[str, Any]) -> None:
    main_path, fallback_path = tmp_path / "main.conf", tmp_path / "fallback.conf"
    main_path.write_text(json.dumps(main))
    fallback_path.write_text(json.dumps(fallback))
    seen = client_config(main_path, fallback_path, tmp_path)
    mine = effective(main, fallback)
    assert seen["ServerURL"] == mine.get("ServerURL", "")
    assert seen["TenantToken"] == mine.get("TenantToken", "")
    for field in ("Certificate", "Key"):
        assert seen["HttpsClient"][field] == mine.get("HttpsClient", {}).get(field, "")
    assert seen["Security"]["AuthPrivateKey"] == mine.get("Security", {}).get("AuthPrivateKey", "")


def test_conflicts_name_what_the_rootfs_overrides() -> None:
    edge = Settings(server_url="https://edge", tenant_token="T")
    assert conflicts({}, edge) == []
    assert conflicts({"ServerURL": "https://edge", "HttpsClient": {"Key": BLOCK["Key"]}}, edge) == []
    assert conflicts({"HttpsClient": {"Key": "/x"}}, Settings()) == ['HttpsClient: {"Key": "/x"}']
    assert conflicts({"ServerURL": None, "TenantToken": ""}, edge) == ['TenantToken: ""']
    assert conflicts({"Servers": [{"ServerURL": "https://a"}]}, edge)[-1].startswith("Servers")


# -- bare filesystem images ---------------------------------------------------


def test_bare_rootfs_ext4(tmp_path: Path, pki: Path) -> None:
    need("mke2fs", "debugfs", "e2fsck")
    image = build_filesystem_image(tmp_path / "core-image.rootfs.ext4", GoldenSpec(rootfs_mib=16))
    assert "table: none" in imageprov("inspect", image).stdout
    assert json.loads(imageprov("cat", f"{image}:/etc/mender/mender.conf").stdout) == DEFAULT_MENDER_CONF
    assert "mender.conf" in imageprov("ls", f"{image}:/etc/mender").stdout
    local = tmp_path / "x"
    local.write_text("x\n")
    imageprov("cp", local, f"{image}:/etc/x", "--mode", "600")
    assert tool("debugfs", "-R", "cat /etc/x", image).stdout == b"x\n"
    back = tmp_path / "back"
    imageprov("cp", f"{image}:/etc/x", back)
    assert back.read_text() == "x\n"
    _one_line_error(imageprov("prepare", image, check=False), 2, "bare root filesystem", "--conf-target rootfs")
    _one_line_error(imageprov("cat", f"{image}:/data/mender/x", check=False), 2, "no data area")
    _one_line_error(imageprov("inspect", image, "--data-part", "4", check=False), 1, "bare filesystem image")
    imageprov("prepare", image, "--conf-target", "rootfs")
    conf = json.loads(tool("debugfs", "-R", "cat /etc/mender/mender.conf", image).stdout)
    assert conf == {**DEFAULT_MENDER_CONF, "HttpsClient": BLOCK, "Security": SECURITY}
    assert tool("e2fsck", "-fn", image, check=False).returncode == 0
    proc = imageprov("verify", image, "--ca", pki / "ca-cert.pem")
    assert "no data partition" in proc.stdout and "warn  HttpsClient survives an update" in proc.stdout


def test_bare_dataimg(tmp_path: Path, pki: Path) -> None:
    need("mke2fs", "debugfs", "e2fsck")
    spec = GoldenSpec(data_mib=8, split_conf=True)
    image = build_filesystem_image(tmp_path / "core-image.dataimg", spec, data=True)
    imageprov("prepare", image)
    assert json.loads(tool("debugfs", "-R", "cat /mender/mender.conf", image).stdout) == {
        **PERSISTENT,
        "HttpsClient": BLOCK,
        "Security": SECURITY,
    }
    assert "HttpsClient" in imageprov("cat", f"{image}:/data/mender/mender.conf").stdout
    _one_line_error(imageprov("cat", f"{image}:/etc/hostname", check=False), 2, "no rootfs area")
    proc = imageprov("verify", image, "--ca", pki / "ca-cert.pem", check=False)
    assert proc.returncode == 1 and "ok    mender.conf on the data partition" in proc.stdout
    assert "FAIL  /data/mender/mender-cert.pem present" in proc.stdout
    assert tool("e2fsck", "-fn", image, check=False).returncode == 0


def testclient_config_reader_sees_the_main_file(tmp_path: Path) -> None:
    """The log scraping above must see a change in either file, or the tests built on it prove nothing."""
    main, fallback = tmp_path / "main.conf", tmp_path / "fallback.conf"
    main.write_text(json.dumps({"ServerURL": "https://main"}))
    fallback.write_text(json.dumps({"ServerURL": "https://fb", "HttpsClient": BLOCK}))
    got = client_config(main, fallback, tmp_path)
    assert got["ServerURL"] == "https://main" and got["HttpsClient"] == BLOCK
    os.unlink(main)
    assert client_config(main, fallback, tmp_path)["ServerURL"] == "https://fb"
