"""imageprov flash on loop devices: four stale cards at once per layout, a card failing mid-write, reissue.

Each card is checked with other tools than imageprov's readers: sfdisk --json,
e2fsck -fn, fsck.vfat -n, debugfs for modes and owners, openssl for the
certificate read off the card, and sqlite3 for what the registry says of it
(tests/oracle.py), never ``imageprov devices`` or ``verify`` alone.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import pty
import re
import select
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from imageprov.disk.golden import Scheme
from tests.conftest import IMAGEPROV_ARGV, cli_env, imageprov_pki, roles, sha256, tool
from tests.flashdev import MIB, STALE, Loops, debugfs, loop_devices, offset, partitions, read_span
from tests.oracle import registry, serial
from tests.test_field import _leave_journal_unreplayed as leave_journal_unreplayed

SMALL = {"rootfs_mib": 16, "data_mib": 16}


@pytest.fixture
def loops(tmp_path: Path) -> Iterator[Loops]:
    yield from loop_devices(tmp_path)


def _flash(golden: Path, pki: Path, *args: str | Path, check: bool = True) -> tuple[int, list[dict[str, object]], str]:
    proc = imageprov_pki("flash", golden, "--pki", pki, "--json", *args, check=check)
    return proc.returncode, [json.loads(line) for line in proc.stdout.splitlines()], proc.stderr


def check_card(card: Path, golden: Path, pki: Path, device_id: str, tmp: Path) -> str:
    """The card holds the golden image's table and filesystems, and this device's credentials, by other tools.

    Returns the serial of the certificate on the card, as openssl reads it.
    """
    want = [(p["start"], p["size"], p["type"]) for p in partitions(golden)]
    assert [(p["start"], p["size"], p["type"]) for p in partitions(card)] == want
    # Boot loaders live before the first partition: it must read as in the image, holes included.
    first = min(p["start"] for p in partitions(golden)) * 512
    assert read_span(card, 0, first) == read_span(golden, 0, first)
    role = roles(golden)
    for name in ("rootfs-a", "rootfs-b", "data"):
        fsck = tool("e2fsck", "-fn", f"{card}?offset={offset(card, role[name])}", check=False)
        assert fsck.returncode == 0, f"{name}: {fsck.stdout.decode()}"
    boot = next(p for p in partitions(card) if p["number"] == role["boot"])
    vfat = tmp / f"{device_id}-boot.img"
    vfat.write_bytes(read_span(card, boot["start"] * 512, boot["size"] * 512))
    assert vfat.read_bytes() == read_span(golden, boot["start"] * 512, boot["size"] * 512)
    assert tool("fsck.vfat", "-n", vfat, check=False).returncode == 0
    for path, mode in (("/mender/mender-cert-private.pem", "0600"), ("/mender/mender-cert.pem", "0644")):
        stat = debugfs(card, role["data"], f"stat {path}")
        assert f"Mode:  {mode}" in stat and "User:     0   Group:     0" in stat, stat
    cert, key = tmp / f"{device_id}.pem", tmp / f"{device_id}.key"
    debugfs(card, role["data"], f"dump /mender/mender-cert.pem {cert}")
    debugfs(card, role["data"], f"dump /mender/mender-cert-private.pem {key}")
    assert tool("openssl", "verify", "-CAfile", pki / "ca-cert.pem", cert).returncode == 0
    subject = tool("openssl", "x509", "-in", cert, "-noout", "-subject").stdout.decode()
    assert f"CN = {device_id}" in subject or f"CN={device_id}" in subject
    from_cert = tool("openssl", "x509", "-in", cert, "-noout", "-pubkey").stdout
    assert tool("openssl", "pkey", "-in", key, "-pubout").stdout == from_cert
    return serial(cert)


def check_delivered(card: Path, golden: Path, pki: Path, device_id: str, tmp: Path) -> str:
    """``check_card``, and the registry (read with sqlite3) has the certificate on the card as delivered to it."""
    on_card = check_card(card, golden, pki, device_id, tmp)
    record = registry(pki)[on_card]
    assert (record["device_id"], record["status"]) == (device_id, "active"), record
    assert str(record["delivered_to"]).startswith(f"card {card}: "), record["delivered_to"]
    live = [s for s, r in registry(pki).items() if r["device_id"] == device_id and r["status"] != "revoked"]
    assert live == [on_card]
    return on_card


@pytest.mark.parametrize("scheme", list(Scheme), ids=[s.value for s in Scheme])
def test_four_stale_cards_at_once(
    scheme: Scheme, make_golden: Callable[..., Path], pki: Path, loops: Loops, tmp_path: Path
) -> None:
    golden = make_golden(scheme, **SMALL)
    # Zero blocks as holes, as in a golden image decompressed sparse: what a
    # card must read as zeros (the vfat root directory, the gap before the
    # first partition) is then a hole, and must be written all the same.
    tool("fallocate", "--dig-holes", golden)
    size = golden.stat().st_size
    # One card larger than the image, as real cards are.
    cards = [loops.card(size + (8 * MIB if i == 3 else 0)) for i in range(4)]
    ids = [f"{scheme.value}-{i}" for i in range(4)]
    # The rootfs configuration too (the batch's scratch then holds both rootfs partitions).
    conf = ["--conf-target", "rootfs"] if scheme is Scheme.MBR_EXTENDED else []
    targets = [a for c, i in zip(cards, ids) for a in ("--target", f"{c}={i}")]
    code, results, stderr = _flash(golden, pki, *conf, *targets)
    assert code == 0, stderr
    assert [r["result"] for r in results] == ["delivered"] * 4
    assert [r["device_id"] for r in results] == ids and [r["target"] for r in results] == [str(c) for c in cards]
    where = ("rootfs-a", "/etc/mender/mender.conf") if conf else ("data", "/mender/mender.conf")
    for card, device_id, result in zip(cards, ids, results):
        assert check_delivered(card, golden, pki, device_id, tmp_path) == result["serial"]
        settings = json.loads(debugfs(card, roles(golden)[where[0]], f"cat {where[1]}"))
        assert settings["HttpsClient"]["Key"] == "/data/mender/mender-cert-private.pem"
        assert int(str(result["bytes_written"])) > 0
    assert len(registry(pki)) == 4
    # Every card got the same bytes outside the data partition, and its own inside it.
    data = roles(golden)["data"]
    keys = {debugfs(c, data, "cat /mender/mender-cert-private.pem") for c in cards}
    assert len(keys) == 4
    log = [json.loads(line) for line in (pki / "line-log.jsonl").read_text().splitlines()]
    assert [(e["device_id"], e["target"], e["result"]) for e in log] == [
        (i, str(c), "delivered") for c, i in zip(cards, ids)
    ]
    assert all(e["time"] and e["serial"] for e in log)


def test_card_failing_mid_write_fails_alone(
    make_golden: Callable[..., Path], pki: Path, loops: Loops, tmp_path: Path
) -> None:
    golden = make_golden(Scheme.MBR, **SMALL)
    size = golden.stat().st_size
    good = [loops.card(size), loops.card(size)]
    # A card that takes 4 MiB and then fails: a loop device over a sparse file on a 4 MiB tmpfs.
    small = loops.mount("tmpfs", tmp_path / "small", "-t", "tmpfs", "-o", "size=4m")
    sparse = small / "card.img"
    with open(sparse, "wb") as handle:
        handle.truncate(size)
    bad = loops.attach(sparse)
    targets = tmp_path / "cards.csv"
    targets.write_text(f"target,device_id\n{good[0]},ok-0\n{bad},bad-1\n{good[1]},ok-2\n")
    code, results, stderr = _flash(golden, pki, "--targets", targets, check=False)
    assert code == 1
    assert [r["result"] for r in results] == ["delivered", "failed", "delivered"]
    failed = results[1]
    assert str(bad) in str(failed["error"]) and "byte" in str(failed["error"]), failed["error"]
    assert "bad-1 on " + str(bad) in stderr and "the other 2 were delivered" in stderr
    # The failed card's certificate was issued, and revoked: nothing live for bad-1.
    [(bad_serial, bad_record)] = [(s, r) for s, r in registry(pki).items() if r["device_id"] == "bad-1"]
    assert bad_serial == failed["serial"]
    assert (bad_record["status"], bad_record["reason"]) == ("revoked", "cessation-of-operation"), bad_record
    for card, device_id in zip(good, ("ok-0", "ok-2")):
        check_delivered(card, golden, pki, device_id, tmp_path)
    log = [json.loads(line) for line in (pki / "line-log.jsonl").read_text().splitlines()]
    assert [e["result"] for e in log] == ["delivered", "failed", "delivered"]


def test_delivered_id_never_goes_on_a_second_card(
    make_golden: Callable[..., Path], pki: Path, loops: Loops, tmp_path: Path
) -> None:
    golden = make_golden(Scheme.GPT, **SMALL)
    size = golden.stat().st_size
    first, second = loops.card(size), loops.card(size)
    code, [done], _ = _flash(golden, pki, "--target", f"{first}=SN-1")
    assert code == 0
    code, [refused], stderr = _flash(golden, pki, "--target", f"{second}=SN-1", check=False)
    assert code == 1 and refused["result"] == "failed"
    assert "already delivered" in stderr and "--reissue" in stderr
    assert read_span(second, 0, 1 << 20) == bytes([STALE]) * (1 << 20)  # not touched
    code, [again], _ = _flash(golden, pki, "--target", f"{second}=SN-1", "--reissue")
    assert code == 0 and again["result"] == "delivered"
    records = registry(pki)
    assert [s for s, r in records.items() if r["device_id"] == "SN-1"] == [done["serial"], again["serial"]]
    assert (records[str(done["serial"])]["status"], records[str(done["serial"])]["reason"]) == ("revoked", "superseded")
    assert str(records[str(done["serial"])]["delivered_to"]).startswith(f"card {first}: ")
    assert check_delivered(second, golden, pki, "SN-1", tmp_path) == again["serial"]
    log = [json.loads(line)["result"] for line in (pki / "line-log.jsonl").read_text().splitlines()]
    assert log == ["delivered", "failed", "delivered"]


def test_verify_reads_a_card(make_golden: Callable[..., Path], pki: Path, loops: Loops, tmp_path: Path) -> None:
    golden = make_golden(Scheme.MBR_EXTENDED, **SMALL)
    imageprov_pki("prepare", golden)  # a prepared golden image: per batch, nothing changes
    card = loops.card(golden.stat().st_size)
    # What a killed flash left in its scratch directory (device keys among it) is removed: its owner
    # file's lock is gone; and an older imageprov's, with no owner file, once it is a minute old.
    gone = (1 << 22) + os.getpid()  # above any pid_max: no such process
    scratch = tmp_path / "scratch"
    stale = scratch / f"imageprov-flash-{gone}-x1"
    stale.mkdir(parents=True)
    (stale / "SN-9.data").write_bytes(b"key")
    (stale / f".owner.{gone}.x1y2.partial").write_bytes(b"")
    older = scratch / f"imageprov-flash-{gone}-x2"
    older.mkdir()
    (older / "SN-8.data").write_bytes(b"key")
    os.utime(older, (time.time() - 120, time.time() - 120))
    starting = scratch / f"imageprov-flash-{gone}-x3"  # a station between mkdtemp and its owner file
    starting.mkdir()
    code, [result], stderr = _flash(golden, pki, "--target", f"{card}=V-1", "--scratch", scratch)
    assert code == 0 and result["result"] == "delivered"
    assert f"removed {stale}" in stderr and f"removed {older}" in stderr
    assert list(scratch.iterdir()) == [starting]
    proc = imageprov_pki("verify", card, "--ca", pki / "ca-cert.pem", "--device-id", "V-1")
    assert "e2fsck -fn on data" in proc.stdout
    check_delivered(card, golden, pki, "V-1", tmp_path)  # what verify passed is so, read with other tools
    # A card with the key gone fails verify.
    data = roles(golden)["data"]
    tool("debugfs", "-w", "-R", "rm /mender/mender-cert-private.pem", f"{card}?offset={offset(card, data)}")
    os.sync()
    proc = imageprov_pki("verify", card, "--ca", pki / "ca-cert.pem", "--device-id", "V-1", check=False)
    assert proc.returncode == 1 and "mender-cert-private.pem present" in proc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target", "/dev/loop0"], "is not DEVICE=ID"),
        (["--target", "/dev/loop0=bad id"], "is not allowed"),
        (["--target", "/dev/loop0=A", "--target", "/dev/loop0=B"], "the same target is named twice"),
        (["--device-id", "A"], "go with --wait"),
        (["--wait"], "--wait needs the ids"),
        ([], "no target"),
    ],
)
def test_bad_input_is_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    golden = tmp_path / "golden.sdimg"
    golden.write_bytes(bytes(4096))
    proc = imageprov_pki("flash", golden, "--pki", tmp_path, *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_targets_csv_without_its_columns_is_refused(pki: Path, tmp_path: Path) -> None:
    golden = tmp_path / "golden.sdimg"
    golden.write_bytes(bytes(4096))
    targets = tmp_path / "cards.csv"
    targets.write_text("serial,device\nA,/dev/loop0\n")
    proc = imageprov_pki("flash", golden, "--pki", pki, "--targets", targets, check=False)
    assert proc.returncode == 2 and "device_id and target columns" in proc.stderr
    assert not (pki / "line-log.jsonl").exists()


def test_compressed_golden_image(make_golden: Callable[..., Path], pki: Path, loops: Loops, tmp_path: Path) -> None:
    golden = make_golden(Scheme.MBR, **SMALL)
    packed = tmp_path / "golden.sdimg.gz"
    packed.write_bytes(gzip.compress(golden.read_bytes(), compresslevel=1))
    card = loops.card(golden.stat().st_size)
    code, [result], _ = _flash(packed, pki, "--target", f"{card}=Z-1", "--conf-target", "data")
    assert code == 0 and result["result"] == "delivered"
    check_delivered(card, golden, pki, "Z-1", tmp_path)


def test_progress_line_per_card_on_a_terminal(make_golden: Callable[..., Path], pki: Path, loops: Loops) -> None:
    golden = make_golden(Scheme.MBR, **SMALL)
    cards = [loops.card(golden.stat().st_size) for _ in range(2)]
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [*IMAGEPROV_ARGV, "flash", golden, "--pki", pki,
         *(a for i, c in enumerate(cards) for a in ("--target", f"{c}=T-{i}"))],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=secondary, env=cli_env(),
    )  # fmt: skip
    os.close(secondary)
    shown = b""
    with contextlib.suppress(OSError):  # EIO once the process has closed the terminal
        while select.select([primary], [], [], 120)[0] and (chunk := os.read(primary, 4096)):
            shown += chunk
    os.close(primary)
    assert proc.wait(timeout=120) == 0, shown.decode()
    text = shown.decode()
    for i, card in enumerate(cards):
        assert re.search(rf"\x1b\[2K{card}  T-{i}  delivered +100%", text), text
    assert "\x1b[2F" in text  # redrawn in place


def test_golden_with_unreplayed_journals(
    make_golden: Callable[..., Path], pki: Path, loops: Loops, tmp_path: Path
) -> None:
    # A golden image made with dd of a running device: the journals are replayed
    # on the batch's private copy, and the cards get the replayed filesystems.
    golden = make_golden(Scheme.MBR, **SMALL)
    role = roles(golden)
    leave_journal_unreplayed(golden, role["rootfs-a"], "/etc/mender")
    leave_journal_unreplayed(golden, role["data"], "/mender")
    before = sha256(golden)
    card = loops.card(golden.stat().st_size)
    code, [result], stderr = _flash(golden, pki, "--target", f"{card}=J-1")
    assert code == 0 and result["result"] == "delivered", stderr
    assert "replayed the journal" in stderr
    for name in ("rootfs-a", "data"):
        features = tool("dumpe2fs", "-h", f"{card}?offset={offset(card, role[name])}").stdout.decode()
        assert "needs_recovery" not in features
    check_delivered(card, golden, pki, "J-1", tmp_path)
    assert sha256(golden) == before


def test_server_ca_is_on_the_card_and_verify_checks_it(
    make_golden: Callable[..., Path], pki: Path, loops: Loops, tmp_path: Path
) -> None:
    golden = make_golden(Scheme.MBR, **SMALL)
    card = loops.card(golden.stat().st_size)
    edge_ca = pki / "ca-cert.pem"
    code, results, stderr = _flash(golden, pki, "--server-ca", edge_ca, "--target", f"{card}=ca-1")
    assert code == 0 and results[0]["result"] == "delivered", stderr
    data = roles(golden)["data"]
    stat = debugfs(card, data, "stat /mender/server.crt")
    assert "Mode:  0644" in stat and "User:     0   Group:     0" in stat, stat
    assert debugfs(card, data, "cat /mender/server.crt") == edge_ca.read_text()
    assert json.loads(debugfs(card, data, "cat /mender/mender.conf"))["ServerCertificate"] == "/data/mender/server.crt"
    image = tmp_path / "card.sdimg"
    image.write_bytes(read_span(card, 0, golden.stat().st_size))
    proc = imageprov_pki("verify", image, "--ca", edge_ca, "--server-ca", edge_ca, "--json", check=False)
    assert proc.returncode == 0, proc.stdout
