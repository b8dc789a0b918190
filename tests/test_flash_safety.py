"""Which targets the line station refuses: one test per refusal of ``check_target``, and the CLI's refusals.

A refused card is never written: every CLI test checks that the card still
holds its stale bytes, and the registry is read with sqlite3 (tests/oracle.py).
The disks a station must never take are made here, as root, on any machine: a
system disk is a loop device mounted as ``/`` in a mount namespace of its own,
a fixed disk a zram device of the test's own.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from imageprov.disk.blockdev import TargetError, check_target, removable_disks
from imageprov.disk.golden import Scheme
from tests.conftest import SBIN, imageprov_pki, need, tool
from tests.flashdev import MIB, STALE, Loops, loop_devices, need_root, read_span, unavailable
from tests.oracle import registry_rows

SIZE = 64 * MIB


@pytest.fixture
def loops(tmp_path: Path) -> Iterator[Loops]:
    yield from loop_devices(tmp_path)


def _refused(path: Path, why: str, **kwargs: object) -> None:
    with pytest.raises(TargetError) as caught:
        check_target(path, image_size=kwargs.pop("image_size", SIZE), **kwargs)  # type: ignore[arg-type]
    assert why in str(caught.value), str(caught.value)


def _partition(loops: Loops, card: Path) -> Path:
    # BLKPG: a partition without the kernel's table parsers (the card is attached with -P).
    tool("addpart", card, "1", "2048", str(SIZE // 512 - 4096))
    return Path(f"{card}p1")


def test_a_loop_device_of_the_right_size_is_accepted(loops: Loops) -> None:
    card = loops.card(SIZE)
    device = check_target(card, image_size=SIZE)
    assert device.is_loop and device.size == SIZE and "loop over" in device.identity


def test_refuses_what_is_not_a_block_device(tmp_path: Path) -> None:
    plain = tmp_path / "card.img"
    plain.write_bytes(b"\0" * 4096)
    _refused(plain, "not a block device but a regular file")
    _refused(tmp_path / "sdx-typo", "does not exist")


def test_refuses_a_partition(loops: Loops) -> None:
    partition = _partition(loops, loops.card(SIZE, None, "-P"))
    _refused(partition, "is partition 1 of /dev/loop")


# Run by a child in a mount namespace of its own (unshare --mount): a filesystem on the loop
# device becomes its /, with the kernel's /dev, /proc and /sys bound in, and check_target is
# asked about that device there. imageprov is imported first: the new root holds nothing else.
_AS_SYSTEM_DISK = """
import os, subprocess, sys
from pathlib import Path
from imageprov.disk.blockdev import TargetError, check_target

device, root = sys.argv[1:]
subprocess.run(["mount", device, root], check=True)
for tree in ("dev", "proc", "sys"):
    os.mkdir(f"{root}/{tree}")
    subprocess.run(["mount", "--rbind", f"/{tree}", f"{root}/{tree}"], check=True)
os.chroot(root)
os.chdir("/")
try:
    check_target(Path(device), image_size=0)
except TargetError as exc:
    print(exc.message)
else:
    print("accepted")
