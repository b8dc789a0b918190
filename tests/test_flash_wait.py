"""The operator's loop: imageprov flash --wait and scripts/line-example.sh, with cards put in and taken out.

A card writer is a loop device over a file: empty (no card), or grown to a
card's size and re-read with ``losetup -c`` (a card put in), as a card
reader's disk changes size when a card goes in or out.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from imageprov.disk.golden import Scheme
from tests.conftest import IMAGEPROV_ARGV, cli_env, imageprov_pki, need, sigint_default, tool
from tests.flashdev import STALE, Loops, loop_devices, read_span, stale_file
from tests.test_flash import check_card

ROOT = Path(__file__).resolve().parent.parent
SMALL = {"rootfs_mib": 16, "data_mib": 16}


@pytest.fixture
def loops(tmp_path: Path) -> Iterator[Loops]:
    yield from loop_devices(tmp_path)


class Writer:
    """A card writer: a loop device whose file is empty until a card is put in."""

    def __init__(self, loops: Loops, backing: Path) -> None:
        backing.write_bytes(b"")
        self.backing = backing
        self.device = loops.attach(backing)

    def put_in(self, size: int) -> None:
        stale_file(self.backing, size)
        tool("losetup", "-c", self.device)

    def take_out(self) -> None:
        with open(self.backing, "r+b") as handle:
            handle.truncate(0)
        tool("losetup", "-c", self.device)


class FrozenSlot(Writer):
    """A writer whose card, once in, is written only when the test thaws the filesystem under it."""

    def __init__(self, loops: Loops, tmp: Path, size: int) -> None:
        image = tmp / "frozen-fs.img"
        with open(image, "wb") as handle:
            handle.truncate(size + (32 << 20))
        tool("mkfs.ext4", "-q", "-F", image)
        self.mount = loops.mount(image, tmp / "frozen", "-o", "loop")
        super().__init__(loops, self.mount / "card.img")
        self.frozen = False

    def put_in(self, size: int) -> None:
        stale_file(self.backing, size)
        tool("fsfreeze", "-f", self.mount)  # flushes the card's bytes, then holds every write
        self.frozen = True
        tool("losetup", "-c", self.device)

    def thaw(self) -> None:
        if self.frozen:
            tool("fsfreeze", "-u", self.mount)
            self.frozen = False


class Operator:
    """The flashing process, as the operator sees it: its stderr line by line."""

    def __init__(self, argv: list[str | Path]) -> None:
        self.proc = subprocess.Popen(
            [str(a) for a in argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            # The tests interrupt it as an operator's Ctrl-C would, whatever the runner ignores.
            preexec_fn=sigint_default,
            env=cli_env(IMAGEPROV=f"{sys.executable} -m imageprov", PATH=f"/usr/sbin:/sbin:{os.environ['PATH']}"),
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.out: list[str]
        self.seen: list[str] = []
        assert self.proc.stderr is not None
        stderr = self.proc.stderr
        self.reader = threading.Thread(target=lambda: [self.lines.put(line) for line in stderr], daemon=True)
        self.reader.start()
        assert self.proc.stdout is not None
        stdout, self.out = self.proc.stdout, []
        self.out_reader = threading.Thread(target=lambda: self.out.extend(stdout), daemon=True)
        self.out_reader.start()

    def expect(self, text: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.seen.append(line)
            if text in line:
                return line
        raise AssertionError(f"no {text!r} within {timeout} s; stderr so far:\n{''.join(self.seen)}")

    def finish(self, timeout: float = 120) -> tuple[int, list[dict[str, object]]]:
        self.proc.wait(timeout=timeout)
        self.reader.join(timeout=timeout)
        self.out_reader.join(timeout=timeout)
        return self.proc.returncode, [json.loads(line) for line in self.out]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def test_wait_flashes_each_new_card_skips_delivered_and_stops_on_ctrl_c(
    make_golden: Callable[..., Path], pki: Path, loops: Loops, tmp_path: Path
) -> None:
    golden = make_golden(Scheme.MBR, **SMALL)
    size = golden.stat().st_size
    first = loops.card(size)
    imageprov_pki("flash", golden, "--pki", pki, "--target", f"{first}=W-0")
    slot_a = Writer(loops, tmp_path / "slot-a")
    slot_b = Writer(loops, tmp_path / "slot-b")
    slot_b.put_in(size)  # in the writer before the start: left alone
    ids = tmp_path / "ids.txt"
    ids.write_text("W-0\nW-1\nW-2\nW-3\n")
    watch = ["--wait-for", slot_a.device.name, "--wait-for", slot_b.device.name]
    flash = ["flash", golden, "--pki", pki, "--device-ids", ids, "--wait", *watch, "--json"]
    operator = Operator([*IMAGEPROV_ARGV, *flash])
    try:
        operator.expect(f"left alone (present before the start): {slot_b.device.name}")
        operator.expect("W-0: already delivered, skipped")
        operator.expect("waiting for a card (3 ids to go")
        slot_a.put_in(size)
        operator.expect(f"done: remove card {slot_a.device}")
        slot_b.take_out()
        operator.expect(f"{slot_b.device.name}: card removed")
        slot_b.put_in(size)
        operator.expect(f"done: remove card {slot_b.device}")
        operator.expect("waiting for a card (1 ids to go")
        operator.proc.send_signal(signal.SIGINT)
        code, results = operator.finish()
    finally:
        operator.kill()
    assert code == 130
    assert [(r["device_id"], r["target"], r["result"]) for r in results] == [
        ("W-1", str(slot_a.device), "delivered"),
        ("W-2", str(slot_b.device), "delivered"),
    ]
    for writer, device_id in ((slot_a, "W-1"), (slot_b, "W-2")):
        check_card(writer.device, golden, pki, device_id, tmp_path)


def test_ctrl_c_during_a_card_finishes_it_first(
    make_golden: Callable[..., Path], pki: Path, loops: Loops, tmp_path: Path
) -> None:
    need("fsfreeze", "mkfs.ext4")
    golden = make_golden(Scheme.GPT, **SMALL)
    # A card whose writes wait for the thaw: Ctrl-C lands while it is in progress, however slow the machine.
    slot = FrozenSlot(loops, tmp_path, golden.stat().st_size)
    operator = Operator([*IMAGEPROV_ARGV, "flash", golden, "--pki", pki, "--device-id", "C-1",
                         "--device-id", "C-2", "--wait", "--wait-for", slot.device.name, "--json"])  # fmt: skip
    try:
        operator.expect("waiting for a card (2 ids")
        slot.put_in(golden.stat().st_size)
        operator.expect(f"flashing C-1 onto {slot.device}")
        operator.proc.send_signal(signal.SIGINT)
        slot.thaw()
        operator.expect("stopping after the card in progress")
        operator.expect(f"done: remove card {slot.device}")
        code, results = operator.finish()
    finally:
        slot.thaw()
        operator.kill()
    assert code == 130
    assert [(r["device_id"], r["result"]) for r in results] == [("C-1", "delivered")]
    check_card(slot.device, golden, pki, "C-1", tmp_path)


# -- scripts/line-example.sh --------------------------------------------------------------


def _line(golden: Path, serials: Path, *args: str | Path) -> Operator:
    return Operator(["bash", ROOT / "scripts/line-example.sh", golden, serials, *args])


def test_line_script_refuses_a_file_or_a_typo_as_the_writer(
    make_golden: Callable[..., Path], pki: Path, tmp_path: Path
) -> None:
    golden = make_golden(Scheme.MBR, **SMALL)
    serials = tmp_path / "serials.txt"
    serials.write_text("L-1\n")
    for target in (tmp_path / "card.img", Path("/dev/sdxq")):
        operator = _line(golden, serials, target, pki)
        code, _ = operator.finish()
        assert code == 2
        assert not target.exists()
    records = json.loads(imageprov_pki("devices", "--pki", pki, "--json").stdout)
    assert records == []


def test_line_script_flashes_the_card_verifies_it_and_never_clones_on_a_rerun(
    make_golden: Callable[..., Path], pki: Path, loops: Loops, tmp_path: Path
) -> None:
    golden = make_golden(Scheme.GPT, **SMALL)
    size = golden.stat().st_size
    serials = tmp_path / "serials.csv"
    serials.write_text("device_id,batch\nL-1,7\n")
    writer = Writer(loops, tmp_path / "writer")
    operator = _line(golden, serials, writer.device, pki)
    try:
        operator.expect("waiting for a card")
        # A card too small for the image: refused, not delivered, its serial waits for the next card.
        writer.put_in(size // 2)
        operator.expect("FAILED L-1")
        operator.expect("waiting for a card (1 ids")
        writer.take_out()
        operator.expect(f"{writer.device.name}: card removed")
        writer.put_in(size)
        operator.expect(f"done: remove card {writer.device}")
        code, _ = operator.finish()
    finally:
        operator.kill()
    assert code == 0
    check_card(writer.device, golden, pki, "L-1", tmp_path)
    log = [json.loads(line) for line in (pki / "line-log.jsonl").read_text().splitlines()]
    assert [(e["device_id"], e["result"]) for e in log] == [("L-1", "failed"), ("L-1", "delivered")]
    assert all(e["target"] == str(writer.device) and e["time"] for e in log)
    # A rerun with a fresh card in the writer: L-1 is delivered, so nothing is written and all is well.
    writer.take_out()
    writer.put_in(size)
    operator = _line(golden, serials, writer.device, pki)
    try:
        code, _ = operator.finish()
    finally:
        operator.kill()
    assert code == 0 and "L-1: already delivered, skipped" in "".join(operator.seen) + _drain(operator)
    assert read_span(writer.device, 0, 1 << 20) == bytes([STALE]) * (1 << 20)


def test_line_script_exits_non_zero_when_a_serial_was_not_delivered(
    make_golden: Callable[..., Path], pki: Path, loops: Loops, tmp_path: Path
) -> None:
    golden = make_golden(Scheme.MBR_EXTENDED, **SMALL)
    serials = tmp_path / "serials.txt"
    serials.write_text("N-1\n")
    writer = Writer(loops, tmp_path / "writer")
    operator = _line(golden, serials, writer.device, pki)
    try:
        operator.expect("waiting for a card")
        writer.put_in(golden.stat().st_size - 4096)
        operator.expect("FAILED N-1")
        operator.expect("waiting for a card")
        operator.proc.send_signal(signal.SIGINT)
        code, _ = operator.finish()
    finally:
        operator.kill()
    assert code == 1
    assert "1 devices failed and were not delivered: N-1" in _drain(operator)


def _drain(operator: Operator) -> str:
    text = []
    while not operator.lines.empty():
        text.append(operator.lines.get())
    return "".join(text)
