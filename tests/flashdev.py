"""Cards for the line station's tests: loop devices over files of stale bytes, and mounts, cleaned up always.

Only devices attached here (``losetup -f --show``) are detached here, so that
tests of other suites running at the same time keep theirs.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

from tests.conftest import IN_CI, need, tool

STALE = 0xA5
MIB = 1 << 20


def unavailable(message: str) -> NoReturn:
    """Skip for want of what the test needs; fail in CI (CI=true), whose machine must provide it."""
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def need_root() -> None:
    need("losetup", "mount", "umount")
    if os.geteuid() != 0:
        unavailable("the flashing tests need root (loop devices)")


def stale_file(path: Path, size: int) -> Path:
    """A file of ``size`` bytes of 0xA5: what a used card holds."""
    block = bytes([STALE]) * MIB
    with open(path, "wb") as handle:
        for _ in range(size // MIB):
            handle.write(block)
        handle.write(block[: size % MIB])
    return path


class Loops:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        # Undone in reverse order: a loop device over a file on a mount goes before the mount.
        self._undo: list[tuple[str, Path]] = []

    def attach(self, backing: Path, *options: str) -> Path:
        device = Path(tool("losetup", "-f", "--show", *options, backing).stdout.decode().strip())
        self._undo.append(("losetup", device))
        return device

    def card(self, size: int, name: str | None = None, *options: str) -> Path:
        """A loop device over a new file of ``size`` stale bytes."""
        name = name or f"card{len(self._undo)}.img"
        return self.attach(stale_file(self.tmp / name, size), *options)

    def mount(self, source: str | Path, where: Path, *options: str) -> Path:
        where.mkdir(parents=True, exist_ok=True)
        tool("mount", *options, source, where)
        self._undo.append(("umount", where))
        return where

    def close(self) -> None:
        while self._undo:
            kind, what = self._undo.pop()
            argv: list[str | Path] = ["umount", what] if kind == "umount" else ["losetup", "-d", what]
            tool(*argv, check=False)


def loop_devices(tmp_path: Path) -> Iterator[Loops]:
    """The body of each test module's ``loops`` fixture: cards made in ``tmp_path``, cleaned up always."""
    need_root()
    made = Loops(tmp_path)
    try:
        yield made
    finally:
        made.close()


def partitions(device: Path) -> list[dict[str, Any]]:
    """sfdisk's view of the partitions, each with its number."""
    table = json.loads(tool("sfdisk", "--json", device).stdout)["partitiontable"]
    parts: list[dict[str, Any]] = table["partitions"]
    for part in parts:
        part["number"] = int(re.search(r"(\d+)$", part["node"]).group(1))  # type: ignore[union-attr]
    return parts


def offset(device: Path, number: int) -> int:
    part = next(p for p in partitions(device) if p["number"] == number)
    return int(part["start"]) * 512


def debugfs(device: Path, number: int, request: str) -> str:
    return tool("debugfs", "-R", request, f"{device}?offset={offset(device, number)}").stdout.decode()


def read_span(device: Path, start: int, length: int) -> bytes:
    with open(device, "rb") as handle:
        handle.seek(start)
        return handle.read(length)