"""


def test_refuses_the_disk_holding_root(loops: Loops, tmp_path: Path) -> None:
    need("unshare")
    system = loops.card(SIZE)
    tool("mkfs.ext4", "-q", system)
    root = tmp_path / "root"
    root.mkdir()
    seen = tool("unshare", "--mount", "--propagation", "private", sys.executable, "-c", _AS_SYSTEM_DISK, system, root)
    assert seen.stdout.decode().strip() == f"target {system} ({system.name}) holds the root filesystem /"
    # The same disk, seen from the host's own /, is a card like any other.
    assert check_target(system, image_size=0).name == system.name


def test_refuses_the_loop_device_holding_the_golden_image(loops: Loops, tmp_path: Path) -> None:
    golden = tmp_path / "golden.sdimg"
    golden.write_bytes(bytes(SIZE))
    _refused(loops.attach(golden), f"holds {golden}", protected=[golden])


def test_refuses_the_disk_holding_the_pki(loops: Loops, tmp_path: Path) -> None:
    card = loops.card(SIZE)
    tool("mkfs.ext4", "-q", card)
    pki = loops.mount(card, tmp_path / "mnt") / "pki"
    pki.mkdir()
    _refused(card, f"holds {pki}", protected=[pki])


def test_refuses_a_mounted_disk(loops: Loops, tmp_path: Path) -> None:
    card = loops.card(SIZE)
    tool("mkfs.ext4", "-q", card)
    loops.mount(card, tmp_path / "mnt")
    _refused(card, "is mounted")


def test_refuses_a_disk_with_a_mounted_partition(loops: Loops, tmp_path: Path) -> None:
    card = loops.card(SIZE, None, "-P")
    partition = _partition(loops, card)
    tool("mkfs.ext4", "-q", partition)
    loops.mount(partition, tmp_path / "mnt")
    _refused(card, "or holds a mounted partition")


def test_refuses_a_card_mounted_through_a_loop_device_over_it(loops: Loops, tmp_path: Path) -> None:
    """mount -o loop,offset=... /dev/CARD: the mount is on a loop device whose backing file is the card's node."""
    card = loops.card(SIZE)
    view = loops.attach(card, "--offset", str(MIB))  # what mount -o loop,offset=1M makes
    tool("mkfs.ext4", "-q", view)
    loops.mount(view, tmp_path / "mnt")
    _refused(card, "is mounted")
    # A second loop device over the card, as a target, while the card's contents are mounted: the same card.
    other = loops.attach(card)
    _refused(other, f"through /dev/{card.name}")


def test_refuses_a_loop_device_over_a_card_whose_partition_is_mounted(loops: Loops, tmp_path: Path) -> None:
    card = loops.card(SIZE, None, "-P")
    partition = _partition(loops, card)
    tool("mkfs.ext4", "-q", partition)
    loops.mount(partition, tmp_path / "mnt")
    over = loops.attach(card)
    _refused(over, f"holds a mounted partition through /dev/{card.name}")


def test_refuses_a_card_that_a_loop_device_is_over(loops: Loops) -> None:
    """Not mounted, but viewed: a loop device over the card would read what the flash is rewriting."""
    card = loops.card(SIZE)
    over = loops.attach(card)
    _refused(card, f"in use by {over.name}")


def test_refuses_a_read_only_disk(loops: Loops, tmp_path: Path) -> None:
    locked = tmp_path / "locked.img"
    locked.write_bytes(bytes(SIZE))
    _refused(loops.attach(locked, "-r"), "is read-only")


def test_refuses_a_disk_smaller_than_the_image(loops: Loops) -> None:
    _refused(loops.card(SIZE), "less than the image's", image_size=SIZE + 512)


@pytest.fixture
def fixed_disk(tmp_path: Path) -> Iterator[Path]:
    """A zram disk of this test's own: a real block device that is neither removable nor a loop device.

    Added with zram-control's hot_add and removed after, so that a zram0 in
    use as swap, or another test's, is never touched.
    """
    need_root()
    control = Path("/sys/class/zram-control")
    if not control.exists() and shutil.which("modprobe", path=f"{os.environ.get('PATH', '')}{os.pathsep}{SBIN}"):
        tool("modprobe", "zram", "num_devices=0", check=False)  # the module alone: devices are added below
    if not control.exists():
        unavailable("no zram to stand for a fixed disk (modprobe zram: a kernel with CONFIG_ZRAM)")
    number = int((control / "hot_add").read_text())
    sysdir = Path(f"/sys/block/zram{number}")
    try:
        (sysdir / "disksize").write_text(str(SIZE))
        device = Path(f"/dev/zram{number}")
        if not device.exists():  # a /dev that is no devtmpfs (a container's): a node of the test's own
            device = tmp_path / device.name
            major, minor = map(int, (sysdir / "dev").read_text().split(":"))
            os.mknod(device, stat.S_IFBLK | 0o600, os.makedev(major, minor))
        yield device
    finally:
        (sysdir / "reset").write_text("1")
        (control / "hot_remove").write_text(str(number))


def test_refuses_a_fixed_disk_unless_forced(fixed_disk: Path) -> None:
    assert (Path("/sys/block") / fixed_disk.name / "removable").read_text().strip() == "0"
    _refused(fixed_disk, "is not a removable disk")
    assert check_target(fixed_disk, image_size=SIZE, force=True).name == fixed_disk.name


# -- the CLI: refused cards are not written, and the others are ------------------------


def _flash(golden: Path, pki: Path, *args: str | Path) -> tuple[int, list[dict[str, object]], str]:
    proc = imageprov_pki("flash", golden, "--pki", pki, "--json", *args, check=False)
    return proc.returncode, [json.loads(line) for line in proc.stdout.splitlines()], proc.stderr


def _stale(card: Path) -> bool:
    return read_span(card, 0, MIB) == bytes([STALE]) * MIB


def test_cli_refuses_mounted_partition_and_golden_loop_but_flashes_the_good_card(
    make_golden: Callable[..., Path], pki: Path, loops: Loops, tmp_path: Path
) -> None:
    golden = make_golden(Scheme.MBR, rootfs_mib=16, data_mib=16)
    size = golden.stat().st_size
    mounted = loops.card(size)
    tool("mkfs.ext4", "-q", mounted)
    loops.mount(mounted, tmp_path / "mnt")
    holder = loops.card(size + 8 * MIB, None, "-P")
    partition = _partition(loops, holder)
    of_golden = loops.attach(golden)
    good = loops.card(size)
    code, results, _ = _flash(golden, pki, "--target", f"{mounted}=m-1", "--target", f"{partition}=p-1",
                                   "--target", f"{of_golden}=g-1", "--target", f"{good}=ok-1")  # fmt: skip
    assert code == 1
    assert [r["result"] for r in results] == ["failed", "failed", "failed", "delivered"]
    errors = [str(r["error"]) for r in results[:3]]
    assert "is mounted" in errors[0] and "is partition 1" in errors[1] and f"holds {golden}" in errors[2]
    assert _stale(holder) and not _stale(good)
    # Refused before any certificate was issued: only the good card's is in the registry.
    records = registry_rows(pki)
    assert [(r["device_id"], r["status"]) for r in records] == [("ok-1", "active")]
    assert str(records[0]["delivered_to"]).startswith(f"card {good}: ")


def test_cli_refuses_a_plain_file_and_the_same_disk_twice(
    make_golden: Callable[..., Path], pki: Path, loops: Loops, tmp_path: Path
) -> None:
    golden = make_golden(Scheme.GPT, rootfs_mib=16, data_mib=16)
    card = loops.card(golden.stat().st_size)
    alias = tmp_path / "alias"
    alias.symlink_to(card)
    code, results, _ = _flash(golden, pki, "--target", f"{tmp_path / 'card.img'}=f-1", "--target", f"{card}=a-1",
                              "--target", f"{alias}=a-2")  # fmt: skip
    assert code == 1
    assert [r["result"] for r in results] == ["failed", "delivered", "failed"]
    assert "does not exist" in str(results[0]["error"]) and "same disk" in str(results[2]["error"])
    assert not (tmp_path / "card.img").exists()
    assert [(r["device_id"], r["status"]) for r in registry_rows(pki)] == [("a-1", "active")]


def test_wait_takes_only_removable_disks_unless_named(loops: Loops) -> None:
    # A loop device (like a USB backup drive) is never taken for a new card unless its writer is named.
    card = loops.card(SIZE)
    assert card.name not in removable_disks()
    assert removable_disks([card.name]) == {card.name: SIZE}
